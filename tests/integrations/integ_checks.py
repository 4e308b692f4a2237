"""The comparisons every integration test makes, written once, and their reference.

A *run* is what a worker (``hf_workers.hf_run``, ``accel_workers.accel_run``)
returns on one rank; a test passes the runs of every rank of one training. The
reference (:func:`reference_run`) is a plain torch loop in one process with distclip's
``ClippedOptimizer(SGD)`` on the concatenation of every rank's batch of each step (DDP
and DeepSpeed average the ranks' gradients of equal-sized batches: the gradient of the
mean loss over the concatenation).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.support.compare import max_rel_error as max_rel_diff
from tests.support.frameworks import sample
from tests.support.problem import INTEGRATIONS
from tests.support.training import native_run

#: Relative tolerance of thresholds, norms and parameters against the reference (fp32).
RTOL = 1e-6
#: Absolute floor for parameters near zero.
ATOL = 1e-7


def step_batches(seen_per_rank: list[list[list[int]]], gas: int = 1) -> list[list[int]]:
    """The global batch of each optimizer step: every rank's indices, rank 0 first.

    With ``gas`` micro-batches per step (each loss divided by ``gas``), the step's
    gradient is that of the mean loss over the union of its equal-sized micro-batches.
    """
    passes = {len(seen) for seen in seen_per_rank}
    if len(passes) != 1 or passes.copy().pop() % gas:
        raise AssertionError(f"the ranks ran {sorted(passes)} forward passes, gas={gas}")
    num_steps = passes.pop() // gas
    return [
        [i for seen in seen_per_rank for micro in range(gas) for i in seen[gas * step + micro]]
        for step in range(num_steps)
    ]


def reference_run(
    batches: list[list[int]],
    *,
    method: str = INTEGRATIONS.method,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The plain loop: ``ClippedOptimizer(SGD)`` on ``batches``, one optimizer step each.

    Returns the per-step ``total_norm`` and ``threshold`` (floats), the final
    parameters (flat float32) and the window (oldest first).
    """
    steps = [
        [(torch.stack([sample(i)[0] for i in batch]), torch.stack([sample(i)[1] for i in batch]))]
        for batch in batches
    ]
    run = native_run(
        INTEGRATIONS,
        steps,
        method=method,
        options=INTEGRATIONS.options if options is None else options,
        lr=INTEGRATIONS.optimizer_kwargs["lr"],
    )
    return {**run["records"], "params": run["params"], "window": run["window"]}


def ok(per_rank: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``per_rank`` after checking that no rank recorded an error."""
    for run in per_rank:
        assert run["error"] is None, run["error"]["traceback"]
    return per_rank


def thresholds(run: dict[str, Any]) -> list[float]:
    """The threshold of every optimizer step of ``run``."""
    return [record["threshold"] for record in run["records"]]


def max_param_diff(first: torch.Tensor, second: torch.Tensor) -> float:
    """The largest absolute difference of two flat parameter tensors."""
    return float((first - second).abs().max())


def check_against_reference(per_rank: list[dict[str, Any]], *, gas: int = 1) -> float:
    """Every rank's training equals the plain loop on the same batches; returns the max diff.

    Checks: the ranks recorded the same steps (one window), each trained its own
    samples, thresholds and norms equal :func:`reference_run` on the
    concatenated batches (``RTOL``), AutoClip clipped on some steps and not on all (the
    comparison is not vacuous), every rank's final parameters equal the reference's,
    and ``last_clip`` read through the framework's wrapper was the clipper's record.
    """
    ok(per_rank)
    first = per_rank[0]
    for run in per_rank[1:]:
        assert run["records"] == first["records"]
        assert set(run["seen"][0]).isdisjoint(first["seen"][0])
    reference = reference_run(step_batches([run["seen"] for run in per_rank], gas=gas))
    diff = max_rel_diff(thresholds(first), reference["threshold"])
    assert diff <= RTOL
    norms = [record["total_norm"] for record in first["records"]]
    assert max_rel_diff(norms, reference["total_norm"]) <= RTOL
    assert 0 < sum(record["clipped"] for record in first["records"]) < len(first["records"])
    for run in per_rank:
        torch.testing.assert_close(run["params"], reference["params"], rtol=RTOL, atol=ATOL)
        assert all(run["mirrored"])
    return diff


def check_resumed(
    full: list[dict[str, Any]], resumed: list[dict[str, Any]], split: int
) -> tuple[float, float]:
    """A run resumed after ``split`` steps continues the uninterrupted one exactly.

    On every rank: the same later samples, steps counted on from ``split``, the same
    thresholds and final window (``RTOL``) and parameters. Returns the max threshold
    and parameter differences.
    """
    ok(full)
    ok(resumed)
    worst = (0.0, 0.0)
    for before, after in zip(full, resumed, strict=True):
        assert after["seen"] == before["seen"][split:]
        assert after["records"][0]["step"] == split + 1
        diff = max_rel_diff(thresholds(after), thresholds(before)[split:])
        assert diff <= RTOL
        assert after["window"] == pytest.approx(before["window"], rel=RTOL)
        torch.testing.assert_close(after["params"], before["params"], rtol=RTOL, atol=ATOL)
        params = max_param_diff(after["params"], before["params"])
        worst = (max(worst[0], diff), max(worst[1], params))
    return worst
