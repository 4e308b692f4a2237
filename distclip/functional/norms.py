"""Local power sums of gradients and the root that turns them into a norm.

A p-norm over many tensors, possibly spread over many processes, is computed in two
steps so that partial results can be combined exactly:

* ``powsum = sum_i ||g_i||_p ** p`` (or ``max_i ||g_i||_inf`` for ``p = inf``) over the
  tensors one process holds, accumulated in float32 (float64 if any input is float64);
* partial power sums are added (or maxed) across processes, and the root
  ``powsum ** (1 / p)`` is taken once, at the end.

Nothing here talks to other processes and nothing reads a value back to the host.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from distclip.functional._grouping import (
    group_by_device_and_dtype,
    group_indices_by_device_and_dtype,
    use_foreach,
)

__all__ = [
    "accumulation_dtype",
    "combine_powsums",
    "local_norm",
    "local_powsum",
    "powsum_to_norm",
    "tensor_powsums",
    "validate_norm_type",
]


def validate_norm_type(norm_type: float | int) -> float:
    """Return ``norm_type`` as a float; raise if it is not a p > 0 or ``inf``.

    Raises:
        TypeError: ``norm_type`` is not a real number.
        ValueError: ``norm_type`` is not in (0, inf].
    """
    if isinstance(norm_type, bool) or not isinstance(norm_type, (int, float)):
        raise TypeError(f"norm_type must be a real number p > 0 or float('inf'), got {norm_type!r}")
    p = float(norm_type)
    if math.isnan(p) or p <= 0.0:
        raise ValueError(f"norm_type must be in (0, inf], got {norm_type!r}")
    return p


def accumulation_dtype(dtypes: Sequence[torch.dtype]) -> torch.dtype:
    """The dtype power sums are accumulated in: float64 if any input is, else float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _powsum_of_norms(norms: Tensor, norm_type: float) -> Tensor:
    """``sum(norms ** p)``, or ``max(norms)`` for ``p = inf``; ``norms`` is 1-D."""
    if math.isinf(norm_type):
        return norms.amax()
    if norm_type == 1.0:
        return norms.sum()
    if norm_type == 2.0:
        return torch.dot(norms, norms)
    return norms.pow(norm_type).sum()


def _norms(
    group: list[Tensor],
    device: torch.device,
    norm_type: float,
    dtype: torch.dtype,
    foreach: bool | None,
) -> Tensor:
    """Per-tensor norms of one (device, dtype) group, accumulated in ``dtype`` or wider."""
    acc = accumulation_dtype([dtype, group[0].dtype])
    if use_foreach(device, foreach):
        return torch.stack(list(torch._foreach_norm(group, norm_type, dtype=acc)))
    return torch.stack([torch.linalg.vector_norm(t, norm_type, dtype=acc) for t in group])


def local_powsum(
    tensors: Sequence[Tensor],
    norm_type: float,
    *,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    foreach: bool | None = None,
) -> Tensor:
    """Power sum of the p-norm over ``tensors``, as a 0-dim tensor on ``device``.

    ``sum_i ||t_i||_p ** p`` for finite p, ``max_i ||t_i||_inf`` for ``p = inf``; an
    empty list gives 0. Tensors are grouped by (device, dtype) and each group's
    per-tensor norms come from one ``torch._foreach_norm`` call (``foreach=None``
    uses it where the device supports it; ``False`` uses one ``vector_norm`` per
    tensor). Norms are accumulated in ``dtype`` (so bf16/fp16 gradients are summed
    in float32). Empty tensors contribute nothing (the inf-norm of an empty tensor
    has no identity, so they are dropped rather than passed to the kernel).
    No host synchronisation.
    """
    parts: list[Tensor] = []
    nonempty = [t for t in tensors if t.numel() > 0]
    for group_device, group in group_by_device_and_dtype(nonempty):
        norms = _norms(group, group_device, norm_type, dtype, foreach)
        parts.append(_powsum_of_norms(norms, norm_type).to(device, dtype))
    if not parts:
        return torch.zeros((), device=device, dtype=dtype)
    return combine_powsums(parts, norm_type)


def local_norm(
    tensors: Sequence[Tensor],
    norm_type: float,
    *,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    foreach: bool | None = None,
) -> Tensor:
    """The ``norm_type``-norm of ``tensors`` on this process alone, as a 0-dim tensor.

    ``powsum_to_norm(local_powsum(...))``, for a norm nobody reduces further: with one
    (device, dtype) group it is the norm of the per-tensor norms (one op fewer than a
    power sum and a root), as ``torch.nn.utils.get_total_norm`` computes it.
    """
    nonempty = [t for t in tensors if t.numel() > 0]
    groups = group_by_device_and_dtype(nonempty)
    if len(groups) == 1:
        group_device, group = groups[0]
        norms = _norms(group, group_device, norm_type, dtype, foreach)
        norm: Tensor = torch.linalg.vector_norm(norms, norm_type)
        return norm.to(device, dtype)
    return powsum_to_norm(
        local_powsum(nonempty, norm_type, device=device, dtype=dtype, foreach=foreach), norm_type
    )


def tensor_powsums(
    tensors: Sequence[Tensor],
    norm_type: float,
    *,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    foreach: bool | None = None,
) -> Tensor:
    """Each tensor's own power sum ``||t_i||_p ** p`` (``max |t_i|`` for inf), as a 1-D tensor.

    Entry i belongs to ``tensors[i]``; an empty tensor gives 0. Norms come from one
    ``torch._foreach_norm`` per (device, dtype) group, accumulated in ``dtype``, and are
    put in order by one ``torch.stack`` (no index tensor is made from host data).
    No host synchronisation.
    """
    entries: list[Tensor | None] = [None] * len(tensors)
    nonempty = [i for i, t in enumerate(tensors) if t.numel() > 0]
    chosen = [tensors[i] for i in nonempty]
    groups = group_indices_by_device_and_dtype(chosen)
    stacked: Tensor | None = None
    for group_device, group, indices in groups:
        norms = _norms(group, group_device, norm_type, dtype, foreach).to(device, dtype)
        if len(groups) == 1 and len(indices) == len(tensors):  # all of them, in order
            stacked = norms
            break
        for position, norm in zip(indices, norms.unbind(0), strict=True):
            entries[nonempty[position]] = norm
    if stacked is None:
        if not entries:
            return torch.zeros(0, device=device, dtype=dtype)
        zero: Tensor | None = None
        if any(entry is None for entry in entries):
            zero = torch.zeros((), device=device, dtype=dtype)
        stacked = torch.stack([zero if entry is None else entry for entry in entries])  # type: ignore[misc]
    if math.isinf(norm_type) or norm_type == 1.0:
        return stacked
    return stacked.pow(norm_type)


def combine_powsums(powsums: Sequence[Tensor], norm_type: float) -> Tensor:
    """Combine partial power sums (0-dim, same device): a sum, or a max for inf."""
    if len(powsums) == 1:
        return powsums[0]
    stacked = torch.stack(list(powsums))
    return stacked.amax() if math.isinf(norm_type) else stacked.sum()


def powsum_to_norm(powsum: Tensor, norm_type: float) -> Tensor:
    """Take the root once: ``powsum ** (1 / p)`` (identity for ``p = inf``)."""
    if math.isinf(norm_type) or norm_type == 1.0:
        return powsum
    if norm_type == 2.0:
        return powsum.sqrt()
    return powsum.pow(1.0 / norm_type)
