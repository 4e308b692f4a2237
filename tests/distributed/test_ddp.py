"""distclip under DistributedDataParallel: 2 gloo ranks on CPU against a 1-process reference.

Every check runs in one process group per module (the ``group2`` fixture) and
compares:

* the ranks with each other, bit for bit (norms, thresholds, coefficients, windows,
  parameters, optimizer and clipper state): DDP gives every rank the same averaged
  gradients, so distclip must make the same decision everywhere;
* the ranks with the slow reference (``tests.support.reference``: plain torch on the
  full batch, numpy quantile) to 1e-6 relative for the per-step numbers and 1e-5 for
  the final parameters.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.distributed import workers_ddp
from tests.distributed.workers_ddp import build_optimizer, make_spec
from tests.support.compare import assert_bitwise_equal, assert_ranks_identical, assert_rel_close
from tests.support.harness import ProcessGroupHarness
from tests.support.problem import DDP, loss_fn
from tests.support.reference import Reference

pytestmark = pytest.mark.distributed

STEPS = 24
#: Per-step numbers against the reference (float32 runs, float64 reference).
RTOL = 1e-6
WINDOW = 8
NAN_STEP = 10
AUTOCLIP = {"q": 0.3, "window": WINDOW}
SGD_MOMENTUM = {"lr": 0.05, "momentum": 0.9}
ADAMW_FUSED = {"lr": 1e-2, "weight_decay": 0.01, "fused": True}

#: The layouts of the main comparison: integration, base optimizer, options.
SPECS: dict[str, dict[str, Any]] = {
    "sgd": make_spec("SGD", {"lr": 0.05}, clip=AUTOCLIP),
    "sgd-momentum-maxnorm-noforeach": make_spec(
        "SGD", SGD_MOMENTUM, clip={**AUTOCLIP, "max_norm": 2.0, "foreach": False}
    ),
    "adamw-fused": make_spec("AdamW", ADAMW_FUSED, clip=AUTOCLIP),
    "adamw-foreach": make_spec(
        "AdamW", {"lr": 1e-2, "foreach": True}, clip={**AUTOCLIP, "foreach": True}
    ),
    "attach-sgd-momentum": make_spec("SGD", SGD_MOMENTUM, integration="attach", clip=AUTOCLIP),
    "attach-adamw-fused": make_spec("AdamW", ADAMW_FUSED, integration="attach", clip=AUTOCLIP),
    "sgd-closure-bucketview": make_spec(
        "SGD",
        SGD_MOMENTUM,
        clip=AUTOCLIP,
        closure=True,
        ddp_kwargs={"gradient_as_bucket_view": True},
    ),
    "attach-adamw-closure-bucketview": make_spec(
        "AdamW",
        {"lr": 1e-2},
        integration="attach",
        clip=AUTOCLIP,
        closure=True,
        ddp_kwargs={"gradient_as_bucket_view": True},
    ),
    "sgd-fused-momentum": make_spec("SGD", {**SGD_MOMENTUM, "fused": True}, clip=AUTOCLIP),
    "norm-adamw": make_spec("AdamW", {"lr": 1e-2}, method="norm", clip={"max_norm": 2.0}),
}

EXPECTED_CLASS = {
    "sgd": "AutoClippedSGD",
    "sgd-momentum-maxnorm-noforeach": "AutoClippedSGD",
    "adamw-fused": "AutoClippedAdamW",
    "adamw-foreach": "AutoClippedAdamW",
    "attach-sgd-momentum": "SGD",
    "attach-adamw-fused": "AdamW",
    "sgd-fused-momentum": "AutoClippedSGD",
    "sgd-closure-bucketview": "AutoClippedSGD",
    "attach-adamw-closure-bucketview": "AdamW",
    "norm-adamw": "NormClippedAdamW",
}


def _nan_spec(name: str, nan_steps: dict[int, tuple[int, ...]], **clip: Any) -> dict[str, Any]:
    """``SPECS[name]`` with NaNs in the batches of the given ``{step: ranks}``."""
    spec = SPECS[name]
    return {**spec, "clip": {**spec["clip"], **clip}, "nan_steps": dict(nan_steps)}


# ------------------------------------------------------------------------------ helpers
def assert_matches_reference(result: dict[str, Any], ref: Reference, spec: dict[str, Any]) -> None:
    """One rank's run equals the reference run, step by step, and ends in the same state."""
    records = result["records"]
    skipped = [bool(s) for s in records["skipped"]]
    assert skipped == ref.skipped, "skipped steps differ from the reference"
    finite = [i for i, s in enumerate(ref.skipped) if not s]
    for name in ("total_norm", "threshold", "clip_coef"):
        expected = getattr(ref, name)
        assert_rel_close(
            records[name][finite], [expected[i] for i in finite], f"{name} of finite steps", RTOL
        )
    for i, was_skipped in enumerate(skipped):
        if was_skipped:
            assert not torch.isfinite(records["total_norm"][i]), f"step {i}: norm"
            assert float(records["clip_coef"][i]) == 1.0, f"step {i}: coef"
            # The threshold of a skipped step comes from the window it left untouched.
            assert_rel_close(
                records["threshold"][i], ref.threshold[i], f"step {i}: threshold", RTOL
            )
    assert result["step_numbers"] == list(range(1, spec["steps"] + 1))
    if spec["method"] == "autoclip":
        assert_rel_close(result["window"], ref.window, "window (oldest first)", RTOL)
        assert int(result["window_num_seen"]) == ref.skipped.count(False)
    torch.testing.assert_close(result["params"], ref.params, rtol=1e-5, atol=1e-5)
    assert int(result["num_skipped"]) == ref.skipped.count(True)
    clear, ties = ref.clipped_steps()
    assert clear <= int(result["num_clipped"]) <= clear + ties


