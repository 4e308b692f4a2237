"""Method names to clipper classes: the one place a name is resolved."""

from __future__ import annotations

from typing import Any

import torch

from distclip.clippers.agc import AGC
from distclip.clippers.autoclip import AutoClip
from distclip.clippers.base import Clipper, ParamsLike
from distclip.clippers.elementwise import CoordinateWiseClip, LayerWiseClip, ValueClip
from distclip.clippers.norm import NormClip
from distclip.clippers.stochastic import (
    LinearStochAutoClip,
    LinearStochNormClip,
    QuadraticStochAutoClip,
    QuadraticStochNormClip,
)
from distclip.clippers.zclip import ZClip

__all__ = ["METHODS", "available_methods", "make_clipper", "resolve_method"]

#: Canonical names and aliases of the methods this version ships.
METHODS: dict[str, type[Clipper]] = {
    "norm": NormClip,
    "value": ValueClip,
    "autoclip": AutoClip,
    "auto_clip": AutoClip,
    "linear_stoch_norm": LinearStochNormClip,
    "quadratic_stoch_norm": QuadraticStochNormClip,
    "layer_wise": LayerWiseClip,
    "coordinate_wise": CoordinateWiseClip,
    "linear_stoch_autoclip": LinearStochAutoClip,
    "quadratic_stoch_autoclip": QuadraticStochAutoClip,
    "zclip": ZClip,
    "agc": AGC,
}


def available_methods() -> tuple[str, ...]:
    """Every accepted method name (aliases included), sorted."""
    return tuple(sorted(METHODS))


def resolve_method(method: str) -> type[Clipper]:
    """The clipper class of ``method``.

    Raises:
        TypeError: ``method`` is not a string (the valid names are listed).
        ValueError: an unknown name (the valid names are listed).
    """
    valid = ", ".join(available_methods())
    if not isinstance(method, str):
        raise TypeError(f"method must be a string, one of: {valid}; got {method!r}")
    if method not in METHODS:
        raise ValueError(f"unknown clipping method {method!r}; valid methods: {valid}")
    return METHODS[method]


def make_clipper(
    method: str,
    params: ParamsLike,
    *,
    model: torch.nn.Module | None = None,
    pipeline_groups: Any = None,
    **options: Any,
) -> Clipper:
    """Build the clipper of ``method`` over ``params`` with ``options``.

    ``model`` (the FSDP1 root) and ``pipeline_groups`` describe the layout; see
    :class:`~distclip.Clipper`.

    Raises:
        ValueError: unknown method or an option out of range.
        TypeError: a method that is not a string; an unknown option or a value of the
            wrong type.
    """
    return resolve_method(method)(params, model=model, pipeline_groups=pipeline_groups, **options)
