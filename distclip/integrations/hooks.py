"""Clipping attached to an optimizer instance that already exists (built by other code).

``handle = distclip.attach(optimizer, method="autoclip", q=0.1)`` registers step and
state_dict hooks on the instance; ``handle.remove()`` takes them all off again.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from distclip.clippers import Clipper, make_clipper
from distclip.integrations.binding import (
    OptimizerBinding,
    adopt_stray_state,
    binding_of,
    evaluate_closure,
)
from distclip.integrations.frameworks import check_framework_clipping
from distclip.integrations.optimizer import (
    ClippedOptimizerMixin,
    check_param_groups,
    check_state_dict_type,
)
from distclip.integrations.wrappers import (
    ENGINE_ADAPTER_ATTR,
    describe_chain,
    unwrap,
    wrapper_chain,
)

__all__ = ["ClipHandle", "attach", "get_clipper"]


class ClipHandle:
    """Returned by :func:`attach`: the attached ``clipper`` and :meth:`remove`."""

    def __init__(
        self, optimizer: Optimizer, binding: OptimizerBinding, hooks: list[RemovableHandle]
    ) -> None:
        self.optimizer = optimizer
        self.binding = binding
        self._hooks = hooks

    @property
    def clipper(self) -> Clipper:
        """The attached clipper (options, state, ``check_consistency``)."""
        return self.binding.clipper

    def remove(self) -> None:
        """Detach: remove every hook; the optimizer steps unclipped from now on."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        if self.optimizer.__dict__.get("_distclip") is self.binding:
            del self.optimizer.__dict__["_distclip"]

    def __enter__(self) -> ClipHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _replace_closure(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """Evaluate a closure passed to ``step`` now, and pass on one that returns its loss.

    Step pre-hooks run before ``step`` evaluates its closure; the clip must see the
    gradients the closure computes, so the closure runs here, once. ``args`` are the
    arguments of ``step`` as the hook sees them: the optimizer first.
    """
    if kwargs.get("closure") is not None:
        loss = evaluate_closure(kwargs["closure"])
        return args, {**kwargs, "closure": lambda: loss}
    if len(args) > 1 and args[1] is not None:
        loss = evaluate_closure(args[1])
        return (args[0], lambda: loss, *args[2:]), kwargs
    return None


def attach(
    optimizer: Any,
    method: str = "autoclip",
    *,
    model: torch.nn.Module | None = None,
    pipeline_groups: Any = None,
    **options: Any,
) -> ClipHandle:
    """Clip ``optimizer``'s gradients with ``method`` before every ``optimizer.step()``.

    The clipper follows the optimizer's param groups, records ``optimizer.last_clip``,
    skips NaN/inf steps (fused optimizers on the device; others by hiding the
    gradients from the update after one host read), and saves its state in
    ``optimizer.state_dict()`` under ``param_groups[0]["distclip"]``.
    Hooks are not pickled with an optimizer (torch's rule): attach again after
    unpickling, or use :func:`distclip.ClippedOptimizer`.

    A clipper state already in ``optimizer.param_groups[0]["distclip"]`` (a
    checkpoint saved with distclip and loaded into the plain optimizer before this
    call, as a framework resuming a run does) is adopted: validated, loaded into the
    new clipper and removed from the param group.

    Args:
        optimizer: an existing ``torch.optim.Optimizer``, or a framework's wrapper
            around one that exposes it as ``.optimizer`` (Accelerate, Lightning).
        method: a method name, as in :func:`distclip.ClippedOptimizer`.
        model: the FSDP1 root module when FSDP1 manages the parameters.
        pipeline_groups: process group(s) summing the pipeline stages' norms.
        **options: the method's options.

    Returns:
        A :class:`ClipHandle`; ``handle.remove()`` detaches.

    Raises:
        TypeError: ``optimizer`` is not an optimizer (nor a wrapper of one), or is a
            DeepSpeed one (use :mod:`distclip.deepspeed`); ``method`` is not a string;
            an unknown option or one of the wrong type.
        ValueError: a clipper is already attached; an unknown method or an option out
            of range; no parameter requires grad, or one is on the meta device; a
            stray clipper state that does not fit.
        FrameworkClippingError: a training framework on the call stack clips the
            gradients itself (see :mod:`distclip.integrations.frameworks`).
            Nothing is attached when it raises.
    """
    optimizer = unwrap(optimizer)
    if isinstance(optimizer, ClippedOptimizerMixin):
        raise ValueError(
            f"this optimizer ({type(optimizer).__name__}) already clips its gradients: it "
            "was built by distclip.ClippedOptimizer; attach to a plain torch optimizer, or "
            "build the class with the method you want"
        )
    if getattr(optimizer, "_distclip", None) is not None:
        raise ValueError(
            "this optimizer already clips its gradients with distclip; remove the first "
            "clipper (handle.remove()) before attaching another"
        )
    check_param_groups(optimizer.param_groups)
    clipper = make_clipper(
        method, optimizer.param_groups, model=model, pipeline_groups=pipeline_groups, **options
    )
    check_framework_clipping(clipper.method)
    adopt_stray_state(clipper, optimizer)
    binding = OptimizerBinding(clipper, optimizer)

    def pre_step(opt: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        binding.recover_stale(opt)  # the last step raised before the post-hook
        replaced = _replace_closure(args, kwargs)
        stats = binding.before_step(opt)
        if stats is not None:
            binding.arm_step(opt, stats)
        return replaced

    def post_step(opt: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        binding.end_step(opt)

    def add_state(opt: Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        return binding.add_state(state_dict)

    def take_state(opt: Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        check_state_dict_type(state_dict)
        return binding.take_state(state_dict)

    def apply_state(opt: Optimizer) -> None:
        binding.apply_taken_state()

    hooks = [
        optimizer.register_step_pre_hook(pre_step),
        optimizer.register_step_post_hook(post_step),
        optimizer.register_state_dict_post_hook(add_state),
        optimizer.register_load_state_dict_pre_hook(take_state),
        optimizer.register_load_state_dict_post_hook(apply_state),
    ]
    optimizer._distclip = binding  # type: ignore[attr-defined]
    optimizer.last_clip = None  # type: ignore[attr-defined]
    return ClipHandle(optimizer, binding, hooks)


def get_clipper(optimizer: Any) -> Clipper:
    """The clipper of ``optimizer`` (made by :func:`ClippedOptimizer` or :func:`attach`).

    Typed access for code that holds the optimizer as a plain ``torch.optim.Optimizer``,
    or as a framework's wrapper around it (anything exposing the real optimizer as
    ``.optimizer``: Accelerate's ``AcceleratedOptimizer``, Lightning's
    ``LightningOptimizer``): ``distclip.get_clipper(opt).last_clip`` is the
    ``last_clip`` of the optimizer that clips. Under DeepSpeed, the optimizer of an
    engine that :mod:`distclip.deepspeed` clips, any wrapper around it (HF Trainer's
    and Accelerate's ``DeepSpeedOptimizerWrapper``) and the engine itself give the
    engine adapter's clipper.

    Raises:
        ValueError: no optimizer along the wrapper chain clips with distclip.
    """
    chain = wrapper_chain(optimizer)
    for obj in chain:
        binding = binding_of(obj)
        if binding is not None:
            return binding.clipper
        adapter = getattr(obj, "__dict__", {}).get(ENGINE_ADAPTER_ATTR)
        if isinstance(getattr(adapter, "clipper", None), Clipper):
            return adapter.clipper  # type: ignore[no-any-return,union-attr]
    raise ValueError(
        f"{describe_chain(chain)} does not clip with distclip; build it with "
        "distclip.ClippedOptimizer(...) or call distclip.attach(optimizer) first (a "
        "DeepSpeed engine: distclip.deepspeed.attach(engine), or under HF Trainer / "
        "Accelerate distclip.hf.attach(trainer) / distclip.accelerate.attach(accelerator))"
    )
