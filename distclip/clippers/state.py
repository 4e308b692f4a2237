"""What a method remembers between steps: one object, saved in the clipper's checkpoints.

A method keeps its state in a :class:`MethodState` (the default holds nothing). The
clipper saves it under ``state_dict()["state"]``, validates it before loading, resets
and fingerprints it, without knowing what is inside.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from distclip.window import NormWindow

__all__ = ["MethodState", "WindowState"]


class MethodState:
    """A method's state between steps; the base class holds none.

    Subclasses keep tensors on the clipper's device and implement the methods below;
    every method of a subclass may read tensors on the host except
    :meth:`finite_count` (a load or a check is not on the hot path).
    """

    def state_dict(self) -> dict[str, Any]:
        """The state as tensors, numbers and strings (``torch.load(weights_only=True)``)."""
        return {}

    def validate_state_dict(self, state: dict[str, Any]) -> None:
        """Raise ``ValueError`` if ``state`` (from :meth:`state_dict`) does not fit here."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a state that passed :meth:`validate_state_dict`."""

    def reset(self) -> None:
        """Forget what was learnt."""

    def tensors(self) -> list[Tensor]:
        """The tensors compared across ranks by ``Clipper.check_consistency``."""
        return []

    def finite_count(self) -> Tensor | None:
        """The count of finite norms this state keeps anyway (0-dim int64), if it keeps one.

        The clipper then derives ``num_skipped`` from it instead of counting twice.
        """
        return None

    @staticmethod
    def saved_finite_count(state: dict[str, Any]) -> int | None:
        """:meth:`finite_count` of a validated saved ``state``."""
        return None


class WindowState(MethodState):
    """A :class:`~distclip.window.NormWindow` of past norms, saved as ``{"window": ...}``."""

    def __init__(self, size: int, *, device: torch.device, dtype: torch.dtype) -> None:
        self.window = NormWindow(size, device=device, dtype=dtype)

    def state_dict(self) -> dict[str, Any]:
        return {"window": self.window.state_dict()}

    def validate_state_dict(self, state: dict[str, Any]) -> None:
        window = state.get("window")
        if not isinstance(window, dict):
            raise ValueError(f"an autoclip state must hold a 'window' dict, got {window!r:.80}")
        self.window.validate_state_dict(window)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window.load_state_dict(state["window"])

    def reset(self) -> None:
        self.window.reset()

    def tensors(self) -> list[Tensor]:
        return [self.window.values, self.window.num_seen]

    def finite_count(self) -> Tensor | None:
        return self.window.num_seen

    @staticmethod
    def saved_finite_count(state: dict[str, Any]) -> int | None:
        return int(state["window"]["num_seen"])
