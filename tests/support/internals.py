"""Every distclip internal the tests reach, in one place.

The suites use the public API (``ClippedOptimizer``, ``attach``, ``make_clipper``,
``get_clipper``, the clipper's ``clip_`` / ``observe_`` / ``state_dict`` /
``check_consistency``, ``last_clip``, ``distclip.deepspeed``, the drop-ins and the
framework modules) and method *names*. What they must read beyond it (a reduction
plan's collectives, a DeepSpeed adapter's hook point, the section parser, a config
class, a method's state tensors) goes through this module, so that renaming an internal is one edit here.
Framework-side internals are imported lazily: importing this module imports no
framework.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

import distclip
from distclip.clippers import resolve_method
from distclip.clippers.stats import RECORD_FIELDS
from distclip.functional._grouping import use_foreach
from distclip.integrations import frameworks, metrics, wrappers
from distclip.integrations.binding import STATE_KEY
from distclip.reduction import ReductionPlan, collectives, get_layout, local_tensor
from distclip.window import NormWindow

__all__ = [
    "RECORD_FIELDS",
    "STATE_KEY",
    "NormWindow",
    "ReductionPlan",
    "clipper_class",
    "collectives",
    "config_class",
    "frameworks",
    "get_layout",
    "local_tensor",
    "metrics",
    "plan_of",
    "use_foreach",
    "wrappers",
]


def clipper_class(method: str) -> Callable[..., distclip.Clipper]:
    """What builds the clipper of ``method`` (aliases included) from ``(params, **options)``:
    its class, or ``make_clipper`` bound to the name where one class serves several names
    (the stochastic presets)."""
    spec = resolve_method(method)
    if not spec.preset:
        return spec.clipper_cls
    return functools.partial(distclip.make_clipper, spec.name)


def config_class(method: str) -> type[Any]:
    """The configuration class of ``method`` (what ``from_options`` builds)."""
    return resolve_method(method).config_cls


def canonical_method(method: str) -> str:
    """The registered name ``method`` (an alias) stands for."""
    return resolve_method(method).name


def plan_of(clipper: distclip.Clipper) -> Any:
    """The reduction plan a clipper built at construction (collectives, describe())."""
    return clipper.plan  # type: ignore[attr-defined]


def build_plan(params: Any, **layout: Any) -> Any:
    """A reduction plan of ``params`` with the layout keywords of the clippers."""
    return ReductionPlan.build(params, **layout)


def state_tensors(clipper: distclip.Clipper) -> list[torch.Tensor]:
    """The clipper's state tensors (window, EMA, counters), in its own order."""
    return list(clipper.state.tensors())


# --------------------------------------------------------------------- DeepSpeed
def fragment_collectives(engine: Any) -> int | None:
    """The all-reduces the per-unit clip (layer_wise / agc over DeepSpeed's partitions)
    issued on ``engine``, read off its step pre-hook on the inner optimizer; ``None``
    where there is no such hook (ZeRO 0 in fp32)."""
    inner = getattr(engine.optimizer, "optimizer", None) if engine.distclip.wrapper else None
    hooks = getattr(inner, "_optimizer_step_pre_hooks", {}).values()
    clips = [hook.apply for hook in hooks if hasattr(hook, "apply")]
    return clips[0].collectives if clips else None


def parse_deepspeed_section(section: Any) -> Any:
    """The DeepSpeed config's ``"distclip"`` section, validated (a ``ClipSection``)."""
    from distclip.integrations.deepspeed import parse_section

    return parse_section(section)


def read_deepspeed_section(config: Any) -> Any:
    """The validated ``"distclip"`` section of a DeepSpeed config (dict, path, base64)."""
    from distclip.integrations.deepspeed import read_section

    return read_section(config)


def deepspeed_methods() -> tuple[str, ...]:
    """The method names that work under DeepSpeed."""
    from distclip.integrations.deepspeed import deepspeed_methods

    return tuple(deepspeed_methods())


def load_deepspeed_config(config: Any) -> dict[str, Any]:
    """A DeepSpeed config as a dict, read as ``deepspeed.initialize`` reads it."""
    from distclip.integrations.deepspeed._config import load_deepspeed_config

    return load_deepspeed_config(config)


def deepspeed_config_from_arguments(arguments: dict[str, Any]) -> Any:
    """Where ``deepspeed.initialize``'s arguments hold the config (as it looks)."""
    from distclip.integrations.deepspeed._config import config_from_arguments

    return config_from_arguments(arguments)


def deepspeed_version_verified(version: str) -> bool:
    """Whether distclip has verified DeepSpeed ``version``."""
    from distclip.integrations.deepspeed import _verified

    return bool(_verified._is_verified(version))


def forget_warned_deepspeed_versions(monkeypatch: Any) -> None:
    """Forget (for one test) which unverified DeepSpeed versions were warned about."""
    from distclip.integrations.deepspeed import _verified

    monkeypatch.setattr(_verified, "_warned_versions", set())


def deepspeed_supported_wrappers() -> tuple[str, ...]:
    """The DeepSpeed optimizer wrappers distclip drives."""
    from distclip.integrations.deepspeed import SUPPORTED_WRAPPERS

    return tuple(SUPPORTED_WRAPPERS)


def deepspeed_wrapper_modules() -> dict[str, Any]:
    """The DeepSpeed modules each supported wrapper is looked up in."""
    from distclip.integrations.deepspeed import _verified

    return dict(_verified._WRAPPER_MODULES)


def optimizer_config(optimizer_cls: type[Any]) -> Any:
    """The validated clipping configuration a distclip optimizer class was built with."""
    return optimizer_cls._distclip_config
