"""The pure math layer against numpy and torch references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distclip.functional import (
    clip_coefficient,
    local_powsum,
    powsum_to_norm,
    prefix_quantile,
    scale_,
    skip_aware_coefficient,
    validate_norm_type,
)
from tests.support.reference import norm_of

CPU = torch.device("cpu")


def _tensors(seed: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (7,), (0,), (2, 2, 2), (1,)]
    return [torch.randn(s, generator=gen).to(dtype) * 3 for s in shapes]


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, 0.5, math.inf])
@pytest.mark.parametrize("foreach", [None, True, False])
def test_norm_matches_numpy(p: float, foreach: bool | None) -> None:
    tensors = _tensors(0)
    norm = powsum_to_norm(local_powsum(tensors, p, device=CPU, foreach=foreach), p)
    assert norm.dtype == torch.float32
    assert float(norm) == pytest.approx(norm_of(tensors, p), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [2.0, math.inf])
def test_low_precision_gradients_accumulate_in_float32(p: float, dtype: torch.dtype) -> None:
    tensors = _tensors(1, dtype)
    norm = powsum_to_norm(local_powsum(tensors, p, device=CPU), p)
    assert norm.dtype == torch.float32
    assert float(norm) == pytest.approx(norm_of(tensors, p), rel=1e-5)


def test_float16_gradients_whose_square_sum_overflows_float16() -> None:
    """Each element fits in fp16 but the sum of squares (9e8) does not (max 65504)."""
    grads = [torch.full((10_000,), 300.0, dtype=torch.float16) for _ in range(2)]
    assert math.isinf(float((grads[0].float() ** 2).sum().half()))
    norm = powsum_to_norm(local_powsum(grads, 2.0, device=CPU), 2.0)
    assert float(norm) == pytest.approx(300.0 * math.sqrt(20_000), rel=1e-6)


def test_float64_accumulation_is_exact_for_float64_inputs() -> None:
    tensors = _tensors(2, torch.float64)
    norm = powsum_to_norm(local_powsum(tensors, 2.0, device=CPU, dtype=torch.float64), 2.0)
    assert float(norm) == pytest.approx(norm_of(tensors), rel=1e-12)


def test_empty_inputs_give_zero_and_inf_norm_skips_empty_tensors() -> None:
    assert float(local_powsum([], 2.0, device=CPU)) == 0.0
    assert float(local_powsum([torch.zeros(0)], math.inf, device=CPU)) == 0.0
    assert (
        float(local_powsum([torch.zeros(0), torch.tensor([-4.0, 2.0])], math.inf, device=CPU))
        == 4.0
    )


def test_powsums_combine_exactly_across_partitions() -> None:
    tensors = _tensors(3)
    whole = local_powsum(tensors, 2.0, device=CPU)
    parts = local_powsum(tensors[:2], 2.0, device=CPU) + local_powsum(tensors[2:], 2.0, device=CPU)
    torch.testing.assert_close(whole, parts, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (2, 2.0),
        (0, 0.0),
        (-1.5, -1.5),
        ("inf", math.inf),
        ("-inf", -math.inf),
        ("2", 2.0),
        (np.float32(3.0), 3.0),
        (-math.inf, -math.inf),
    ],
)
def test_norm_type_accepts_what_torch_accepts(given: object, expected: float) -> None:
    assert validate_norm_type(given) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [float("nan"), "nan", "fro"])
def test_norm_type_out_of_range(bad: object) -> None:
    with pytest.raises(ValueError, match="norm_type"):
        validate_norm_type(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [None, True, [2.0]])
def test_norm_type_wrong_type(bad: object) -> None:
    with pytest.raises(TypeError, match="norm_type"):
        validate_norm_type(bad)  # type: ignore[arg-type]


finite_floats = st.floats(min_value=0.0, max_value=1e6, allow_nan=False, width=32)


@settings(max_examples=300, deadline=None)
@given(
    values=st.lists(finite_floats, min_size=1, max_size=40),
    q=st.floats(min_value=0.0, max_value=1.0),
    data=st.data(),
)
def test_prefix_quantile_is_torch_quantile_bit_for_bit(
    values: list[float], q: float, data: st.DataObject
) -> None:
    num_valid = data.draw(st.integers(min_value=1, max_value=len(values)))
    buffer = torch.tensor(values, dtype=torch.float32)
    got = prefix_quantile(buffer, torch.tensor(num_valid), q)
    expected = torch.quantile(buffer[:num_valid], q)
    assert torch.equal(got, expected), (got, expected)
    reference = np.quantile(np.asarray(values[:num_valid], dtype=np.float64), q, method="linear")
    # float32 interpolation: the error scales with the largest value interpolated.
    scale = max(values[:num_valid])
    assert float(got) == pytest.approx(reference, rel=1e-5, abs=1e-6 * max(scale, 1.0))


def test_prefix_quantile_of_nothing_is_inf() -> None:
    assert math.isinf(float(prefix_quantile(torch.ones(4), torch.tensor(0), 0.5)))


def test_clip_coefficient_and_skip() -> None:
    tau, eps = torch.tensor(2.0), 1e-6
    assert float(clip_coefficient(tau, torch.tensor(4.0), eps)) == pytest.approx(2.0 / (4.0 + eps))
    assert float(clip_coefficient(tau, torch.tensor(1.0), eps)) == 1.0
    assert float(clip_coefficient(torch.tensor(math.inf), torch.tensor(3.0), eps)) == 1.0
    coef = clip_coefficient(tau, torch.tensor(math.nan), eps)
    assert float(skip_aware_coefficient(coef, torch.tensor(False))) == 1.0


@pytest.mark.parametrize("foreach", [None, False])
def test_scale_multiplies_every_tensor(foreach: bool | None) -> None:
    tensors = [*_tensors(4), torch.ones(3, dtype=torch.bfloat16)]
    expected = [t.clone() * 0.25 for t in tensors]
    scale_(tensors, torch.tensor(0.25), foreach=foreach)
    for got, want in zip(tensors, expected, strict=True):
        torch.testing.assert_close(got, want)
