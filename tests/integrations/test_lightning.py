"""PyTorch Lightning with distclip's callback, on CPU: every strategy that runs there.

Single device (in this process); DDP, ``ModelParallelStrategy`` (FSDP2) and DeepSpeed
ZeRO-2 on 2 gloo ranks of one harness group, started once for the module (Lightning
sees ``LOCAL_RANK`` and the process group, so it neither re-runs the script nor
creates a group). Each strategy trains once uninterrupted, once resumed with
``fit(ckpt_path=...)`` from the checkpoint of step 4, and the checks below read those
runs (``lightning_runs.py``). The oracle is ``lightning_support.reference_run``: a plain torch loop on the
global batches with the slow reference AutoClip. Lightning's FSDP1 strategy refuses
CPU and is not run; Lightning's DeepSpeed strategy refuses CPU too, and runs here with
exactly its CUDA-only checks lifted (``lightning_support.CPUDeepSpeedStrategy``).
"""

from __future__ import annotations

import csv
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import distclip
from distclip.lightning import DistClipCallback
from tests.integrations import lightning_runs as runs
from tests.integrations import lightning_support as ls
from tests.support.harness import ProcessGroupHarness, running_group

#: Seconds one call into the group may take (Lightning and DeepSpeed start-up included).
RUN_TIMEOUT = 240.0
STRATEGIES = ["single", "ddp", "fsdp2", "deepspeed"]
#: fp32 training against the float64 reference: the thresholds agree to this (relative).
REL = 1e-6

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def group() -> Iterator[ProcessGroupHarness]:
    """Two gloo ranks prepared for Lightning, started once for the module."""
    for harness in running_group(2, timeout=RUN_TIMEOUT):
        harness.run(ls.prepare_rank)
        yield harness


@pytest.fixture(scope="module")
def run(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., list[Any]]:
    """``run(fn, strategy)``: ``fn(strategy, root)`` on every rank (or here, single device), cached."""
    root = tmp_path_factory.mktemp("lightning")
    cache: dict[tuple[str, str], list[Any]] = {}

    def call(fn: Callable[..., Any], strategy: str) -> list[Any]:
        key = (fn.__name__, strategy)
        if key not in cache:
            if strategy == "single":
                ls.quiet()
                cache[key] = [fn(strategy, str(root))]
            else:
                group = request.getfixturevalue("group")
                cache[key] = group.run(fn, strategy, str(root))
        return cache[key]

    return call


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def _max_param_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


# ------------------------------------------------------------------ thresholds
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_thresholds_equal_the_plain_loop(run: Callable[..., list[Any]], strategy: str) -> None:
    per_rank = run(runs.run_strategy, strategy)
    reference = per_rank[0]["reference"]
    stats = per_rank[0]["full"]["stats"]
    assert [s["step"] for s in stats] == list(range(1, ls.STEPS + 1))
    for record, norm, threshold in zip(
        stats, reference["norms"], reference["thresholds"], strict=True
    ):
        assert _rel(record["total_norm"], norm) < REL
        assert _rel(record["threshold"], threshold) < REL
        assert record["clipped"] is (norm > threshold)
    assert any(s["clipped"] for s in stats)  # the run clips on some steps, not on all
    assert not all(s["clipped"] for s in stats)
    for other in per_rank[1:]:  # the same record on every rank
        assert other["full"]["stats"] == stats
    assert _max_param_diff(per_rank[0]["full"]["params"], reference["params"]) < 1e-6


# ----------------------------------------------------------------------- resume
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_resume_from_ckpt_path_gives_the_uninterrupted_run(
    run: Callable[..., list[Any]], strategy: str
) -> None:
    for result in run(runs.run_strategy, strategy):
        full, resumed = result["full"], result["resumed"]
        assert [s["step"] for s in resumed["stats"]] == list(range(ls.RESUME_AT + 1, ls.STEPS + 1))
        for after, before in zip(resumed["stats"], full["stats"][ls.RESUME_AT :], strict=True):
            assert _rel(after["threshold"], before["threshold"]) < REL
            assert _rel(after["total_norm"], before["total_norm"]) < REL
        window = ls.AUTOCLIP["window"]
        expected_window = [s["total_norm"] for s in full["stats"][-window:]]
        assert resumed["window"] == pytest.approx(expected_window, rel=REL)
        assert _max_param_diff(resumed["params"], full["params"]) < 1e-6


