"""distclip on sharded layouts with 2 gloo ranks on CPU, against a 1-process reference.

Layouts (see ``tests.support.layouts``): DDP, FSDP1 (FULL_SHARD, SHARD_GRAD_OP, NO_SHARD, each
with ``use_orig_params`` on and off; a submodule FSDP ignores; empty local shards),
FSDP2 (per layer + root: uneven and empty shards; 2-norm and inf-norm), tensor
parallel, and two pipeline stages holding a tied weight. Each run trains 24 steps of
AutoClip + SGD (window 8) and is checked by ``layouts_asserts.check_run``: every
rank's norm, threshold and coefficient are bit-identical across ranks and equal the
reference to 1e-5, final parameters too; every ``step()`` issues exactly the
expected all-reduces; ``grad_norm``, ``get_total_norm`` and ``clip_grad_norm_`` give
the reference for every norm type (SUM, MAX, MIN, count, negative p).

One process group serves the whole module (``group2``).
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from tests.distributed import workers_layouts
from tests.distributed.layouts_asserts import (
    assert_rel_close,
    cached_runner,
    check_collectives,
    check_run,
)
from tests.distributed.workers_layouts import make_spec
from tests.support import layouts
from tests.support.harness import ProcessGroupHarness
from tests.support.layouts import STAGE_PARAMS
from tests.support.problem import LAYOUTS
from tests.support.reference import norm_of, reference_grads

pytestmark = pytest.mark.distributed


def _fsdp1(sharding: str, use_orig_params: bool, **options: Any) -> dict[str, Any]:
    return make_spec("fsdp1", sharding=sharding, use_orig_params=use_orig_params, **options)


#: name: (spec, all-reduces per step).
SPECS: dict[str, tuple[dict[str, Any], int]] = {
    # DDP already averaged the gradients: nothing to reduce.
    "ddp": (make_spec("ddp", momentum=0.9), 0),
    "fsdp1-full-orig": (_fsdp1("FULL_SHARD", True, momentum=0.9, foreach=True), 1),
    "fsdp1-full-flat": (_fsdp1("FULL_SHARD", False, integration="attach"), 1),
    "fsdp1-gradop-orig": (_fsdp1("SHARD_GRAD_OP", True, integration="attach"), 1),
    "fsdp1-gradop-flat": (_fsdp1("SHARD_GRAD_OP", False, momentum=0.9), 1),
    # NO_SHARD is replicated, as DDP: nothing to reduce.
    "fsdp1-noshard-orig": (_fsdp1("NO_SHARD", True, check_first_step=False), 0),
    "fsdp1-noshard-flat": (_fsdp1("NO_SHARD", False, momentum=0.9), 0),
    "fsdp1-ignored-orig": (_fsdp1("FULL_SHARD", True, ignored=True, momentum=0.9), 1),
    "fsdp1-ignored-flat": (_fsdp1("SHARD_GRAD_OP", False, ignored=True, integration="attach"), 1),
    "fsdp2": (make_spec("fsdp2", momentum=0.9, foreach=True), 1),
    "fsdp2-inf": (make_spec("fsdp2", norm_type=math.inf, integration="attach"), 1),
    "tp": (make_spec("tp", momentum=0.9, check_first_step=False), 1),
    "tp-inf": (make_spec("tp", norm_type=math.inf, integration="attach"), 1),
    # Tensor parallelism by hand on plain tensors, told with mark_layout: one all-reduce.
    "hand-tp": (make_spec("hand_tp", momentum=0.9), 1),
    "hand-tp-inf": (make_spec("hand_tp", norm_type=math.inf, integration="attach"), 1),
    "pipeline-mark-shared": (make_spec("pipeline", shared="mark_shared", momentum=0.9), 1),
    "pipeline-megatron-attr": (
        make_spec("pipeline", shared="attr", new_group=True, integration="attach"),
        1,
    ),
}

run_spec = cached_runner(SPECS)


def test_every_registered_layout_is_run() -> None:
    """Each builder of ``tests.support.layouts`` trains here or in the 4-rank module
    (``single``, the 1-process layout, in the method and reliability suites)."""
    from tests.distributed.test_layouts_4ranks import SPECS as SPECS_4RANKS

    run = {spec["layout"] for spec, _ in (*SPECS.values(), *SPECS_4RANKS.values())}
    assert run | {"single"} == set(layouts.LAYOUTS)


@pytest.mark.parametrize("name", list(SPECS))
def test_layout_matches_reference(group2: ProcessGroupHarness, name: str) -> None:
    """Norms, thresholds, coefficients, window and final parameters equal the reference."""
    spec, collectives = SPECS[name]
    check_run(spec, run_spec(group2, name), collectives)


@pytest.mark.parametrize("name", ["fsdp1-full-orig", "fsdp1-gradop-orig", "fsdp1-ignored-orig"])
def test_fsdp1_empty_local_shards(group2: ProcessGroupHarness, name: str) -> None:
    """With ``use_orig_params=True`` some rank holds an empty view of a parameter.

    ``fc1``'s unit (144 elements) splits at 72: rank 0 gets only weight, so its
    ``fc1.bias`` is empty; the root's (fc3 + out) leaves rank 0 without ``out``. The
    run above still matched the reference on both ranks.
    """
    results = run_spec(group2, name)
    empty = [{n for n, k in r["info"]["local_numel"].items() if k == 0} for r in results]
    assert "fc1.bias" in empty[0], empty
    assert "out.bias" in empty[0] or name == "fsdp1-ignored-orig", empty
    assert not empty[1] & {"fc1.bias", "fc1.weight"}, empty


def test_fsdp1_ignored_module_is_replicated(group2: ProcessGroupHarness) -> None:
    """The module FSDP ignores (``out``) is a plain, replicated group counted once."""
    for name in ("fsdp1-ignored-orig", "fsdp1-ignored-flat"):
        for result in run_spec(group2, name):
            kinds = {row["kind"]: row for row in result["plan"]}
            assert kinds["replicated"]["num_params"] == 2, result["plan"]  # out.weight, out.bias
            assert not kinds["replicated"]["reduced"]
            assert kinds["fsdp1"]["reduced"]
            assert kinds["fsdp1"]["group_size"] == 2
            assert result["info"]["local_numel"]["out.weight"] == 3  # whole on every rank


def test_pipeline_stages_and_shared_mark(group2: ProcessGroupHarness) -> None:
    """Stage r holds stage r's parameters; the stage-1 copy of the tied weight is not counted."""
    for name in ("pipeline-mark-shared", "pipeline-megatron-attr"):
        results = run_spec(group2, name)
        assert [r["info"]["stage"] for r in results] == [0, 1]
        (stage0,), (stage1,) = (r["plan"] for r in results)
        assert (stage0["num_params"], stage0["num_counted"]) == (3, 3)
        assert (stage1["num_params"], stage1["num_counted"]) == (7, 6)
        # Both copies of the tied weight end where the reference's single one does
        # (check_run compared each with it); hence they are equal to each other.


