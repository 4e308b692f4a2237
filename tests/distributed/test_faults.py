"""Faults injected into real 2-rank gloo runs: nothing lost, no rank left behind.

Every check compares numbers: parameters, optimizer state and the window bit for bit
across a skipped step and across ranks; thresholds and parameters against a
single-process reference (``tests.support.reference``) that never saw the faulty step;
norms against float64 numpy.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from tests.distributed import workers_faults
from tests.support import problem
from tests.support.harness import ProcessGroupHarness, WorkerError
from tests.support.reference import Reference, SlowAutoClip, reference_train

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]

#: The layouts of ``tests.support.layouts`` the fault runs use.
LAYOUTS = ("ddp", "fsdp2")
STEPS = 14
Q = 0.3
WINDOW = 6
FAULT_STEP = 7


def _spec(layout: str, **options: Any) -> dict[str, Any]:
    return {"layout": layout, "steps": STEPS, "q": Q, "window": WINDOW, **options}


def reference_run(steps: int, **options: Any) -> Reference:
    """AutoClip (q=0.3, window=6) + SGD with momentum 0.9 on the ``FAULTS`` problem."""
    return reference_train(
        problem.FAULTS,
        steps=steps,
        options={"q": Q, "window": WINDOW},
        optimizer_kwargs={"lr": 0.05, "momentum": 0.9},
        **options,
    )


def _assert_matches_reference(per_rank: list[dict[str, Any]], ref: Reference, rtol: float) -> None:
    """Every rank's thresholds, norms, window and parameters equal the reference's."""
    for out in per_rank:
        assert out["steps"] == ref.steps
        for stats, n, tau in zip(out["stats"], ref.total_norm, ref.threshold, strict=True):
            assert stats["skipped"] == 0.0
            assert math.isclose(stats["total_norm"], n, rel_tol=rtol)
            assert math.isclose(stats["threshold"], tau, rel_tol=rtol)
        assert out["window"] == pytest.approx(ref.window, rel=rtol)
        for name, value in ref.params.items():
            torch.testing.assert_close(out["params"][name].float(), value, rtol=rtol, atol=1e-6)
    # The ranks agree bit for bit.
    assert all(torch.equal(out["checksum"], per_rank[0]["checksum"]) for out in per_rank)
    assert all(out["stats"] == per_rank[0]["stats"] for out in per_rank)


# ---------------------------------------------------------------------- non-finite
FAULTS = {
    # layout, optimizer, rank holding the fault, parameter, value
    "fsdp2-nan-one-shard-element-rank1": ("fsdp2", "sgd", 1, "mlp.fc2.weight", math.nan),
    "fsdp2-inf-rank0": ("fsdp2", "sgd", 0, "mlp.fc1.bias", math.inf),
    "ddp-nan-before-allreduce-rank1": ("ddp", "sgd", 1, "mlp.out.weight", math.nan),
    "ddp-neg-inf-fused": ("ddp", "sgd_fused", 0, "side.weight", -math.inf),
}


@pytest.mark.parametrize("case", sorted(FAULTS))
def test_nonfinite_in_one_element_skips_on_every_rank(
    group2: ProcessGroupHarness, case: str
) -> None:
    """One NaN/inf element of one rank's shard: every rank skips; later steps as if never seen."""
    layout, optimizer, rank, param, value = FAULTS[case]
    fault = {"step": FAULT_STEP, "rank": rank, "param": param, "value": value}
    per_rank = group2.run(workers_faults.train, _spec(layout, optimizer=optimizer, fault=fault))
    reference = reference_run(STEPS, omit=[FAULT_STEP])
    for out in per_rank:
        before, after = out["before"], out["after"]
        # Nothing changed on the skipped step: parameters, optimizer state, window.
        for name, tensor in before["params"].items():
            assert torch.equal(after["params"][name], tensor), name
        assert before["optim"].keys() == after["optim"].keys()
        for key, state in before["optim"].items():
            for name, tensor in state.items():
                assert torch.equal(after["optim"][key][name], tensor), (key, name)
        for name, tensor in before["window"].items():
            assert torch.equal(after["window"][name], tensor), name
        assert (before["num_skipped"], after["num_skipped"]) == (0, 1)
        assert out["num_skipped"] == 1
        # The skipped step is recorded as such, on every rank.
        skipped = [s["step"] for s in out["stats"] if s["skipped"]]
        assert skipped == [FAULT_STEP + 1]
        out["stats"] = [s for s in out["stats"] if not s["skipped"]]
        out["steps"] = [st for st in out["steps"] if st != FAULT_STEP]
    # Afterwards: the thresholds and parameters of a run that never saw the step.
    _assert_matches_reference(per_rank, reference, rtol=2e-6)


