"""Accelerate in one process (CPU): ``distclip.accelerate.attach``, save/load_state, refusals.

Real ``Accelerator`` loops on :class:`~tests.support.frameworks.TinyNet`, run once (``runs``):

* the thresholds per step equal the plain ``ClippedOptimizer(SGD)`` loop on the same
  batches (1e-6 relative), with the integration and with a distclip optimizer
  without it; ``last_clip`` and ``get_clipper`` through ``AcceleratedOptimizer``;
* ``save_state`` after 4 steps, then a fresh accelerator's ``load_state``: the same
  thresholds, window and parameters as the uninterrupted run;
* a user-called ``accelerator.clip_grad_norm_(parameters, 1.0)`` is refused with the
  integration, ``clip_grad_norm_(parameters, inf)`` returns the pre-clip norm and clips
  nothing; without the integration distclip warns once at the first step.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import distclip
from tests.integrations import accel_workers
from tests.integrations.integ_checks import (
    RTOL,
    check_against_reference,
    check_resumed,
    max_rel_diff,
    ok,
)

pytest.importorskip("accelerate")

SPLIT = 4


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    state = str(tmp_path_factory.mktemp("accelerate_single") / "state")
    specs = [
        accel_workers.make_spec("integration", save_at=SPLIT, state_dir=state),
        accel_workers.make_spec("integration-resumed", resume=(state, SPLIT)),
        accel_workers.make_spec("class", integration=False, class_optimizer=True),
        accel_workers.make_spec("user-clip", user_clip=1.0),
        accel_workers.make_spec("user-norm", user_clip=float("inf")),
        accel_workers.make_spec(
            "class-user-clip", integration=False, class_optimizer=True, user_clip=1.0
        ),
    ]
    return {spec["name"]: accel_workers.accel_run(spec) for spec in specs}


@pytest.mark.parametrize("name", ["integration", "class", "user-norm"])
def test_thresholds_equal_the_plain_loop(runs: dict[str, dict[str, Any]], name: str) -> None:
    run = runs[name]
    check_against_reference([run])
    assert run["num_processes"] == 1
    inner = "AutoClippedSGD" if name == "class" else "SGD"
    assert run["chain"] == f"AcceleratedOptimizer -> {inner}"


def test_save_state_and_load_state_keep_the_window(runs: dict[str, dict[str, Any]]) -> None:
    full, resumed = runs["integration"], runs["integration-resumed"]
    check_resumed([full], [resumed], SPLIT)
    assert full["removed"]
    assert resumed["removed"]


def test_user_called_clip_grad_norm_is_refused_with_the_integration(
    runs: dict[str, dict[str, Any]],
) -> None:
    run = runs["user-clip"]
    assert run["error"]["type"] == "FrameworkClippingError"
    assert "accelerator.clip_grad_norm_(parameters, max_norm=1.0)" in run["error"]["message"]
    assert run["records"] == []
    # The norm alone (max_norm=inf) is distclip's pre-clip norm of the same step.
    (norms,) = ok([runs["user-norm"]])
    assert max_rel_diff(norms["user_norms"], [r["total_norm"] for r in norms["records"]]) <= RTOL


def test_without_the_integration_distclip_warns_once(runs: dict[str, dict[str, Any]]) -> None:
    for name in ("class", "class-user-clip"):
        (run,) = ok([runs[name]])
        assert len(run["warnings"]) == 1, run["warnings"]
        assert (
            "stepped by Accelerate (AcceleratedOptimizer -> AutoClippedSGD)" in run["warnings"][0]
        )
        assert "distclip.accelerate.attach(accelerator)" in run["warnings"][0]
    assert ok([runs["integration"]])[0]["warnings"] == []


def test_attach_and_get_clipper_through_accelerated_optimizer_and_bad_input() -> None:
    from accelerate import Accelerator

    from tests.support.frameworks import IndexedData, TinyNet, framework_run

    with framework_run():
        accelerator = Accelerator(cpu=True)
        model = TinyNet()
        plain = torch.optim.SGD(model.parameters(), lr=0.1)
        model, prepared = accelerator.prepare(model, plain)
        with pytest.raises(ValueError, match="AcceleratedOptimizer -> SGD does not clip"):
            distclip.get_clipper(prepared)
        # attach through the wrapper (the bare optimizer is inside it).
        handle = distclip.attach(prepared, "norm", max_norm=0.5)
        assert handle.optimizer is plain
        assert distclip.get_clipper(prepared) is handle.clipper
        with pytest.raises(ValueError, match="already clips with norm"):
            distclip.accelerate.attach(accelerator, "autoclip")
        assert "prepare" not in accelerator.__dict__  # nothing left behind by the refusal
        # Bad methods and options: the bad-input table (tests/unit/test_bad_inputs.py).
        batch = IndexedData()[0]
        model(batch["x"][None], batch["y"][None], batch["idx"])["loss"].backward()
        guard = distclip.accelerate.attach(accelerator)  # keeps the attached norm clipper
        assert guard.handles == []
        with pytest.raises(ValueError, match="already called on this accelerator"):
            distclip.accelerate.attach(accelerator)
        with pytest.raises(distclip.FrameworkClippingError, match="clip_grad_value_"):
            accelerator.clip_grad_value_(model.parameters(), 0.1)
        guard.remove()
        assert "last_clip" not in prepared.__dict__
        accelerator.clip_grad_value_(model.parameters(), 0.1)  # Accelerate's own again
        handle.remove()
        del model, prepared, accelerator
