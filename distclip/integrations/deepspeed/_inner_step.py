"""The piecewise methods under DeepSpeed: a step pre-hook on the inner torch optimizer.

``value`` / ``coordinate_wise`` (element units) clamp, ``layer_wise`` / ``agc`` (tensor
and row units) clip the fp32 partitions piece by piece (:class:`~._partitions.FragmentClip`),
on the torch optimizer that updates the fp32 master weights, after DeepSpeed has
unscaled the gradients and before the update. How and why: ``docs/deepspeed.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from distclip.clippers import PiecewiseClipper
from distclip.clippers.flat_pieces import FlatPieces
from distclip.integrations.deepspeed._partitions import FragmentClip

__all__ = [
    "Clamp",
    "InnerApply",
    "InnerStepHook",
    "clamp_apply",
    "element_clamp",
    "inner_apply",
    "inner_optimizers",
]

#: Clamps a list of gradients in place (a piecewise clipper with element units).
Clamp = Callable[[list[Tensor]], None]

#: What the inner optimizer's step pre-hook does with that optimizer.
InnerApply = Callable[[Any], None]


def element_clamp(clipper: PiecewiseClipper) -> Clamp:
    """The clamp of an element-unit clipper, as a function of a list of fp32 gradients."""

    def clamp(grads: list[Tensor]) -> None:
        clipper.clip_pieces_(FlatPieces(None, grads))

    return clamp


def clamp_apply(clamp: Clamp) -> InnerApply:
    """Clamp the ``.grad`` of every parameter the optimizer is about to step."""

    def apply(optimizer: Any) -> None:
        clamp(
            [
                param.grad
                for group in optimizer.param_groups
                for param in group["params"]
                if param.grad is not None
            ]
        )

    return apply


def inner_apply(clipper: PiecewiseClipper, wrapper: Any, name: str) -> InnerApply:
    """What the inner step's pre-hook does under the wrapper ``wrapper`` (class ``name``).

    Element units: clamp every gradient (no collective, no layout). Tensor and row
    units: clip the flat fp32 partitions by DeepSpeed's layout of them.
    """
    if clipper.unit == "element":
        return clamp_apply(element_clamp(clipper))
    return FragmentClip(wrapper, name, clipper)


def inner_optimizers(wrapper: Any) -> list[Any]:
    """The optimizers a DeepSpeed wrapper's ``step()`` calls on its fp32 partitions."""
    inner = [wrapper.optimizer]
    backup = getattr(wrapper, "backup_optimizer", None)  # ZeRO 3, partial offload
    if backup is not None:
        inner.append(backup)
    return inner


class InnerStepHook:
    """The step pre-hook that clips the gradients of torch optimizers' parameters.

    Registered on the optimizers that update the fp32 master weights; acts only while
    ``active()`` (inside a DeepSpeed step that went past its norm), so other calls of
    those optimizers' ``step()`` are left alone. ``apply`` gets the optimizer: it
    clamps its gradients (``value``) or clips them tensor by tensor / row by row
    (``layer_wise``, ``agc``: :class:`~._partitions.FragmentClip`).
    """

    def __init__(
        self,
        optimizers: list[torch.optim.Optimizer],
        apply: InnerApply,
        active: Callable[[], bool],
        on_call: Callable[[], None] | None = None,
    ) -> None:
        self.optimizers = optimizers
        self.apply = apply
        self.active = active
        self.on_call = on_call
        self.handles = [opt.register_step_pre_hook(self) for opt in optimizers]

    def __call__(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if not self.active():
            return
        if self.on_call is not None:
            self.on_call()
        self.apply(optimizer)

    def remove(self) -> None:
        """Unregister the pre-hook from every optimizer it was registered on."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