@pytest.mark.parametrize("use_orig_params", [True, False])
def test_fsdp1_without_model_is_refused(group2: ProcessGroupHarness, use_orig_params: bool) -> None:
    """FSDP1 parameters without ``model=``: a ValueError at construction that says so."""
    spec = make_spec("fsdp1", sharding="FULL_SHARD", use_orig_params=use_orig_params)
    for errors in group2.run(workers_layouts.fsdp1_without_model, spec):
        for entry in ("subclass", "attach", "get_total_norm", "grad_norm"):
            message = errors[entry]
            assert message is not None, f"{entry}: no ValueError"
            assert "model=" in message, message
            assert "FSDP1" in message


def test_fsdp2_inf_norm_on_empty_shards(group2: ProcessGroupHarness) -> None:
    """torch's inf-norm raises on the rank whose FSDP2 shards are empty; distclip's is right.

    ``out`` (one row) shards as [1, 0] rows: rank 1 holds empty shards of
    ``out.weight`` and ``out.bias``. torch's ``get_total_norm`` / ``clip_grad_norm_``
    (norm_type=inf) raise there ("no identity" for the max of an empty tensor) while
    rank 0 would go on into a collective and hang. torch's 2-norm works.
    """
    results = group2.run(workers_layouts.torch_inf_norm_on_empty_shards, make_spec("fsdp2"))
    grads = reference_grads(LAYOUTS, 0)
    assert results[0]["empty"] == []
    assert set(results[1]["empty"]) == {"out.weight", "out.bias"}
    assert results[0]["torch_error_inf"] is None
    for key in ("torch_error_inf", "torch_clip_error_inf"):
        assert "empty tensor" in results[1][key], results[1][key]
    for result in results:
        assert result["torch_norm_inf"] is None  # no rank may enter full_tensor()
        assert result["torch_error_2.0"] is None
        assert_rel_close(result["torch_norm_2.0"], norm_of(grads.values(), 2.0), "torch 2-norm")
        assert_rel_close(result["distclip_norm_2.0"], norm_of(grads.values(), 2.0), "2-norm")
        assert_rel_close(result["distclip_norm_inf"], norm_of(grads.values(), math.inf), "inf")
        assert result["grads_unchanged"]


