"""distclip under Hugging Face Accelerate: ``distclip.accelerate.attach(accelerator)``.

One call on the ``Accelerator``, before ``accelerator.prepare``::

    accelerator = Accelerator()
    distclip.accelerate.attach(accelerator, "autoclip", q=0.1, window=200)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

What it changes, on this accelerator instance only (``handle.remove()`` undoes all):

* ``accelerator.prepare``: every optimizer it prepares is clipped by distclip. A
  distclip optimizer (``ClippedOptimizer``, or already ``attach``-ed) keeps its
  clipper; a plain one gets :func:`distclip.attach` with ``method`` and the options
  (``autoclip`` with its defaults when none are given), with the FSDP1 root module
  Accelerate wrapped as ``model=``. Under DeepSpeed the engine is clipped through
  :func:`distclip.deepspeed.attach` right after ``deepspeed.initialize``, with
  ``method`` and the options or, without them, the ``"distclip"`` section of the
  DeepSpeed config; a distclip optimizer handed to DeepSpeed is refused.
  Optimizers prepared before ``attach`` are taken in the same way at ``attach``.
* ``accelerator.clip_grad_norm_`` / ``clip_grad_value_`` raise
  :class:`~distclip.FrameworkClippingError` when they would clip parameters that
  distclip clips: the clip would change the gradients before distclip measures them.
  ``clip_grad_norm_(parameters, float("inf"))`` (the norm only, no clip; HF Trainer
  logs ``grad_norm`` that way) is passed through, and so is every call under DeepSpeed,
  where Accelerate only reports the engine's norm.
* The prepared optimizers (``AcceleratedOptimizer``, ``DeepSpeedOptimizerWrapper``)
  show ``last_clip`` after every step; :func:`distclip.get_clipper` works on them.

Checkpoints need nothing more: ``accelerator.save_state`` / ``load_state`` save and
load the optimizer's ``state_dict`` (which carries the clipper's state) or, under
DeepSpeed, call the engine's ``save_checkpoint`` / ``load_checkpoint`` (which carry it
in ``client_state``). Both restore the window exactly, provided ``attach`` ran before
``load_state``.

This module never imports ``accelerate``: it works on the object it is given.
"""

from __future__ import annotations

import functools
import logging
import math
import sys
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from distclip.clippers import validate_options
from distclip.errors import FrameworkClippingError
from distclip.integrations.binding import binding_of
from distclip.integrations.frameworks import GUARD_ATTR
from distclip.integrations.hooks import ClipHandle
from distclip.integrations.hooks import attach as attach_optimizer
from distclip.integrations.optimizer import ClippedOptimizerMixin
from distclip.integrations.wrappers import (
    describe_chain,
    is_deepspeed_wrapper,
    unwrap,
    wrapper_chain,
)

__all__ = ["DEFAULT_METHOD", "AccelerateHandle", "attach", "layout_model"]

logger = logging.getLogger(__name__)

#: The method a plain optimizer is clipped with when ``attach`` gets none.
DEFAULT_METHOD = "autoclip"

#: Where :func:`attach` keeps its handle on the accelerator.
_HANDLE_ATTR = "_distclip_accelerate"

#: The accelerator methods :func:`attach` wraps on the instance.
_WRAPPED = ("prepare", "clip_grad_norm_", "clip_grad_value_")


def _accelerator_class() -> type | None:
    module = sys.modules.get("accelerate.accelerator")
    cls = getattr(module, "Accelerator", None) if module is not None else None
    return cls if isinstance(cls, type) else None


def _is_deepspeed(accelerator: Any) -> bool:
    return str(getattr(accelerator, "distributed_type", "")).rsplit(".", 1)[-1] == "DEEPSPEED"


