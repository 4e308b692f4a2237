"""PyTorch's own tests of its clipping functions, ported to distclip's drop-ins (gloo, CPU).

The cases and assertions of ``test/distributed/fsdp/test_fsdp_clip_grad_norm.py``,
``test/distributed/_composable/fsdp/test_fully_shard_clip_grad_norm_.py`` and the clip
tests of ``test/test_nn.py`` (on sharded layouts here; in one process in
``tests/unit/test_clip_grad.py``), written afresh for distclip's functions, on 2 and
4 ranks. Where torch is the oracle (a DDP copy, whole gradients) the numbers are
compared with torch's, with torch's tolerances (``assertEqual``'s float32 defaults);
everywhere with a float64 reference. Every norm type distclip adds (0, negative p,
-inf) runs beside torch's. The cases that cannot hold, for torch's reasons, are
asserted as they are (see the README's drop-in section):

* FSDP1 CPU offload: FSDP1 pins the offloaded shards' memory, which needs an
  accelerator (not run here);
* FSDP1 ``keep_low_precision_grads`` with ``use_orig_params=True``: torch 2.13's
  FSDP1 backward itself raises (a gradient dtype check), before any clipping;
* FSDP2 2-D: torch's test expects one all-reduce per mesh dimension (2); distclip
  issues one;
* ``p = 0``: torch returns the number of tensors with a non-zero element,
  distclip the number of non-zero elements (checked against the reference).
"""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
import torch

from tests.distributed import workers_dtensor_contract as dtensor
from tests.distributed import workers_fsdp1_contract as fsdp1
from tests.support.harness import ProcessGroupHarness
from tests.support.reference import norm_of
from tests.unit.test_clip_grad import NONFINITE_CASES

pytestmark = pytest.mark.distributed

#: torch.testing's float32 tolerances (what ``assertEqual`` uses in torch's tests).
TORCH_RTOL, TORCH_ATOL = 1.3e-6, 1e-5
RTOL = 1e-5


def torch_equal(a: float, b: float) -> bool:
    return abs(a - b) <= TORCH_ATOL + TORCH_RTOL * abs(b)


def rel_close(a: float, b: float, rtol: float = RTOL) -> bool:
    if math.isnan(b) or math.isinf(b):
        return (math.isnan(a) and math.isnan(b)) or a == b
    return abs(a - b) <= rtol * abs(b)


# ------------------------------------------------------------- FSDP1 (torch's 5 tests)
PARITY = [(s, o) for s in ("FULL_SHARD", "NO_SHARD", "mixed") for o in (False, True)]
#: The norm type each (sharding, use_orig_params) runs its four training steps with.
ITERATION_NORM = dict(zip(PARITY, fsdp1.PARITY_NORM_TYPES, strict=True))


def check_ddp_parity(result: dict[str, Any]) -> None:
    for sub in result["subtests"]:
        p, max_norm, ref = sub["norm_type"], sub["max_norm"], sub["reference"]
        what = f"p={p} max_norm={max_norm}"
        assert rel_close(float(sub["fsdp_norm"]), ref), (what, sub)
        if p != 0:  # torch's p = 0 counts tensors, not elements
            assert torch_equal(float(sub["fsdp_norm"]), float(sub["ddp_norm"])), (what, sub)
            assert sub["grad_error"] <= RTOL, (what, sub)
        assert sub["fsdp_changed"] is (float(sub["fsdp_norm"]) > max_norm), (what, sub)
        assert sub["ddp_changed"] is (float(sub["ddp_norm"]) > max_norm), (what, sub)
    assert max(result["param_error"]) <= RTOL, result
    for step in result["iterations"]:
        assert rel_close(float(step["fsdp"]), step["reference"]), step


@pytest.mark.parametrize(("sharding", "use_orig_params"), PARITY)
def test_fsdp1_ddp_parity(
    group2: ProcessGroupHarness, sharding: str, use_orig_params: bool
) -> None:
    """``test_ddp_parity``: FSDP1 via distclip == DDP via torch, 2 max_norms x 6 norm types."""
    norm = ITERATION_NORM[(sharding, use_orig_params)]
    for result in group2.run(fsdp1.ddp_parity, sharding, use_orig_params, norm):
        check_ddp_parity(result)
        if norm != 0:
            for step in result["iterations"]:
                assert torch_equal(float(step["fsdp"]), float(step["ddp"])), step


@pytest.mark.parametrize(("sharding", "use_orig_params"), [("FULL_SHARD", True), ("mixed", False)])
def test_fsdp1_ddp_parity_4_ranks(
    group4: ProcessGroupHarness, sharding: str, use_orig_params: bool
) -> None:
    """The same on 4 ranks (uneven shards, padding in the last rank's)."""
    for result in group4.run(fsdp1.ddp_parity, sharding, use_orig_params, -math.inf):
        check_ddp_parity(result)


