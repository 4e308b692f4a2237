"""Accelerate on 2 gloo ranks: DDP (``Accelerator(cpu=True)``) and DeepSpeed ZeRO-2 (plugin).

One process group for the module; the loops run once (``runs``) and the tests check
them against the plain ``ClippedOptimizer(SGD)`` loop in this process on the
concatenation of both ranks' batches of every step (1e-6 relative, fp32):

* DDP with ``distclip.accelerate.attach``, and ``save_state`` / ``load_state`` after 4
  steps; a user-called ``clip_grad_norm_(parameters, 1.0)`` refused on every rank;
  without the integration, one warning on rank 0 only;
* DeepSpeed through Accelerate's plugin (``gradient_clipping: 1.0``): the engine clipped
  with the config's ``"distclip"`` section, ``save_state`` / ``load_state`` through the
  engine's checkpoint, ``get_clipper`` and ``last_clip`` through Accelerate's
  ``DeepSpeedOptimizerWrapper``, a distclip optimizer handed to DeepSpeed refused;
* FSDP1 (torch's, directly: Accelerate 1.15 enables its FSDP plugin only on GPUs): the
  root that :func:`distclip.accelerate.layout_model` finds gives the plain loop's
  thresholds, and the window survives FSDP1's ``optim_state_dict`` round trip (what
  Accelerate's FSDP1 ``save_state`` / ``load_state`` use).
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.integrations import accel_workers
from tests.integrations.integ_checks import (
    RTOL,
    check_against_reference,
    check_resumed,
    max_rel_diff,
    ok,
    reference_run,
    thresholds,
)
from tests.support.frameworks import METHOD, OPTIONS
from tests.support.harness import ProcessGroupHarness

pytestmark = pytest.mark.distributed

pytest.importorskip("accelerate")
pytest.importorskip("deepspeed")

SPLIT = 4
SECTION = {"method": METHOD, **OPTIONS}


@pytest.fixture(scope="module")
def runs(
    fw_group: ProcessGroupHarness, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, list[dict[str, Any]]]:
    root = tmp_path_factory.mktemp("accelerate_dist")
    zero2 = {"zero": 2, "section": SECTION, "method": None, "options": {}}
    specs = [
        accel_workers.make_spec("ddp", save_at=SPLIT, state_dir=str(root / "ddp")),
        accel_workers.make_spec("ddp-resumed", resume=(str(root / "ddp"), SPLIT)),
        accel_workers.make_spec("ddp-user-clip", user_clip=1.0),
        accel_workers.make_spec(
            "ddp-class", integration=False, class_optimizer=True, user_clip=1.0
        ),
        accel_workers.make_spec("zero2", save_at=SPLIT, state_dir=str(root / "zero2"), **zero2),
        accel_workers.make_spec("zero2-resumed", resume=(str(root / "zero2"), SPLIT), **zero2),
        accel_workers.make_spec("zero2-class", zero=2, class_optimizer=True),
    ]
    out = {spec["name"]: fw_group.run(accel_workers.accel_run, spec) for spec in specs}
    out["fsdp1"] = fw_group.run(accel_workers.fsdp1_layout_run)
    return out


@pytest.mark.parametrize(("name", "kind"), [("ddp", "MULTI_CPU"), ("zero2", "DEEPSPEED")])
def test_thresholds_equal_the_plain_loop_on_both_ranks(
    runs: dict[str, list[dict[str, Any]]], name: str, kind: str
) -> None:
    check_against_reference(runs[name])
    for run in runs[name]:
        assert run["distributed_type"].endswith(kind)
        assert run["num_processes"] == 2
        assert run["warnings"] == []
        assert run["removed"]


@pytest.mark.parametrize("name", ["ddp", "zero2"])
def test_save_state_and_load_state_keep_the_window(
    runs: dict[str, list[dict[str, Any]]], name: str
) -> None:
    check_resumed(runs[name], runs[f"{name}-resumed"], SPLIT)


def test_deepspeed_engine_reads_the_section_and_is_reached_through_the_wrapper(
    runs: dict[str, list[dict[str, Any]]],
) -> None:
    for run in ok(runs["zero2"]):
        assert run["chain"] == "DeepSpeedOptimizerWrapper -> DistClipDeepSpeedZeroOptimizer -> SGD"
        assert run["section_present"]
        assert run["engine_adapter_clipper"]


def test_user_clip_refused_with_the_integration_and_warned_without(
    runs: dict[str, list[dict[str, Any]]],
) -> None:
    for run in runs["ddp-user-clip"]:
        assert run["error"]["type"] == "FrameworkClippingError"
        assert run["records"] == []
    rank0, rank1 = ok(runs["ddp-class"])
    assert len(rank0["warnings"]) == 1
    assert "accelerator.clip_grad_norm_" in rank0["warnings"][0]
    assert rank1["warnings"] == []


def test_distclip_optimizer_handed_to_deepspeed_is_refused(
    runs: dict[str, list[dict[str, Any]]],
) -> None:
    for run in runs["zero2-class"]:
        assert run["error"]["type"] == "FrameworkClippingError"
        assert "under DeepSpeed the engine computes the norm" in run["error"]["message"]
        assert run["seen"] == []


def test_fsdp1_root_found_for_the_optimizer_gives_the_plain_loop(
    runs: dict[str, list[dict[str, Any]]],
) -> None:
    rank0, rank1 = runs["fsdp1"]
    assert rank0["plain_root"] is None  # no FSDP1 parameter: nothing to supply
    assert rank0["found_root"]
    assert rank1["found_root"]
    assert rank0["records"] == rank1["records"]
    reference = reference_run(rank0["batches"])
    assert max_rel_diff(thresholds(rank0), reference["threshold"]) <= RTOL
    for run in (rank0, rank1):  # the window through FSDP1's optimizer state dict
        assert run["saved_has_clipper"]
        assert run["loaded_window"] == run["window"]
        assert run["loaded_steps"] == len(run["records"])
