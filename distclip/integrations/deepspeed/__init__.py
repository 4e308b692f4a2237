"""distclip under DeepSpeed: the engine adapter behind ``distclip.deepspeed``.

:func:`initialize` wraps ``deepspeed.initialize`` and reads the top-level ``"distclip"``
section of the DeepSpeed config, validated before DeepSpeed starts; :func:`attach`
hooks an engine built by other code (HF Trainer, Accelerate). Either way the adapter is
``engine.distclip`` (:class:`DeepSpeedClipAdapter`), driven by DeepSpeed's own norm (no
second pass over the gradients, no extra collective), and the clipper's state travels
in the engine checkpoint's ``client_state``.

The modules, one concern each: ``_verified`` (the verified release and wrappers, the
one ``import deepspeed``), ``_config`` (the section), ``_plan`` (the hook point) and
``_refusals`` (what is refused), ``_wrapper_hook`` (a wrapper's ``clip_grad``),
``_inner_step`` (the inner optimizer's step pre-hook), ``_partitions`` (the layouts of
the flat fp32 partitions), ``_zero0`` (ZeRO 0 in fp32), ``_adapter`` (the object users
hold). How each wrapper is hooked, what was verified in DeepSpeed's source and what is
refused: ``docs/deepspeed.md``.

``import distclip`` does not import DeepSpeed; this package imports it only when one of
its functions is called.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

from distclip.clippers import make_clipper
from distclip.integrations.binding import OptimizerBinding
from distclip.integrations.deepspeed._adapter import STATE_KEY, DeepSpeedClipAdapter
from distclip.integrations.deepspeed._config import (
    DEFAULT_METHOD,
    SECTION_KEY,
    ClipSection,
    config_from_arguments,
    deepspeed_methods,
    parse_section,
    read_section,
)
from distclip.integrations.deepspeed._installed import InstalledHook
from distclip.integrations.deepspeed._plan import ENGINE_CLAMP_HOOK, ENGINE_HOOK, plan_hook
from distclip.integrations.deepspeed._verified import (
    SUPPORTED_WRAPPERS,
    VERIFIED_VERSIONS,
    DeepSpeedVersionError,
    check_version,
    import_deepspeed,
)

__all__ = [
    "DEFAULT_METHOD",
    "ENGINE_CLAMP_HOOK",
    "ENGINE_HOOK",
    "SECTION_KEY",
    "STATE_KEY",
    "SUPPORTED_WRAPPERS",
    "VERIFIED_VERSIONS",
    "ClipSection",
    "DeepSpeedClipAdapter",
    "DeepSpeedVersionError",
    "attach",
    "deepspeed_methods",
    "get_adapter",
    "initialize",
    "parse_section",
    "plan_hook",
    "read_section",
]

logger = logging.getLogger(__name__)


def _engine_section(engine: Any) -> ClipSection:
    """The ``"distclip"`` section of the config the engine was built with."""
    param_dict = getattr(getattr(engine, "_config", None), "_param_dict", None)
    if isinstance(param_dict, dict):
        return parse_section(param_dict.get(SECTION_KEY))
    config = getattr(engine, "config", None)
    if config is None:
        return parse_section(None)
    return read_section(config)


def get_adapter(engine: Any) -> DeepSpeedClipAdapter:
    """``engine.distclip``, typed.

    Raises:
        ValueError: distclip is not attached to ``engine``.
    """
    adapter = getattr(engine, "__dict__", {}).get("distclip")
    if not isinstance(adapter, DeepSpeedClipAdapter):
        raise ValueError(
            "this DeepSpeed engine does not clip with distclip; build it with "
            "distclip.deepspeed.initialize(...) or call distclip.deepspeed.attach(engine)"
        )
    return adapter


def _attach_section(
    engine: Any, section: ClipSection, *, allow_unverified: bool
) -> DeepSpeedClipAdapter:
    check_version(allow_unverified)
    if isinstance(getattr(engine, "__dict__", {}).get("distclip"), DeepSpeedClipAdapter):
        raise ValueError(
            "this DeepSpeed engine already clips with distclip (engine.distclip); call "
            "engine.distclip.remove() before attaching another"
        )
    spec = section.spec
    # Refuses before any change.
    plan = plan_hook(engine, allow_unverified=allow_unverified, spec=spec)
    params = [p for p in engine.module.parameters() if p.requires_grad] or list(
        engine.module.parameters()
    )
    clipper = make_clipper(section.method, params, **section.options)
    adapter = DeepSpeedClipAdapter(
        engine, clipper, section, wrapper=plan.wrapper, hook_point=plan.hook_point
    )
    first = [plan]

    def install() -> InstalledHook:
        current = (
            first.pop()
            if first
            else plan_hook(engine, allow_unverified=allow_unverified, spec=spec)
        )
        binding = OptimizerBinding(clipper, engine.optimizer) if current.wrapper is None else None
        return current.install(adapter.observe, binding, clipper)

    adapter._set_hook(install)
    adapter._wrap_checkpointing()
    clipping = getattr(getattr(engine, "_config", None), "gradient_clipping", 0.0)
    if isinstance(clipping, (int, float)) and clipping > 0.0 and clipping != float("inf"):
        logger.info(
            "distclip: %s replaces DeepSpeed's gradient_clipping=%s on this engine",
            section.method,
            clipping,
        )
    engine.distclip = adapter
    return adapter


def attach(
    engine: Any,
    method: str | None = None,
    *,
    allow_unverified: bool = False,
    **options: Any,
) -> DeepSpeedClipAdapter:
    """Clip an existing DeepSpeed engine's gradients with distclip (see ``docs/deepspeed.md``).

    For engines built by other code (HF Trainer, Accelerate). Call it before the first
    optimizer step. Without ``method`` and options, the ``"distclip"`` section of the
    engine's DeepSpeed config is used (the defaults, ``autoclip``, without one)::

        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
        distclip.deepspeed.attach(engine)                     # the config's section
        distclip.deepspeed.attach(engine, "autoclip", q=0.2)  # or explicit options

    With Accelerate the engine is the model ``accelerator.prepare`` returns; with the HF
    Trainer it is ``trainer.model_wrapped`` once training has started. Their own
    checkpoints are loaded before user code runs again, so attach through
    :func:`distclip.accelerate.attach` / :func:`distclip.hf.attach` instead: they call
    this right after ``deepspeed.initialize``, before any checkpoint is loaded.

    Args:
        engine: a ``deepspeed.DeepSpeedEngine``.
        method: a method name (see :func:`deepspeed_methods`).
        allow_unverified: use a DeepSpeed version, or a subclass of a supported optimizer
            wrapper, that distclip has not verified (with a warning) instead of refusing.
        **options: the method's options, as for :func:`distclip.ClippedOptimizer`.

    Returns:
        The adapter, also set as ``engine.distclip``.

    Raises:
        TypeError: ``engine`` is not a DeepSpeed engine; an unknown option or one of the
            wrong type; a section that is not a dict.
        ValueError: an unknown method or an option out of range; already attached.
        NotImplementedError: an optimizer wrapper / precision distclip has not
            verified; (``value``, ``coordinate_wise``, ``layer_wise``, ``agc``) a wrapper
            configuration where the inner optimizer step does not update from the
            clipped ``.grad``; (``layer_wise``, ``agc``) model parallelism or ZeRO 3
            with NVMe offload: the refusal table of ``docs/deepspeed.md``.
        DeepSpeedVersionError: an unverified DeepSpeed without ``allow_unverified``.
    """
    if method is None and not options:
        section = _engine_section(engine)
    else:
        section = parse_section(
            {"method": method or DEFAULT_METHOD, **options}, where="distclip.deepspeed.attach()"
        )
    return _attach_section(engine, section, allow_unverified=allow_unverified)


def initialize(*args: Any, allow_unverified: bool = False, **kwargs: Any) -> Any:
    """``deepspeed.initialize`` with distclip attached to the engine it returns.

    Takes exactly the arguments of ``deepspeed.initialize`` and returns what it returns
    (``engine, optimizer, dataloader, lr_scheduler``). The ``"distclip"`` section of the
    config (``config=``, ``config_params=`` or ``args.deepspeed_config``) is validated
    before DeepSpeed starts; without one, ``autoclip`` with its defaults is used.

    Args:
        *args, **kwargs: what ``deepspeed.initialize`` takes.
        allow_unverified: see :func:`attach`.

    Raises:
        TypeError, ValueError, NotImplementedError, DeepSpeedVersionError: as
            :func:`attach`, before ``deepspeed.initialize`` runs for a bad section or
            version.
    """
    deepspeed = import_deepspeed()
    check_version(allow_unverified)
    try:
        bound = inspect.signature(deepspeed.initialize).bind(*args, **kwargs)
    except TypeError:
        bound = None  # let deepspeed.initialize report its own argument error
    config = config_from_arguments(bound.arguments) if bound is not None else None
    section = read_section(config) if config is not None else None
    if section is not None and not section.present:
        logger.warning(
            "distclip: the DeepSpeed config has no %r section; clipping with %s and its "
            "default options",
            SECTION_KEY,
            DEFAULT_METHOD,
        )
    result = deepspeed.initialize(*args, **kwargs)
    engine = result[0]
    if section is None:
        section = _engine_section(engine)
    _attach_section(engine, section, allow_unverified=allow_unverified)
    return result
