"""The per-step draws: a pure-Python integer reference, uniformity, and the device-free contract."""

from __future__ import annotations

import math

import pytest
import torch

from distclip.functional import step_uniform
from tests.support.op_probe import probe

PRIME = (1 << 31) - 1


def reference_uniform(seed: int, step: int) -> float:
    """The draw in plain Python integers: what any device must compute, bit for bit."""
    x = (step + (seed % PRIME) * 0x9E3779B1 % PRIME) % PRIME
    for _ in range(3):
        x = x * 48271 % PRIME
        x ^= x >> 16
    return float(torch.tensor((x % PRIME) / PRIME, dtype=torch.float64).to(torch.float32))


@pytest.mark.parametrize("seed", [0, 1, 5, 2**40 + 3])
def test_draws_equal_the_integer_reference_bit_for_bit(seed: int) -> None:
    for step in [*range(50), 10**6, 2**33 + 7]:
        got = step_uniform(seed, torch.tensor(step), torch.device("cpu"))
        assert got.dtype == torch.float32
        assert got.shape == ()
        assert float(got) == reference_uniform(seed, step), (seed, step)


def test_draws_look_uniform_and_independent_across_steps() -> None:
    n = 20000
    steps = torch.arange(n)
    draws = torch.stack([step_uniform(7, s, torch.device("cpu"), torch.float64) for s in steps])
    # Mean and variance of U(0, 1), within 5 standard errors.
    assert abs(float(draws.mean()) - 0.5) < 5 * math.sqrt(1 / 12 / n)
    assert abs(float(draws.var()) - 1 / 12) < 5 * 0.0745 / math.sqrt(n)
    # Consecutive steps uncorrelated, and every tenth of [0, 1) about equally full.
    centred = draws - draws.mean()
    lag1 = float((centred[1:] * centred[:-1]).mean() / centred.var())
    assert abs(lag1) < 5 / math.sqrt(n)
    counts = torch.histc(draws.float(), bins=10, min=0.0, max=1.0)
    expected = n / 10
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 33.7  # the chi-squared 0.9999 quantile with 9 degrees of freedom
    assert float(draws.min()) >= 0.0
    assert float(draws.max()) <= 1.0


def test_seeds_give_different_sequences() -> None:
    a = [float(step_uniform(0, torch.tensor(s), torch.device("cpu"))) for s in range(64)]
    b = [float(step_uniform(1, torch.tensor(s), torch.device("cpu"))) for s in range(64)]
    assert sum(x == y for x, y in zip(a, b, strict=True)) <= 1


def test_a_draw_reads_nothing_from_the_host_and_builds_nothing_from_it() -> None:
    step = torch.tensor(12)
    counts = probe(lambda: step_uniform(3, step, torch.device("cpu")))
    assert counts.host_reads == 0
    assert counts.host_data == 0
