"""distclip under DeepSpeed: 2 gloo ranks on CPU against the native 1-process run.

One process group for the module (``ds_group``), many engines per call: ZeRO 0-3 x
fp32/bf16 x gradient accumulation 1/2, ZeRO 1-3 with the optimizer offloaded to the
CPU, DeepSpeed's BF16_Optimizer, every method DeepSpeed can drive, NaN steps,
``gradient_clipping: 0``, ``attach`` and checkpoint resume. For every run:

* the ranks agree bit for bit (thresholds, norms, the clipper's state checksum);
* the thresholds equal, bit for bit, those of a fresh clipper fed DeepSpeed's own norms
  (``engine.get_global_grad_norm()``, in DeepSpeed's dtype: float64 under ZeRO 3) through
  ``Clipper.observe_``: DeepSpeed's norm is the one used, window first;
* ``engine.get_global_grad_norm()`` equals ``last_clip.total_norm``;
* fp32: the thresholds (or, for the stochastic methods, the clip coefficients) equal
  the native ``ClippedOptimizer(SGD)`` run on the same data to 1e-6 relative, and so do
  the final parameters (1e-5); bf16 rounds the gradients, so only the first two hold.

The element-wise clamps (``value``, ``coordinate_wise``: a step pre-hook on the inner
optimizer, DeepSpeed's clip neutral) on ZeRO 0-3 in fp32, bf16 and fp16, offload and
BF16_Optimizer: the final fp32 parameters equal the native run to 1e-6 relative (fp32),
and inside every run the inner optimizer step got exactly ``clamp(g)`` of the unscaled,
unclipped gradients ``g`` (checked by hand through torch's global optimizer hooks).

``layer_wise`` and ``agc`` (per-tensor / per-row norms reduced over DeepSpeed's flat
partitions, in the inner optimizer's step pre-hook) on ZeRO 0-3 in fp32 (offload 1-3,
gas 2, NaN steps, attach, ZeRO 3 sub-groups), bf16 and BF16_Optimizer: tensors and
rows straddle the two ranks' partitions, the level clips some units and not others,
and the final fp32 parameters, the smallest factor and the norm equal the native run
to 1e-6 relative, with one all-reduce per inner step.
"""

from __future__ import annotations

import math
from typing import Any

import ds_workers
import pytest
import torch
from ds_setup import make_model, make_spec, own_norm_thresholds, reference_train, unit_clip_counts

from tests.support.harness import ProcessGroupHarness

pytestmark = pytest.mark.distributed

pytest.importorskip("deepspeed")

THRESHOLD_RTOL = 1e-6
PARAM_RTOL = 1e-5
PARAM_ATOL = 1e-7
NAN_STEP = 3

STOCHASTIC = (
    "linear_stoch_norm",
    "quadratic_stoch_norm",
    "linear_stoch_autoclip",
    "quadratic_stoch_autoclip",
)


def _matrix() -> list[dict[str, Any]]:
    specs = []
    for stage in (0, 1, 2, 3):
        for bf16 in (False, True):
            for gas in (1, 2):
                name = f"z{stage}-{'bf16' if bf16 else 'fp32'}-gas{gas}"
                specs.append(make_spec(name, stage=stage, bf16=bf16, gas=gas))
    for stage in (1, 2, 3):
        specs.append(make_spec(f"z{stage}-fp32-offload", stage=stage, offload=True))
    specs.append(make_spec("z2-fp32-offload-gas2", stage=2, offload=True, gas=2))
    specs.append(make_spec("bf16opt-gas1", bf16_optimizer=True))
    specs.append(make_spec("bf16opt-gas2", bf16_optimizer=True, gas=2))
    return specs


METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    "norm": {"max_norm": 2.0},
    "autoclip": {"q": 0.5, "window": 3, "max_norm": 3.0},
    "auto_clip": {"q": 0.2, "window": 5, "min_norm": 1.5},
    "linear_stoch_norm": {"max_norm": 2.0, "beta": 0.5, "seed": 3},
    "quadratic_stoch_norm": {"max_norm": 2.0, "beta": 0.7, "seed": 4},
    "linear_stoch_autoclip": {"q": 0.3, "window": 4, "beta": 0.5, "seed": 5},
    "quadratic_stoch_autoclip": {"q": 0.3, "window": 4, "beta": 0.9, "seed": 6},
    "zclip": {"warmup_steps": 3, "z_thresh": 1.0, "alpha": 0.8},
}


def _methods() -> list[dict[str, Any]]:
    return [
        make_spec(f"{method}-z{stage}", stage=stage, clip={"method": method, **options})
        for method, options in METHOD_OPTIONS.items()
        for stage in (0, 2, 3)
    ]


def _edge_cases() -> list[dict[str, Any]]:
    specs = [
        make_spec(f"nan-z{stage}-fp32", stage=stage, nan_step=NAN_STEP) for stage in (0, 1, 2, 3)
    ]
    specs += [
        make_spec("nan-z0-bf16", stage=0, bf16=True, nan_step=NAN_STEP),
        make_spec("nan-z2-bf16", stage=2, bf16=True, nan_step=NAN_STEP),
        make_spec("nan-z3-bf16", stage=3, bf16=True, nan_step=NAN_STEP),
        make_spec("nan-bf16opt", bf16_optimizer=True, nan_step=NAN_STEP),
    ]
    specs += [
        make_spec(f"clip0-z{stage}", stage=stage, gradient_clipping=0.0) for stage in (0, 2, 3)
    ]
    specs += [
        make_spec("attach-z0-fp32", stage=0, integration="attach"),
        make_spec("attach-z2-fp32", stage=2, integration="attach"),
        make_spec("attach-z3-bf16-gas2", stage=3, bf16=True, gas=2, integration="attach"),
    ]
    return specs


MATRIX = _matrix()
METHODS = _methods()
EDGE_CASES = _edge_cases()

EXPECTED_WRAPPER = {
    0: (None, "FP16_UnfusedOptimizer"),
    1: ("DeepSpeedZeroOptimizer", "DeepSpeedZeroOptimizer"),
    2: ("DeepSpeedZeroOptimizer", "DeepSpeedZeroOptimizer"),
    3: ("DeepSpeedZeroOptimizer_Stage3", "DeepSpeedZeroOptimizer_Stage3"),
}

#: name -> (max relative threshold/coefficient error, max absolute parameter error).
SUMMARY: dict[str, tuple[float, float]] = {}
#: name -> (max relative total_norm error, parameter error max|ds - native| / max|native|).
CLAMP_SUMMARY: dict[str, tuple[float, float]] = {}


def _stage(spec: dict[str, Any]) -> int | None:
    zero = spec["ds_config"].get("zero_optimization")
    return 0 if zero is None else zero["stage"]


def _rel_errors(actual: list[float], expected: list[float]) -> float:
    worst = 0.0
    for a, e in zip(actual, expected, strict=True):
        if math.isinf(a) or math.isinf(e):
            assert a == e, (actual, expected)
            continue
        worst = max(worst, abs(a - e) / max(abs(e), 1e-12))
    return worst


