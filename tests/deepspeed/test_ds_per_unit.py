"""``layer_wise`` and ``agc`` under DeepSpeed, on 2 gloo ranks against the native run.

Per-tensor / per-row norms reduced over DeepSpeed's flat partitions, in the inner
optimizer's step pre-hook, on ZeRO 0-3 in fp32 (offload 1-3, gas 2, NaN steps, attach,
ZeRO 3 sub-groups), bf16 and BF16_Optimizer: tensors and rows straddle the two ranks'
partitions, the level clips some units and not others, and the final fp32 parameters,
the smallest factor and the norm equal the native run to 1e-6 relative, with one
all-reduce per inner step.

The DeepSpeed suite shares one process group (``ds_group``, started once for the package).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from tests.deepspeed import workers_per_unit
from tests.deepspeed.checks import (
    CLAMP_PARAM_RTOL,
    NAN_STEP,
    THRESHOLD_RTOL,
    expected_wrapper,
    ranks_agree,
    stage_of,
    unit_clip_counts,
)
from tests.deepspeed.engines import make_spec, reference_train
from tests.support.compare import max_rel_error, max_scaled_error
from tests.support.harness import ProcessGroupHarness
from tests.support.problem import DEEPSPEED

pytestmark = pytest.mark.distributed

pytest.importorskip("deepspeed")


#: Levels at which some tensors (rows) are clipped and some not, on most steps.
LAYER_WISE = {"method": "layer_wise", "max_norm": 1.0}
AGC_SECTION = {"method": "agc", "clip_factor": 0.5}
PER_UNIT_STEPS = 5
#: bf16 rounds the forward pass: the parameters drift from the fp32 native run.
PER_UNIT_BF16_RTOL = 1e-2


def _per_unit_specs() -> list[dict[str, Any]]:
    lw: dict[str, Any] = {"clip": LAYER_WISE, "steps": PER_UNIT_STEPS}
    agc: dict[str, Any] = {"clip": AGC_SECTION, "steps": PER_UNIT_STEPS}
    # ZeRO 3 in two sub-groups (per rank: the first weight's 64 elements, then the rest):
    # two inner steps, one all-reduce each.
    subgroups = make_spec("agc-z3-fp32-subgroups", stage=3, **agc)
    subgroups["ds_config"]["zero_optimization"]["sub_group_size"] = 50
    return [
        make_spec("lw-z0-fp32-nan", stage=0, nan_step=NAN_STEP, **lw),
        make_spec("lw-z1-fp32", stage=1, **lw),
        make_spec("lw-z2-fp32-gas2", stage=2, gas=2, **lw),
        make_spec("lw-z3-fp32-offload", stage=3, offload=True, **lw),
        make_spec("agc-z0-fp32-attach", stage=0, integration="attach", **agc),
        make_spec("agc-z1-fp32-offload", stage=1, offload=True, **agc),
        make_spec("agc-z2-fp32-nan", stage=2, nan_step=NAN_STEP, **agc),
        subgroups,
        make_spec("lw-bf16opt", bf16_optimizer=True, **lw),
        make_spec("agc-z0-bf16", stage=0, bf16=True, **agc),
        make_spec("agc-z3-bf16-gas2", stage=3, bf16=True, gas=2, **agc),
    ]


def _check_split(spec: dict[str, Any], pieces: list[list[tuple[int, int, int]]]) -> None:
    """Some tensor, and some AGC unit (a weight row or a vector), lies on both ranks."""
    name = spec["name"]
    shapes = [tuple(p.shape) for p in DEEPSPEED.model().parameters()]
    on_rank = [{index for index, _, _ in rank_pieces} for rank_pieces in pieces]
    shared = on_rank[0] & on_rank[1]
    assert shared, (name, pieces)  # a tensor straddles the partition boundary
    split_rows = [
        (index, start)
        for index, start, _ in pieces[1]
        if index in shared and start % (math.prod(shapes[index]) // shapes[index][0]) != 0
    ]
    split_vectors = [index for index in shared if len(shapes[index]) < 2]
    assert split_rows, (name, pieces)  # a weight row is cut by the boundary
    if stage_of(spec) == 3:
        assert split_vectors, (name, pieces)  # a bias is cut too


def test_layer_wise_and_agc_match_native(ds_group: ProcessGroupHarness) -> None:
    """layer_wise / agc on ZeRO 0-3 (offload, gas 2, NaN steps, attach), bf16, BF16_Optimizer.

    fp32: the final parameters, ``last_clip.clip_coef`` (the smallest factor) and the
    norm equal the native ``ClippedOptimizer(SGD, method)`` run to 1e-6 relative, with
    tensors (rows) that straddle the two ranks' partitions and a level that clips some
    units and not others. Both ranks agree bit for bit; one all-reduce per applied step
    under ZeRO 1-3 and BF16_Optimizer (whole tensors at ZeRO 0: none).
    """
    specs = _per_unit_specs()
    per_rank = ds_group.run(workers_per_unit.run_per_unit, specs)
    for index, spec in enumerate(specs):
        name = spec["name"]
        first = ranks_agree(name, [per_rank[0][index], per_rank[1][index]])
        second = per_rank[1][index]
        assert torch.equal(first["params"], second["params"]), name
        wrapper = expected_wrapper(spec)
        assert first["wrapper"] == wrapper, name
        expected_point = (
            "engine.clip_fp32_gradients" if wrapper is None else f"{wrapper}.optimizer.step"
        )
        assert first["hook_point"] == expected_point, name
        records = first["records"]
        applied = [step != spec["nan_step"] for step in range(spec["steps"])]
        assert records["skipped"] == [0.0 if a else 1.0 for a in applied], name
        assert records["num_steps"][-1] == spec["steps"], name
        level = spec["options"].get("max_norm", spec["options"].get("clip_factor"))
        assert all(t == pytest.approx(level, rel=1e-7) for t in records["threshold"]), name
        if wrapper in (None, "FP16_UnfusedOptimizer"):
            assert first["collectives"] in (None, 0), (name, first["collectives"])
            assert first["pieces"] == [] == second["pieces"], name
        else:
            expected = first["sub_groups"] * sum(applied)
            assert first["collectives"] == expected, (name, first["collectives"], expected)
            if name.endswith("subgroups"):
                assert first["sub_groups"] == 2, name
            _check_split(spec, [first["pieces"], second["pieces"]])

        counts: list[tuple[int, int]] = []
        reference = reference_train(
            spec,
            inspect=lambda model, s=spec, out=counts: out.append(
                unit_clip_counts(model, s["method"], s["options"])
            ),
        )
        clipped = sum(c for (c, _), a in zip(counts, applied, strict=True) if a)
        units = sum(u for (_, u), a in zip(counts, applied, strict=True) if a)
        assert 0 < clipped < units, (name, counts)  # the level bites, not everywhere
        if spec["method"] == "layer_wise":
            steps_clipped = sum(1 for (c, _), a in zip(counts, applied, strict=True) if a and c)
            assert first["num_clipped"] == steps_clipped, (name, first["num_clipped"], counts)
        else:
            assert first["num_clipped"] == 0, name  # AGC does not count, as natively
        params, expected = first["params"], reference["params"]
        param_error = max_scaled_error(params, expected)
        if spec["bf16"]:
            assert param_error <= PER_UNIT_BF16_RTOL, (name, param_error)
            continue
        ref = reference["records"]
        assert ref["skipped"] == records["skipped"], name
        error = max(
            max_rel_error(
                [c for c, a in zip(records[key], applied, strict=True) if a],
                [c for c, a in zip(ref[key], applied, strict=True) if a],
            )
            for key in ("clip_coef", "total_norm")
        )
        assert error <= THRESHOLD_RTOL, (name, error, records, ref)
        assert param_error <= CLAMP_PARAM_RTOL, (name, param_error)
