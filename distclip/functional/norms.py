"""Local power sums of gradients and the root that turns them into a norm.

A p-norm over many tensors, possibly spread over many processes, is computed in two
steps so that partial results can be combined exactly:

* ``powsum = sum_i ||g_i||_p ** p`` over the tensors one process holds, accumulated in
  float32 (float64 if any input is float64);
* partial power sums are combined across processes, and the root ``powsum ** (1 / p)``
  is taken once, at the end.

Every ``p`` torch accepts has a power sum that combines exactly (:func:`reduce_op`):

=========  ===============================  =======  ===========  ==============
``p``      power sum of one element ``x``   combine  identity     root
=========  ===============================  =======  ===========  ==============
``inf``    ``|x|``                          max      0            none
``-inf``   ``|x|``                          min      ``+inf``     none
``0``      ``1`` if ``x != 0`` else ``0``   sum      0            none
other      ``|x| ** p`` (``|0| ** p = inf``  sum      0            ``** (1 / p)``
           for ``p < 0``)
=========  ===============================  =======  ===========  ==============

``p = 0`` counts the non-zero elements of all tensors together (what "as if the
tensors were concatenated into one vector" means); torch's ``get_total_norm`` instead
returns the number of tensors that hold any non-zero element.

Nothing here talks to other processes and nothing reads a value back to the host.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from distclip._checks import is_real
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
    "powsum_identity",
    "powsum_to_norm",
    "reduce_op",
    "tensor_powsums",
    "validate_norm_type",
]

#: Norm types whose power sums are combined by max (``inf``) or min (``-inf``).
_EXTREMA = {math.inf: "max", -math.inf: "min"}


def validate_norm_type(norm_type: float | int | str) -> float:
    """Return ``norm_type`` as a float, accepting every norm type torch's clipping does.

    Any real ``p`` (``0`` and negative ones included), ``inf`` and ``-inf``, as a
    number or as a string ``float()`` reads (``"inf"``, ``"-inf"``, ``"2"``).

    Raises:
        TypeError: ``norm_type`` is neither a real number nor a string (``True`` and
            ``False`` are refused: they are not norm types).
        ValueError: NaN, or a string that is not a number.
    """
    expected = "a real number p (0, negative, inf and -inf included) or a string such as 'inf'"
    if not (is_real(norm_type) or isinstance(norm_type, str)):
        raise TypeError(f"norm_type must be {expected}, got {norm_type!r}")
    try:
        p = float(norm_type)
    except ValueError:
        raise ValueError(f"norm_type must be {expected}, got {norm_type!r}") from None
    if math.isnan(p):
        raise ValueError(f"norm_type must be {expected}; NaN is not a norm type, got {norm_type!r}")
    return p


def reduce_op(norm_type: float) -> str:
    """How partial power sums of ``norm_type`` combine: ``"sum"``, ``"max"`` or ``"min"``."""
    return _EXTREMA.get(norm_type, "sum")


def powsum_identity(norm_type: float) -> float:
    """The power sum of nothing: ``+inf`` for ``p = -inf`` (a min), else ``0``."""
    return math.inf if norm_type == -math.inf else 0.0


def _has_root(norm_type: float) -> bool:
    """Whether the power sum of ``norm_type`` needs a root (not for 0, 1, inf, -inf)."""
    return not (math.isinf(norm_type) or norm_type in (0.0, 1.0))


def accumulation_dtype(dtypes: Sequence[torch.dtype]) -> torch.dtype:
    """The dtype power sums are accumulated in: float64 if any input is, else float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _accumulate_in(dtype: torch.dtype, tensor_dtype: torch.dtype) -> torch.dtype:
    """``torch.promote_types(dtype, tensor_dtype)`` for the dtypes gradients have, in Python.

    (``torch.promote_types`` is an aten op: one more dispatch per group and step.)
    Complex tensors accumulate in a complex dtype (their norms come out real).
    """
    if tensor_dtype.is_complex:
        wide = dtype == torch.float64 or tensor_dtype == torch.complex128
        return torch.complex128 if wide else torch.complex64
    if tensor_dtype.is_floating_point:
        return accumulation_dtype([dtype, tensor_dtype])
    return dtype