def test_nonfinite_error_raises_on_every_rank_under_fsdp2(group2: ProcessGroupHarness) -> None:
    """``nonfinite="error"``: the same error on both ranks, nothing modified, no hang."""
    fault = {"step": 3, "rank": 1, "param": "mlp.fc3.weight", "value": math.nan}
    per_rank = group2.run(workers_faults.train, _spec("fsdp2", fault=fault, nonfinite="error"))
    messages = set()
    for out in per_rank:
        assert [(step, kind) for step, kind, _ in out["errors"]] == [(3, "NonFiniteNormError")]
        messages.add(out["errors"][0][2])
        for name, tensor in out["before"]["params"].items():
            assert torch.equal(out["after"]["params"][name], tensor)
        assert out["after"]["num_steps"] == out["before"]["num_steps"] == 3
    assert len(messages) == 1
    assert "step 4" in messages.pop()


# --------------------------------------------------------------- mixed precision
AMP = {
    "adamw-fused-no-unscale": ("AdamW", True, False),
    "adamw-fused-unscale": ("AdamW", True, True),
    "sgd-no-unscale": ("SGD", False, False),
    "sgd-unscale": ("SGD", False, True),
}


@pytest.mark.parametrize("case", sorted(AMP))
def test_grad_scaler_fp16(group2: ProcessGroupHarness, case: str) -> None:
    """GradScaler + fp16 autocast: the window holds unscaled norms, overflow steps stay out.

    The reference clips by hand after ``scaler.unscale_``. With a fused optimizer and
    no ``unscale_``, GradScaler hands the scale to the optimizer as ``grad_scale``:
    distclip must divide it out before measuring.
    """
    optimizer, fused, unscale = AMP[case]
    spec = {
        "optimizer": optimizer,
        "fused": fused,
        "unscale": unscale,
        "optim_kwargs": {"lr": 0.01} if optimizer == "AdamW" else {"lr": 0.05, "momentum": 0.9},
        "q": Q,
        "window": WINDOW,
        "steps": 20,
        "init_scale": 2.0**20,
        "growth_interval": 3,
        "input_gain": 4.0,
    }
    per_rank = group2.run(workers_faults.train_amp, spec)
    for out in per_rank:
        ours, ref = out["distclip"], out["reference"]
        overflow = [i for i, r in enumerate(ref) if r["skipped"]]
        # Overflows did happen (the scale is backed off several times), and regrowth too.
        assert len(overflow) >= 3
        assert any(b > a for a, b in zip(out["scale"], out["scale"][1:], strict=False))
        assert [i for i, s in enumerate(ours) if s["skipped"]] == overflow
        for mine, theirs in zip(ours, ref, strict=True):
            if not theirs["skipped"]:
                assert math.isclose(mine["total_norm"], theirs["total_norm"], rel_tol=1e-6)
                assert math.isclose(mine["threshold"], theirs["threshold"], rel_tol=1e-6)
        assert out["window"] == pytest.approx(out["reference_window"], rel=1e-6)
        for name, value in out["params"]["reference"].items():
            torch.testing.assert_close(out["params"]["distclip"][name], value, rtol=1e-5, atol=1e-6)
        assert out["attrs_left"] == []
        if fused:  # distclip saw the overflow steps (and skipped them on the device)
            assert all("by" not in s for s in ours)
            assert out["num_skipped"] == len(overflow)
        else:  # the scaler did not even call step() on them
            assert all(ours[i].get("by") == "scaler" for i in overflow)
            assert out["num_skipped"] == 0
    assert repr(per_rank[0]["distclip"]) == repr(per_rank[1]["distclip"])


def test_bf16_gradients_accumulate_in_float32(group2: ProcessGroupHarness) -> None:
    """bf16 parameters sharded by FSDP2: the global norm equals float64 numpy to 1e-6."""
    per_rank = group2.run(
        workers_faults.train, _spec("fsdp2", dtype="bfloat16", measure_full=True, steps=6)
    )
    for out in per_rank:
        for stats, exact in zip(out["stats"], out["ref_norm"], strict=True):
            assert math.isclose(stats["total_norm"], exact, rel_tol=1e-6)
    assert per_rank[0]["stats"] == per_rank[1]["stats"]


