"""Checks of user input shared by every layer (no torch.distributed, no state)."""

from __future__ import annotations

import numbers
from typing import Any, TypeGuard

from torch import Tensor

__all__ = ["is_int", "is_positive_real", "is_real", "refuse_meta"]


def is_real(value: Any) -> TypeGuard[int | float]:
    """True for a real number that is not a ``bool`` (``True`` is no number here)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_int(value: Any) -> TypeGuard[int]:
    """True for an ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_positive_real(value: Any) -> TypeGuard[int | float]:
    """:func:`is_real` and ``> 0`` (NaN is not)."""
    return is_real(value) and value > 0


def refuse_meta(name: str, tensor: Tensor, fix: str = "") -> None:
    """``ValueError`` naming ``name`` when ``tensor`` is on the meta device (it holds no data).

    ``fix`` (e.g. ``"; load a checkpoint with real tensors"``) ends the message.
    """
    if tensor.is_meta:
        raise ValueError(f"{name} is on the meta device and holds no data{fix}")