# ---------------------------------------------------------------------- logging
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_the_record_reaches_self_log_the_logger_and_json_lines(
    run: Callable[..., list[Any]], strategy: str
) -> None:
    per_rank = run(runs.run_strategy, strategy)
    full = per_rank[0]["full"]
    for logged, record in zip(full["logged"], full["stats"], strict=True):
        assert set(logged) == {"total_norm", "threshold", "clip_coef", "clipped", "skipped"}
        for key in ("total_norm", "threshold", "clip_coef"):
            assert logged[key] == pytest.approx(record[key], rel=1e-6)
        assert logged["clipped"] == float(record["clipped"])
        assert logged["skipped"] == float(record["skipped"])

    with open(full["csv"], newline="") as file:
        rows = list(csv.DictReader(file))
    assert [int(row["step"]) for row in rows] == list(range(ls.STEPS))
    for row, record in zip(rows, full["stats"], strict=True):
        assert float(row["distclip/threshold"]) == pytest.approx(record["threshold"], rel=1e-6)
        assert float(row["distclip/total_norm"]) == pytest.approx(record["total_norm"], rel=1e-6)

    # Written by global rank 0 only (every rank's path is the same file); the resumed
    # run appended its steps.
    lines = distclip.read_metrics(full["jsonl"])
    expected = full["stats"] + full["stats"][ls.RESUME_AT :]
    assert [line["step"] for line in lines] == [s["step"] for s in expected]
    for line, record in zip(lines, expected, strict=True):
        assert {k: line[k] for k in record} == pytest.approx(record, rel=1e-6)


# ------------------------------------------------------- Lightning's own clipping
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_gradient_clip_val_left_on_is_refused(run: Callable[..., list[Any]], strategy: str) -> None:
    for outcomes in run(runs.run_refusals, strategy):
        assert outcomes["callback"].startswith("FrameworkClippingError: ")
        assert "Trainer(gradient_clip_val=1.0)" in outcomes["callback"]
        assert "leave gradient_clip_val unset" in outcomes["callback"]
        if strategy == "deepspeed":
            assert outcomes["optimizer_class"].startswith("ValueError: ")
            assert "distclip.deepspeed" in outcomes["optimizer_class"]
        else:  # the optimizer class alone, with the real Trainer on the stack
            assert outcomes["optimizer_class"].startswith("FrameworkClippingError: ")
            assert "Trainer(gradient_clip_val=1.0)" in outcomes["optimizer_class"]


# ----------------------------------------------------------------- the wrapper
@pytest.mark.parametrize("strategy", ["single", "ddp", "fsdp2"])
def test_get_clipper_through_the_lightning_optimizer(
    run: Callable[..., list[Any]], strategy: str
) -> None:
    for result in run(runs.run_strategy, strategy):
        assert result["full"]["get_clipper"] is True
        assert result["resumed"]["clipper_seen"] is True


# --------------------------------------------- clipping built into the optimizer
@pytest.mark.parametrize("strategy", ["single", "ddp"])
def test_optimizer_class_alone_trains_and_resumes(
    run: Callable[..., list[Any]], strategy: str
) -> None:
    per_rank = run(runs.run_optimizer_class, strategy)
    reference = run(runs.run_strategy, strategy)[0]["reference"]
    for result in per_rank:
        full, resumed = result["full"], result["resumed"]
        thresholds = [s["threshold"] for s in full["stats"]]
        assert max(map(_rel, thresholds, reference["thresholds"])) < REL
        assert [s["threshold"] for s in resumed["stats"]] == pytest.approx(
            thresholds[ls.RESUME_AT :], rel=REL
        )
        assert _max_param_diff(resumed["params"], full["params"]) < 1e-6


