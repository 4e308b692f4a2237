"""HF ``transformers.Trainer`` on 2 gloo ranks: DDP and DeepSpeed ZeRO-2 / ZeRO-3 on CPU.

One process group for the module; the Trainer runs happen once (``runs``) and the
tests check them against the plain ``ClippedOptimizer(SGD)`` loop in this process on
the concatenation of both ranks' batches of every step (1e-6 relative, fp32):

* DDP: a distclip class (``optimizer_cls_and_kwargs``), ``distclip.hf.attach``, and
  ``distclip.attach`` in a callback; each also resumed from the Trainer's
  ``checkpoint-4``; HF's default ``max_grad_norm`` refused without the integration,
  turned off (one warning, rank 0 only) with it;
* DeepSpeed (``TrainingArguments(deepspeed=...)``, ``gradient_clipping: "auto"``, i.e.
  HF's 1.0): ``distclip.hf.attach`` clips the engine with the config's ``"distclip"``
  section (ZeRO-0 fp32, ZeRO-2) or with the method it is given (ZeRO-3), before the Trainer loads
  ``resume_from_checkpoint``; ``get_clipper`` and ``last_clip`` through HF's
  ``DeepSpeedOptimizerWrapper``; a distclip optimizer class under DeepSpeed refused,
  with and without the integration.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.integrations import hf_workers
from tests.integrations.integ_checks import (
    RTOL,
    check_against_reference,
    check_resumed,
    ok,
    thresholds,
)
from tests.support.frameworks import METHOD, OPTIONS
from tests.support.harness import ProcessGroupHarness

pytestmark = pytest.mark.distributed

pytest.importorskip("transformers")
pytest.importorskip("deepspeed")

SPLIT = 4
SECTION = {"method": METHOD, **OPTIONS}

#: name -> make_spec keywords of the uninterrupted runs; each also runs resumed.
RESUMED: dict[str, dict[str, Any]] = {
    "ddp-class": {"path": "class"},
    "ddp-integration": {"path": "integration", "max_grad_norm": None},
    "ddp-callback": {"path": "callback"},
    "zero0": {"zero": 0, "method": None, "options": {}, "section": SECTION, "max_grad_norm": None},
    "zero2": {"zero": 2, "method": None, "options": {}, "section": SECTION, "max_grad_norm": None},
    "zero3": {"zero": 3, "max_grad_norm": None},
}

REFUSED: dict[str, dict[str, Any]] = {
    "ddp-class-default-max-grad-norm": {"path": "class", "max_grad_norm": None},
    "zero2-class": {"path": "class", "zero": 2, "max_grad_norm": None},
    "zero2-class-integration": {"path": "class+integration", "zero": 2, "max_grad_norm": None},
}


@pytest.fixture(scope="module")
def runs(
    fw_group: ProcessGroupHarness, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, list[dict[str, Any]]]:
    root = tmp_path_factory.mktemp("hf_dist")
    out = {}
    for name, kwargs in RESUMED.items():
        first = hf_workers.make_spec(name, str(root / name), save_steps=SPLIT, **kwargs)
        out[name] = fw_group.run(hf_workers.hf_run, first)
        resumed = hf_workers.make_spec(
            f"{name}-resumed",
            str(root / f"{name}-resumed"),
            save_steps=SPLIT,
            resume=str(Path(first["output_dir"]) / f"checkpoint-{SPLIT}"),
            **kwargs,
        )
        out[resumed["name"]] = fw_group.run(hf_workers.hf_run, resumed)
    for name, kwargs in REFUSED.items():
        spec = hf_workers.make_spec(name, str(root / name), **kwargs)
        out[name] = fw_group.run(hf_workers.hf_run, spec)
    return out


@pytest.mark.parametrize("name", list(RESUMED))
def test_thresholds_equal_the_plain_loop_on_both_ranks(
    runs: dict[str, list[dict[str, Any]]], name: str
) -> None:
    check_against_reference(runs[name])


@pytest.mark.parametrize("name", list(RESUMED))
def test_resume_from_the_trainer_checkpoint_keeps_the_window(
    runs: dict[str, list[dict[str, Any]]], name: str
) -> None:
    check_resumed(runs[name], runs[f"{name}-resumed"], SPLIT)


def test_integration_turns_max_grad_norm_off_with_one_warning_on_rank_zero(
    runs: dict[str, list[dict[str, Any]]],
) -> None:
    rank0, rank1 = ok(runs["ddp-integration"])
    assert [len(rank0["warnings"]), len(rank1["warnings"])] == [1, 0]
    assert "max_grad_norm=1.0 is turned off" in rank0["warnings"][0]
    assert rank0["max_grad_norm_after_attach"] == rank1["max_grad_norm_after_attach"] == 0.0
    assert [entry["distclip/threshold"] for entry in rank0["log"]] == pytest.approx(
        thresholds(rank0), rel=RTOL
    )


def test_default_max_grad_norm_is_refused_on_every_rank(
    runs: dict[str, list[dict[str, Any]]],
) -> None:
    for run in runs["ddp-class-default-max-grad-norm"]:
        assert run["error"]["type"] == "FrameworkClippingError"
        assert "TrainingArguments(max_grad_norm=1.0)" in run["error"]["message"]
        assert run["records"] == []


@pytest.mark.parametrize(
    ("name", "chain"),
    [
        ("zero0", "DeepSpeedOptimizerWrapper -> SGD"),
        ("zero2", "DeepSpeedOptimizerWrapper -> DistClipDeepSpeedZeroOptimizer -> SGD"),
        ("zero3", "DeepSpeedOptimizerWrapper -> DistClipDeepSpeedZeroOptimizer_Stage3 -> SGD"),
    ],
)
def test_deepspeed_engine_clipper_is_reached_through_hf_wrappers(
    runs: dict[str, list[dict[str, Any]]], name: str, chain: str
) -> None:
    for run in ok(runs[name]):
        assert run["chain"] == chain
        assert run["engine_adapter_clipper"]
        assert run["engine_get_clipper"]
        assert "is a DeepSpeed optimizer" in run["attach_refused"]
        assert "distclip.hf.attach(trainer)" in run["attach_refused"]


def test_distclip_optimizer_class_under_deepspeed_is_refused(
    runs: dict[str, list[dict[str, Any]]],
) -> None:
    for run in runs["zero2-class"]:
        # Without the integration: at the first step, DeepSpeed found on the stack.
        assert run["error"]["type"] == "FrameworkClippingError"
        assert "stepped by DeepSpeed" in run["error"]["message"]
        assert "distclip.hf.attach(trainer)" in run["error"]["message"]
    for run in runs["zero2-class-integration"]:
        # With it: at attach, before DeepSpeed starts.
        assert run["error"]["type"] == "FrameworkClippingError"
        assert "distclip.hf: the Trainer's optimizer clips with distclip" in run["error"]["message"]
        assert run["seen"] == []
