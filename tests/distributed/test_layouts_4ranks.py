"""distclip on 2x2 layouts with 4 gloo ranks on CPU, against a 1-process reference.

Layouts (see ``tests.support.layouts``): FSDP1 HYBRID_SHARD on an explicit
``("replicate", "shard")`` mesh; FSDP2 over 4 ranks (a rank with empty shards of
``fc3``); HSDP with FSDP2; tensor parallel over 4 ranks; FSDP2 + TP on a
``("dp", "tp")`` mesh with ``fc3``/``out`` only on the dp sub-mesh; two pipeline
stages, each ``fully_shard``-ed over 2 ranks, on a ``("pp", "dp")`` mesh. Each run
is checked by ``layouts_asserts.check_run`` (bit-identical across ranks, equal to
the reference to 1e-5, exact collective counts, functional drop-ins).

One process group serves the whole module (``group4``).
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from tests.distributed import workers_layouts
from tests.distributed.layouts_asserts import assert_rel_close, cached_runner, check_run
from tests.distributed.workers_layouts import make_spec
from tests.support.harness import ProcessGroupHarness
from tests.support.problem import LAYOUTS
from tests.support.reference import norm_of, reference_grads

pytestmark = pytest.mark.distributed

#: name: (spec, all-reduces per step).
SPECS: dict[str, tuple[dict[str, Any], int]] = {
    "fsdp1-hybrid-orig": (
        make_spec("fsdp1", sharding="HYBRID_SHARD", use_orig_params=True, momentum=0.9),
        1,
    ),
    "fsdp1-hybrid-flat": (
        make_spec("fsdp1", sharding="HYBRID_SHARD", use_orig_params=False, integration="attach"),
        1,
    ),
    "fsdp2": (make_spec("fsdp2", norm_type=math.inf, foreach=True), 1),
    "hsdp": (make_spec("fsdp2", hsdp=True, momentum=0.9, foreach=True), 1),
    "hsdp-inf": (make_spec("fsdp2", hsdp=True, norm_type=math.inf, integration="attach"), 1),
    "tp": (make_spec("tp", momentum=0.9, check_first_step=False), 1),
    "fsdp2-tp": (make_spec("fsdp2_tp", momentum=0.9), 1),
    "fsdp2-tp-inf": (make_spec("fsdp2_tp", norm_type=math.inf, integration="attach"), 1),
    # Tensor parallelism by hand (tp x dp, mark_layout): one all-reduce over tp; mixed
    # with FSDP2 DTensors over dp for fc3 and out: one more, over dp.
    "hand-tp": (make_spec("hand_tp", momentum=0.9, integration="attach"), 1),
    "hand-tp-mixed": (make_spec("hand_tp", mixed=True, momentum=0.9), 2),
    "hand-tp-mixed-3": (make_spec("hand_tp", mixed=True, norm_type=3.0), 2),
    # One all-reduce over the stage's dp group, one over the pipeline group.
    "pipeline-fsdp2": (make_spec("pipeline", shared="mark_shared", momentum=0.9), 2),
    "pipeline-fsdp2-megatron-attr": (
        make_spec("pipeline", shared="attr", integration="attach", check_first_step=False),
        2,
    ),
}

run_spec = cached_runner(SPECS)


@pytest.mark.parametrize("name", list(SPECS))
def test_layout_matches_reference(group4: ProcessGroupHarness, name: str) -> None:
    """Norms, thresholds, coefficients, window and final parameters equal the reference."""
    spec, collectives = SPECS[name]
    check_run(spec, run_spec(group4, name), collectives)


def test_data_and_counting_split(group4: ProcessGroupHarness) -> None:
    """Who trains on which slice, and which rank counts replicated copies.

    HSDP: only the replicate-0 ranks count (each shard once). 2-D: the TP-sharded
    parameters count on every rank, replicated-over-tp ones (``fc2.bias``, ``fc3``,
    ``out``) only on tp rank 0. Pipeline: each stage's dp group shares a slice pair.
    """
    counted = [r["plan"][0]["num_counted"] for r in run_spec(group4, "hsdp")]
    assert counted == [8, 8, 0, 0]
    counted = [r["plan"][0]["num_counted"] for r in run_spec(group4, "fsdp2-tp")]
    assert counted == [8, 3, 8, 3]
    assert [r["info"]["data"] for r in run_spec(group4, "fsdp2-tp")] == [
        (0, 2),
        (0, 2),
        (1, 2),
        (1, 2),
    ]
    results = run_spec(group4, "pipeline-fsdp2")
    assert [r["info"]["stage"] for r in results] == [0, 0, 1, 1]
    assert [r["info"]["data"] for r in results] == [(0, 2), (1, 2), (0, 2), (1, 2)]
    assert [(r["plan"][0]["num_params"], r["plan"][0]["num_counted"]) for r in results] == [
        (3, 3),
        (3, 3),
        (7, 6),
        (7, 6),
    ]
    # FSDP2 over 4 ranks: fc3 (3 rows) leaves rank 3 empty, out (1 row) ranks 1-3.
    numels = [r["info"]["local_numel"] for r in run_spec(group4, "fsdp2")]
    assert [n["fc3.weight"] for n in numels] == [8, 8, 8, 0]
    assert [n["out.bias"] for n in numels] == [1, 0, 0, 0]


def test_torch_clip_fails_on_2d_mesh(group4: ProcessGroupHarness) -> None:
    """torch's ``clip_grad_norm_`` cannot stack norms of DTensors on two meshes; distclip can."""
    results = group4.run(workers_layouts.torch_clip_on_2d_mesh, make_spec("fsdp2_tp"))
    expected = norm_of(reference_grads(LAYOUTS, 0).values(), 2.0)
    for result in results:
        assert result["meshes"] == ["('dp', 'tp')", "('dp',)"]
        assert "must have the same mesh" in result["torch_error"], result["torch_error"]
        assert_rel_close(result["distclip_norm"], expected, "distclip norm on the 2-D mesh")


def test_torch_inf_norm_on_empty_shards(group4: ProcessGroupHarness) -> None:
    """FSDP2 over 4 ranks: torch's inf-norm raises on every rank holding an empty shard."""
    results = group4.run(workers_layouts.torch_inf_norm_on_empty_shards, make_spec("fsdp2"))
    grads = reference_grads(LAYOUTS, 0)
    assert [r["torch_error_inf"] is None for r in results] == [True, False, False, False]
    for result in results[1:]:
        assert "empty tensor" in result["torch_error_inf"]
    for result in results:
        assert_rel_close(result["torch_norm_2.0"], norm_of(grads.values(), 2.0), "torch 2-norm")
        assert_rel_close(result["distclip_norm_inf"], norm_of(grads.values(), math.inf), "inf")


def test_fsdp2_pipeline_without_pipeline_groups_is_caught(group4: ProcessGroupHarness) -> None:
    """Forgetting ``pipeline_groups`` with FSDP2 stages: caught at step 1, or still right.

    The stage meshes are sub-meshes of a ("pp", "dp") root that no parameter lives on
    along "pp", so distclip must not treat "pp" as replication (which would leave
    stage 1 out of the norm on every rank alike, unnoticed); each stage then gets its
    own norm and the first-step check raises.
    """
    spec = make_spec("pipeline", shared="mark_shared")
    expected = norm_of(reference_grads(LAYOUTS, 0, kind="tied").values(), 2.0)
    for result in group4.run(workers_layouts.forgot_pipeline_groups, spec):
        caught = result["error"] is not None and result["error"].startswith("RankDesyncError")
        assert caught or math.isclose(result["norm"], expected, rel_tol=1e-5), result
