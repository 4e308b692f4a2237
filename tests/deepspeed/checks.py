"""What the DeepSpeed engine tests share: tolerances, the wrappers expected, comparisons."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from tests.support.reference import agc_units_clipped, layer_wise_coefficients

THRESHOLD_RTOL = 1e-6
PARAM_RTOL = 1e-5
PARAM_ATOL = 1e-7
#: fp32 parameters against the native run: max |ds - native| / max |native|.
CLAMP_PARAM_RTOL = 1e-6
NAN_STEP = 3

#: ZeRO stage -> (the optimizer wrapper in fp32, in bf16 / fp16).
EXPECTED_WRAPPER = {
    0: (None, "FP16_UnfusedOptimizer"),
    1: ("DeepSpeedZeroOptimizer", "DeepSpeedZeroOptimizer"),
    2: ("DeepSpeedZeroOptimizer", "DeepSpeedZeroOptimizer"),
    3: ("DeepSpeedZeroOptimizer_Stage3", "DeepSpeedZeroOptimizer_Stage3"),
}


def stage_of(spec: dict[str, Any]) -> int:
    """The spec's ZeRO stage (0 without a ``zero_optimization`` section)."""
    zero = spec["ds_config"].get("zero_optimization")
    return 0 if zero is None else int(zero["stage"])


def expected_wrapper(spec: dict[str, Any]) -> str | None:
    """The DeepSpeed optimizer wrapper a spec's engine must have (``None``: ZeRO 0 fp32)."""
    if spec["ds_config"].get("data_types", {}).get("grad_accum_dtype") == "fp32":
        return "BF16_Optimizer"
    return EXPECTED_WRAPPER[stage_of(spec)][spec["fp16"] or spec["bf16"]]


def canon(records: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """``records`` with NaN spelled as a string, so that equal records compare equal."""
    return {
        key: ["nan" if isinstance(v, float) and math.isnan(v) else v for v in values]
        for key, values in records.items()
    }


def ranks_agree(name: str, per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """No rank raised, and both recorded the same steps and state; rank 0's result."""
    for result in per_rank:
        assert "error" not in result, f"{name}: {result['error']}"
    first, second = per_rank
    assert canon(first["records"]) == canon(second["records"]), name
    assert torch.equal(first["checksum"], second["checksum"]), name
    return first


def unit_clip_counts(model: nn.Module, method: str, options: dict[str, Any]) -> tuple[int, int]:
    """``(units this step's layer_wise / agc would clip, units)`` of ``model``'s gradients.

    By the reference rules on the unclipped gradients: layer_wise's units are the
    tensors, AGC's the output rows of weights and the whole vectors (its weight floor
    1e-3).
    """
    params = [p for p in model.parameters() if p.grad is not None]
    if method == "layer_wise":
        factors = layer_wise_coefficients([p.grad for p in params], options["max_norm"])
        return sum(f < 1.0 for f in factors), len(factors)
    clipped = units = 0
    for param in params:
        c, u = agc_units_clipped(param.grad, param.detach(), options["clip_factor"])
        clipped, units = clipped + c, units + u
    return clipped, units