def layout_model(models: Iterable[Any], optimizer: Optimizer) -> torch.nn.Module | None:
    """The FSDP1 root among ``models`` that holds ``optimizer``'s parameters, or ``None``.

    FSDP1's flat parameters do not say which process group shards them, so distclip
    needs the root module (``model=``); Accelerate and HF Trainer wrap it themselves.
    ``None`` when no parameter is an FSDP1 flat parameter (nothing to supply).
    """
    from distclip.reduction.layouts import is_fsdp1_param

    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not any(is_fsdp1_param(p) for p in params):
        return None
    wanted = {id(p) for p in params}
    for model in models:
        if isinstance(model, torch.nn.Module) and wanted <= {id(p) for p in model.parameters()}:
            return model
    return None


def _check_options(method: str | None, options: dict[str, Any], *, deepspeed: bool) -> None:
    """Validate ``method`` and its options now, before anything is wrapped."""
    if method is None and not options:
        return
    if deepspeed:
        from distclip.integrations.deepspeed import parse_section

        parse_section(
            {"method": method or DEFAULT_METHOD, **options}, where="distclip.accelerate.attach()"
        )
        return
    name = method or DEFAULT_METHOD
    validate_options(name, options)


class AccelerateHandle:
    """What :func:`attach` did to one accelerator; :meth:`remove` undoes it.

    Attributes:
        accelerator: the ``Accelerator``.
        method: the method plain optimizers are clipped with (``None``: the default,
            or under DeepSpeed the config's ``"distclip"`` section).
        options: the method's options.
        handles: the :class:`~distclip.ClipHandle` of every optimizer this handle
            attached distclip to.
        adapters: the DeepSpeed engine adapters this handle attached.
    """

    def __init__(
        self,
        accelerator: Any,
        method: str | None,
        options: dict[str, Any],
        *,
        allow_unverified: bool,
    ) -> None:
        self.accelerator = accelerator
        self.method = method
        self.options = dict(options)
        self.allow_unverified = allow_unverified
        self.handles: list[ClipHandle] = []
        self.adapters: list[Any] = []
        self._wrapped: dict[str, Callable[..., Any]] = {}
        self._guarded: list[Any] = []
        self._mirrored: list[tuple[Any, Any]] = []

    # -------------------------------------------------------------- wrapping
    def _install(self) -> None:
        accelerator = self.accelerator
        originals = {name: getattr(accelerator, name) for name in _WRAPPED}

        @functools.wraps(originals["prepare"])
        def prepare(*args: Any, **kwargs: Any) -> Any:
            if _is_deepspeed(accelerator):
                self._refuse_clipped_optimizers([*args, *kwargs.values()])
            result = originals["prepare"](*args, **kwargs)
            self.take_prepared()
            return result

        @functools.wraps(originals["clip_grad_norm_"])
        def clip_grad_norm_(parameters: Any, max_norm: Any, *args: Any, **kwargs: Any) -> Any:
            parameters = _as_list(parameters)
            norm_only = isinstance(max_norm, (int, float)) and math.isinf(max_norm)
            if not norm_only:
                self._refuse_clip(parameters, f"clip_grad_norm_(parameters, max_norm={max_norm!r})")
            return originals["clip_grad_norm_"](parameters, max_norm, *args, **kwargs)

        @functools.wraps(originals["clip_grad_value_"])
        def clip_grad_value_(parameters: Any, clip_value: Any, *args: Any, **kwargs: Any) -> Any:
            parameters = _as_list(parameters)
            self._refuse_clip(
                parameters, f"clip_grad_value_(parameters, clip_value={clip_value!r})"
            )
            return originals["clip_grad_value_"](parameters, clip_value, *args, **kwargs)

        for name, wrapped in (
            ("prepare", prepare),
            ("clip_grad_norm_", clip_grad_norm_),
            ("clip_grad_value_", clip_grad_value_),
        ):
            setattr(accelerator, name, wrapped)
            self._wrapped[name] = wrapped
        accelerator.__dict__[_HANDLE_ATTR] = self

    def _refuse_clipped_optimizers(self, objects: list[Any]) -> None:
        for obj in objects:
            if not isinstance(obj, Optimizer):
                continue
            chain = wrapper_chain(obj)
            if any(isinstance(o, ClippedOptimizerMixin) or binding_of(o) for o in chain):
                raise FrameworkClippingError(
                    f"distclip.accelerate: {describe_chain(chain)} clips with distclip, but "
                    "under DeepSpeed the engine computes the norm and clips (and partitions "
                    "the gradients) before the optimizer steps. Pass a plain torch optimizer: "
                    "distclip clips the engine, with the method given to "
                    'distclip.accelerate.attach or the DeepSpeed config\'s "distclip" section.'
                )

    def _clipped_param_ids(self) -> set[int]:
        ids: set[int] = set()
        for prepared in getattr(self.accelerator, "_optimizers", []):
            for obj in wrapper_chain(prepared):
                if binding_of(obj) is not None:
                    ids.update(id(p) for group in obj.param_groups for p in group["params"])
        return ids

    def _refuse_clip(self, parameters: list[Any], call: str) -> None:
        if _is_deepspeed(self.accelerator):
            return  # Accelerate only reports the engine's norm under DeepSpeed
        clipped = self._clipped_param_ids()
        if any(id(p) in clipped for p in parameters):
            raise FrameworkClippingError(
                f"accelerator.{call} would clip gradients that distclip clips in "
                "optimizer.step(): distclip would then measure norms already clipped and its "
                "thresholds would be wrong. Remove the call (distclip's own max_norm= caps "
                "the threshold if you want a bound); for the norm, read "
                "optimizer.last_clip.total_norm after the step, or call "
                'clip_grad_norm_(parameters, float("inf")), which clips nothing.'
            )

    # ------------------------------------------------------------ adoption
    def take_prepared(self) -> None:
        """Clip what the accelerator has prepared so far (called after every ``prepare``)."""
        accelerator = self.accelerator
        if _is_deepspeed(accelerator):
            self._take_engine()
        for prepared in list(getattr(accelerator, "_optimizers", [])):
            if any(prepared is seen for seen in self._guarded):
                continue
            if is_deepspeed_wrapper(prepared):
                continue  # taken with its engine
            self._take_optimizer(prepared)

    def _take_optimizer(self, prepared: Any) -> None:
        inner = unwrap(prepared)
        binding = binding_of(inner)
        if binding is None:
            model = layout_model(getattr(self.accelerator, "_models", []), inner)
            handle = attach_optimizer(
                inner, self.method or DEFAULT_METHOD, model=model, **self.options
            )
            self.handles.append(handle)
            binding = handle.binding
        elif self.method is not None or self.options:
            raise ValueError(
                f"distclip.accelerate: {describe_chain(wrapper_chain(prepared))} already clips "
                f"with {binding.clipper.method}; call distclip.accelerate.attach(accelerator) "
                "without a method and options to keep that clipper, or prepare a plain "
                "optimizer"
            )
        self._guard(prepared, binding.mirrors, getattr(inner, "last_clip", None))

    def _take_engine(self) -> None:
        from distclip.integrations.deepspeed import DeepSpeedClipAdapter
        from distclip.integrations.deepspeed import attach as attach_engine

        wrapped = getattr(self.accelerator, "deepspeed_engine_wrapped", None)
        engine = getattr(wrapped, "engine", None)
        if engine is None:
            return
        adapter = engine.__dict__.get("distclip")
        if not isinstance(adapter, DeepSpeedClipAdapter):
            adapter = attach_engine(
                engine, self.method, allow_unverified=self.allow_unverified, **self.options
            )
            if self.method is None and not self.options and not adapter.section.present:
                logger.warning(
                    "distclip.accelerate: the DeepSpeed config has no 'distclip' section; "
                    "clipping with %s and its default options",
                    adapter.method,
                )
            self.adapters.append(adapter)
        for prepared in getattr(self.accelerator, "_optimizers", []):
            if is_deepspeed_wrapper(prepared) and not any(prepared is g for g in self._guarded):
                self._guard(prepared, adapter.mirrors, adapter.last_clip)

    def _guard(self, prepared: Any, mirrors: Any, last_clip: Any) -> None:
        prepared.__dict__[GUARD_ATTR] = self
        prepared.__dict__["last_clip"] = last_clip
        mirrors.add(prepared)
        self._guarded.append(prepared)
        self._mirrored.append((prepared, mirrors))

    # ---------------------------------------------------------------- undo
    def remove(self) -> None:
        """Undo :func:`attach`: the accelerator's methods, the clippers it attached, the marks."""
        accelerator = self.accelerator
        for name, wrapped in self._wrapped.items():
            if accelerator.__dict__.get(name) is wrapped:
                del accelerator.__dict__[name]
        self._wrapped.clear()
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        for adapter in self.adapters:
            adapter.remove()
        self.adapters.clear()
        for prepared, mirrors in self._mirrored:
            mirrors.remove(prepared)
            if prepared.__dict__.get(GUARD_ATTR) is self:
                del prepared.__dict__[GUARD_ATTR]
        self._mirrored.clear()
        self._guarded.clear()
        if accelerator.__dict__.get(_HANDLE_ATTR) is self:
            del accelerator.__dict__[_HANDLE_ATTR]

    def __repr__(self) -> str:
        return (
            f"AccelerateHandle(method={self.method!r}, options={self.options!r}, "
            f"optimizers={len(self._guarded)})"
        )


