"""Random draws that are the same on every rank and on every device, made on the device.

A draw is a hash of ``(seed, step)`` computed with integer tensor ops on the device:
no generator, no host data, so the same seed and step give the same number on a CPU
and on any GPU (integer arithmetic is exact everywhere), every rank draws alike, a
resumed run draws what the uninterrupted one drew, and the draw can be captured in a
CUDA graph or a ``torch.compile`` graph when ``step`` is a device tensor.

The hash keeps every intermediate value below ``2**31`` before a multiplication by a
constant below ``2**17``, so no product leaves int64's exact range: three rounds of a
Lehmer multiplication modulo the Mersenne prime ``2**31 - 1`` (MINSTD's multiplier),
each followed by an xor-shift that breaks the linearity between consecutive steps.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["step_uniform"]

#: The modulus: the Mersenne prime 2**31 - 1.
_PRIME = (1 << 31) - 1
#: MINSTD's multiplier (Park and Miller 1993): a primitive root modulo _PRIME.
_MULTIPLIER = 48271
#: Spreads seeds apart before the steps are added (Knuth's golden-ratio constant, folded).
_SEED_MIX = 0x9E3779B1
_ROUNDS = 3


def _seed_offset(seed: int) -> int:
    """Where seed ``seed``'s sequence starts in ``[0, 2**31 - 1)`` (on the host, once)."""
    return (seed % _PRIME) * _SEED_MIX % _PRIME


def step_uniform(
    seed: int, step: Tensor, device: torch.device, dtype: torch.dtype = torch.float32
) -> Tensor:
    """One draw ``u`` in ``[0, 1)``, a 0-dim tensor on ``device``: a function of (seed, step).

    ``step`` is a 0-dim integer tensor (a step counter kept on the device). Every call
    with the same ``seed`` and ``step`` value gives the same number, on any device and
    rank. About 16 small integer ops; no host synchronisation, no tensor from host data.
    """
    x = torch.remainder(step.to(device, torch.long) + _seed_offset(seed), _PRIME)
    for _ in range(_ROUNDS):
        x = torch.remainder(x * _MULTIPLIER, _PRIME)
        x = torch.bitwise_xor(x, torch.bitwise_right_shift(x, 16))
    # x < 2**31 here; dividing in float64 is exact enough, then rounded once.
    return torch.remainder(x, _PRIME).to(torch.float64).div(_PRIME).to(dtype)
