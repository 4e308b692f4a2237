"""Validated, hashable configurations of the clipping methods.

Every method's options are a frozen dataclass checked in ``__post_init__``: a bad value
raises ``TypeError`` (wrong type) or ``ValueError`` (out of range) naming the option,
the value and the valid range. Configurations are hashable, so the optimizer classes
the factory makes can be cached per configuration.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from distclip._checks import is_int, is_real
from distclip.functional import DEFAULT_EPS, validate_norm_type

__all__ = [
    "NONFINITE_CHOICES",
    "ClipConfig",
    "check_choice",
    "check_int",
    "check_nonnegative_finite",
    "check_optional_bool",
    "check_positive_finite",
    "check_unit_interval",
]

#: What to do when the global norm is NaN or inf.
NONFINITE_CHOICES = ("skip", "error")

_C = TypeVar("_C", bound="ClipConfig")


def check_unit_interval(name: str, value: Any) -> float:
    """``value`` as a float in [0, 1], else ``TypeError``/``ValueError`` naming ``name``."""
    if not is_real(value):
        raise TypeError(f"{name} must be a real number in [0, 1], got {value!r}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return float(value)


def check_int(name: str, value: Any, *, minimum: int) -> int:
    """``value`` as an int >= ``minimum``, else ``TypeError``/``ValueError`` naming ``name``."""
    if not is_int(value):
        raise TypeError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_positive_finite(name: str, value: Any, *, allow_none: bool = False) -> float | None:
    """``value`` as a finite float > 0 (or ``None`` if allowed), else a typed error."""
    if value is None and allow_none:
        return None
    expected = "a positive finite number" + (" or None" if allow_none else "")
    if not is_real(value):
        raise TypeError(f"{name} must be {expected}, got {value!r}")
    if not (math.isfinite(float(value)) and float(value) > 0.0):
        raise ValueError(f"{name} must be {expected} (0 < {name} < inf), got {value!r}")
    return float(value)


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``, else a typed error listing them.

    ``TypeError`` when ``value`` is not a string, ``ValueError`` when it is another one.
    """
    listed = ", ".join(map(repr, choices))
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, one of {listed}; got {value!r}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {listed}; got {value!r}")
    return value


def check_nonnegative_finite(name: str, value: Any) -> float:
    """``value`` as a finite float >= 0, else ``TypeError``/``ValueError`` naming ``name``."""
    if not is_real(value):
        raise TypeError(f"{name} must be a finite number >= 0 (a real number), got {value!r}")
    if not (math.isfinite(float(value)) and float(value) >= 0.0):
        raise ValueError(f"{name} must be a finite number >= 0 (0 <= {name} < inf), got {value!r}")
    return float(value)


def check_optional_bool(name: str, value: Any) -> bool | None:
    """``value`` if it is ``True``, ``False`` or ``None``, else ``TypeError``."""
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"{name} must be True, False or None, got {value!r}")
    return value


@dataclass(frozen=True)
class ClipConfig:
    """Options every method takes.

    Attributes:
        norm_type: p of the global p-norm (default 2): every norm type torch's
            clipping accepts, as a number or a string (``"inf"``): p > 0, ``inf``,
            ``0`` (the number of non-zero elements), negative p and ``-inf`` (the
            smallest ``|g|``), each reduced across ranks as
            :func:`distclip.get_total_norm` does.
        nonfinite: ``"skip"`` (default) skips the update on every rank when the global
            norm is NaN/inf and keeps the norm out of the window; ``"error"`` raises
            :class:`distclip.NonFiniteNormError` on every rank instead (this reads the
            norm on the host: one synchronisation per step).
        eps: added to the norm in ``threshold / (norm + eps)`` (default 1e-6).
        foreach: use the foreach kernels (``None``: where the device supports them).
        check_every: debug: every this many steps, compare the clipper's state
            across ranks and raise :class:`distclip.RankDesyncError` on a mismatch
            (0, the default, never checks; a check is a collective and a sync).
        check_first_step: after the first step of a multi-process job, compare the
            state across ranks once (default ``True``): gradients in a layout
            distclip does not see (a model that is neither replicated by DDP nor
            sharded by FSDP/DTensor, pipeline stages without ``pipeline_groups``)
            give each rank a different norm, and this turns that silent error into
            a :class:`distclip.RankDesyncError`. One all-gather and one sync, once.
    """

    norm_type: float = 2.0
    nonfinite: str = "skip"
    eps: float = DEFAULT_EPS
    foreach: bool | None = None
    check_every: int = 0
    check_first_step: bool = True

    def __post_init__(self) -> None:
        self._set("norm_type", validate_norm_type(self.norm_type))
        check_choice("nonfinite", self.nonfinite, NONFINITE_CHOICES)
        self._set("eps", check_nonnegative_finite("eps", self.eps))
        check_optional_bool("foreach", self.foreach)
        check_int("check_every", self.check_every, minimum=0)
        if not isinstance(self.check_first_step, bool):
            raise TypeError(
                f"check_first_step must be True or False, got {self.check_first_step!r}"
            )

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """Every option this configuration accepts."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_options(cls: type[_C], method: str, options: Mapping[str, Any]) -> _C:
        """Build from keyword options; unknown names raise ``TypeError`` listing valid ones."""
        valid = cls.option_names()
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise TypeError(
                f"method {method!r} got unknown option(s) {', '.join(map(repr, unknown))}; "
                f"valid options: {', '.join(valid)}"
            )
        return cls(**options)

    def as_dict(self) -> dict[str, Any]:
        """The options as a plain dict (what is saved in a checkpoint)."""
        return dataclasses.asdict(self)