def _as_list(parameters: Any) -> list[Any]:
    """``parameters`` as a list (a generator can be read once only, and is passed on)."""
    if isinstance(parameters, torch.Tensor):
        return [parameters]
    return list(parameters)


def attach(
    accelerator: Any,
    method: str | None = None,
    *,
    allow_unverified: bool = False,
    **options: Any,
) -> AccelerateHandle:
    """Clip every optimizer ``accelerator`` prepares with distclip (see the module docstring).

    Call it after building the ``Accelerator`` and before ``load_state`` (before
    ``prepare`` is simplest; optimizers prepared earlier are taken at once).

    Args:
        accelerator: an ``accelerate.Accelerator``.
        method: the distclip method for plain optimizers (default ``autoclip``); under
            DeepSpeed, the engine's method (default: the config's ``"distclip"`` section).
        allow_unverified: under DeepSpeed, see :func:`distclip.deepspeed.attach`.
        **options: the method's options, as for :func:`distclip.ClippedOptimizer`.

    Returns:
        An :class:`AccelerateHandle`; ``handle.remove()`` undoes everything.

    Raises:
        TypeError: ``accelerator`` is not an ``accelerate.Accelerator``; ``method`` is
            not a string; an unknown option or one of the wrong type.
        ValueError: already attached; an unknown method or an option out of range; a
            prepared optimizer already clips and a method was given.
        FrameworkClippingError: (later, from ``prepare``) a distclip optimizer handed to
            DeepSpeed; (from ``clip_grad_norm_`` / ``clip_grad_value_``) a clip of
            parameters distclip clips.
    """
    cls = _accelerator_class()
    if cls is None or not isinstance(accelerator, cls):
        raise TypeError(
            f"accelerator must be an accelerate.Accelerator, got {type(accelerator).__name__}"
        )
    if isinstance(accelerator.__dict__.get(_HANDLE_ATTR), AccelerateHandle):
        raise ValueError(
            "distclip.accelerate.attach was already called on this accelerator; call "
            "handle.remove() first to attach again with other options"
        )
    if method is not None and not isinstance(method, str):
        raise TypeError(f"method must be a string such as 'autoclip', got {method!r}")
    _check_options(method, options, deepspeed=_is_deepspeed(accelerator))
    handle = AccelerateHandle(accelerator, method, options, allow_unverified=allow_unverified)
    handle._install()
    try:
        handle.take_prepared()
    except BaseException:
        handle.remove()
        raise
    return handle
