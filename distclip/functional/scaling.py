"""Clip coefficients and in-place scaling of gradients.

As in ``torch.nn.utils.clip_grads_with_norm_``, the coefficient is clamped on the
device and always multiplied in, instead of branching on ``coef < 1`` (a branch on a
tensor's value is a host synchronisation).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from distclip.functional._grouping import (
    group_by_device_and_dtype,
    group_indices_by_device_and_dtype,
    use_foreach,
)

__all__ = [
    "DEFAULT_EPS",
    "clamp_",
    "clip_coefficient",
    "scale_",
    "scale_each_",
    "skip_aware_coefficient",
]

#: Added to the norm in the denominator of every clip coefficient.
DEFAULT_EPS = 1e-6


def clip_coefficient(threshold: Tensor, total_norm: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """``min(1, threshold / (total_norm + eps))`` as a 0-dim tensor (no host sync)."""
    return (threshold / (total_norm + eps)).clamp(max=1.0)


def skip_aware_coefficient(coef: Tensor, finite: Tensor) -> Tensor:
    """``coef`` where the norm is finite, else 1 (a skipped step leaves gradients alone)."""
    return torch.where(finite, coef, 1.0)


def scale_(tensors: Sequence[Tensor], coef: Tensor, *, foreach: bool | None = None) -> None:
    """Multiply every tensor in place by the 0-dim tensor ``coef``.

    Tensors are grouped by (device, dtype); each group gets one ``torch._foreach_mul_``
    where the device supports it (``foreach=False`` forces a per-tensor ``mul_``).
    ``coef`` is moved to each device once and cast to the group's dtype: CUDA's fused
    ``_foreach_mul_`` takes its multi-tensor path only when the scalar tensor has the
    tensors' dtype (bf16/fp16 gradients get a bf16/fp16 factor; the norm it came from
    was accumulated in float32). No host synchronisation.
    """
    for device, group in group_by_device_and_dtype(tensors):
        coef_on_device = coef.to(device, group[0].dtype)
        if use_foreach(device, foreach):
            torch._foreach_mul_(group, coef_on_device)
        else:
            for t in group:
                t.mul_(coef_on_device)


def scale_each_(
    tensors: Sequence[Tensor], factors: Sequence[Tensor], *, foreach: bool | None = None
) -> None:
    """Multiply ``tensors[i]`` in place by ``factors[i]``, a device tensor broadcastable to it.

    One ``torch._foreach_mul_`` per (device, dtype) group of ``tensors`` where the
    device supports it (``foreach=False``: one ``mul_`` per tensor): the op count does
    not grow with the number of tensors. Factors of per-tensor or per-row clipping
    (0-dim, or ``(rows, 1, ...)``) differ in shape from their tensors, so on CUDA the
    kernel takes torch's per-tensor path inside that one op. No host synchronisation.
    """
    if len(tensors) != len(factors):
        raise ValueError(f"scale_each_ got {len(tensors)} tensors but {len(factors)} factors")
    for device, group, indices in group_indices_by_device_and_dtype(tensors):
        chosen = [factors[i].to(device) for i in indices]
        if use_foreach(device, foreach):
            torch._foreach_mul_(group, chosen)
        else:
            for tensor, factor in zip(group, chosen, strict=True):
                tensor.mul_(factor)


def clamp_(tensors: Sequence[Tensor], bound: float, *, foreach: bool | None = None) -> None:
    """Clamp every element of every tensor into ``[-bound, bound]``, in place.

    Tensors are grouped by (device, dtype); each group gets one
    ``torch._foreach_clamp_min_`` and one ``torch._foreach_clamp_max_`` where the
    device supports them (``foreach=False``: a ``clamp_`` per tensor). Element by
    element, so exact on any piece of a gradient; no communication, no host read.
    """
    for device, group in group_by_device_and_dtype(tensors):
        if use_foreach(device, foreach):
            torch._foreach_clamp_min_(group, -bound)
            torch._foreach_clamp_max_(group, bound)
        else:
            for t in group:
                t.clamp_(min=-bound, max=bound)
