"""Every norm type torch accepts, in the functional layer, against a float64 reference.

Each p has its own combination of partial power sums (SUM of ``|x| ** p``, MAX for
``inf``, MIN for ``-inf``, SUM of counts for ``0``); splitting the tensors into parts,
taking each part's power sum and combining them must give the whole's, exactly as the
all-reduce across shards does. Parts without elements contribute the identity.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from distclip.functional import (
    combine_powsums,
    local_powsum,
    powsum_identity,
    powsum_to_norm,
    reduce_op,
    tensor_powsums,
)
from tests.support.reference import norm_of

CPU = torch.device("cpu")
#: One norm type per reduction and the corner cases of each: (p, reduce op).
NORM_TYPES = [
    (2.0, "sum"),
    (1.0, "sum"),
    (3.0, "sum"),
    (0.5, "sum"),
    (-1.0, "sum"),
    (-2.5, "sum"),
    (0.0, "sum"),
    (math.inf, "max"),
    (-math.inf, "min"),
]


def _tensors(seed: int, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    """Tensors with exact zeros in some (|0| ** p = inf for p < 0) and an empty one."""
    gen = torch.Generator().manual_seed(seed)
    out = [torch.randn(s, generator=gen, dtype=torch.float64) * 3 for s in [(3, 4), (7,), (2, 2)]]
    out[1][2] = 0.0
    out.append(torch.zeros(0, dtype=torch.float64))
    out.append(torch.tensor([0.5, -4.0], dtype=torch.float64))
    return [t.to(dtype) for t in out]


def _norm(tensors: list[torch.Tensor], p: float, **kwargs: object) -> float:
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    return float(powsum_to_norm(local_powsum(tensors, p, device=CPU, dtype=dtype, **kwargs), p))


@pytest.mark.parametrize(("p", "op"), NORM_TYPES)
@pytest.mark.parametrize("foreach", [None, False])
def test_norm_of_every_type_matches_float64_reference(p: float, op: str, foreach: bool) -> None:
    tensors = _tensors(0)
    assert reduce_op(p) == op
    assert _norm(tensors, p, foreach=foreach) == pytest.approx(norm_of(tensors, p), rel=1e-12)
    nonzero = [t[t != 0] for t in tensors]  # without zeros negative p has a finite sum
    assert _norm(nonzero, p, foreach=foreach) == pytest.approx(norm_of(nonzero, p), rel=1e-12)


@pytest.mark.parametrize(("p", "op"), NORM_TYPES)
def test_float32_inputs_accumulate_to_the_reference(p: float, op: str) -> None:
    tensors = [t[t != 0] for t in _tensors(1, torch.float32)]
    assert _norm(tensors, p) == pytest.approx(norm_of(tensors, p), rel=1e-5)


def test_zero_norm_counts_nonzero_elements_not_tensors() -> None:
    tensors = [torch.tensor([0.0, 2.0, -3.0]), torch.tensor([1.0, 0.0, 0.0, 0.5])]
    assert _norm(tensors, 0.0) == 4.0  # torch's get_total_norm says 2 (tensors)
    assert float(torch.nn.utils.get_total_norm(tensors, 0.0)) == 2.0
    assert _norm([torch.tensor([math.nan, 0.0])], 0.0) == 1.0  # NaN is not zero


@pytest.mark.parametrize(("p", "op"), NORM_TYPES)
def test_partial_power_sums_combine_exactly(p: float, op: str) -> None:
    """Any split of the elements into parts (shards) combines to the whole's power sum."""
    tensors = _tensors(2)
    whole = local_powsum(tensors, p, device=CPU, dtype=torch.float64)
    flat = torch.cat([t.reshape(-1) for t in tensors])
    for cuts in ([3], [5, 11], [0, 1, 2, 20, 20]):
        bounds = [0, *cuts, flat.numel()]
        parts = [
            local_powsum([flat[a:b]], p, device=CPU, dtype=torch.float64)
            for a, b in itertools.pairwise(bounds)
        ]
        torch.testing.assert_close(combine_powsums(parts, p), whole, rtol=1e-13, atol=0)


@pytest.mark.parametrize(("p", "op"), NORM_TYPES)
def test_nothing_gives_the_identity(p: float, op: str) -> None:
    identity = powsum_identity(p)
    assert identity == (math.inf if op == "min" else 0.0)
    assert float(local_powsum([], p, device=CPU)) == identity
    assert float(local_powsum([torch.zeros(0)], p, device=CPU)) == identity
    some = torch.tensor([2.0])
    combined = combine_powsums(
        [local_powsum([], p, device=CPU), local_powsum([some], p, device=CPU)], p
    )
    assert float(combined) == float(local_powsum([some], p, device=CPU))


@pytest.mark.parametrize(("p", "op"), NORM_TYPES)
def test_per_tensor_power_sums(p: float, op: str) -> None:
    tensors = _tensors(3)
    sums = tensor_powsums(tensors, p, device=CPU, dtype=torch.float64)
    norms = powsum_to_norm(sums, p)
    for tensor, norm in zip(tensors, norms, strict=True):
        if tensor.numel() == 0:
            assert float(norm) == powsum_to_norm(torch.tensor(powsum_identity(p)), p)
        else:
            assert float(norm) == pytest.approx(norm_of([tensor], p), rel=1e-12)
    torch.testing.assert_close(
        combine_powsums(list(sums), p), local_powsum(tensors, p, device=CPU, dtype=torch.float64)
    )