def _powsum_of_norms(norms: Tensor, norm_type: float) -> Tensor:
    """``sum(norms ** p)`` (max / min for ``p = +-inf``, sum for 0 and 1); ``norms`` is 1-D."""
    op = reduce_op(norm_type)
    if op == "max":
        return norms.amax()
    if op == "min":
        return norms.amin()
    if not _has_root(norm_type):
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
    acc = _accumulate_in(dtype, group[0].dtype)
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

    ``sum_i ||t_i||_p ** p`` (see the module docstring for 0 and +-inf); an empty
    list gives the identity (:func:`powsum_identity`). Tensors are grouped by
    (device, dtype) and each group's per-tensor norms come from one
    ``torch._foreach_norm`` call (``foreach=None`` uses it where the device supports
    it; ``False`` uses one ``vector_norm`` per tensor). Norms are accumulated in
    ``dtype`` (so bf16/fp16 gradients are summed in float32). Empty tensors
    contribute nothing (the +-inf-norms of an empty tensor have no identity, so they
    are dropped rather than passed to the kernel). No host synchronisation.
    """
    parts: list[Tensor] = []
    nonempty = [t for t in tensors if t.numel() > 0]
    for group_device, group in group_by_device_and_dtype(nonempty):
        norms = _norms(group, group_device, norm_type, dtype, foreach)
        parts.append(_powsum_of_norms(norms, norm_type).to(device, dtype))
    if not parts:
        return torch.full((), powsum_identity(norm_type), device=device, dtype=dtype)
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
    power sum and a root), as ``torch.nn.utils.get_total_norm`` computes it. Not for
    ``p = 0``, where the norm of per-tensor counts would count tensors, not elements.
    """
    nonempty = [t for t in tensors if t.numel() > 0]
    groups = group_by_device_and_dtype(nonempty)
    if len(groups) == 1 and norm_type != 0.0:
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

    Entry i belongs to ``tensors[i]``; an empty tensor gives the identity
    (:func:`powsum_identity`). Norms come from one ``torch._foreach_norm`` per
    (device, dtype) group, accumulated in ``dtype``, and are put in order by one
    ``torch.stack`` (no index tensor is made from host data). No host synchronisation.
    """
    entries: list[Tensor | None] = [None] * len(tensors)
    nonempty = [i for i, t in enumerate(tensors) if t.numel() > 0]
    chosen = [tensors[i] for i in nonempty]
    groups = group_indices_by_device_and_dtype(chosen)
    stacked: Tensor | None = None
    for group_device, group, indices in groups:
        norms = _norms(group, group_device, norm_type, dtype, foreach).to(device, dtype)
        if _has_root(norm_type):
            norms = norms.pow(norm_type)
        if len(groups) == 1 and len(indices) == len(tensors):  # all of them, in order
            stacked = norms
            break
        for position, norm in zip(indices, norms.unbind(0), strict=True):
            entries[nonempty[position]] = norm
    if stacked is not None:
        return stacked
    if not entries:
        return torch.zeros(0, device=device, dtype=dtype)
    identity: Tensor | None = None
    if any(entry is None for entry in entries):  # an empty tensor's power sum, unpowered
        identity = torch.full((), powsum_identity(norm_type), device=device, dtype=dtype)
    return torch.stack([identity if entry is None else entry for entry in entries])  # type: ignore[misc]


def combine_powsums(powsums: Sequence[Tensor], norm_type: float) -> Tensor:
    """Combine partial power sums (same shape and device): a sum, or a max / min for +-inf."""
    if len(powsums) == 1:
        return powsums[0]
    stacked = torch.stack(list(powsums))
    op = reduce_op(norm_type)
    if op == "max":
        return stacked.amax(dim=0)
    if op == "min":
        return stacked.amin(dim=0)
    return stacked.sum(dim=0)


def powsum_to_norm(powsum: Tensor, norm_type: float) -> Tensor:
    """Take the root once: ``powsum ** (1 / p)`` (identity for 0, 1, inf and -inf)."""
    if not _has_root(norm_type):
        return powsum
    if norm_type == 2.0:
        return powsum.sqrt()
    return powsum.pow(1.0 / norm_type)
