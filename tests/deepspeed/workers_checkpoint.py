"""Checkpoints and ``distclip.deepspeed.attach``, on every rank (``test_ds_checkpoint.py``)."""

from __future__ import annotations

import traceback
import warnings
from typing import Any

import torch

import distclip
from tests.deepspeed.engines import (
    LR,
    build_engine,
    full_fp32_params,
    outcome,
    release,
    train_steps,
)
from tests.support.deepspeed_env import init_deepspeed_distributed
from tests.support.problem import DEEPSPEED


def run_checkpoint(spec: dict[str, Any], directory: str, split: int) -> dict[str, Any]:
    """Uninterrupted run vs. save after ``split`` steps and resume in a fresh engine.

    The resumed engine starts from other weights and another ``gradient_clipping``
    (DeepSpeed restores its own saved clip value on load: distclip must still win).
    """
    steps = spec["steps"]
    out: dict[str, Any] = {"name": spec["name"]}
    try:
        engine = build_engine(spec)
        out["full"] = train_steps(engine, spec, range(steps))
        out["full_params"] = full_fp32_params(engine)
        release(engine)

        engine = build_engine(spec)
        out["first"] = train_steps(engine, spec, range(split))
        saved_state = engine.distclip.clipper.state_dict()
        engine.save_checkpoint(directory, tag="split", client_state={"user_key": 7})
        out["saved_num_steps"] = saved_state["num_steps"]
        release(engine)

        resumed_config = {**spec["ds_config"], "gradient_clipping": 2.5}
        engine = build_engine(spec, model_seed=123, config=resumed_config)
        before = engine.distclip.clipper.num_steps
        load_path, client_state = engine.load_checkpoint(directory, tag="split")
        out["load_path"] = str(load_path)
        out["client_state_keys"] = sorted(client_state)
        out["user_key"] = client_state.get("user_key")
        out["num_steps_before_load"] = before
        out["num_steps_after_load"] = engine.distclip.clipper.num_steps
        out["hooked_after_load"] = engine.distclip.hooked
        out["ds_clip_after_load"] = (
            engine.optimizer.clip_grad if hasattr(engine.optimizer, "clip_grad") else None
        )
        out["resumed"] = train_steps(engine, spec, range(split, steps))
        out["resumed_params"] = full_fp32_params(engine)
        release(engine)
    except Exception:
        out["error"] = traceback.format_exc()
    return out


def run_attach_checks(spec: dict[str, Any]) -> dict[str, Any]:
    """Refusals at attach time and attach with explicit options, on engines of ``spec``."""
    deepspeed = init_deepspeed_distributed()
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    out: dict[str, Any] = {}
    config = {k: v for k, v in spec["ds_config"].items() if k != "distclip"}

    def plain_engine() -> Any:
        model = DEEPSPEED.model()
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR), config=config
        )
        return engine

    # layer_wise / agc with model parallelism: refused before any change.
    engine = plain_engine()
    engine.mpu = object()
    for method in ("agc", "layer_wise"):
        out[f"refuse_{method}"] = outcome(lambda m=method: distclip.deepspeed.attach(engine, m))
    engine.mpu = None
    out["no_adapter_after_refusal"] = "distclip" not in engine.__dict__

    # layer_wise / agc: a step pre-hook on the inner optimizer, gone after remove().
    inner = engine.optimizer.optimizer
    hooks_before = len(inner._optimizer_step_pre_hooks)
    adapter = distclip.deepspeed.attach(engine, "agc", clip_factor=0.1)
    out["agc_hook_point"] = adapter.hook_point
    out["agc_hooks_added"] = len(inner._optimizer_step_pre_hooks) - hooks_before
    adapter.remove()
    out["agc_hooks_after_remove"] = len(inner._optimizer_step_pre_hooks) - hooks_before

    # The element-wise clamp: a step pre-hook on the inner optimizer, gone after remove().
    adapter = distclip.deepspeed.attach(engine, "value", clip_value=0.5)
    out["value_hook_point"] = adapter.hook_point
    out["value_hooks_added"] = len(inner._optimizer_step_pre_hooks) - hooks_before
    out["value_hooked"] = adapter.hooked
    adapter.remove()
    out["value_hooks_after_remove"] = len(inner._optimizer_step_pre_hooks) - hooks_before
    out["value_removed_class"] = type(engine.optimizer).__name__

    # Explicit options; no section in the config: the keywords decide.
    adapter = distclip.deepspeed.attach(engine, "norm", max_norm=0.5)
    out["explicit_method"] = adapter.method
    out["explicit_max_norm"] = adapter.clipper.config.max_norm
    out["double_attach"] = outcome(lambda: distclip.deepspeed.attach(engine))
    out["get_adapter_is_adapter"] = distclip.deepspeed.get_adapter(engine) is adapter
    records = train_steps(engine, {**spec, "steps": 3}, range(3))
    out["explicit_thresholds"] = records["threshold"]
    # remove(): the wrapper is back to DeepSpeed's class and its own clip value.
    adapter.remove()
    out["removed_class"] = type(engine.optimizer).__name__
    out["removed_clip_grad"] = engine.optimizer.clip_grad
    out["removed_attr"] = "distclip" not in engine.__dict__
    release(engine)

    # No "distclip" section and no options: AutoClip's defaults.
    engine = plain_engine()
    adapter = distclip.deepspeed.attach(engine)
    out["default_method"] = adapter.method
    out["default_section_present"] = adapter.section.present
    release(engine)

    # A subclass of a supported wrapper: refused unless allow_unverified (then warned).
    engine = plain_engine()
    engine.optimizer.__class__ = type("CustomZero", (DeepSpeedZeroOptimizer,), {})
    out["subclass_refused"] = outcome(lambda: distclip.deepspeed.attach(engine))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        distclip.deepspeed.attach(engine, allow_unverified=True)
    out["subclass_warning"] = [str(w.message) for w in caught if w.category is RuntimeWarning]
    out["subclass_hook_point"] = engine.distclip.hook_point
    release(engine)

    # Something that is no DeepSpeed wrapper at all, under ZeRO: refused.
    engine = plain_engine()
    engine.optimizer = torch.optim.SGD(engine.module.parameters(), lr=LR)
    out["unknown_refused"] = outcome(lambda: distclip.deepspeed.attach(engine))
    release(engine)

    # Not an engine.
    out["not_engine"] = outcome(lambda: distclip.deepspeed.attach(torch.nn.Linear(2, 2)))
    return out