@pytest.mark.parametrize("sharding", ["FULL_SHARD", "NO_SHARD"])
def test_fsdp1_low_precision_grads(group2: ProcessGroupHarness, sharding: str) -> None:
    """``test_low_precision_grads``: fp16 gradients give an fp16 norm, clipped below max_norm."""
    for result in group2.run(fsdp1.low_precision_grads, sharding, False):
        assert result["grad_dtypes"] == ["torch.float16"]
        for sub in result["subtests"]:
            p, max_norm = sub["norm_type"], sub["max_norm"]
            assert sub["dtype"] == "torch.float16", sub
            assert rel_close(sub["norm"], sub["reference"], 1e-3), sub  # fp16's precision
            if p in (1.0, 2.0, math.inf):  # torch's best-effort check, its norm types
                assert all(n <= max_norm * (1 + 1e-3) for n in sub["local_norms"]), sub


def test_fsdp1_low_precision_grads_with_orig_params_fails_in_torch(
    group2: ProcessGroupHarness,
) -> None:
    """torch 2.13's FSDP1 cannot keep fp16 gradients with ``use_orig_params=True``: its
    own backward raises, before anything of distclip runs (torch's test is GPU-only)."""
    for result in group2.run(fsdp1.low_precision_grads, "FULL_SHARD", True):
        assert "grad_dtype" in result["torch_error"], result


@pytest.mark.parametrize("use_orig_params", [False, True])
def test_fsdp1_no_gradients(group2: ProcessGroupHarness, use_orig_params: bool) -> None:
    """``test_no_gradients``: a float32 zero and torch's warning, naming the rank."""
    for rank, result in enumerate(group2.run(fsdp1.no_gradients, use_orig_params)):
        pattern = (
            rf"on rank {rank} with no gradients -- returning the total norm in the default "
            r"dtype torch\.float32"
        )
        assert any(re.search(pattern, w) for w in result["warnings"]), result
        assert result["dtype"] == "torch.float32"
        assert result["norm"] == 0.0


def test_fsdp1_non_uniform_grad_dtype(group2: ProcessGroupHarness) -> None:
    """``test_non_uniform_grad_dtype``: bf16 and fp32 gradients give an fp32 norm."""
    for result in group2.run(fsdp1.non_uniform_grad_dtype):
        assert result["grad_dtypes"] == ["torch.bfloat16", "torch.float32"]
        assert result["dtype"] == "torch.float32"
        assert rel_close(result["norm"], result["reference"], 1e-6), result


@pytest.mark.parametrize("use_orig_params", [False, True])
def test_fsdp1_non_root(group2: ProcessGroupHarness, use_orig_params: bool) -> None:
    """``test_non_root``: torch's method refuses a non-root unit; distclip takes it for its
    own parameters (their global norm) and refuses parameters it does not manage."""
    for result in group2.run(fsdp1.non_root, use_orig_params):
        assert "should only be called on the root FSDP instance" in result["torch_error"]
        assert rel_close(result["unit_norm"], result["reference"]), result
        assert "model=" in result["refused"], result


# ------------------------------------------------------------- FSDP2 (torch's 2 tests)
def check_fully_shard(
    result: dict[str, Any], norm_type: float | str, torch_norms: tuple[Any, ...], dims: int
) -> None:
    max_norm, p = 1.0, float(norm_type)
    for step in result["iterations"]:
        assert step["grads_match_reference"], step
        assert rel_close(step["total"], step["sharded_reference"]), step
        assert torch_equal(step["total"], step["reference"]), step
        assert step["placements"] == ["Replicate"] * dims, step
        assert step["all_reduces"] == step["debug_all_reduces"] == 1, step
        clipped = step["reference"] > max_norm
        if norm_type in torch_norms:
            assert step["all_above_max_norm"], step
            assert torch_equal(step["total"], step["ref_total"]), step
            assert all(n <= max_norm * (1 + 1e-5) for n in step["local_norms_after"]), step
        elif p != 0:
            assert torch_equal(step["total"], step["ref_total"]), step
        if clipped:
            assert step["changed"], step


@pytest.mark.parametrize("norm_type", [2, 1, "inf", 0, -1, "-inf"])
def test_fully_shard_clip_grad_norm_1d(group2: ProcessGroupHarness, norm_type: Any) -> None:
    """``test_clip_grad_norm_1d``: FSDP2 vs a DDP copy; one all-reduce, as torch expects."""
    for result in group2.run(dtensor.fully_shard_clip, norm_type, False):
        check_fully_shard(result, norm_type, (2, 1, "inf"), 1)


