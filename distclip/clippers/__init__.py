"""Stateful clipping policies: a rule, how it is applied, and its state.

Two kinds (:mod:`distclip.clippers.kinds`); each method is one class in its own module,
registered with :func:`register_method` (importing this package registers them all).
"""

from distclip.clippers.agc import AGC, AGCConfig
from distclip.clippers.autoclip import AutoClip, AutoClipConfig
from distclip.clippers.base import Clipper
from distclip.clippers.config import ClipConfig
from distclip.clippers.kinds import Decision, GlobalFactorClipper, PiecewiseClipper, Units
from distclip.clippers.layer_wise import LayerWiseClip, LayerWiseConfig
from distclip.clippers.norm import NormClip, NormClipConfig
from distclip.clippers.params import ParamsLike, as_param_list
from distclip.clippers.pieces import Pieces, PlanPieces
from distclip.clippers.registry import (
    METHODS,
    MethodSpec,
    available_methods,
    make_clipper,
    register_method,
    resolve_method,
    validate_options,
)
from distclip.clippers.state import MethodState, WindowState
from distclip.clippers.stats import ClipStats
from distclip.clippers.stochastic import StochasticClip, StochAutoClipConfig, StochNormConfig
from distclip.clippers.value import ValueClip, ValueConfig
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
    "Decision",
    "GlobalFactorClipper",
    "LayerWiseClip",
    "LayerWiseConfig",
    "MethodSpec",
    "MethodState",
    "NormClip",
    "NormClipConfig",
    "ParamsLike",
    "Pieces",
    "PiecewiseClipper",
    "PlanPieces",
    "StochAutoClipConfig",
    "StochNormConfig",
    "StochasticClip",
    "Units",
    "ValueClip",
    "ValueConfig",
    "WindowState",
    "ZClip",
    "ZClipConfig",
    "as_param_list",
    "available_methods",
    "make_clipper",
    "register_method",
    "resolve_method",
    "validate_options",
]
