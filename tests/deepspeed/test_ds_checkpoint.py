"""DeepSpeed checkpoints and ``distclip.deepspeed.attach``, on 2 gloo ranks.

* ``save_checkpoint`` after 4 steps, ``load_checkpoint`` into a fresh engine (other
  weights, another ``gradient_clipping``): the later thresholds, norms, step counts and
  the final fp32 parameters equal the uninterrupted run's, bit for bit, on ZeRO 0-3,
  offload, BF16_Optimizer and a bf16 ZClip run;
* ``attach``: the refusals (model parallelism for the per-unit methods, an unverified
  wrapper subclass, no wrapper at all, not an engine) before any change, explicit
  options, hooks added and removed, ``remove()`` restoring DeepSpeed's own clip.

The DeepSpeed suite shares one process group (``ds_group``, started once for the package).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.deepspeed import workers_checkpoint
from tests.deepspeed.checks import canon
from tests.deepspeed.engines import make_spec
from tests.support.harness import ProcessGroupHarness

pytestmark = pytest.mark.distributed

pytest.importorskip("deepspeed")


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
    per_rank = ds_group.run(workers_checkpoint.run_checkpoint, spec, str(tmp_path), split)
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
    assert canon(per_rank[0]["resumed"]) == canon(per_rank[1]["resumed"])


def test_attach_refusals_and_options(ds_group: ProcessGroupHarness) -> None:
    spec = make_spec("attach-checks", stage=2)
    out = ds_group.run(workers_checkpoint.run_attach_checks, spec)[0]
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
