"""What distclip's DeepSpeed adapter was verified with: the release, the optimizer wrappers.

The one place that imports ``deepspeed`` (only when the adapter is used). Why these and
what was checked in their source: ``docs/deepspeed.md``.
"""

from __future__ import annotations

import importlib
import re
import warnings
from typing import Any

__all__ = [
    "SUPPORTED_WRAPPERS",
    "VERIFIED_VERSIONS",
    "DeepSpeedVersionError",
    "check_version",
    "import_deepspeed",
    "wrapper_classes",
]

#: The DeepSpeed releases whose order of operations distclip has verified.
VERIFIED_VERSIONS = ">=0.19,<0.20"
_VERIFIED_MINOR = ((0, 19),)

#: Each verified optimizer wrapper and the module that defines it.
_WRAPPER_MODULES = {
    "DeepSpeedZeroOptimizer": "deepspeed.runtime.zero.stage_1_and_2",
    "DeepSpeedZeroOptimizer_Stage3": "deepspeed.runtime.zero.stage3",
    "BF16_Optimizer": "deepspeed.runtime.bf16_optimizer",
    "FP16_Optimizer": "deepspeed.runtime.fp16.fused_optimizer",
    "FP16_UnfusedOptimizer": "deepspeed.runtime.fp16.unfused_optimizer",
}

#: The DeepSpeed optimizer wrappers whose ``step()`` distclip has verified.
SUPPORTED_WRAPPERS: tuple[str, ...] = tuple(_WRAPPER_MODULES)

_warned_versions: set[str] = set()


class DeepSpeedVersionError(RuntimeError):
    """The installed DeepSpeed is outside the versions distclip's adapter was verified with."""


def import_deepspeed() -> Any:
    """``import deepspeed`` (only here, and only when the adapter is used)."""
    try:
        return importlib.import_module("deepspeed")
    except ImportError as exc:
        raise ImportError(
            "distclip.deepspeed needs DeepSpeed: pip install 'distclip[deepspeed]' "
            f"(verified with deepspeed{VERIFIED_VERSIONS})"
        ) from exc


def _is_verified(version: str) -> bool:
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        return False
    return (int(match.group(1)), int(match.group(2))) in _VERIFIED_MINOR


def check_version(allow_unverified: bool) -> str:
    """The installed DeepSpeed version; refuse (or warn once) outside the verified range.

    Raises:
        DeepSpeedVersionError: the version is not verified and ``allow_unverified`` is
            false.
    """
    version = str(getattr(import_deepspeed(), "__version__", "unknown"))
    if _is_verified(version):
        return version
    message = (
        f"distclip's DeepSpeed adapter relies on the order of operations inside DeepSpeed's "
        f"optimizer step (norm stored before the clip value is read), verified for deepspeed"
        f"{VERIFIED_VERSIONS}; the installed DeepSpeed is {version}."
    )
    if not allow_unverified:
        raise DeepSpeedVersionError(
            message + " Install a verified version (pip install 'distclip[deepspeed]'), or pass "
            "allow_unverified=True to use it anyway: distclip then still raises if a step "
            "finishes without reading its threshold, but cannot check everything else."
        )
    if version not in _warned_versions:
        _warned_versions.add(version)
        warnings.warn(
            message + " allow_unverified=True: using it anyway; check the thresholds "
            "(engine.distclip.last_clip) against engine.get_global_grad_norm().",
            RuntimeWarning,
            stacklevel=3,
        )
    return version


def wrapper_classes() -> dict[str, type]:
    """Each verified wrapper's name and class (imports their DeepSpeed modules)."""
    return {
        name: getattr(importlib.import_module(module), name)
        for name, module in _WRAPPER_MODULES.items()
    }
