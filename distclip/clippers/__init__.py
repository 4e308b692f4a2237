"""Stateful clipping policies: a threshold rule, how it is applied, and its state."""

from distclip.clippers.agc import AGC, AGCConfig
from distclip.clippers.autoclip import AutoClip, AutoClipConfig
from distclip.clippers.base import Clipper, ParamsLike, as_param_list
from distclip.clippers.config import ClipConfig
from distclip.clippers.elementwise import (
    CoordinateWiseClip,
    LayerWiseClip,
    LayerWiseConfig,
    ValueClip,
    ValueConfig,
)
from distclip.clippers.norm import NormClip, NormClipConfig
from distclip.clippers.registry import (
    METHODS,
    available_methods,
    make_clipper,
    resolve_method,
)
from distclip.clippers.stats import ClipStats
from distclip.clippers.stochastic import (
    LinearStochAutoClip,
    LinearStochNormClip,
    QuadraticStochAutoClip,
    QuadraticStochNormClip,
    StochAutoClipConfig,
    StochNormConfig,
)
from distclip.clippers.zclip import ZClip, ZClipConfig

__all__ = [
    "AGC",
    "METHODS",
    "AGCConfig",
    "AutoClip",
    "AutoClipConfig",
    "ClipConfig",
    "ClipStats",
    "Clipper",
    "CoordinateWiseClip",
    "LayerWiseClip",
    "LayerWiseConfig",
    "LinearStochAutoClip",
    "LinearStochNormClip",
    "NormClip",
    "NormClipConfig",
    "ParamsLike",
    "QuadraticStochAutoClip",
    "QuadraticStochNormClip",
    "StochAutoClipConfig",
    "StochNormConfig",
    "ValueClip",
    "ValueConfig",
    "ZClip",
    "ZClipConfig",
    "as_param_list",
    "available_methods",
    "make_clipper",
    "resolve_method",
]
