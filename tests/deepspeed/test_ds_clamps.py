"""The element-wise clamps (``value``, ``coordinate_wise``) under DeepSpeed, on 2 gloo ranks.

A step pre-hook on the inner optimizer clamps, DeepSpeed's clip neutral, on ZeRO 0-3 in
fp32, bf16 and fp16, offload and BF16_Optimizer: the final fp32 parameters equal the
native run to 1e-6 relative (fp32), and inside every run the inner optimizer step got
exactly ``clamp(g)`` of the unscaled, unclipped gradients ``g`` (checked by hand
through torch's global optimizer hooks).

The DeepSpeed suite shares one process group (``ds_group``, started once for the package).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.deepspeed import workers_clamps
from tests.deepspeed.checks import (
    CLAMP_PARAM_RTOL,
    NAN_STEP,
    THRESHOLD_RTOL,
    expected_wrapper,
    ranks_agree,
    stage_of,
)
from tests.deepspeed.engines import make_spec, reference_train
from tests.support.compare import max_rel_error, max_scaled_error
from tests.support.harness import ProcessGroupHarness

pytestmark = pytest.mark.distributed

pytest.importorskip("deepspeed")


#: The clamp bounds: they bite on 10-60 % of the gradient elements of these runs.
VALUE = {"method": "value", "clip_value": 0.25}
COORDINATE_WISE = {"method": "coordinate_wise", "clip_value": 0.4}
#: Steps of the element-wise runs (NAN_STEP is one of them); engines cost more than steps.
CLAMP_STEPS = 5


def _elementwise_fp32() -> list[dict[str, Any]]:
    value: dict[str, Any] = {"clip": VALUE, "steps": CLAMP_STEPS}
    cw: dict[str, Any] = {"clip": COORDINATE_WISE, "steps": CLAMP_STEPS}
    return [
        make_spec("value-z0-fp32-nan", stage=0, nan_step=NAN_STEP, **value),
        make_spec("value-z1-fp32", stage=1, **value),
        make_spec("value-z2-fp32-nan", stage=2, nan_step=NAN_STEP, **value),
        make_spec("value-z3-fp32", stage=3, **value),
        make_spec("cw-z0-fp32-attach", stage=0, integration="attach", **cw),
        make_spec("cw-z1-fp32-offload", stage=1, offload=True, **cw),
        make_spec("cw-z2-fp32-gas2", stage=2, gas=2, **cw),
        make_spec("cw-z3-fp32-offload", stage=3, offload=True, **cw),
    ]


def _elementwise_low_precision() -> list[dict[str, Any]]:
    value: dict[str, Any] = {"clip": VALUE, "steps": CLAMP_STEPS}
    return [
        make_spec("value-z0-bf16", stage=0, bf16=True, **value),
        make_spec("value-z2-bf16-gas2", stage=2, bf16=True, gas=2, **value),
        make_spec("value-bf16opt", bf16_optimizer=True, **value),
    ]


def _check_clamp_run(spec: dict[str, Any], per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """What every element-wise run must show; returns rank 0's result."""
    name = spec["name"]
    first = ranks_agree(name, per_rank)
    assert torch.equal(first["params"], per_rank[1]["params"]), name
    wrapper = expected_wrapper(spec)
    assert first["wrapper"] == wrapper, name
    assert first["hook_point"] == (
        "engine.optimizer.step" if wrapper is None else f"{wrapper}.optimizer.step"
    ), name
    records, probe = first["records"], first["probe"]
    bound = spec["options"]["clip_value"]
    applied = [not overflow for overflow in records["overflow"]]
    # The loss scale each step's backward used (the one before the step).
    scales = records["loss_scale"]
    initial = 2.0 ** spec["ds_config"]["fp16"]["initial_scale_power"] if spec["fp16"] else 1.0
    scale_before = [initial, *scales[:-1]]
    for step, entry in enumerate(probe):
        skipped = step == spec["nan_step"] or not applied[step]
        if skipped:
            # DeepSpeed skipped the step (fp16 overflow / NaN): no clamp, no update (ZeRO 0
            # calls the optimizer with every gradient hidden).
            assert entry["elements"] == 0, (name, step, entry)
            continue
        assert entry["calls"] >= 1, (name, step, entry)
        # Exactly clamp(g) reached the update, and exactly p - lr * clamp(g) came out.
        assert entry["grad_error"] == 0.0, (name, step, entry)
        assert entry["update_error"] == 0.0, (name, step, entry)
        # The gradients the clamp saw are the final ones: unscaled, not clipped by
        # DeepSpeed (whose gradient_clipping=1.0 is below every norm here). DeepSpeed
        # 0.19.8 (ZeRO 1-3, FP16_*) grows the fp16 loss scale *before* it unscales, so
        # on a growth step the update's gradients are too small by the growth factor:
        # DeepSpeed's own behaviour, with or without distclip; the clamp acts on them.
        total = records["total_norm"][step]
        growth = scales[step] / scale_before[step]
        assert total > spec["ds_config"]["gradient_clipping"], (name, step, total)
        assert entry["grad_norm"] == pytest.approx(total / growth, rel=1e-5), (
            name,
            step,
            entry,
            total,
            growth,
        )
        # last_clip: DeepSpeed's pre-clip norm, the clamp bound, no norm factor.
        assert records["threshold"][step] == pytest.approx(bound, rel=1e-7), name
        assert records["clip_coef"][step] == 1.0, name
        engine_norm = records["engine_norm"][step]
        if not (spec["fp16"] and stage_of(spec) == 3):  # ZeRO 3 fp16: see test_fp16_loss_scaling
            assert float(torch.tensor(engine_norm, dtype=torch.float64).float()) == total, name
    clamped = sum(entry["clamped"] for entry in probe)
    elements = sum(entry["elements"] for entry in probe)
    assert 0 < clamped < elements, (name, clamped, elements)  # the bound bites, not everywhere
    # Counted: every step, but fp16 overflows (loss scaling at work, as with GradScaler).
    counted = [i for i in range(spec["steps"]) if applied[i] or not spec["fp16"]]
    assert records["num_steps"][-1] == len(counted), name
    expected_skips = [1.0 if i == spec["nan_step"] else 0.0 for i in counted]
    assert [records["skipped"][i] for i in counted] == expected_skips, name
    return first


