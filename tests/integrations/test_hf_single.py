"""HF ``transformers.Trainer`` in one process (CPU): the three ways in, resume, logs, refusals.

Every run trains :class:`~tests.support.frameworks.TinyNet` with a real Trainer; the module runs
them once (``runs``) and the tests check them:

* thresholds per step equal the plain ``ClippedOptimizer(SGD)`` loop on the same
  batches (1e-6 relative, fp32), for a distclip class (``optimizer_cls_and_kwargs``),
  ``distclip.hf.attach`` and ``distclip.attach`` in a callback, and with gradient
  accumulation;
* a run resumed from the Trainer's own ``checkpoint-4`` gives the uninterrupted run's
  thresholds, window and parameters (the callback path through the adoption of the
  clipper state the Trainer loaded into the plain optimizer);
* ``distclip.hf.attach`` turns ``max_grad_norm`` off and says so once; its records reach
  ``log_history`` and TensorBoard; without it, the default ``max_grad_norm=1.0`` is
  refused with :class:`~distclip.FrameworkClippingError`;
* the wrappers: ``last_clip`` and ``get_clipper`` through ``AcceleratedOptimizer``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import distclip
from tests.integrations import hf_workers
from tests.integrations.integ_checks import (
    RTOL,
    check_against_reference,
    check_resumed,
    max_rel_diff,
    ok,
    thresholds,
)

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

SPLIT = 4
PATHS = ("class", "integration", "callback")


def _spec(name: str, root: Path, **kwargs: Any) -> dict[str, Any]:
    return hf_workers.make_spec(name, str(root / name), **kwargs)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    root = tmp_path_factory.mktemp("hf_single")
    specs = []
    for path in PATHS:
        # The integration path keeps HF's default max_grad_norm=1.0: attach turns it off.
        grad_norm = None if path == "integration" else 0.0
        report = ["tensorboard"] if path == "integration" else []
        specs.append(
            _spec(
                path, root, path=path, save_steps=SPLIT, max_grad_norm=grad_norm, report_to=report
            )
        )
        specs.append(
            _spec(
                f"{path}-resumed",
                root,
                path=path,
                save_steps=SPLIT,
                max_grad_norm=grad_norm,
                resume=str(root / path / f"checkpoint-{SPLIT}"),
            )
        )
    specs += [
        _spec("class+integration", root, path="class+integration", max_grad_norm=None),
        _spec("gas2", root, path="integration", gas=2, steps=6),
        _spec("class-default-max-grad-norm", root, path="class", max_grad_norm=None),
        _spec("callback-default-max-grad-norm", root, path="callback", max_grad_norm=None),
        _spec("class-model-kwarg", root, path="class", model_as_params=True),
    ]
    out = {}
    for spec in specs:
        out[spec["name"]] = hf_workers.hf_run(spec)
        out[spec["name"]]["spec"] = spec
    return out


@pytest.mark.parametrize("path", [*PATHS, "class+integration"])
def test_thresholds_and_parameters_equal_the_plain_loop(
    runs: dict[str, dict[str, Any]], path: str
) -> None:
    run = runs[path]
    check_against_reference([run])
    assert len(run["records"]) == 8
    assert run["chain"].startswith("AcceleratedOptimizer -> ")


def test_gradient_accumulation_adds_one_window_entry_per_optimizer_step(
    runs: dict[str, dict[str, Any]],
) -> None:
    run = runs["gas2"]
    check_against_reference([run], gas=2)
    assert len(run["seen"]) == 12
    assert run["num_steps"] == 6


@pytest.mark.parametrize("path", PATHS)
def test_resume_from_the_trainer_checkpoint_keeps_the_window(
    runs: dict[str, dict[str, Any]], path: str
) -> None:
    check_resumed([runs[path]], [runs[f"{path}-resumed"]], SPLIT)


def test_integration_turns_max_grad_norm_off_once_and_remove_restores_it(
    runs: dict[str, dict[str, Any]],
) -> None:
    (run,) = ok([runs["integration"]])
    assert run["max_grad_norm_after_attach"] == 0.0
    assert run["max_grad_norm_after_remove"] == 1.0
    assert run["log_restored"]
    assert len(run["warnings"]) == 1
    assert "max_grad_norm=1.0 is turned off" in run["warnings"][0]
    # The Trainer still logs grad_norm: the pre-clip norm, distclip's total_norm.
    logged = [entry["grad_norm"] for entry in run["log"]]
    assert max_rel_diff(logged, [r["total_norm"] for r in run["records"]]) <= RTOL


def test_integration_records_reach_log_history(runs: dict[str, dict[str, Any]]) -> None:
    (run,) = ok([runs["integration"]])
    assert [entry["step"] for entry in run["log"]] == list(range(1, 9))
    for entry, record in zip(run["log"], run["records"], strict=True):
        assert entry["distclip/threshold"] == pytest.approx(record["threshold"], rel=RTOL)
        assert entry["distclip/total_norm"] == pytest.approx(record["total_norm"], rel=RTOL)
        assert entry["distclip/clip_coef"] == pytest.approx(record["clip_coef"], rel=RTOL)
        assert entry["distclip/clipped"] == float(record["clipped"])
        assert entry["distclip/skipped"] == 0.0
    # Without the integration nothing is added to the Trainer's logs.
    assert all("distclip/threshold" not in entry for entry in runs["class"]["log"])


def test_integration_records_reach_tensorboard(runs: dict[str, dict[str, Any]]) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run,) = ok([runs["integration"]])
    events = list(Path(run["spec"]["output_dir"]).rglob("events.out.tfevents.*"))
    assert events, "the Trainer wrote no TensorBoard event file"
    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    scalars = accumulator.Scalars("train/distclip/threshold")
    assert [event.step for event in scalars] == list(range(1, 9))
    assert [event.value for event in scalars] == pytest.approx(thresholds(run), rel=RTOL)


def test_default_max_grad_norm_is_refused_without_the_integration(
    runs: dict[str, dict[str, Any]],
) -> None:
    for name, when in (
        ("class-default-max-grad-norm", "at the first step"),
        ("callback-default-max-grad-norm", "at attach"),
    ):
        run = runs[name]
        assert run["error"] is not None, name
        assert run["error"]["type"] == "FrameworkClippingError", (when, run["error"])
        assert "TrainingArguments(max_grad_norm=1.0)" in run["error"]["message"]
        assert "max_grad_norm=0.0" in run["error"]["message"]
        assert run["records"] == []


def test_distclip_model_keyword_in_optimizer_cls_and_kwargs_is_explained(
    runs: dict[str, dict[str, Any]],
) -> None:
    run = runs["class-model-kwarg"]
    assert run["error"]["type"] == "TypeError"
    assert (
        "HF Trainer takes the 'model' entry of optimizer_cls_and_kwargs" in run["error"]["message"]
    )
    assert "distclip.hf.attach(trainer" in run["error"]["message"]


def test_attach_refuses_bad_input_before_changing_anything(tmp_path: Path) -> None:
    from transformers import Trainer, TrainingArguments

    from tests.support.frameworks import IndexedData, TinyNet, framework_run

    with pytest.raises(TypeError, match=r"trainer must be a transformers\.Trainer, got object"):
        distclip.hf.attach(object())
    with framework_run():
        args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
        trainer = Trainer(model=TinyNet(), args=args, train_dataset=IndexedData())
        # Bad methods and options: the bad-input table (tests/unit/test_bad_inputs.py).
        assert trainer.args.max_grad_norm == 1.0
        assert "prepare" not in trainer.accelerator.__dict__
        given = distclip.AutoClippedOptimizer(torch.optim.SGD)
        with_class = Trainer(
            model=TinyNet(),
            args=args,
            train_dataset=IndexedData(),
            optimizer_cls_and_kwargs=(given, {"lr": 0.1}),
        )
        with pytest.raises(ValueError, match=r"optimizer \(AutoClippedSGD\) already clips"):
            distclip.hf.attach(with_class, "autoclip", q=0.2)
        handle = distclip.hf.attach(trainer, "norm", max_norm=2.0)
        with pytest.raises(ValueError, match="already called on this Trainer"):
            distclip.hf.attach(trainer)
        assert handle.clipper is None  # the Trainer builds its optimizer in train()
        handle.remove()
        assert trainer.args.max_grad_norm == 1.0
        assert "prepare" not in trainer.accelerator.__dict__
        del trainer, with_class