@pytest.mark.parametrize("norm_type", [2, 1, 3, "inf", 0, -1, "-inf"])
def test_fully_shard_clip_grad_norm_2d(group4: ProcessGroupHarness, norm_type: Any) -> None:
    """``test_clip_grad_norm_2d``: FSDP2 + TP on a 2 x 2 mesh vs DDP over the dp group.

    torch's test expects one all-reduce per mesh dimension (2, partial to replicate
    along each); distclip's clip does one over the flattened mesh.
    """
    for result in group4.run(dtensor.fully_shard_clip, norm_type, True, 3):
        check_fully_shard(result, norm_type, (2, 1, 3, "inf"), 2)


# ------------------------------------------------------- test_nn's cases, sharded
DTENSOR_LAYOUTS = {"fsdp2", "tp-rowwise", "2d"}


def check_nn_cases(layout: str, result: dict[str, Any]) -> None:
    max_norm = 2
    for case in result["cases"]:
        p, what = case["norm_type"], case
        assert case["dtensor"] is (layout in DTENSOR_LAYOUTS), what
        assert rel_close(case["norm"], case["before"]), what
        if case["torch"] is not None:
            assert torch_equal(case["norm"], case["torch"]), what
        expected_scale = min(1.0, max_norm / (case["before"] + 1e-6))
        assert case["spread"] <= 1e-6 * expected_scale, what
        assert rel_close(case["scale"], expected_scale), what
        if p not in (0.5, 1.5, 2.0, 4.0, math.inf):  # distclip's norm types: scale checked
            continue
        if case["grads"] == "_small":  # test_nn: small gradients are left alone
            assert case["scale"] == 1.0, what
            assert case["after"] == case["before"], what
        else:  # test_nn: clipped to exactly max_norm
            assert rel_close(case["after"], max_norm), what
    assert all(result["single_equal"])
    assert result["generator_warnings"] == [
        "`parameters` is an empty generator, no gradient clipping will occur."
    ]
    assert all(result["value"]), result["value"]


@pytest.mark.parametrize("layout", ["ddp", "fsdp2", "tp-rowwise", "marked"])
def test_nn_clip_cases_2_ranks(group2: ProcessGroupHarness, layout: str) -> None:
    """test_nn's ``test_clip_grad_norm`` / ``test_clip_grad_value`` on a sharded Linear."""
    for result in group2.run(dtensor.nn_cases, layout):
        check_nn_cases(layout, result)


@pytest.mark.parametrize("layout", ["fsdp2", "2d", "marked"])
def test_nn_clip_cases_4_ranks(group4: ProcessGroupHarness, layout: str) -> None:
    """The same on 4 ranks: uneven FSDP2 rows (3, 3, 3, 1), a 2-D mesh, tp x dp by hand."""
    for result in group4.run(dtensor.nn_cases, layout):
        check_nn_cases(layout, result)


def check_nonfinite(rows_by_rank: list[list[dict[str, Any]]]) -> None:
    """Every rank raises alike, exactly when test_nn expects, before any gradient changes."""
    first = rows_by_rank[0]
    for rows in rows_by_rank:
        assert len(rows) == len(first)
        for row, row0 in zip(rows, first, strict=True):
            assert (row["error"] is None) is (row0["error"] is None), (row, row0)
    for row in first:
        one_elem, prefix, _, nonfinite, _ = NONFINITE_CASES[row["case"]]
        p, scalar = row["norm_type"], row["scalar"]
        expect_error = p in nonfinite and row["error_if_nonfinite"]
        if expect_error:
            assert row["error"] is not None, row
            assert f"The total norm of order {float(p)} for gradients" in row["error"], row
            assert row["unchanged"], row
            continue
        assert row["error"] is None, row
        grad = torch.zeros(10, dtype=torch.float64)
        if one_elem:
            grad[1] = scalar
        else:
            grad.fill_(scalar)
        grads = [torch.ones(1, dtype=torch.float64), grad] if prefix else [grad]
        assert rel_close(row["norm"], norm_of(grads, p), 1e-12), row
        assert math.isfinite(row["norm"]) is (p not in nonfinite), row


@pytest.mark.parametrize("layout", ["fsdp2", "marked"])
def test_clip_grad_norm_error_if_nonfinite_sharded(
    group2: ProcessGroupHarness, group4: ProcessGroupHarness, layout: str
) -> None:
    """test_nn's ``error_if_nonfinite`` table, the parameters sharded over 2 and 4 ranks:
    a NaN or inf held by one rank makes every rank raise."""
    for group in (group2, group4):
        check_nonfinite(group.run(dtensor.nonfinite_table, layout, NONFINITE_CASES))
