"""Random draws that are the same on every rank: seeded by (seed, step), made on the device."""

from __future__ import annotations

import torch
from torch import Tensor

from distclip.functional._compile import eager_only

__all__ = ["step_uniform"]

_MIX = 0x9E3779B97F4A7C15  # 2**64 / golden ratio: spreads consecutive steps apart
_MASK = (1 << 63) - 1


@eager_only()
def step_uniform(
    seed: int, step: int, device: torch.device, dtype: torch.dtype = torch.float32
) -> Tensor:
    """One draw ``u ~ U(0, 1)`` as a 0-dim tensor on ``device``, a function of (seed, step).

    Every rank that calls it with the same arguments gets the same number, and a
    resumed run gets the numbers of the uninterrupted one: the generator is seeded
    from ``seed`` and the step count, so no generator position needs saving.
    No host synchronisation (seeding is a host operation on the generator object).
    Under ``torch.compile`` the draw runs eagerly: a seeded generator cannot be part
    of a graph (one graph break instead of one per generator call).
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(((seed * _MIX) ^ (step + 1)) & _MASK)
    return torch.rand((), generator=generator, device=device, dtype=dtype)
