"""Quantiles of the valid prefix of a fixed-size buffer, computed on the device.

The window of past norms is a fixed-size buffer of which only the first ``num_valid``
entries hold data until it has filled once. Its quantile must not depend on the host
knowing ``num_valid`` (that would be a synchronisation), so invalid entries sort to the
end as ``+inf`` and the interpolation is looked up, by ``num_valid``, in a
:class:`QuantileTable` made once on the device. The result is the number
``torch.quantile(values[:num_valid], q)`` gives (linear interpolation), bit for bit:
the table holds the ranks exactly as ``torch.quantile`` computes them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["QuantileTable", "prefix_quantile", "quantile_table", "sorted_prefix_quantile"]


class QuantileTable(NamedTuple):
    """Where the q-quantile of ``n`` sorted values lies, for every ``n`` in ``[0, size]``.

    Row ``n`` of ``neighbours`` holds the two positions ``(floor(r), ceil(r))`` of
    ``r = q * (n - 1)`` (``(0, 0)`` for ``n = 0``); ``weights[n]`` is ``r - floor(r)``,
    both computed in the values' dtype as ``torch.quantile`` computes them; row ``n``
    of ``coefficients`` is ``(1 - weights[n], weights[n])`` (``(0.5, 0.5)`` for ``n = 0``,
    so that an empty prefix of ``+inf`` interpolates to ``+inf``, not NaN).
    """

    neighbours: Tensor
    weights: Tensor
    coefficients: Tensor


def quantile_table(
    size: int, q: float, *, dtype: torch.dtype, device: torch.device | str
) -> QuantileTable:
    """The :class:`QuantileTable` of quantile ``q`` for buffers of ``size`` entries.

    Made with device ops (no copy from the host), once per buffer and ``q``.
    """
    counts = torch.arange(size + 1, device=device)
    last = (counts - 1).clamp(min=0).to(dtype)
    ranks = torch.full((), q, dtype=dtype, device=device) * last
    below = ranks.to(torch.long)
    above = ranks.ceil().to(torch.long)
    weights = ranks - below.to(dtype)
    coefficients = torch.stack((1.0 - weights, weights), dim=1)
    coefficients[0] = 0.5
    return QuantileTable(torch.stack((below, above), dim=1), weights, coefficients)


def sorted_prefix_quantile(
    sorted_values: Tensor, num_valid: Tensor, table: QuantileTable
) -> Tensor:
    """The quantile of ``table`` of the ``num_valid`` smallest entries of ``sorted_values``.

    ``sorted_values`` is 1-D, ascending, with its invalid entries ``+inf`` (so they
    sort last); ``num_valid`` a 0-dim integer tensor in ``[0, len(table.weights) - 1]``.
    With no valid entry the result is ``+inf``.

    The interpolation is ``(1 - w) * s[lo] + w * s[hi]``, one dot product: four ops in
    all (two row lookups, a gather, the dot), no view, no host synchronisation, no
    data-dependent shape, so that a training step stays short. It agrees with
    ``torch.quantile`` (``lerp(s[lo], s[hi], w)``) to within a rounding of the
    values' dtype, and exactly where ``w`` is 0 or the neighbours are equal; use
    :func:`prefix_quantile` for ``torch.quantile``'s number bit for bit.
    """
    # embedding of a 0-dim index: a row lookup that torch.compile traces (no .item()).
    pair = sorted_values.gather(0, torch.embedding(table.neighbours, num_valid))
    return torch.dot(pair, torch.embedding(table.coefficients, num_valid))


def prefix_quantile(values: Tensor, num_valid: Tensor, q: float) -> Tensor:
    """q-quantile (linear interpolation) of ``values[:num_valid]``, as a 0-dim tensor.

    ``values`` is 1-D; ``num_valid`` a 0-dim integer tensor on the same device in
    ``[0, len(values)]``. With ``pos = q * (num_valid - 1)``, ``lo = floor(pos)``,
    ``hi = ceil(pos)``, the result is ``lerp(s[lo], s[hi], pos - lo)`` where ``s`` is
    the sorted valid prefix: the number ``torch.quantile(values[:num_valid], q)``
    gives, bit for bit. With no valid entry the result is ``+inf`` (no finite
    threshold exists yet). Cost: one sort of ``len(values)`` elements and a new
    :class:`QuantileTable`; no host synchronisation. (The window's own quantile,
    :func:`sorted_prefix_quantile`, keeps its table and takes fewer ops.)
    """
    size = values.shape[0]
    valid = torch.arange(size, device=values.device) < num_valid
    sorted_values = torch.where(valid, values, float("inf")).sort().values
    table = quantile_table(size, q, dtype=values.dtype, device=values.device)
    row = num_valid.reshape(())
    below, above = sorted_values.gather(0, torch.embedding(table.neighbours, row)).unbind()
    weight = table.weights.gather(0, row.reshape(1)).reshape(())
    inf = float("inf")
    return torch.lerp(below, above, weight).nan_to_num(nan=inf, posinf=inf, neginf=-inf)
