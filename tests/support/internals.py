"""Every distclip internal the tests reach, in one place.

The suites use the public API (``ClippedOptimizer``, ``attach``, ``make_clipper``,
``get_clipper``, the clipper's ``clip_`` / ``observe_`` / ``state_dict`` /
``check_consistency``, ``last_clip``, ``distclip.deepspeed``, the drop-ins and the
framework modules) and method *names*. What they must read beyond it (a reduction
plan's collectives, a DeepSpeed adapter's hook point, the section parser, a config
class) goes through this module, so that renaming an internal is one edit here.
Framework-side internals are imported lazily: importing this module imports no
framework.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch

import distclip
from distclip.clippers import resolve_method
from distclip.clippers.stats import RECORD_FIELDS
from distclip.reduction import ReductionPlan
from distclip.window import NormWindow

__all__ = [
    "RECORD_FIELDS",
    "NormWindow",
    "ReductionPlan",
    "clipper_class",
    "collectives_module",
    "config_class",
    "plan_of",
]


def clipper_class(method: str) -> type[distclip.Clipper]:
    """The clipper class registered under ``method`` (aliases included)."""
    return resolve_method(method)


def config_class(method: str) -> type[Any]:
    """The configuration class of ``method`` (what ``from_options`` builds)."""
    return clipper_class(method).config_cls  # type: ignore[no-any-return]


def canonical_method(method: str) -> str:
    """The registered name ``method`` (an alias) stands for."""
    return clipper_class(method).method


def collectives_module() -> ModuleType:
    """The module distclip issues its collectives from (its ``dist`` is counted)."""
    from distclip.reduction import collectives

    return collectives


def plan_of(clipper: distclip.Clipper) -> Any:
    """The reduction plan a clipper built at construction (collectives, describe())."""
    return clipper.plan  # type: ignore[attr-defined]


def build_plan(params: Any, **layout: Any) -> Any:
    """A reduction plan of ``params`` with the layout keywords of the clippers."""
    return ReductionPlan.build(params, **layout)


def state_tensors(clipper: distclip.Clipper) -> list[torch.Tensor]:
    """The clipper's state tensors (window, EMA, counters), in its own order."""
    return list(clipper._state_tensors())  # type: ignore[attr-defined]