def _resume_in_this_process(spec: dict[str, Any], path: Path, stop_at: int) -> dict[str, Any]:
    """Load a rank's checkpoint here (no process group) and train on the full batch."""
    checkpoint = torch.load(path, weights_only=True)
    model = DDP.model(12345)
    model.load_state_dict(checkpoint["model"])
    optimizer, clipper = build_optimizer(spec, model.parameters())
    optimizer.load_state_dict(checkpoint["optimizer"])
    out: dict[str, Any] = {"total_norm": [], "threshold": [], "clip_coef": []}
    for step in range(stop_at, spec["steps"]):
        x, y = DDP.full_batch(step)
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()
        for field in out:
            out[field].append(float(getattr(optimizer.last_clip, field)))  # type: ignore[attr-defined]
    out["window"] = clipper.window.chronological()  # type: ignore[attr-defined]
    out["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return out


# -------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", list(SPECS))
def test_ddp_matches_reference(group2: ProcessGroupHarness, name: str) -> None:
    """Both ranks clip identically (bitwise) and as the 1-process reference does."""
    spec = SPECS[name]
    results = group2.run(workers_ddp.train, spec)
    ref = workers_ddp.reference(spec)

    assert_ranks_identical(results)
    result = results[0]
    assert result["class_name"] == EXPECTED_CLASS[name]
    assert_matches_reference(result, ref, spec)
    # step(closure) returns the closure's loss (evaluated once).
    assert result["closure_loss_returned"] == ([True] * STEPS if spec["closure"] else [])

    # The run exercises both branches of the clip, and AutoClip's window wrapped.
    coefs = result["records"]["clip_coef"]
    assert int((coefs < 0.99).sum()) >= 5, f"too few clipped steps: {coefs}"
    assert int((coefs == 1.0).sum()) >= 3, f"too few unclipped steps: {coefs}"
    if spec["method"] == "autoclip":
        assert int(result["window_num_seen"]) == STEPS > WINDOW
        assert result["window"].shape == (WINDOW,)
        if spec["clip"].get("max_norm") is not None:
            thresholds = result["records"]["threshold"]
            assert bool((thresholds == spec["clip"]["max_norm"]).any()), "max_norm never binds"
            assert bool((thresholds < spec["clip"]["max_norm"]).any())
    else:
        assert bool((result["records"]["threshold"] == spec["clip"]["max_norm"]).all())


@pytest.mark.parametrize(
    "name",
    [
        "sgd-momentum-maxnorm-noforeach",
        "adamw-fused",
        "attach-sgd-momentum",
        "attach-adamw-fused",
        "sgd-closure-bucketview",
        "attach-adamw-closure-bucketview",
        "sgd-fused-momentum",
    ],
)
def test_nonfinite_step_skipped_on_every_rank(group2: ProcessGroupHarness, name: str) -> None:
    """A NaN in rank 1's batch reaches both ranks through DDP; both skip that step.

    Parameters, optimizer state and window are bitwise unchanged across the step, and
    every later threshold equals a reference that never saw the step.
    """
    spec = _nan_spec(name, {NAN_STEP: (1,)})
    results = group2.run(workers_ddp.train, spec)
    ref = workers_ddp.reference(spec)
    assert ref.skipped == [step == NAN_STEP for step in range(STEPS)]

    assert_ranks_identical(results)
    for result in results:
        assert_matches_reference(result, ref, spec)
        assert bool(result["records"]["skipped"][NAN_STEP])
        assert int(result["num_skipped"]) == 1

        around = result["snapshots"][NAN_STEP]
        floats = around["as_floats"]
        assert math.isnan(floats["total_norm"])
        assert (floats["skipped"], floats["clip_coef"], floats["step"]) == (1.0, 1.0, NAN_STEP + 1)
        before, after = around["before"], around["after"]
        assert_bitwise_equal(before["params"], after["params"], "params across the NaN step")
        opt_before, opt_after = before["optimizer"], after["optimizer"]
        assert_bitwise_equal(opt_before["state"], opt_after["state"], "optimizer state")
        clip_before = opt_before["param_groups"][0].pop("distclip")
        clip_after = opt_after["param_groups"][0].pop("distclip")
        assert_bitwise_equal(opt_before["param_groups"], opt_after["param_groups"], "groups")
        assert_bitwise_equal(clip_before["state"], clip_after["state"], "clipper window")
        assert_bitwise_equal(clip_before["num_clipped"], clip_after["num_clipped"])
        assert clip_after["num_steps"] == clip_before["num_steps"] + 1 == NAN_STEP + 1
        assert int(clip_after["num_skipped"]) == int(clip_before["num_skipped"]) + 1 == 1


@pytest.mark.parametrize(
    "name",
    [
        "sgd-momentum-maxnorm-noforeach",
        "adamw-fused",
        "attach-sgd-momentum",
        "attach-adamw-fused",
        # A skipped first step of SGD(fused=True, momentum>0) must not go through
        # found_inf: torch's _fused_sgd stores torch.empty_like momentum buffers that
        # only the (skipped) kernel would write.
        "sgd-fused-momentum",
    ],
)
def test_nonfinite_first_step_skipped(group2: ProcessGroupHarness, name: str) -> None:
    """A NaN at the very first step (rank 0's batch; empty window, no optimizer state yet).

    Both ranks skip it: the threshold is inf (no finite norm seen), parameters are
    unchanged, the window stays empty, and the optimizer state is at most lazily
    created (all zeros): the rest of the run equals a reference that started a step
    later.
    """
    spec = _nan_spec(name, {0: (0,)})
    results = group2.run(workers_ddp.train, spec)
    ref = workers_ddp.reference(spec)
    assert ref.skipped == [step == 0 for step in range(STEPS)]
    # No finite norm seen yet: no threshold (or the max_norm cap).
    assert ref.threshold[0] == spec["clip"].get("max_norm", math.inf)

    assert_ranks_identical(results)
    for result in results:
        around = result["snapshots"][0]
        assert_bitwise_equal(around["before"]["params"], around["after"]["params"], "params")
        clip_after = around["after"]["optimizer"]["param_groups"][0]["distclip"]
        assert int(clip_after["state"]["window"]["num_seen"]) == 0
        assert int(clip_after["num_skipped"]) == 1
        assert around["before"]["optimizer"]["state"] == {}
        for index, state in around["after"]["optimizer"]["state"].items():
            for key, value in state.items():
                assert not bool(value.any()), (
                    f"optimizer state[{index}][{key!r}] after a skipped first step is not "
                    f"a fresh zero state: {value}"
                )
        assert_matches_reference(result, ref, spec)


@pytest.mark.parametrize("name", ["sgd-momentum-maxnorm-noforeach", "adamw-fused"])
def test_nonfinite_error_raises_on_every_rank(group2: ProcessGroupHarness, name: str) -> None:
    """``nonfinite="error"``: both ranks raise at the NaN step, having modified nothing."""
    spec = _nan_spec(name, {NAN_STEP: (1,)}, nonfinite="error")
    results = group2.run(workers_ddp.train_expecting_error, spec)
    ref = workers_ddp.reference(spec)

    assert_ranks_identical(results)
    for result in results:
        (error,) = result["errors"]
        assert error["step"] == NAN_STEP
        assert "nan" in error["message"]
        assert f"at step {NAN_STEP + 1}" in error["message"]
        assert error["num_steps"] == NAN_STEP
        assert_bitwise_equal(error["before"], error["after"], "state across the raising step")
        assert_bitwise_equal(error["grads_before"], error["grads_after"], "gradients")
        assert all(not bool(torch.isfinite(g).all()) for g in error["grads_after"])

        # The loop went on after catching the error: it equals the reference with the
        # step dropped (the clipper never counted it).
        filtered = ref.without(NAN_STEP)
        assert_matches_reference(result, filtered, {**spec, "steps": STEPS - 1})
        assert int(result["num_skipped"]) == 0


def test_consistency_check(group2: ProcessGroupHarness) -> None:
    """``check_every=1`` passes on an honest run; a window corrupted on rank 1 is named."""
    spec = make_spec("SGD", SGD_MOMENTUM, clip={**AUTOCLIP, "check_every": 1})
    results = group2.run(workers_ddp.consistency, spec)
    ref = workers_ddp.reference(spec)

    assert STEPS % WINDOW == 0  # the worker's corruption relies on it
    assert_ranks_identical(results)
    for result in results:
        assert_matches_reference(result, ref, spec)
        assert result["check_intact"] is None
        for key in ("check_corrupted", "step_corrupted"):
            error = result[key]
            assert error is not None, f"{key}: no RankDesyncError"
            assert error["type"] == "RankDesyncError"
            assert "rank(s) [1]" in error["message"], error["message"]
        assert f"at step {STEPS}" in result["check_corrupted"]["message"]
        assert f"at step {STEPS + 1}" in result["step_corrupted"]["message"]
        # Both ranks raised at the same point: the next collective pairs up.
        assert result["probe"] == 3.0


@pytest.mark.parametrize(
    "name", ["sgd-momentum-maxnorm-noforeach", "adamw-fused", "attach-sgd-momentum"]
)
def test_checkpoint_resume(group2: ProcessGroupHarness, tmp_path: Path, name: str) -> None:
    """``state_dict`` saved after 13 steps, loaded (weights_only) into fresh objects:
    the resumed run continues exactly (bitwise) as the uninterrupted one; loaded in
    one process (world size 1) it continues as the 2-rank run to 1e-6."""
    spec = SPECS[name]
    stop_at = 13
    results = group2.run(workers_ddp.checkpoint_resume, spec, stop_at, str(tmp_path))
    ref = workers_ddp.reference(spec)

    assert_ranks_identical(results)
    for result in results:
        full, resumed = result["full"], result["resumed"]
        assert_matches_reference(full, ref, spec)
        # The fresh optimizer's window was empty; loading restored the saved one.
        assert result["fresh_window"].numel() == 0
        assert_bitwise_equal(result["before_save"]["window"], result["loaded"]["window"])
        assert_bitwise_equal(
            result["before_save"]["optimizer_state"], result["loaded"]["optimizer_state"]
        )
        assert result["loaded"]["num_steps"] == stop_at
        for field in ("total_norm", "threshold", "clip_coef", "skipped"):
            assert_bitwise_equal(resumed["records"][field], full["records"][field][stop_at:], field)
        assert resumed["step_numbers"] == full["step_numbers"][stop_at:]
        for field in ("window", "params", "optimizer_state", "num_clipped", "checksum"):
            assert_bitwise_equal(resumed[field], full[field], field)

    # The clipper state is replicated: rank 0's file resumes a 1-process run too.
    single = _resume_in_this_process(spec, tmp_path / "rank0.pt", stop_at)
    full = results[0]["full"]
    for field in ("total_norm", "threshold", "clip_coef"):
        assert_rel_close(
            single[field], full["records"][field][stop_at:], f"1-process {field}", RTOL
        )
    assert_rel_close(single["window"], full["window"], "1-process window", RTOL)
    torch.testing.assert_close(single["params"], full["params"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["adamw-fused", "attach-sgd-momentum", "sgd"])
def test_dcp_resume(group2: ProcessGroupHarness, tmp_path: Path, name: str) -> None:
    """The same round trip through ``torch.distributed.checkpoint`` (get/set_state_dict).

    DCP initialises the fresh optimizer's state with a zero-gradient ``step()``; that
    must not enter the window.
    """
    spec = SPECS[name]
    stop_at = 13
    results = group2.run(workers_ddp.dcp_resume, spec, stop_at, str(tmp_path))
    ref = workers_ddp.reference(spec)

    assert_ranks_identical(results)
    for result in results:
        full, resumed = result["full"], result["resumed"]
        assert_matches_reference(full, ref, spec)
        assert result["after_init"]["window"].numel() == 0
        assert result["after_init"]["num_steps"] == 0
        assert_bitwise_equal(result["before_save"]["window"], result["loaded"]["window"])
        assert_bitwise_equal(
            result["before_save"]["optimizer_state"], result["loaded"]["optimizer_state"]
        )
        assert result["loaded"]["num_steps"] == stop_at
        for field in ("total_norm", "threshold", "clip_coef", "skipped"):
            assert_bitwise_equal(resumed["records"][field], full["records"][field][stop_at:], field)
        assert resumed["step_numbers"] == full["step_numbers"][stop_at:]
        for field in ("window", "params", "optimizer_state", "num_clipped", "checksum"):
            assert_bitwise_equal(resumed[field], full[field], field)
