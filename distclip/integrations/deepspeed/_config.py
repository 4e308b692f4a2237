"""The ``"distclip"`` section of a DeepSpeed config: where it is found, and its validation.

A DeepSpeed config is a dict, a path to a JSON (hjson) file, or a base64-encoded JSON
string (the three forms ``deepspeed.initialize`` accepts). distclip reads one top-level
section of it::

    {"train_micro_batch_size_per_gpu": 4, ...,
     "distclip": {"method": "autoclip", "q": 0.1, "window": 200, "max_norm": 5.0}}

``method`` (default ``"autoclip"``) and the options are exactly those of
:func:`distclip.ClippedOptimizer`, for the methods of :func:`deepspeed_methods`.
DeepSpeed itself ignores unknown top-level keys, so the section can stay in the config
it is given. Nothing here imports ``deepspeed``.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from distclip.clippers import METHODS, ClipConfig, MethodSpec, resolve_method

__all__ = [
    "DEFAULT_METHOD",
    "SECTION_KEY",
    "ClipSection",
    "config_from_arguments",
    "deepspeed_methods",
    "load_deepspeed_config",
    "parse_section",
    "piecewise_unit",
    "read_section",
]

#: The top-level key of the DeepSpeed config that distclip reads.
SECTION_KEY = "distclip"

#: The method used when the section (or its ``"method"``) is missing.
DEFAULT_METHOD = "autoclip"

#: The norm DeepSpeed computes (L2) and the eps it adds in ``min(1, c / (n + eps))``.
_DEEPSPEED_NORM_TYPE = 2.0
_DEEPSPEED_EPS = 1e-6


def deepspeed_methods() -> tuple[str, ...]:
    """The method names (aliases included) that work under DeepSpeed, sorted: all of them.

    Every kind has its way in: a global-factor method (``norm``, ``autoclip``,
    ``zclip``, the stochastic family) is driven by DeepSpeed's own norm; a piecewise
    one clips DeepSpeed's fp32 partitions in the inner optimizer step (element units:
    ``value``, ``coordinate_wise``, exact on any partition; tensor and row units:
    ``layer_wise``, ``agc``, their norms reduced over the partitions).
    """
    return tuple(sorted(name for name, spec in METHODS.items() if spec.clipper_cls.kind in _KINDS))


#: The clipper kinds the adapter knows how to drive.
_KINDS = ("global", "piecewise")


def piecewise_unit(spec: MethodSpec) -> str | None:
    """The unit of a piecewise method (``"element"``, ``"tensor"``, ``"row"``); ``None`` else.

    What the adapter needs to know of a method: a global-factor one clips by DeepSpeed's
    norm; a piecewise one clips the fp32 partitions in the inner optimizer step, and
    needs the partitions' layout unless its units are elements.
    """
    cls = spec.clipper_cls
    return getattr(cls, "unit", None) if cls.kind == "piecewise" else None


@dataclass(frozen=True)
class ClipSection:
    """A validated ``"distclip"`` section.

    Attributes:
        method: the method name as given (an alias stays an alias).
        options: the options as given (everything but ``"method"``).
        config: the method's validated configuration.
        present: False when the DeepSpeed config had no section (defaults are used).
    """

    method: str
    options: dict[str, Any] = field(default_factory=dict)
    config: ClipConfig = field(default_factory=ClipConfig)
    present: bool = True

    @property
    def spec(self) -> MethodSpec:
        """The registered method of :attr:`method`."""
        return resolve_method(self.method)

    @property
    def elementwise(self) -> bool:
        """A piecewise method with element units (``value``, ``coordinate_wise``)."""
        return piecewise_unit(self.spec) == "element"

    @property
    def per_unit(self) -> bool:
        """A piecewise method with tensor or row units (``layer_wise``, ``agc``)."""
        return piecewise_unit(self.spec) in ("tensor", "row")


def parse_section(
    section: Any, *, where: str = "the DeepSpeed config's 'distclip' section"
) -> ClipSection:
    """Validate a ``"distclip"`` section (``None``: no section, the defaults).

    Args:
        section: the section: a mapping with an optional ``"method"`` and the method's
            options, or ``None``.
        where: how error messages name the section.

    Raises:
        TypeError: the section is not a mapping (JSON object); ``method`` is not a
            string; an unknown option or an option of the wrong type.
        ValueError: an unknown method; an option out of range; ``norm_type`` other
            than 2, or ``eps`` other than 1e-6 for a norm-driven method (DeepSpeed's
            norm and eps are fixed).
        NotImplementedError: a method DeepSpeed cannot drive (none of the registered
            ones today).
    """
    present = section is not None
    if section is None:
        section = {}
    if not isinstance(section, Mapping):
        raise TypeError(
            f"{where} must be a dict (a JSON object) such as "
            f'{{"method": "autoclip", "q": 0.1, "window": 200}}, got {type(section).__name__} '
            f"{section!r:.80}"
        )
    options = dict(section)
    method = options.pop("method", DEFAULT_METHOD)
    if not isinstance(method, str):
        raise TypeError(f"{where}: method must be a string, got {method!r}")
    try:
        spec = resolve_method(method)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from exc
    kind = spec.clipper_cls.kind
    # A piecewise method applies its own eps (AGC's is a weight floor), not DeepSpeed's.
    own_eps = kind == "piecewise"
    if kind not in _KINDS:
        raise NotImplementedError(
            f"{where}: method {method!r} is not supported under DeepSpeed. Methods that "
            f"work under DeepSpeed: {', '.join(deepspeed_methods())}"
        )
    try:
        config = spec.config_cls.from_options(method, options)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{where}: {exc}") from exc
    if config.norm_type != _DEEPSPEED_NORM_TYPE:
        raise ValueError(
            f"{where}: norm_type must be 2 under DeepSpeed (DeepSpeed computes the L2 norm), "
            f"got {config.norm_type!r}"
        )
    if config.eps != _DEEPSPEED_EPS and not own_eps:
        raise ValueError(
            f"{where}: eps must be {_DEEPSPEED_EPS} under DeepSpeed (DeepSpeed's clip "
            f"coefficient min(1, threshold / (norm + 1e-6)) has it built in), got {config.eps!r}"
        )
    return ClipSection(method=method, options=options, config=config, present=present)


def read_section(config: Any) -> ClipSection:
    """The validated ``"distclip"`` section of a DeepSpeed config (dict, path or base64).

    A config without the section gives the defaults (``autoclip``, ``present=False``).

    Raises:
        TypeError, ValueError, NotImplementedError: see :func:`parse_section`; also a
            config that cannot be read.
    """
    return parse_section(load_deepspeed_config(config).get(SECTION_KEY))


def load_deepspeed_config(config: Any) -> dict[str, Any]:
    """The DeepSpeed config as a dict, read as ``deepspeed.initialize`` reads it.

    Args:
        config: a dict, a path (``str`` or ``os.PathLike``) to a JSON/hjson file, or a
            base64-encoded JSON string.

    Raises:
        TypeError: ``config`` is none of those.
        ValueError: the file or string does not hold a JSON object.
    """
    if isinstance(config, Mapping):
        return dict(config)
    if isinstance(config, os.PathLike) or (isinstance(config, str) and os.path.exists(config)):
        with open(config, encoding="utf-8") as handle:
            text = handle.read()
        source = f"the DeepSpeed config file {os.fspath(config)!r}"
    elif isinstance(config, str):
        try:
            text = base64.urlsafe_b64decode(config).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
            raise ValueError(
                "config must be a dict, a path to an existing DeepSpeed config file or a "
                f"base64-encoded JSON string; {config!r:.80} is none of those"
            ) from exc
        source = "the base64-encoded DeepSpeed config"
    else:
        raise TypeError(
            f"config must be a dict or a path to a DeepSpeed config file, got {type(config).__name__}"
        )
    loaded = _parse_json(text, source)
    if not isinstance(loaded, dict):
        raise ValueError(f"{source} must hold a JSON object, got {type(loaded).__name__}")
    return loaded


def _parse_json(text: str, source: str) -> Any:
    """JSON (hjson when it is installed, as DeepSpeed reads its configs)."""
    try:
        import hjson  # type: ignore[import-untyped,import-not-found,unused-ignore]
    except ImportError:
        hjson = None
    try:
        if hjson is not None:
            return hjson.loads(text)
        return json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{source} is not valid JSON: {exc}") from exc


def config_from_arguments(arguments: Mapping[str, Any]) -> Any:
    """The config ``deepspeed.initialize`` will use, from its bound arguments.

    ``config``, else ``config_params``, else ``args.deepspeed_config`` (or the
    deprecated ``args.deepscale_config``); ``None`` when none is given.
    """
    config = arguments.get("config")
    if config is None:
        config = arguments.get("config_params")
    if config is None:
        args = arguments.get("args")
        for name in ("deepspeed_config", "deepscale_config"):
            value = getattr(args, name, None)
            if value is not None:
                return value
    return config
