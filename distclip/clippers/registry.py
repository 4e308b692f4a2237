"""Method names to clipper classes: a method is registered once, by its class.

::

    @register_method("norm", config=NormClipConfig, class_prefix="NormClipped")
    class NormClip(GlobalFactorClipper): ...

Everything else follows from the registration: :func:`make_clipper`, the optimizer
classes of :func:`distclip.ClippedOptimizer` (named ``<class_prefix><Optimizer>``),
:func:`distclip.attach`, the DeepSpeed config section, the framework integrations and
:func:`available_methods`. One class may serve several names, each with its own
``preset`` of constructor arguments (the four stochastic methods are one class).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from distclip.clippers.config import ClipConfig

if TYPE_CHECKING:
    from distclip.clippers.base import Clipper
    from distclip.clippers.params import ParamsLike

__all__ = [
    "METHODS",
    "MethodSpec",
    "available_methods",
    "make_clipper",
    "register_method",
    "resolve_method",
    "validate_options",
]

_C = TypeVar("_C", bound="type[Clipper]")


@dataclass(frozen=True)
class MethodSpec:
    """One registered method name.

    Attributes:
        name: the canonical name (saved in checkpoints).
        clipper_cls: the clipper class.
        config_cls: the dataclass of the user's options.
        class_prefix: prefix of the optimizer classes made for it (``AutoClippedAdamW``).
        preset: constructor arguments this name fixes (not user options).
        aliases: other accepted names.
    """

    name: str
    clipper_cls: type[Clipper]
    config_cls: type[ClipConfig]
    class_prefix: str
    preset: Mapping[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()

    def config(self, options: Mapping[str, Any]) -> ClipConfig:
        """The validated configuration of ``options`` (see :meth:`ClipConfig.from_options`)."""
        return self.config_cls.from_options(self.name, options)

    def __hash__(self) -> int:
        return hash((self.name, self.clipper_cls))


#: Every accepted method name (aliases included) and its specification.
METHODS: dict[str, MethodSpec] = {}


def register_method(
    name: str,
    *,
    config: type[ClipConfig],
    class_prefix: str | None = None,
    aliases: tuple[str, ...] = (),
    **preset: Any,
) -> Callable[[_C], _C]:
    """Class decorator: register the decorated clipper class as method ``name``.

    Args:
        name: the method name (also what checkpoints record), unique.
        config: the configuration dataclass of its options (a :class:`ClipConfig`).
        class_prefix: prefix of the optimizer classes made for it (default:
            ``"<Name>Clipped"``, e.g. ``"ToyClipped"`` for ``"toy"``).
        aliases: other names that resolve to it.
        **preset: constructor arguments this name fixes (one class, several names).

    Raises:
        ValueError: ``name`` or an alias is registered already.
        TypeError: ``config`` is not a :class:`ClipConfig` subclass.
    """
    if not (isinstance(config, type) and issubclass(config, ClipConfig)):
        raise TypeError(f"config must be a subclass of distclip ClipConfig, got {config!r}")
    taken = [n for n in (name, *aliases) if n in METHODS]
    if taken:
        raise ValueError(f"method name(s) {', '.join(map(repr, taken))} are registered already")

    def register(cls: _C) -> _C:
        prefix = class_prefix or "".join(part.title() for part in name.split("_")) + "Clipped"
        spec = MethodSpec(name, cls, config, prefix, dict(preset), tuple(aliases))
        for key in (name, *aliases):
            METHODS[key] = spec
        return cls

    return register


def available_methods() -> tuple[str, ...]:
    """Every accepted method name (aliases included), sorted."""
    return tuple(sorted(METHODS))


def resolve_method(method: str) -> MethodSpec:
    """The specification of ``method``.

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


def validate_options(method: str, options: Mapping[str, Any]) -> tuple[MethodSpec, ClipConfig]:
    """``(spec, config)`` of ``method`` with ``options``: what an integration checks early.

    Error messages name ``method`` as given (an alias stays an alias).

    Raises:
        TypeError, ValueError: as :func:`resolve_method` and :meth:`ClipConfig.from_options`.
    """
    spec = resolve_method(method)
    return spec, spec.config_cls.from_options(method, options)


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
    spec, config = validate_options(method, options)
    return spec.clipper_cls.from_config(
        params, config, spec=spec, model=model, pipeline_groups=pipeline_groups
    )