def _canon(records: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """``records`` with NaN spelled as a string, so that equal records compare equal."""
    return {
        key: ["nan" if isinstance(v, float) and math.isnan(v) else v for v in values]
        for key, values in records.items()
    }


def _check_run(spec: dict[str, Any], per_rank: list[dict[str, Any]]) -> None:
    name = spec["name"]
    for result in per_rank:
        assert "error" not in result, f"{name}: {result['error']}"
    first, second = per_rank
    # The ranks agree bit for bit.
    assert _canon(first["records"]) == _canon(second["records"]), name
    assert torch.equal(first["checksum"], second["checksum"]), name
    records = first["records"]
    steps = spec["steps"]
    assert records["num_steps"] == list(range(1, steps + 1)), name

    # DeepSpeed's own norm drives the window: a fresh clipper fed those norms agrees.
    engine_norms = records["engine_norm"]
    assert all(n is not None for n in engine_norms), name
    assert records["threshold"] == own_norm_thresholds(spec, engine_norms), name

    # engine.get_global_grad_norm() is last_clip.total_norm (in the clipper's float32).
    for engine_norm, total_norm, skipped in zip(
        engine_norms, records["total_norm"], records["skipped"], strict=True
    ):
        if skipped:
            assert not math.isfinite(engine_norm), name
            assert not math.isfinite(total_norm), name
        else:
            as_float32 = float(torch.tensor(engine_norm, dtype=torch.float64).float())
            assert as_float32 == total_norm, (name, engine_norm, total_norm)

    expected_skips = [1.0 if s == spec["nan_step"] else 0.0 for s in range(steps)]
    assert records["skipped"] == expected_skips, name

    if spec["bf16"]:
        SUMMARY[name] = (0.0, math.nan)
        return
    reference = reference_train(spec)
    ref = reference["records"]
    assert ref["skipped"] == records["skipped"], name
    if spec["method"] in STOCHASTIC:
        # The native threshold is the level; under DeepSpeed it is the level made exact for
        # DeepSpeed's min(1, c / (n + eps)) (or inf): compare what was applied.
        error = _rel_errors(records["clip_coef"], ref["clip_coef"])
    else:
        error = _rel_errors(records["threshold"], ref["threshold"])
        error = max(error, _rel_errors(records["clip_coef"], ref["clip_coef"]))
    assert error <= THRESHOLD_RTOL, (name, error, records, ref)
    finite = [n for n, s in zip(records["total_norm"], records["skipped"], strict=True) if not s]
    ref_finite = [n for n, s in zip(ref["total_norm"], ref["skipped"], strict=True) if not s]
    assert _rel_errors(finite, ref_finite) <= THRESHOLD_RTOL, name
    params = first["params"]
    torch.testing.assert_close(
        params, reference["params"], rtol=PARAM_RTOL, atol=PARAM_ATOL, msg=name
    )
    assert torch.equal(params, second["params"]), name
    SUMMARY[name] = (error, float((params - reference["params"]).abs().max()))


def _run_all(group: ProcessGroupHarness, specs: list[dict[str, Any]]) -> None:
    per_rank = group.run(ds_workers.run_specs, specs)
    failures = []
    for index, spec in enumerate(specs):
        try:
            _check_run(spec, [per_rank[0][index], per_rank[1][index]])
        except AssertionError as exc:
            failures.append(f"{spec['name']}: {str(exc)[:2000]}")
    assert not failures, "\n".join(failures)
    for index, spec in enumerate(specs):
        stage = _stage(spec)
        result = per_rank[0][index]
        if spec["name"].startswith("bf16opt"):
            assert result["wrapper"] == "BF16_Optimizer"
        elif stage is not None and spec["name"].startswith(("z", "nan-z", "attach-z")):
            assert result["wrapper"] == EXPECTED_WRAPPER[stage][spec["bf16"]], spec["name"]
        expected_point = (
            "engine.clip_fp32_gradients"
            if result["wrapper"] is None
            else f"{result['wrapper']}.clip_grad"
        )
        assert result["hook_point"] == expected_point


def test_zero_precision_accumulation_matrix(ds_group: ProcessGroupHarness) -> None:
    """ZeRO 0-3 x fp32/bf16 x gas 1/2, offload, BF16_Optimizer: thresholds and params."""
    _run_all(ds_group, MATRIX)


def test_every_external_norm_method(ds_group: ProcessGroupHarness) -> None:
    """norm, autoclip (+alias), the four stochastic methods and zclip on ZeRO 0, 2, 3."""
    _run_all(ds_group, METHODS)


def test_nan_steps_clip0_and_attach(ds_group: ProcessGroupHarness) -> None:
    """NaN steps never enter the window; gradient_clipping 0; attach reads the section."""
    _run_all(ds_group, EDGE_CASES)


def test_nonfinite_error_raises_on_every_rank(ds_group: ProcessGroupHarness) -> None:
    specs = [
        make_spec(
            f"nan-error-z{stage}",
            stage=stage,
            nan_step=1,
            steps=3,
            clip={"method": "autoclip", "nonfinite": "error"},
        )
        for stage in (0, 2)
    ]
    per_rank = ds_group.run(ds_workers.run_specs, specs)
    for results in per_rank:
        for result in results:
            assert "NonFiniteNormError" in result.get("error", ""), result


def test_fp16_loss_scaling(ds_group: ProcessGroupHarness) -> None:
    """fp16 (forced on the CPU): overflow steps stay out; ZeRO 3's growth-step norm is fixed.

    DeepSpeed's ZeRO 3 divides the stored norm by the loss scale *after* growing it, so
    on a growth step ``get_global_grad_norm()`` is half the true norm; distclip feeds
    the true one (ZeRO 1 stores it right: the two must agree). ZeRO 0 fp16 is refused.
    """
    steps = 12
    specs = [make_spec(f"z{stage}-fp16", stage=stage, fp16=True, steps=steps) for stage in (1, 3)]
    per_rank = ds_group.run(ds_workers.run_fp16, specs)
    refused = per_rank[0][-1]["refused"]
    assert refused[0].startswith("NotImplementedError: ZeRO 0 with fp16"), refused
    runs = {}
    for spec, result in zip(specs, per_rank[0], strict=False):
        assert "error" not in result, result["error"]
        other = per_rank[1][specs.index(spec)]
        assert _canon(result["records"]) == _canon(other["records"]), spec["name"]
        records = result["records"]
        overflow = records["overflow"]
        assert any(overflow), f"{spec['name']}: no overflow step; the test needs one"
        # Only the steps DeepSpeed applied were observed, one each.
        applied = [i for i, skipped in enumerate(overflow) if not skipped]
        assert records["num_steps"][-1] == len(applied)
        pushed = [records["total_norm"][i] for i in applied]
        thresholds = [records["threshold"][i] for i in applied]
        assert thresholds == own_norm_thresholds(spec, pushed), spec["name"]
        runs[spec["name"]] = (applied, pushed, records)
    applied1, pushed1, _ = runs["z1-fp16"]
    applied3, pushed3, records3 = runs["z3-fp16"]
    assert applied1 == applied3
    torch.testing.assert_close(torch.tensor(pushed3), torch.tensor(pushed1), rtol=2e-3, atol=0.0)
    # ZeRO 3 under-reports on growth steps; distclip's total_norm does not.
    growth = [
        i for i in applied3 if i > 0 and records3["loss_scale"][i] > records3["loss_scale"][i - 1]
    ]
    assert growth, "no loss-scale growth step; the test needs one"
    for i in growth:
        ratio = records3["total_norm"][i] / records3["engine_norm"][i]
        assert ratio == pytest.approx(2.0, rel=1e-3), (i, records3)


@pytest.mark.parametrize(
    "spec",
    [
        make_spec("ckpt-z0-fp32", stage=0),
        make_spec("ckpt-z1-fp32", stage=1),
        make_spec("ckpt-z2-fp32-gas2", stage=2, gas=2),
        make_spec("ckpt-z3-fp32", stage=3),
        make_spec("ckpt-z2-offload", stage=2, offload=True),
        make_spec("ckpt-bf16opt", bf16_optimizer=True),
        make_spec(
            "ckpt-z0-bf16-zclip", stage=0, bf16=True, clip={"method": "zclip", "warmup_steps": 2}
        ),
    ],
    ids=lambda spec: spec["name"],
)
def test_checkpoint_resume(
    ds_group: ProcessGroupHarness, spec: dict[str, Any], tmp_path: Any
) -> None:
    """Save after 4 steps, resume in a fresh engine: the later thresholds are unchanged."""
    split = 4
    per_rank = ds_group.run(ds_workers.run_checkpoint, spec, str(tmp_path), split)
    for out in per_rank:
        assert "error" not in out, out["error"]
        assert out["saved_num_steps"] == split
        assert out["num_steps_before_load"] == 0
        assert out["num_steps_after_load"] == split
        assert out["hooked_after_load"]
        assert "distclip" not in out["client_state_keys"]  # distclip's own key is taken out
        assert out["user_key"] == 7
        full, first, resumed = out["full"], out["first"], out["resumed"]
        assert first["threshold"] == full["threshold"][:split]
        assert resumed["threshold"] == full["threshold"][split:]
        assert resumed["total_norm"] == full["total_norm"][split:]
        assert resumed["num_steps"] == full["num_steps"][split:]
        assert torch.equal(out["resumed_params"], out["full_params"])
        if spec["name"] in ("ckpt-z1-fp32", "ckpt-bf16opt"):
            # DeepSpeed restored its saved clip value (1.0 over the new config's 2.5) into
            # the wrapper; it is what the wrapper reports outside step(), and nothing more.
            assert out["ds_clip_after_load"] == 1.0
    assert _canon(per_rank[0]["resumed"]) == _canon(per_rank[1]["resumed"])


def test_attach_refusals_and_options(ds_group: ProcessGroupHarness) -> None:
    spec = make_spec("attach-checks", stage=2)
    out = ds_group.run(ds_workers.run_attach_checks, spec)[0]
    for method in ("agc", "layer_wise"):
        message = out[f"refuse_{method}"]
        assert message.startswith("NotImplementedError"), message
        assert repr(method) in message
        assert "model parallelism" in message  # says why
        assert "autoclip" in message  # names what does work
    assert out["no_adapter_after_refusal"]
    assert out["agc_hook_point"] == "DeepSpeedZeroOptimizer.optimizer.step"
    assert out["agc_hooks_added"] == 1
    assert out["agc_hooks_after_remove"] == 0
    assert out["value_hook_point"] == "DeepSpeedZeroOptimizer.optimizer.step"
    assert out["value_hooks_added"] == 1
    assert out["value_hooked"]
    assert out["value_hooks_after_remove"] == 0
    assert out["value_removed_class"] == "DeepSpeedZeroOptimizer"
    assert out["explicit_method"] == "norm"
    assert out["explicit_max_norm"] == 0.5
    assert out["explicit_thresholds"] == [0.5, 0.5, 0.5]
    assert out["double_attach"].startswith("ValueError"), out["double_attach"]
    assert out["get_adapter_is_adapter"]
    assert out["removed_class"] == "DeepSpeedZeroOptimizer"
    assert out["removed_clip_grad"] == 1.0
    assert out["removed_attr"]
    assert out["default_method"] == "autoclip"
    assert out["default_section_present"] is False
    assert out["subclass_refused"].startswith("NotImplementedError"), out["subclass_refused"]
    assert "CustomZero" in out["subclass_refused"]
    assert any("allow_unverified=True" in w for w in out["subclass_warning"])
    assert out["subclass_hook_point"] == "DeepSpeedZeroOptimizer.clip_grad"
    assert out["unknown_refused"].startswith("NotImplementedError"), out["unknown_refused"]
    assert out["not_engine"].startswith("TypeError"), out["not_engine"]


# ------------------------------------------------------------ element-wise clamps
#: The clamp bounds: they bite on 10-60 % of the gradient elements of these runs.
VALUE = {"method": "value", "clip_value": 0.25}
COORDINATE_WISE = {"method": "coordinate_wise", "clip_value": 0.4}
#: fp32 parameters against the native run: max |ds - native| / max |native|.
CLAMP_PARAM_RTOL = 1e-6


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


def _expected_wrapper(spec: dict[str, Any]) -> str | None:
    if spec["name"].endswith("bf16opt"):
        return "BF16_Optimizer"
    stage = _stage(spec)
    assert stage is not None
    if spec["fp16"]:
        return EXPECTED_WRAPPER[stage][True]
    return EXPECTED_WRAPPER[stage][spec["bf16"]]


def _check_clamp_run(spec: dict[str, Any], per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """What every element-wise run must show; returns rank 0's result."""
    name = spec["name"]
    for result in per_rank:
        assert "error" not in result, f"{name}: {result['error']}"
    first, second = per_rank
    assert _canon(first["records"]) == _canon(second["records"]), name
    assert torch.equal(first["checksum"], second["checksum"]), name
    assert torch.equal(first["params"], second["params"]), name
    wrapper = _expected_wrapper(spec)
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
        if not (spec["fp16"] and _stage(spec) == 3):  # ZeRO 3 fp16: see test_fp16_loss_scaling
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
    per_rank = ds_group.run(ds_workers.run_elementwise, specs)
    for index, spec in enumerate(specs):
        first = _check_clamp_run(spec, [per_rank[0][index], per_rank[1][index]])
        reference = reference_train(spec)
        ref = reference["records"]
        assert ref["skipped"] == first["records"]["skipped"], spec["name"]
        assert ref["threshold"] == first["records"]["threshold"], spec["name"]
        norm_error = _rel_errors(
            [
                n
                for n, s in zip(first["records"]["total_norm"], ref["skipped"], strict=True)
                if not s
            ],
            [n for n, s in zip(ref["total_norm"], ref["skipped"], strict=True) if not s],
        )
        assert norm_error <= THRESHOLD_RTOL, (spec["name"], norm_error)
        params, expected = first["params"], reference["params"]
        error = float((params - expected).abs().max() / expected.abs().max())
        assert error <= CLAMP_PARAM_RTOL, (spec["name"], error)
        CLAMP_SUMMARY[spec["name"]] = (norm_error, error)


def test_elementwise_clamps_low_precision(ds_group: ProcessGroupHarness) -> None:
    """bf16 (ZeRO 0's FP16_UnfusedOptimizer, ZeRO 2, BF16_Optimizer) and fp16 (ZeRO 1, 3).

    No fp32 native run to compare with; the reference is the clamp by hand on the fp32
    gradients the inner optimizer step received (unscaled: their norm is DeepSpeed's),
    and fp16 overflow steps never reach it.
    """
    specs = _elementwise_low_precision()
    per_rank = ds_group.run(ds_workers.run_elementwise, specs)
    for index, spec in enumerate(specs):
        _check_clamp_run(spec, [per_rank[0][index], per_rank[1][index]])
    fp16 = [
        make_spec(f"value-z{stage}-fp16", stage=stage, fp16=True, steps=8, clip=VALUE)
        for stage in (1, 3)
    ]
    per_rank = ds_group.run(ds_workers.run_elementwise, fp16, True)
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


# ------------------------------------------------------ per-tensor / per-row methods
#: Levels at which some tensors (rows) are clipped and some not, on most steps.
LAYER_WISE = {"method": "layer_wise", "max_norm": 1.0}
AGC_SECTION = {"method": "agc", "clip_factor": 0.5}
PER_UNIT_STEPS = 5
#: bf16 rounds the forward pass: the parameters drift from the fp32 native run.
PER_UNIT_BF16_RTOL = 1e-2
#: name -> (max relative clip_coef / total_norm error, parameter error max|ds - native| / max|native|).
PER_UNIT_SUMMARY: dict[str, tuple[float, float]] = {}


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
    shapes = [tuple(p.shape) for p in make_model().parameters()]
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
    if _stage(spec) == 3:
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
    per_rank = ds_group.run(ds_workers.run_per_unit, specs)
    for index, spec in enumerate(specs):
        name = spec["name"]
        first, second = per_rank[0][index], per_rank[1][index]
        for result in (first, second):
            assert "error" not in result, f"{name}: {result['error']}"
        assert _canon(first["records"]) == _canon(second["records"]), name
        assert torch.equal(first["checksum"], second["checksum"]), name
        assert torch.equal(first["params"], second["params"]), name
        wrapper = _expected_wrapper(spec)
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
        param_error = float((params - expected).abs().max() / expected.abs().max())
        if spec["bf16"]:
            assert param_error <= PER_UNIT_BF16_RTOL, (name, param_error)
            PER_UNIT_SUMMARY[name] = (math.nan, param_error)
            continue
        ref = reference["records"]
        assert ref["skipped"] == records["skipped"], name
        error = max(
            _rel_errors(
                [c for c, a in zip(records[key], applied, strict=True) if a],
                [c for c, a in zip(ref[key], applied, strict=True) if a],
            )
            for key in ("clip_coef", "total_norm")
        )
        assert error <= THRESHOLD_RTOL, (name, error, records, ref)
        assert param_error <= CLAMP_PARAM_RTOL, (name, param_error)
        PER_UNIT_SUMMARY[name] = (error, param_error)


def test_print_summary() -> None:
    """Not a check: the per-configuration errors, for ``pytest -s`` readers."""
    for name, (error, param_error) in sorted(SUMMARY.items()):
        print(f"{name:32s} threshold/coef rel err {error:.2e}  param abs err {param_error:.2e}")
    for name, (error, param_error) in sorted(CLAMP_SUMMARY.items()):
        print(f"{name:32s} total_norm rel err {error:.2e}  param rel err {param_error:.2e}")
    for name, (error, param_error) in sorted(PER_UNIT_SUMMARY.items()):
        print(f"{name:32s} coef/norm rel err {error:.2e}  param rel err {param_error:.2e}")


HOST_READ_SPECS = [
    make_spec("reads-z1-fp32", stage=1),
    make_spec("reads-z2-fp32", stage=2),
    make_spec("reads-z3-fp32", stage=3),
    make_spec("reads-z2-bf16", stage=2, bf16=True),
    make_spec("reads-bf16opt", bf16_optimizer=True),
    make_spec("reads-z2-zclip", stage=2, clip={"method": "zclip", "warmup_steps": 2}),
    make_spec("reads-z2-stoch", stage=2, clip={"method": "linear_stoch_autoclip", "q": 0.5}),
    make_spec("reads-z2-value", stage=2, clip={"method": "value", "clip_value": 0.05}),
    make_spec("reads-z2-layer-wise", stage=2, clip={"method": "layer_wise", "max_norm": 0.1}),
    make_spec("reads-z2-agc", stage=2, clip={"method": "agc", "clip_factor": 0.01}),
    make_spec("reads-z0-fp32", stage=0),
]


def test_distclip_adds_no_host_read_to_a_deepspeed_step(ds_group: ProcessGroupHarness) -> None:
    """Counted around backward + engine.step(): DeepSpeed's own reads, and distclip's on top.

    On the optimizer wrappers (ZeRO 1-3, BF16_Optimizer) distclip adds no host read and
    no tensor from host data for any method: the threshold reaches DeepSpeed's clip as
    a device tensor. ZeRO 0 in fp32 has no wrapper: the torch optimizer inside (SGD,
    not fused) pays the one documented read of the skip decision.
    """
    for per_rank in zip(*ds_group.run(ds_workers.run_host_reads, HOST_READ_SPECS), strict=True):
        for result in per_rank:
            name = result["name"]
            assert "error" not in result, result.get("error")
            extra = 1 if name == "reads-z0-fp32" else 0
            for (plain_reads, plain_data), (reads, data) in zip(
                result["plain"], result["distclip"], strict=True
            ):
                assert reads <= plain_reads + extra, (name, result)
                assert data <= plain_data, (name, result)
