"""Comparisons every suite makes: bit for bit, relative, relative to a tensor's scale.

* :func:`assert_bitwise_equal`: nested dicts / lists / tuples of tensors and plain
  values are identical (types, dtypes, shapes, devices and every bit; NaN equals NaN);
* :func:`assert_ranks_identical`: every rank's result equals rank 0's that way;
* :func:`assert_rel_close`: numbers (or tensors) equal to ``rtol`` relative, with no
  absolute slack; non-finite entries must stand in the same places with the same values;
* :func:`max_rel_error`: the largest ``|a - e| / |e|`` of two series of scalars (each
  element a quantity of its own: per-step norms, thresholds, a window);
* :func:`max_scaled_error`: the largest ``|a - e|`` over ``max |e|`` (parameters, where
  an element near zero has no relative error worth the name).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "assert_bitwise_equal",
    "assert_ranks_identical",
    "assert_rel_close",
    "max_rel_error",
    "max_scaled_error",
]

#: The smallest normal float32: the floor of a denominator that would be zero.
_TINY = torch.finfo(torch.float32).tiny


def _bytes(tensor: Tensor) -> Tensor:
    """The raw bytes of a tensor (NaN payloads and signed zeros included)."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_bitwise_equal(a: Any, b: Any, path: str = "") -> None:
    """``a`` and ``b`` are the same nested structure, bit for bit; ``path`` names the place."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, Tensor):
        assert (a.dtype, a.shape, a.device) == (b.dtype, b.shape, b.device), (
            f"{path}: {a.dtype}{tuple(a.shape)} on {a.device} vs "
            f"{b.dtype}{tuple(b.shape)} on {b.device}"
        )
        if a.device.type != "meta":
            assert torch.equal(_bytes(a), _bytes(b)), f"{path}: tensor bits differ:\n{a}\n{b}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{path}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for key in a:
            assert_bitwise_equal(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: length {len(a)} vs {len(b)}"
        for index, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_bitwise_equal(x, y, f"{path}[{index}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), f"{path}: nan vs {b!r}"
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


def assert_ranks_identical(per_rank: Sequence[Any], path: str = "") -> None:
    """Every rank's result equals rank 0's, bit for bit."""
    for rank, result in enumerate(per_rank[1:], start=1):
        assert_bitwise_equal(per_rank[0], result, f"rank {rank} vs rank 0{path}")


def _as_float64(value: Any) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach().to(torch.float64)
    return torch.as_tensor(value, dtype=torch.float64)


def assert_rel_close(
    actual: Any, expected: Any, what: str, rtol: float, *, equal_nan: bool = False
) -> None:
    """``actual`` equals ``expected`` to ``rtol`` relative (no absolute slack).

    Infinities (no threshold) must stand in the same places with the same signs; NaNs
    only where ``equal_nan`` allows them (a skipped step's norm).
    """
    actual, expected = _as_float64(actual), _as_float64(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} vs {expected.shape}"
    special = ~torch.isfinite(expected)
    assert torch.equal(~torch.isfinite(actual), special), (
        f"{what}: non-finite entries differ:\n{actual}\n{expected}"
    )
    torch.testing.assert_close(
        actual[special], expected[special], equal_nan=equal_nan, msg=lambda m: f"{what}: {m}"
    )
    torch.testing.assert_close(
        actual[~special], expected[~special], rtol=rtol, atol=0.0, msg=lambda m: f"{what}: {m}"
    )


def max_rel_error(actual: Any, expected: Any) -> float:
    """The largest ``|a - e| / |e|`` over two equally long series of scalars.

    Non-finite entries must be equal (same places, same values: an error otherwise);
    they count 0. An expected 0 is divided by the smallest normal float32 instead.
    """
    a, e = _as_float64(actual).reshape(-1), _as_float64(expected).reshape(-1)
    assert a.shape == e.shape, f"{a.numel()} values, expected {e.numel()}"
    special = ~torch.isfinite(e)
    assert torch.equal(~torch.isfinite(a), special), f"non-finite entries differ:\n{a}\n{e}"
    assert torch.equal(a[special].nan_to_num(0.0), e[special].nan_to_num(0.0)), (a, e)
    a, e = a[~special], e[~special]
    if not e.numel():
        return 0.0
    return float(((a - e).abs() / e.abs().clamp(min=_TINY)).max())


def max_scaled_error(actual: Tensor, expected: Tensor) -> float:
    """``max |actual - expected| / max |expected|``: the error relative to the tensor's scale."""
    a, e = actual.detach().double(), expected.detach().double()
    assert a.shape == e.shape, f"shape {tuple(a.shape)} vs {tuple(e.shape)}"
    if not e.numel():
        return 0.0
    return float((a - e).abs().max() / e.abs().max().clamp(min=_TINY))
