"""Optimizer classes with clipping built in: ``ClippedOptimizer`` and the seed's factory.

``ClippedOptimizer(torch.optim.AdamW, method="autoclip", q=0.1)`` returns a real
subclass of ``AdamW`` (named ``AutoClippedAdamW``, cached per arguments) whose
``step()`` evaluates the closure, clips by the global norm, then runs AdamW's update.
Hooks, LR schedulers, ``state_dict``, pickling and ``copy.deepcopy`` keep working.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, TypeVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from distclip.clippers import ClipConfig, Clipper, ClipStats, MethodSpec, resolve_method
from distclip.clippers.params import meta_parameter_message
from distclip.integrations.binding import OptimizerBinding, evaluate_closure
from distclip.integrations.frameworks import check_framework_clipping

__all__ = [
    "AutoClippedOptimizer",
    "ClippedOptimizer",
    "ClippedOptimizerMixin",
    "check_param_groups",
    "check_state_dict_type",
]

_O = TypeVar("_O", bound=Optimizer)

_CLASS_CACHE: dict[tuple[type[Optimizer], str, ClipConfig], type[Optimizer]] = {}


def _unhooked(func: Any) -> Any:
    """The function under ``Optimizer``'s step-hook wrapper (hooks must run only once)."""
    while getattr(func, "hooked", False) and hasattr(func, "__wrapped__"):
        func = func.__wrapped__
    return func


def check_param_groups(param_groups: list[dict[str, Any]]) -> None:
    """Refuse an optimizer's parameters that distclip cannot clip, before anything is built.

    Some parameters not requiring grad (frozen layers) are fine; none requiring grad
    means autograd will never give them a gradient. A parameter on the ``meta``
    device holds no data: the model was not materialised.

    Raises:
        ValueError: no parameter requires grad, or one is on the meta device.
    """
    params = [p for group in param_groups for p in group["params"]]
    for index, param in enumerate(params):
        if isinstance(param, Tensor) and param.is_meta:
            raise ValueError(meta_parameter_message(index, param, f" of {len(params)}"))
    if params and not any(isinstance(p, Tensor) and p.requires_grad for p in params):
        raise ValueError(
            f"none of the {len(params)} parameters requires grad, so autograd never gives "
            "them a gradient to clip; pass the trainable parameters, or set "
            "requires_grad=True on them"
        )


def check_state_dict_type(state_dict: Any) -> None:
    """``TypeError`` unless ``state_dict`` is a dict (what ``optimizer.state_dict()`` returns)."""
    if not isinstance(state_dict, dict):
        raise TypeError(
            "the optimizer state_dict must be a dict (what optimizer.state_dict() returns), "
            f"got {type(state_dict).__name__}"
        )


def _rebuild(base: type[Optimizer], method: str, options: dict[str, Any]) -> Optimizer:
    cls = ClippedOptimizer(base, method, **options)
    return cls.__new__(cls)


