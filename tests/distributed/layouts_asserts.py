"""What the sharded-layout tests assert about a run, shared by the 2- and 4-rank modules.

:func:`check_run` compares the per-rank results of ``workers_layouts.train`` with
each other (bit for bit: the clip statistics and the window come from the same
reduced values on every rank) and with the single-process reference (1e-5
relative), checks the collectives of every ``step()`` and the functional drop-ins.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch

from tests.distributed import workers_layouts
from tests.distributed.workers_layouts import FUNCTIONAL_MAX_NORM, FUNCTIONAL_NORM_TYPES
from tests.support import compare
from tests.support.harness import ProcessGroupHarness
from tests.support.layouts import STAGE_PARAMS
from tests.support.problem import LAYOUTS
from tests.support.reference import EPS, Reference, norm_of, reference_grads, reference_train

RTOL = 1e-5


@functools.cache
def _reference(key: tuple[Any, ...]) -> Reference:
    kind, steps, q, window, norm_type, lr, momentum = key
    return reference_train(
        LAYOUTS,
        steps=steps,
        options={"q": q, "window": window},
        optimizer_kwargs={"lr": lr, "momentum": momentum},
        norm_type=norm_type,
        kind=kind,
    )


def reference_for(spec: dict[str, Any]) -> Reference:
    """The reference run of ``spec`` (cached: several layouts share one)."""
    keys = ("kind", "steps", "q", "window", "norm_type", "lr", "momentum")
    return _reference(tuple(spec[k] for k in keys))


@functools.cache
def _grads(kind: str) -> dict[str, torch.Tensor]:
    return reference_grads(LAYOUTS, 0, kind=kind)


def cached_runner(
    specs: dict[str, tuple[dict[str, Any], int]],
) -> Callable[[ProcessGroupHarness, str], list[dict[str, Any]]]:
    """``run(group, name)``: the per-rank results of ``specs[name]``, run once, then cached."""
    results: dict[str, list[dict[str, Any]]] = {}

    def run(group: ProcessGroupHarness, name: str) -> list[dict[str, Any]]:
        if name not in results:
            results[name] = group.run(workers_layouts.train, specs[name][0])
        return results[name]

    return run


def assert_rel_close(actual: Any, expected: Any, what: str, rtol: float = RTOL) -> None:
    compare.assert_rel_close(actual, expected, what, rtol)


def expected_names(spec: dict[str, Any], result: dict[str, Any]) -> set[str]:
    """The parameters this rank holds, by their names in the unsharded model."""
    if spec["layout"] == "pipeline":
        return set(STAGE_PARAMS[result["info"]["stage"]])
    return set(_grads(spec["kind"]))


def check_collectives(result: dict[str, Any], expected: int, check_first_step: bool) -> None:
    """Each ``step()`` issued exactly ``expected`` all-reduces and nothing else.

    The first step also all-gathers the state checksum once if ``check_first_step``.
    Counted twice: by wrappers around the ``torch.distributed`` functions and by
    ``CommDebugMode`` (every c10d op, functional collectives included).
    """
    assert result["same_all_reduce"], "distclip does not call torch.distributed.all_reduce"
    assert result["num_collectives"] == expected, result["plan"]
    first = {"all_reduce": expected, "debug_all_reduce": expected, "debug_total": expected}
    if check_first_step:
        first = {**first, "all_gather": 1, "debug_total": expected + 1}
    later = {"all_reduce": expected, "debug_all_reduce": expected, "debug_total": expected}
    for step, counts in enumerate(result["counts"]):
        want = first if step == 0 else later
        got = {k: v for k, v in counts.items() if v}
        assert got == {k: v for k, v in want.items() if v}, f"step {step + 1}: {counts}"


def _check_returned(norm: dict[str, Any], expected: float, dtensor: bool, what: str) -> None:
    """A returned norm as torch code sees it: value, dtype, a Replicate DTensor for DTensors."""
    assert_rel_close(norm["value"], expected, what)
    assert norm["dtype"] == "torch.float32", (what, norm)
    assert norm["dtensor"] is dtensor, (what, norm)
    if dtensor:  # full_tensor() needs no collective: every local value is the global norm
        assert set(norm["placements"]) == {"Replicate"}, (what, norm)
        assert norm["local"] == norm["value"], (what, norm)


def check_functional(
    spec: dict[str, Any],
    result: dict[str, Any],
    expected: int,
    run_grads: dict[str, torch.Tensor],
) -> None:
    """The drop-ins on step 0's gradients equal the reference for every norm type.

    ``grad_norm(params)`` with ``expected`` all-reduces and nothing else;
    ``get_total_norm(grads, model=...)`` the same value, returned as torch returns it;
    ``clip_grad_norm_``'s returned norm and clipped gradients. The norms are compared
    with the float64 norm of the gradients this run gathered (``run_grads``: the
    tiniest elements, which decide ``-inf`` and negative p, differ from the
    1-process reference's by up to 1e-4 after data-parallel averaging), and for the
    2-norm with the reference too.
    """
    functional = result["functional"]
    grads = _grads(spec["kind"])
    dtensor = functional["any_dtensor"]
    norms = {p: norm_of(run_grads.values(), p) for p in FUNCTIONAL_NORM_TYPES}
    assert_rel_close(norms[2.0], norm_of(grads.values(), 2.0), "the run's gathered gradients")
    for p, norm in norms.items():
        assert_rel_close(functional["norms"][p], norm, f"grad_norm(norm_type={p})")
        assert functional["counts"][p].get("all_reduce", 0) == expected, functional["counts"][p]
        assert functional["counts"][p]["debug_total"] == expected, functional["counts"][p]
        _check_returned(functional["grads_norms"][p], norm, dtensor, f"get_total_norm(grads, {p})")
        assert_rel_close(functional["from_per_tensor"][p], norm, f"per-tensor power sums, {p}")
    assert functional["plan_num_collectives"] == expected
    norm = norm_of(run_grads.values(), spec["norm_type"])
    _check_returned(functional["clip_returned"], norm, dtensor, "clip_grad_norm_'s returned norm")
    coef = min(1.0, FUNCTIONAL_MAX_NORM / (norm + EPS))
    assert coef < 0.5, f"max_norm={FUNCTIONAL_MAX_NORM} should clip (coef {coef})"
    clipped = functional["clipped_grads"]
    assert set(clipped) == expected_names(spec, result)
    for name, grad in clipped.items():
        torch.testing.assert_close(
            grad,
            grads[name] * coef,
            rtol=RTOL,
            atol=1e-6,
            msg=lambda m, name=name: f"clipped grad of {name}: {m}",
        )
    if spec["layout"] == "pipeline":
        # Without the mark the tied weight would count twice: the mark is what matters.
        doubled = math.sqrt(norms[2.0] ** 2 + float(grads["tied"].double().pow(2).sum()))
        assert_rel_close(functional["unmarked_norm"], doubled, "norm with the mark removed")
        assert doubled > norms[2.0] * 1.001


def check_run(
    spec: dict[str, Any], results: list[dict[str, Any]], expected_collectives: int
) -> None:
    """Every assertion about one layout's run."""
    ref = reference_for(spec)
    steps = spec["steps"]
    first = results[0]
    # Identical on every rank, bit for bit.
    for result in results[1:]:
        rank = result["rank"]
        for name in ("total_norm", "threshold", "clip_coef", "skipped"):
            compare.assert_bitwise_equal(
                result["records"][name], first["records"][name], f"rank {rank} {name}"
            )
        compare.assert_bitwise_equal(result["window"], first["window"], f"rank {rank} window")
    # The gradients of step 0 as gathered on each rank (each stage's, for pipelines).
    run_grads = {
        name: grad
        for r in results
        if spec["functional"]
        for name, grad in r["functional"]["grads"].items()
    }
    # Equal to the reference, step by step.
    for result in results:
        records = result["records"]
        assert not bool(records["skipped"].any())
        for name in ("total_norm", "threshold", "clip_coef"):
            assert_rel_close(records[name], getattr(ref, name), f"rank {result['rank']} {name}")
        assert_rel_close(result["window"], ref.window, f"rank {result['rank']} window")
        assert set(result["params"]) == expected_names(spec, result)
        for name, value in result["params"].items():
            what = f"rank {result['rank']} final {name}"
            torch.testing.assert_close(
                value,
                ref.params[name],
                rtol=RTOL,
                atol=RTOL,
                msg=lambda m, what=what: f"{what}: {m}",
            )
        check_collectives(result, expected_collectives, spec["check_first_step"])
        if spec["functional"]:
            check_functional(spec, result, expected_collectives, run_grads)
    # The run clipped often, left some steps alone, and the window wrapped.
    coefs = first["records"]["clip_coef"]
    assert int((coefs < 0.99).sum()) >= 5, coefs
    assert ref.clipped_steps()[0] >= 5, ref.clip_coef
    assert int((coefs == 1.0).sum()) >= 3, coefs
    assert steps > spec["window"] == first["window"].numel()
