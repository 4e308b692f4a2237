"""A DCP checkpoint saved by 4 FSDP2 ranks resumes at 2 ranks and at 1 with the same thresholds.

The model trains on a fixed global batch per step split evenly over the ranks, so
the averaged gradient, hence the global norm, AutoClip's window and its thresholds,
are the same at any world size up to float rounding (the order in which per-rank
partial sums are added differs). The run:

1. 4 gloo ranks, FSDP2: ``SAVE_AFTER`` steps, ``dcp.save``, then on to ``TOTAL`` steps
   (the uninterrupted reference);
2. 2 gloo ranks, FSDP2 (a 2-way sharding of the same tensors): a fresh model from
   another seed, the checkpoint loaded with ``get_state_dict`` / ``dcp.load`` /
   ``set_state_dict``, the same later steps;
3. this process, no process group, a plain (unsharded) model: the same.

Checked: the window right after each load equals the saved one bit for bit (it is
replicated state: a checkpoint of it is world-size independent); the later
per-step norms, thresholds and clip factors, the final window and the final full
parameters agree with the 4-rank run to ``RTOL`` (1e-5 relative); the 4 (and 2)
ranks agree bit for bit among themselves.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.reliability import resume_reshard_workers as workers
from tests.support.compare import max_rel_error, max_scaled_error
from tests.support.harness import ProcessGroupHarness
from tests.support.problem import RESUME

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.timeout(150),
    # DCP warns that it runs without a process group in the 1-process resume.
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled"),
]

SAVE_AFTER = 9  # more than the window (6): the saved ring buffer has wrapped
TOTAL = 17
RTOL = 1e-5
#: Harness deadline of one call (a hung collective fails the test after this).
CALL_TIMEOUT = 60.0


def _compare(resumed: dict[str, Any], reference: dict[str, Any]) -> dict[str, float]:
    """Max relative errors of ``resumed`` against the 4-rank reference, by quantity."""
    errors = {
        f"later.{name}": max_rel_error(resumed["later"][name], reference["later"][name])
        for name in ("total_norm", "threshold", "clip_coef")
    }
    errors["final_window"] = max_rel_error(resumed["final_window"], reference["final_window"])
    for name, value in reference["params"].items():
        errors[f"params.{name}"] = max_scaled_error(resumed["params"][name], value)
    return errors


def _assert_ranks_identical(per_rank: list[dict[str, Any]], keys: tuple[str, ...]) -> None:
    """Every rank returned bit-for-bit the same tensors under ``keys`` (nested dicts too)."""
    first = per_rank[0]
    for rank, result in enumerate(per_rank[1:], start=1):
        for key in keys:
            a, b = first[key], result[key]
            pairs = (
                [(f"{key}.{k}", a[k], b[k]) for k in a] if isinstance(a, dict) else [(key, a, b)]
            )
            for label, x, y in pairs:
                assert torch.equal(x, y), f"rank {rank} differs from rank 0 in {label}"


def test_resume_reshard_4_to_2_and_1(tmp_path: Path) -> None:
    """Save at 4 FSDP2 ranks; resume at 4 (reference), 2 (FSDP2) and 1 (plain, no group)."""
    directory = str(tmp_path / "ckpt_4ranks")
    timings: dict[str, float] = {}

    start = time.perf_counter()
    with ProcessGroupHarness(world_size=4, timeout=CALL_TIMEOUT) as group4:
        four = group4.run(workers.train_save_continue, directory, SAVE_AFTER, TOTAL)
    assert group4.exitcodes == [0, 0, 0, 0], f"4-rank workers exited with {group4.exitcodes}"
    timings["4 ranks: train, save, continue"] = time.perf_counter() - start

    start = time.perf_counter()
    with ProcessGroupHarness(world_size=2, timeout=CALL_TIMEOUT) as group2:
        two = group2.run(workers.load_and_continue, directory, SAVE_AFTER, TOTAL, shard=True)
    assert group2.exitcodes == [0, 0], f"2-rank workers exited with {group2.exitcodes}"
    timings["2 ranks: load, continue"] = time.perf_counter() - start

    start = time.perf_counter()
    one = workers.load_and_continue(directory, SAVE_AFTER, TOTAL, shard=False)
    timings["1 process: load, continue"] = time.perf_counter() - start

    # The 4 ranks (and the 2) made the same decisions, bit for bit.
    keys = ("before", "later", "saved_window", "final_window", "params")
    _assert_ranks_identical(four, keys)
    _assert_ranks_identical(two, ("loaded_window", "later", "final_window", "params"))
    reference = four[0]
    assert reference["world_size"] == 4
    assert two[0]["world_size"] == 2
    assert one["world_size"] == 1
    assert not one["sharded"]

    # The problem clips for real, before and after the save (else nothing is tested).
    assert bool((reference["before"]["clip_coef"] < 1).any())
    assert bool((reference["later"]["clip_coef"] < 0.5).any())
    # The saved window has wrapped around its ring buffer.
    assert reference["saved_num_seen"] == SAVE_AFTER > RESUME.options["window"]
    assert reference["saved_window"].numel() == RESUME.options["window"]

    report: dict[str, dict[str, float]] = {}
    for label, resumed in (("2 ranks", two[0]), ("1 process", one)):
        assert resumed["fresh_num_seen"] == 0, f"{label}: a fresh optimizer's window is not empty"
        # The window is replicated state: it loads bit for bit at any world size.
        assert resumed["loaded_num_seen"] == reference["saved_num_seen"], label
        assert torch.equal(resumed["loaded_window"], reference["saved_window"]), (
            f"{label}: loaded window {resumed['loaded_window'].tolist()} != saved "
            f"{reference['saved_window'].tolist()}"
        )
        # The clipper's step count went on from the checkpoint's.
        assert torch.equal(resumed["later"]["step"], reference["later"]["step"]), label
        assert torch.equal(resumed["later"]["skipped"], reference["later"]["skipped"]), label
        assert resumed["final_num_seen"] == reference["final_num_seen"] == TOTAL, label
        errors = _compare(resumed, reference)
        report[label] = errors
        worst = max(errors, key=lambda k: errors[k])
        assert errors[worst] <= RTOL, (
            f"{label}: {worst} differs from the 4-rank run by {errors[worst]:.3g} relative "
            f"(> {RTOL}); all errors: {errors}"
        )

    # For the record only: the worst element-by-element relative error of a parameter
    # (a coordinate near zero has none worth the name; see _tensor_rel_error).
    elementwise = {
        label: max(
            max_rel_error(resumed["params"][name], value)
            for name, value in reference["params"].items()
        )
        for label, resumed in (("2 ranks", two[0]), ("1 process", one))
    }
    summary = ", ".join(
        f"{label}: max rel error {max(errors.values()):.3g} "
        f"(thresholds {errors['later.threshold']:.3g}, "
        f"params elementwise {elementwise[label]:.3g})"
        for label, errors in report.items()
    )
    timing = ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
    print(f"\nreshard 4 -> 2 / 1: {summary}; {timing}")