# ---------------------------------------------------------------- accumulation
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradient_accumulation_one_window_entry_per_step(
    group2: ProcessGroupHarness, layout: str
) -> None:
    """4 micro-batches per step without sync (no_sync / set_requires_gradient_sync)."""
    per_rank = group2.run(workers_faults.train, _spec(layout, micro=4))
    for out in per_rank:
        assert out["num_steps"] == STEPS
        assert len(out["window"]) == WINDOW
    _assert_matches_reference(per_rank, reference_run(STEPS), 2e-6)


# ---------------------------------------------------------------- edge layouts
EDGES: dict[str, dict[str, Any]] = {
    "ddp-frozen": {"layout": "ddp", "frozen": ("mlp.fc1.weight", "mlp.fc3.bias")},
    "fsdp2-frozen-layer": {"layout": "fsdp2", "frozen": ("mlp.fc2.weight", "mlp.fc2.bias")},
    "fsdp2-side-unused-odd-steps": {"layout": "fsdp2", "side_every": 2},
    "fsdp2-empty-param-group": {"layout": "fsdp2", "empty_group": True},
}


@pytest.mark.parametrize("case", sorted(EDGES))
def test_edge_layouts(group2: ProcessGroupHarness, case: str) -> None:
    """Frozen parameters, gradients missing on some steps, an empty param group."""
    options = dict(EDGES[case])
    per_rank = group2.run(workers_faults.train, _spec(options.pop("layout"), **options))
    reference = reference_run(
        STEPS,
        frozen=options.get("frozen", ()),
        side_every=options.get("side_every", 0),
    )
    _assert_matches_reference(per_rank, reference, rtol=2e-6)


def test_a_rank_without_any_gradient_still_joins(group2: ProcessGroupHarness) -> None:
    """Rank 1 has no gradient at all; both ranks clip by rank 0's norm, step after step."""
    rank0, rank1 = group2.run(workers_faults.rank_without_grads, 6)
    assert rank1["grads_none"]
    assert not rank0["grads_none"]
    slow = SlowAutoClip(q=0.5, window=3)
    for step, exact in enumerate(rank0["local_norm"]):
        tau = slow.threshold(exact)
        for out in (rank0, rank1):
            assert math.isclose(out["stats"][step]["total_norm"], exact, rel_tol=1e-6)
            assert math.isclose(out["stats"][step]["threshold"], tau, rel_tol=1e-6)


# ------------------------------------------------------------ guard and timeouts
def test_missing_rank_is_an_error_not_a_hang(group2: ProcessGroupHarness) -> None:
    """A rank that never reaches the collective: the other fails within the group's timeout."""
    timeout = 2.0
    rank0, rank1 = group2.run(workers_faults.missing_rank, timeout, timeout=60)
    assert rank1 == {}
    kind, message, seconds = rank0["clip"]
    assert kind == "RuntimeError"
    assert timeout * 0.9 <= seconds < timeout + 10
    kind, message, seconds = rank0["check"]
    assert kind == "RankDesyncError"
    assert timeout * 0.9 <= seconds < timeout + 10
    assert "rank(s) [1] did not reach the consistency check within 2 s" in message


def test_group_still_usable_after_the_faults(group2: ProcessGroupHarness) -> None:
    """After every fault above the same workers still train correctly together."""
    try:
        per_rank = group2.run(workers_faults.train, _spec("ddp", steps=4))
    except WorkerError as error:  # pragma: no cover - reported with context
        pytest.fail(f"the group did not survive the faults: {error}")
    _assert_matches_reference(per_rank, reference_run(4), 2e-6)


def test_sharded_grad_scaler_skips_together_under_fsdp2(group2: ProcessGroupHarness) -> None:
    """An overflow in one rank's shard: ShardedGradScaler makes both ranks skip, no hang."""
    inf_step = 4
    rank0, rank1 = group2.run(workers_faults.train_sharded_scaler, 10, inf_step)
    for out in (rank0, rank1):
        assert out["stepped"] == [step != inf_step for step in range(10)]
        for name, tensor in out["before"]["params"].items():
            assert torch.equal(out["after"]["params"][name], tensor), name
        for name, tensor in out["before"]["window"].items():
            assert torch.equal(out["after"]["window"][name], tensor), name
        assert out["scale"][inf_step] == out["scale"][inf_step - 1] / 2
        assert len(out["window"]) == 6
    assert torch.equal(rank0["checksum"], rank1["checksum"])
    assert rank0["stats"] == rank1["stats"]
