"""Stateful clipping policies: a threshold rule, how it is applied, and its state."""

from distclip.clippers.autoclip import AutoClip, AutoClipConfig
from distclip.clippers.base import Clipper, ParamsLike, as_param_list
from distclip.clippers.config import ClipConfig
from distclip.clippers.norm import NormClip, NormClipConfig
from distclip.clippers.registry import (
    METHODS,
    available_methods,
    make_clipper,
    resolve_method,
)
from distclip.clippers.stats import ClipStats

__all__ = [
    "METHODS",
    "AutoClip",
    "AutoClipConfig",
    "ClipConfig",
    "ClipStats",
    "Clipper",
    "NormClip",
    "NormClipConfig",
    "ParamsLike",
    "as_param_list",
    "available_methods",
    "make_clipper",
    "resolve_method",
]
