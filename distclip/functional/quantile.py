"""Quantile of the valid prefix of a fixed-size buffer, computed on the device.

The window of past norms is a fixed-size buffer of which only the first ``num_valid``
entries hold data until it has filled once. Its quantile must not depend on the host
knowing ``num_valid`` (that would be a synchronisation), so invalid entries are sorted
to the end as ``+inf`` and the interpolation indices are computed as tensors.
The result is the same number ``torch.quantile(values[:num_valid], q)`` gives
(linear interpolation), bit for bit.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["prefix_quantile"]


def prefix_quantile(values: Tensor, num_valid: Tensor, q: float) -> Tensor:
    """q-quantile (linear interpolation) of ``values[:num_valid]``, as a 0-dim tensor.

    ``values`` is 1-D; ``num_valid`` a 0-dim integer tensor on the same device in
    ``[0, len(values)]``. With ``pos = q * (num_valid - 1)``, ``lo = floor(pos)``,
    ``hi = ceil(pos)``, the result is ``lerp(s[lo], s[hi], pos - lo)`` where ``s`` is
    the sorted valid prefix, exactly as ``torch.quantile`` computes it. With no valid
    entry the result is ``+inf`` (no finite threshold exists yet).
    Cost: one sort of ``len(values)`` elements; no host synchronisation.
    """
    size = values.shape[0]
    positions = torch.arange(size, device=values.device)
    valid = positions < num_valid
    inf = torch.full((), float("inf"), dtype=values.dtype, device=values.device)
    sorted_values = torch.where(valid, values, inf).sort().values
    last = (num_valid - 1).clamp(min=0).to(values.dtype)
    rank = torch.full((), q, dtype=values.dtype, device=values.device) * last
    below = rank.to(torch.long)
    above = rank.ceil().to(torch.long)
    value_below = sorted_values.gather(0, below.reshape(1))
    value_above = sorted_values.gather(0, above.reshape(1))
    weight = (rank - below.to(values.dtype)).reshape(1)
    result = torch.lerp(value_below, value_above, weight).reshape(())
    return torch.where(num_valid > 0, result, inf)