class ClippedOptimizerMixin:
    """Clipping added in front of a torch optimizer's ``step``; see :func:`ClippedOptimizer`.

    Instances have the seed's methods (``_get_grad_norm``, ``_autoclip_gradients``,
    ``_main_params``, ``step``, ``reset``), ``clipper`` (the :class:`~distclip.Clipper`)
    and ``last_clip`` (the :class:`~distclip.ClipStats` of the last step).
    """

    _distclip_base: type[Optimizer]
    _distclip_spec: MethodSpec
    _distclip_config: ClipConfig
    _distclip: OptimizerBinding
    last_clip: ClipStats | None
    param_groups: list[dict[str, Any]]

    def __init__(
        self,
        *args: Any,
        model: torch.nn.Module | None = None,
        pipeline_groups: Any = None,
        **kwargs: Any,
    ) -> None:
        """Take the base optimizer's arguments, plus the layout keywords.

        Args:
            *args, **kwargs: what the base optimizer class takes.
            model: the FSDP1 root module when FSDP1 manages the parameters.
            pipeline_groups: process group(s) summing the pipeline stages' norms.

        Raises:
            TypeError: the parameters are a ``torch.nn.Module`` (HF Trainer passes the
                ``"model"`` entry of ``optimizer_cls_and_kwargs`` as the parameters).
        """
        params = args[0] if args else kwargs.get("params")
        if isinstance(params, torch.nn.Module):
            raise TypeError(
                f"{type(self).__name__} got a torch.nn.Module ({type(params).__name__}) as "
                "its parameters. HF Trainer takes the 'model' entry of "
                "optimizer_cls_and_kwargs for itself and passes it as the parameters, so "
                "distclip's model= keyword (the FSDP1 root) cannot go there. Pass "
                "model.parameters() (with model=... outside HF Trainer); under HF Trainer, "
                "use a plain optimizer class and distclip.hf.attach(trainer, method, ...), "
                "which gives distclip the FSDP1 root the Trainer wraps."
            )
        super().__init__(*args, **kwargs)
        check_param_groups(self.param_groups)
        spec = self._distclip_spec
        clipper = spec.clipper_cls.from_config(
            self.param_groups,
            self._distclip_config,
            spec=spec,
            model=model,
            pipeline_groups=pipeline_groups,
        )
        check_framework_clipping(clipper.method)
        self._distclip = OptimizerBinding(clipper, self)  # type: ignore[arg-type]
        self.last_clip = None

    @property
    def clipper(self) -> Clipper:
        """The clipper: its options, state and :meth:`~distclip.Clipper.check_consistency`."""
        return self._distclip.clipper

    def _main_params(self) -> Iterator[Tensor]:
        """Yield every parameter of every param group (the seed's meaning)."""
        for group in self.param_groups:
            yield from group["params"]

    def _get_grad_norm(self) -> Tensor:
        """The global gradient norm now, a 0-dim tensor (all ranks, all shards); no state change."""
        self._distclip.refresh_params(self)  # type: ignore[arg-type]
        return self._distclip.clipper.total_norm()

    def _autoclip_gradients(self) -> ClipStats | None:
        """Clip the gradients by this step's threshold (updating the window) and return the stats."""
        return self._distclip.before_step(self)  # type: ignore[arg-type]

    def step(self, closure: Any = None, **kwargs: Any) -> Any:
        """Evaluate ``closure`` (grad enabled), clip, then run the base optimizer's update.

        A step whose global norm is NaN/inf is skipped on every rank (nothing is
        updated; fused torch optimizers skip on the device, others after one host
        read) unless ``nonfinite="error"``, which raises instead. Returns the
        closure's loss, or what the base ``step`` returns.
        """
        loss = evaluate_closure(closure) if closure is not None else None
        base_step = _unhooked(self._distclip_base.step)
        stats = self._distclip.before_step(self)  # type: ignore[arg-type]
        if stats is None:
            out = base_step(self, **kwargs)
            return loss if closure is not None else out
        token = self._distclip.arm_skip(self, stats, can_bypass=True)  # type: ignore[arg-type]
        try:
            out = base_step(self, **kwargs) if token.run_base else None
        finally:
            self._distclip.disarm_skip(self, token)  # type: ignore[arg-type]
        return loss if closure is not None else out

    def reset(self) -> None:
        """Clear the clipper's history (window and counters); call the base ``reset`` if any."""
        self._distclip.clipper.reset()
        base_reset = getattr(super(), "reset", None)
        if callable(base_reset):
            base_reset()

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state_dict with the clipper's under ``param_groups[0]["distclip"]``."""
        return self._distclip.add_state(super().state_dict())  # type: ignore[misc]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load an optimizer state_dict; the clipper entry is validated before anything loads.

        Raises:
            TypeError: ``state_dict`` is not a dict, or its clipper entry is not one.
            ValueError: the clipper entry does not fit this clipper (another method,
                window size or format version, a tensor of the wrong shape or dtype);
                neither the optimizer nor the clipper has changed.
        """
        check_state_dict_type(state_dict)
        stripped = self._distclip.take_state(state_dict)
        super().load_state_dict(stripped)  # type: ignore[misc]
        self._distclip.apply_taken_state()

    def __getstate__(self) -> dict[str, Any]:
        state: dict[str, Any] = super().__getstate__()  # type: ignore[misc]
        state["_distclip"] = self._distclip
        state["last_clip"] = self.last_clip
        return state

    def __reduce__(self) -> tuple[Any, ...]:
        options = self._distclip_config.as_dict()
        return (
            _rebuild,
            (self._distclip_base, self._distclip_spec.name, options),
            self.__getstate__(),
        )


def ClippedOptimizer(optimizer_cls: type[_O], method: str = "autoclip", **options: Any) -> type[_O]:
    """Return a subclass of ``optimizer_cls`` that clips gradients with ``method`` before each step.

    The class is named after the base (``AutoClippedAdamW``, ``NormClippedSGD``) and
    cached: the same arguments give the same class. Its instances take the base
    class's arguments. Options are validated here, once.

    Args:
        optimizer_cls: a subclass of ``torch.optim.Optimizer``.
        method: a registered method name (see :func:`distclip.available_methods`).
        **options: the method's options, e.g. ``q``, ``window``, ``max_norm`` for
            AutoClip; common ones: ``norm_type``, ``nonfinite``, ``eps``,
            ``foreach``, ``check_every``.

    Raises:
        TypeError: ``optimizer_cls`` is not an optimizer class; ``method`` is not a
            string; an unknown option or one of the wrong type.
        ValueError: an unknown method; an option out of range; a class that
            already clips.

    Its instances raise ``ValueError`` at construction when no parameter requires grad
    or one is on the meta device (see :func:`check_param_groups`).
    """
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, Optimizer)):
        raise TypeError(
            f"optimizer_cls must be a subclass of torch.optim.Optimizer, got {optimizer_cls!r}"
        )
    if issubclass(optimizer_cls, ClippedOptimizerMixin):
        raise ValueError(
            f"{optimizer_cls.__name__} already clips its gradients; pass its base class "
            f"{optimizer_cls._distclip_base.__name__} instead"
        )
    spec = resolve_method(method)
    config = spec.config(options)
    key = (optimizer_cls, spec.name, config)
    cls = _CLASS_CACHE.get(key)
    if cls is None:
        name = f"{spec.class_prefix}{optimizer_cls.__name__}"
        namespace = {
            "_distclip_base": optimizer_cls,
            "_distclip_spec": spec,
            "_distclip_config": config,
            "__module__": __name__,
            "__qualname__": name,
            "__doc__": f"{optimizer_cls.__name__} with {spec.name} clipping "
            f"({config.as_dict()}); see distclip.ClippedOptimizer.",
        }
        cls = type(name, (ClippedOptimizerMixin, optimizer_cls), namespace)
        _CLASS_CACHE[key] = cls
    return cls  # type: ignore[return-value]


def AutoClippedOptimizer(
    optimizer_cls: type[_O],
    q: float = 0.1,
    window: int = 200,
    max_norm: float | None = None,
    **options: Any,
) -> type[_O]:
    """The seed's factory: ``optimizer_cls`` with AutoClip, as ``AutoClipped<Name>``.

    Same as ``ClippedOptimizer(optimizer_cls, method="autoclip", q=q, window=window,
    max_norm=max_norm, **options)``: the threshold is the ``q``-quantile of the last
    ``window`` global gradient norms (this step's included), capped at ``max_norm``;
    gradients are scaled by ``min(1, threshold / (norm + 1e-6))``.

    Args:
        optimizer_cls: the base optimizer class (e.g. ``torch.optim.AdamW``).
        q: the quantile in [0, 1] (default 0.1).
        window: how many recent norms are kept, >= 1 (default 200).
        max_norm: an absolute cap on the threshold, or None (default).
        **options: ``min_norm`` (set 1.0 to match the published AutoClipper
            package's hidden floor), ``norm_type``, ``nonfinite``, ``eps``,
            ``foreach``, ``check_every``.
    """
    return ClippedOptimizer(
        optimizer_cls, "autoclip", q=q, window=window, max_norm=max_norm, **options
    )