# ------------------------------------------------------------ the callback itself
def test_callback_is_a_lightning_callback_and_refuses_bad_options() -> None:
    import pytorch_lightning as pl

    assert issubclass(DistClipCallback, pl.Callback)
    assert distclip.lightning.callback_class("pytorch_lightning") is DistClipCallback
    # Bad methods and options: the bad-input table (tests/unit/test_bad_inputs.py).
    with pytest.raises(TypeError, match=r"metrics_path must be"):
        DistClipCallback(metrics_path=3)
    with pytest.raises(RuntimeError, match=r"use \.clippers"):
        _ = DistClipCallback().clipper
    callback = DistClipCallback("zclip", z_thresh=3.0, prefix="clip/")
    copy = pickle.loads(pickle.dumps(callback))  # as ddp_spawn sends the Trainer
    assert type(copy) is DistClipCallback
    assert (copy.method, copy.options, copy.prefix) == ("zclip", {"z_thresh": 3.0}, "clip/")


def test_gradient_accumulation_adds_one_entry_per_optimizer_step(
    run: Callable[..., list[Any]],
) -> None:
    (result,) = run(runs.run_accumulation, "single")
    reference = ls.reference_run(world_size=1)
    assert result["global_step"] == ls.STEPS
    assert result["num_steps"] == ls.STEPS
    assert [line["step"] for line in result["lines"]] == list(range(1, ls.STEPS + 1))
    thresholds = [line["threshold"] for line in result["lines"]]
    assert max(map(_rel, thresholds, reference["thresholds"])) < REL


class _OwnClipping(ls.ClipNet):
    def configure_gradient_clipping(self, optimizer: Any, *args: Any, **kwargs: Any) -> None:
        self.clip_gradients(optimizer, gradient_clip_val=0.5)


def test_a_module_that_clips_in_its_own_hook_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ls.quiet()
    callback = ls.make_callback("single")
    trainer = ls.make_trainer("single", tmp_path, [callback], max_steps=3)
    with caplog.at_level("WARNING", logger="distclip.integrations.lightning"):
        trainer.fit(_OwnClipping())
    (warning,) = [r for r in caplog.records if r.name == "distclip.integrations.lightning"]
    assert "_OwnClipping overrides configure_gradient_clipping" in warning.getMessage()
    # The warning says what happens: distclip measures what the hook left (norms <= 0.5).
    assert callback.clipper.num_steps == 3
    assert float(callback.clipper.window.chronological().max()) <= 0.5 + 1e-6


def test_a_callback_without_options_logs_the_optimizer_class_clipper(tmp_path: Path) -> None:
    ls.quiet()
    callback = DistClipCallback()
    recorder = ls.Recorder(callback)
    trainer = ls.make_trainer("single", tmp_path, [callback, recorder], max_steps=3)
    module = ls.ClipNet(clipped_class=ls.AUTOCLIP)
    trainer.fit(module)
    assert callback.clipper is distclip.get_clipper(module.optimizers())
    assert [s["step"] for s in recorder.stats] == [1, 2, 3]
    for logged, record in zip(recorder.logged, recorder.stats, strict=True):
        assert logged["threshold"] == pytest.approx(record["threshold"], rel=1e-6)
    with pytest.raises(ValueError, match=r"already clips with distclip \(autoclip\)"):
        ls.make_trainer("single", tmp_path, [DistClipCallback(window=4)], max_steps=1).fit(
            ls.ClipNet(clipped_class=ls.AUTOCLIP)
        )


def test_lightning_fsdp1_strategy_refuses_cpu() -> None:
    # Why FSDPStrategy is not in the matrix: the README says so, this pins it. A Lightning
    # that accepts CPU here makes this fail, and FSDP1 should then join the matrix.
    import pytorch_lightning as pl

    with pytest.raises(ValueError, match=r"strategy `fsdp` requires a GPU accelerator"):
        pl.Trainer(accelerator="cpu", devices=1, strategy="fsdp", logger=False)