def test_elementwise_clamps_match_native(ds_group: ProcessGroupHarness) -> None:
    """value / coordinate_wise on ZeRO 0-3 in fp32 (offload 1/3, gas 2, NaN steps, attach).

    The final fp32 parameters equal the native ``ClippedOptimizer(SGD, method)`` run on
    the same data to 1e-6 relative, on both ranks alike; inside each run the inner
    optimizer step received exactly ``clamp(g)`` of the unscaled, unclipped gradients.
    """
    specs = _elementwise_fp32()
    per_rank = ds_group.run(workers_clamps.run_elementwise, specs)
    for index, spec in enumerate(specs):
        first = _check_clamp_run(spec, [per_rank[0][index], per_rank[1][index]])
        reference = reference_train(spec)
        ref = reference["records"]
        assert ref["skipped"] == first["records"]["skipped"], spec["name"]
        assert ref["threshold"] == first["records"]["threshold"], spec["name"]
        norm_error = max_rel_error(
            [
                n
                for n, s in zip(first["records"]["total_norm"], ref["skipped"], strict=True)
                if not s
            ],
            [n for n, s in zip(ref["total_norm"], ref["skipped"], strict=True) if not s],
        )
        assert norm_error <= THRESHOLD_RTOL, (spec["name"], norm_error)
        params, expected = first["params"], reference["params"]
        error = max_scaled_error(params, expected)
        assert error <= CLAMP_PARAM_RTOL, (spec["name"], error)


def test_elementwise_clamps_low_precision(ds_group: ProcessGroupHarness) -> None:
    """bf16 (ZeRO 0's FP16_UnfusedOptimizer, ZeRO 2, BF16_Optimizer) and fp16 (ZeRO 1, 3).

    No fp32 native run to compare with; the reference is the clamp by hand on the fp32
    gradients the inner optimizer step received (unscaled: their norm is DeepSpeed's),
    and fp16 overflow steps never reach it.
    """
    specs = _elementwise_low_precision()
    per_rank = ds_group.run(workers_clamps.run_elementwise, specs)
    for index, spec in enumerate(specs):
        _check_clamp_run(spec, [per_rank[0][index], per_rank[1][index]])
    fp16 = [
        make_spec(f"value-z{stage}-fp16", stage=stage, fp16=True, steps=8, clip=VALUE)
        for stage in (1, 3)
    ]
    per_rank = ds_group.run(workers_clamps.run_elementwise, fp16, True)
    for index, spec in enumerate(fp16):
        first = _check_clamp_run(spec, [per_rank[0][index], per_rank[1][index]])
        records = first["records"]
        assert any(records["overflow"]), f"{spec['name']}: no overflow step"
        grew = [
            i
            for i in range(1, spec["steps"])
            if not records["overflow"][i]
            and records["loss_scale"][i] > records["loss_scale"][i - 1]
        ]
        assert grew, f"{spec['name']}: no loss-scale growth step"