def test_fsdp2_uneven_and_empty_shards(group2: ProcessGroupHarness) -> None:
    """FSDP2 splits fc3's 3 rows as 2 + 1 and out's 1 row as 1 + 0: the run still matched."""
    results = run_spec(group2, "fsdp2")
    for result in results:
        assert set(result["info"]["placements"].values()) == {"(Shard(dim=0),)"}
    numels = [r["info"]["local_numel"] for r in results]
    assert [n["fc3.weight"] for n in numels] == [16, 8]
    assert [n["out.weight"] for n in numels] == [3, 0]
    assert [n["out.bias"] for n in numels] == [1, 0]


def test_tp_plan(group2: ProcessGroupHarness) -> None:
    """TP: the sharded DTensors (fc1, fc2.weight) are reduced; Replicate and plain ones are not."""
    for result in run_spec(group2, "tp"):
        assert result["plan"] == [
            {
                "kind": "dtensor",
                "num_params": 3,
                "num_counted": 3,
                "reduced": True,
                "group_size": 2,
            },
            {
                "kind": "replicated",
                "num_params": 5,
                "num_counted": 5,
                "reduced": False,
                "group_size": 1,
            },
        ]


def test_pipeline_without_pipeline_groups_is_caught(group2: ProcessGroupHarness) -> None:
    """Forgetting ``pipeline_groups``: each stage sees only its own norm; the first step's
    consistency check raises ``RankDesyncError`` on both ranks."""
    spec = make_spec("pipeline", shared="mark_shared")
    grads = reference_grads(LAYOUTS, 0, kind="tied")
    results = group2.run(workers_layouts.forgot_pipeline_groups, spec)
    for stage, result in enumerate(results):
        assert result["error"] is not None
        assert result["error"].startswith("RankDesyncError")
        assert "rank(s) [1]" in result["error"], result["error"]
        stage_grads = [grads[n] for n in STAGE_PARAMS[stage] if not (stage == 1 and n == "tied")]
        assert_rel_close(result["norm"], norm_of(stage_grads, 2.0), f"stage {stage} alone")


def test_ddp_no_collectives_in_step(group2: ProcessGroupHarness) -> None:
    """DDP already averaged the gradients: distclip's step reduces nothing."""
    for check_first_step in (True, False):
        spec = make_spec("ddp", steps=4, functional=False, check_first_step=check_first_step)
        for result in group2.run(workers_layouts.train, spec):
            check_collectives(result, 0, check_first_step)
            assert result["plan"] == [
                {
                    "kind": "replicated",
                    "num_params": 8,
                    "num_counted": 8,
                    "reduced": False,
                    "group_size": 1,
                }
            ]


def test_hand_tp_plan(group2: ProcessGroupHarness) -> None:
    """The hand-split tensors (fc1, fc2.weight) are reduced over their group, once per step;
    the rest, marked or not, is replicated and counted once."""
    for result in run_spec(group2, "hand-tp"):
        rows = {row["kind"]: row for row in result["plan"]}
        assert rows["marked"] == {
            "kind": "marked",
            "num_params": 3,
            "num_counted": 3,
            "reduced": True,
            "group_size": 2,
        }
        assert rows["replicated"]["num_params"] == 5
        assert not rows["replicated"]["reduced"]


def test_mark_layout_errors(group2: ProcessGroupHarness) -> None:
    """A wrong explicit layout is a typed error naming the fix, on every entry point."""
    results = group2.run(workers_layouts.mark_layout_errors)
    for rank, errors in enumerate(results):
        assert errors["type"].startswith("TypeError: sharded_over must be a torch.distributed")
        if rank == 0:
            assert errors["not_member"] is None
        else:
            assert errors["not_member"].startswith("ValueError: sharded_over: rank 1 is not")
        assert errors["overlap"].startswith("ValueError: replicated_over: the group of ranks")
        for entry in ("norm_clip", "optimizer", "attach", "clip_grad_norm", "get_total_norm"):
            message = errors[f"coverage_{entry}"]
            assert message is not None, entry
            assert message.startswith("ValueError: distclip.mark_layout:"), message
            assert "= 1 ranks, but each copy of the model spans 2" in message, message
        assert errors["agc"].startswith("NotImplementedError: distclip: method 'agc'")
