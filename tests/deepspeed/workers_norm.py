"""The methods DeepSpeed's own norm drives, on every rank (``test_ds_norm.py``)."""

from __future__ import annotations

from typing import Any

from tests.deepspeed.engines import build_engine, fp16_allowed, outcome, run_each, train_steps


def _train(engine: Any, spec: dict[str, Any], result: dict[str, Any]) -> None:
    result["optimizer_class"] = type(engine.optimizer).__name__
    result["records"] = train_steps(engine, spec, range(spec["steps"]))
    result["num_skipped"] = int(engine.distclip.clipper.num_skipped)


def run_specs(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Train every spec from scratch; per spec: records, final fp32 params, what was hooked."""
    return run_each(specs, _train)


def run_fp16(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """:func:`run_specs` with DeepSpeed's fp16 allowed on the CPU accelerator; last, what
    ZeRO 0 with fp16 raises (it is refused: DeepSpeed's own updates are off there)."""
    with fp16_allowed():
        results = run_specs(specs)
        spec = {**specs[0], "name": "z0-fp16-refused"}
        config = {k: v for k, v in spec["ds_config"].items() if k != "zero_optimization"}
        refused = [outcome(lambda: build_engine(spec, config=config))]
    return [*results, {"refused": refused}]
