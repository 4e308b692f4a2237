"""Every clipping method under DDP and FSDP2 (2 gloo ranks) against the single-process run.

One process group for the module (the ``group2`` fixture); each layout trains every
configuration of ``workers_methods.CONFIGS`` (every name of
``distclip.available_methods()``, aliases included, plus a few variants) in one call.
For each configuration and layout the tests check:

* the ranks agree bit for bit: global norm, threshold, coefficient (except AGC under
  FSDP2, whose ``clip_coef`` is documented as this rank's smallest unit factor),
  ``state_checksum()`` and the final parameters;
* the same distclip optimizer run in this process on the full batch agrees: per step
  norm, threshold and coefficient to 1e-6 relative (AGC's coefficient, one unit's
  factor, to 4e-6), the clipped gradients (the FSDP2 shards put back together) to
  1e-5, the final parameters to 1e-5;
* the NaN step of the data is skipped on every rank and in one process alike;
* the method really clipped in the run (so the comparison is not vacuous).

Besides: AutoClip, ZClip and AGC under DDP against the slow reference clipper
(``tests.support.reference``) on float64 full-batch gradients, and a state_dict round trip of
the stateful methods under DDP that must resume bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

import distclip
from tests.distributed import workers_methods
from tests.distributed.workers_methods import CONFIGS, NAN_STEP, STEPS, single_process_run
from tests.support.compare import assert_bitwise_equal, assert_rel_close
from tests.support.harness import ProcessGroupHarness
from tests.support.methods import KINDS, LINEAR_STOCHASTIC, WINDOWED, kind_of
from tests.support.problem import METHODS, loss_fn
from tests.support.reference import (
    EPS,
    agc_min_factor,
    agc_reference,
    norm_of,
    slow_clipper,
)

pytestmark = pytest.mark.distributed

#: The layouts of ``tests.support.layouts`` every configuration trains on.
LAYOUTS = ("ddp", "fsdp2")
#: Configurations checked against the slow references under DDP.
REFERENCE_CONFIGS = ("autoclip", "auto_clip", "zclip", "zclip-mean-maxnorm", "agc", "agc-eps")
#: Configurations whose clipper carries state (the window, the EMA, the draw's step).
STATEFUL_CONFIGS = (
    "autoclip",
    "auto_clip",
    "zclip",
    "zclip-mean-maxnorm",
    "linear_stoch_norm",
    "quadratic_stoch_norm",
    "linear_stoch_autoclip",
    "quadratic_stoch_autoclip",
)
#: The round trip checkpoints after this many steps (ZClip's warm-up is over, the
#: windows have wrapped or are about to).
STOP_AT = 11
STATS = ("total_norm", "threshold", "clip_coef", "skipped")
#: Per-step agreement with the single-process run: the global norm and the threshold
#: come from all-reduced sums, the coefficient from them (1e-6 relative covers the
#: different float32 summation orders). AGC's coefficient is one unit's factor
#: ``lam * ||W_u|| / ||G_u||``, and a small unit such as ``out.bias`` (a mean of 16
#: residuals, with cancellation) carries ~1e-6 relative float32 noise of its own.
RTOL = 1e-6
AGC_COEF_RTOL = 4e-6
#: Local parameter shapes under FSDP2 on 2 ranks: ``fc2`` split 2 + 1, ``out`` empty on rank 1.
FSDP2_LOCAL_SHAPES = (
    {
        "fc1.weight": (4, 6),
        "fc1.bias": (4,),
        "fc2.weight": (2, 8),
        "fc2.bias": (2,),
        "out.weight": (1, 3),
        "out.bias": (1,),
    },
    {
        "fc1.weight": (4, 6),
        "fc1.bias": (4,),
        "fc2.weight": (1, 8),
        "fc2.bias": (1,),
        "out.weight": (0, 3),
        "out.bias": (0,),
    },
)


def _method(config_id: str) -> str:
    return CONFIGS[config_id][0]


def _close(actual: Any, expected: Any, what: str, rtol: float) -> None:
    """Equal to ``rtol``; infinities (no threshold) and NaNs (the skipped step) in place."""
    assert_rel_close(actual, expected, what, rtol, equal_nan=True)


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def single() -> dict[str, dict[str, Any]]:
    """Every configuration trained in this process on the full batch."""
    return {config_id: single_process_run(config_id) for config_id in CONFIGS}


@pytest.fixture(scope="module")
def layout_runs(group2: ProcessGroupHarness) -> Callable[[str], list[dict[str, Any]]]:
    """``runs(layout)``: every configuration trained on ``layout``, once per module."""
    cache: dict[str, list[dict[str, Any]]] = {}

    def runs(layout: str) -> list[dict[str, Any]]:
        if layout not in cache:
            cache[layout] = group2.run(workers_methods.train_all, layout, list(CONFIGS), STEPS)
        return cache[layout]

    return runs


@pytest.fixture(scope="module")
def ddp_runs(layout_runs: Callable[[str], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return layout_runs("ddp")


@pytest.fixture(scope="module")
def round_trips(group2: ProcessGroupHarness) -> list[dict[str, Any]]:
    return group2.run(workers_methods.round_trip_all, list(STATEFUL_CONFIGS), STEPS, STOP_AT)


# ---------------------------------------------------------------------------- helpers
def per_rank(results: list[dict[str, Any]], config_id: str) -> list[dict[str, Any]]:
    """Each rank's result for ``config_id``; the test fails with a rank's traceback."""
    out = [result[config_id] for result in results]
    errors = [f"rank {r}:\n{x['error']}" for r, x in enumerate(out) if "error" in x]
    if errors:
        pytest.fail(f"{config_id} raised in the workers:\n" + "\n".join(errors))
    return out


def merged_grads(ranks: list[dict[str, Any]], layout: str) -> list[dict[str, torch.Tensor]]:
    """Per step, the whole clipped gradients: DDP's (identical on every rank, checked) or
    FSDP2's ``Shard(0)`` shards concatenated in rank order."""
    if layout == "ddp":
        for rank, result in enumerate(ranks[1:], start=1):
            for step, (a, b) in enumerate(zip(ranks[0]["grads"], result["grads"], strict=True)):
                for name in a:
                    assert_bitwise_equal(b[name], a[name], f"step {step} grad {name} rank {rank}")
        return ranks[0]["grads"]
    return [
        {
            name: torch.cat([r["grads"][step][name] for r in ranks])
            for name in ranks[0]["grads"][step]
        }
        for step in range(len(ranks[0]["grads"]))
    ]


def assert_ranks_identical(ranks: list[dict[str, Any]], *, rank_local_coef: bool) -> None:
    """Norms, thresholds, (coefficients,) clipper state and parameters equal bit for bit."""
    first = ranks[0]
    fields = [f for f in STATS if not (rank_local_coef and f == "clip_coef")]
    for rank, result in enumerate(ranks[1:], start=1):
        for field in fields:
            assert_bitwise_equal(result[field], first[field], f"{field} of rank {rank} vs rank 0")
        assert_bitwise_equal(result["checksum"], first["checksum"], f"state_checksum rank {rank}")
        assert result["step"] == first["step"]
        assert result["num_clipped"] == first["num_clipped"]
        assert result["class_name"] == first["class_name"]
        for name, value in first["params"].items():
            assert_bitwise_equal(result["params"][name], value, f"final {name} rank {rank}")


def assert_method_clipped(
    config_id: str,
    record: dict[str, Any],
    coefs: torch.Tensor,
    grads: list[dict[str, torch.Tensor]],
) -> None:
    """The run really clipped (and, where it should, also left some steps alone).

    ``record`` holds the norms/thresholds, ``coefs`` the (global) coefficients and
    ``grads`` the clipped gradients of a run; ``max_abs`` in ``record`` is the largest
    gradient element before clipping.
    """
    method, options = CONFIGS[config_id]
    live = [step for step in range(STEPS) if step != NAN_STEP]
    assert coefs[NAN_STEP] == 1
    if kind_of(method) == "elementwise":
        bound = float(torch.tensor(options["clip_value"], dtype=torch.float32))
        exceeded = {step: record["max_abs"][step] > bound for step in live}
        assert sum(exceeded.values()) >= STEPS // 2, (
            f"too few above clip_value: {record['max_abs']}"
        )
        assert not all(exceeded.values()), "no step left unclipped"
        for step in live:
            top = max(float(g.abs().max()) for g in grads[step].values() if g.numel())
            if exceeded[step]:
                assert top == bound, f"step {step}: largest clipped element {top} != {bound}"
            else:
                assert top <= bound
        assert torch.equal(coefs, torch.ones_like(coefs))
        return
    clipped = int((coefs[live] < 1).sum())
    untouched = int((coefs[live] == 1).sum())
    assert clipped >= 3, f"{config_id}: too few clipped steps: {coefs}"
    assert untouched >= 1, f"{config_id}: no step left unclipped: {coefs}"
    if method in LINEAR_STOCHASTIC:
        norm, level = record["total_norm"].double(), record["threshold"].double()
        # The draw declined some clear excess (and accepted others, with c = level / n).
        declined = (norm > 1.01 * level) & (coefs == 1)
        assert int(declined.sum()) >= 1, f"{config_id}: the draw never declined: {coefs}"
        taken = coefs < 1
        assert_rel_close(coefs[taken], (level / norm)[taken], "stochastic c = level / n", 1e-6)


def check_against_single(
    ranks: list[dict[str, Any]], single_run: dict[str, Any], config_id: str, layout: str
) -> None:
    """The whole comparison of one configuration on one layout with the single-process run."""
    agc = _method(config_id) == "agc"
    rank_local_coef = layout == "fsdp2" and agc
    assert_ranks_identical(ranks, rank_local_coef=rank_local_coef)
    first = ranks[0]
    assert first["class_name"] == workers_methods.optimizer_class(config_id).__name__
    assert first["num_steps"] == STEPS
    assert first["step"] == list(range(1, STEPS + 1)) == single_run["step"]
    # The NaN step is skipped everywhere: nothing else, and no parameter moves.
    expected_skipped = torch.arange(STEPS) == NAN_STEP
    assert torch.equal(first["skipped"], expected_skipped)
    assert torch.equal(single_run["skipped"], expected_skipped)
    for result in ranks:
        before, after = result["params_before"][NAN_STEP : NAN_STEP + 2]
        for name, value in before.items():
            assert_bitwise_equal(after[name], value, f"{name} across the skipped step")
    if layout == "fsdp2":
        for rank, result in enumerate(ranks):
            assert result["local_shapes"] == FSDP2_LOCAL_SHAPES[rank]
    if rank_local_coef:  # each rank's smallest factor; the global one is their minimum
        coefs = torch.stack([r["clip_coef"] for r in ranks]).amin(0)
    else:
        coefs = first["clip_coef"]

    coef_rtol = AGC_COEF_RTOL if agc else RTOL
    _close(first["total_norm"], single_run["total_norm"], "total_norm", RTOL)
    _close(first["threshold"], single_run["threshold"], "threshold", RTOL)
    _close(coefs, single_run["clip_coef"], "clip_coef", coef_rtol)
    grads = merged_grads(ranks, layout)
    for step, (got, expected) in enumerate(zip(grads, single_run["grads"], strict=True)):
        for name, value in expected.items():
            torch.testing.assert_close(
                got[name],
                value,
                rtol=1e-5,
                atol=1e-6,
                equal_nan=step == NAN_STEP,
                msg=lambda m, s=step, n=name: f"step {s} grad {n}: {m}",
            )
    for name, value in single_run["params"].items():
        torch.testing.assert_close(
            first["params"][name],
            value,
            rtol=1e-5,
            atol=1e-5,
            msg=lambda m, n=name: f"final {n}: {m}",
        )
    assert first["num_clipped"] == single_run["num_clipped"]
    # The counters (steps, skipped, clipped) are the same as in one process.
    assert torch.equal(first["checksum"][:3], single_run["checksum"][:3])
    assert_method_clipped(config_id, single_run, single_run["clip_coef"], single_run["grads"])
    max_abs = [max(values) for values in zip(*(r["max_abs"] for r in ranks), strict=True)]
    # (NaN at the skipped step, which the check leaves out.)
    assert_method_clipped(config_id, {**first, "max_abs": max_abs}, coefs, grads)


# ------------------------------------------------------------------------------ tests
def test_every_method_has_a_configuration() -> None:
    assert {method for method, _ in CONFIGS.values()} == set(distclip.available_methods())
    assert set(KINDS) == set(distclip.available_methods())


@pytest.mark.parametrize("config_id", list(CONFIGS))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_matches_single_process(
    layout_runs: Callable[[str], list[dict[str, Any]]],
    single: dict[str, dict[str, Any]],
    layout: str,
    config_id: str,
) -> None:
    runs = layout_runs(layout)
    check_against_single(per_rank(runs, config_id), single[config_id], config_id, layout)


@pytest.mark.parametrize("config_id", REFERENCE_CONFIGS)
def test_ddp_matches_slow_reference(ddp_runs: list[dict[str, Any]], config_id: str) -> None:
    """Each DDP step against the slow reference clipper on float64 full-batch gradients.

    The reference recomputes the full batch's gradient in float64 at the parameters
    the DDP run had before that step, so it shares nothing with the run but the data.
    """
    record = per_rank(ddp_runs, config_id)[0]
    method, options = CONFIGS[config_id]
    agc = method == "agc"
    model = METHODS.model(dtype=torch.float64)
    named = dict(model.named_parameters())
    slow = None if agc else slow_clipper(method, **options)
    lam, eps = options.get("clip_factor", 0.0), options.get("eps", 1e-3)
    clipped = 0
    for step in range(STEPS):
        with torch.no_grad():
            for name, value in record["params_before"][step].items():
                named[name].copy_(value)
        model.zero_grad(set_to_none=True)
        x, y = METHODS.full_batch(step)
        loss_fn(model(x.double()), y.double()).backward()
        grads = {name: p.grad.detach() for name, p in named.items()}
        norm = norm_of(list(grads.values()))
        _close(record["total_norm"][step], norm, f"step {step} norm", 1e-5)
        if step == NAN_STEP:  # skipped: gradients left as they are, state unchanged
            assert math.isnan(norm)
            assert bool(record["skipped"][step])
            assert float(record["clip_coef"][step]) == 1.0
            tau = lam if agc else slow.threshold(norm)
            _close(record["threshold"][step], tau, "threshold when skipped", 1e-5)
            for name, value in grads.items():
                assert bool(record["grads"][step][name].isnan().all()), name
                assert bool(value.isnan().all()), name
            continue
        if agc:
            tau = lam
            coef = min(agc_min_factor(grads[n], named[n].detach(), lam, eps) for n in grads)
            expected = {n: agc_reference(grads[n], named[n].detach(), lam, eps) for n in grads}
        else:
            tau = slow.threshold(norm)
            coef = min(1.0, tau / (norm + EPS))
            expected = {n: g * coef for n, g in grads.items()}
        _close(record["threshold"][step], tau, f"step {step} threshold", 1e-5)
        _close(record["clip_coef"][step], coef, f"step {step} clip_coef", 1e-5)
        for name, value in expected.items():
            torch.testing.assert_close(
                record["grads"][step][name].double(),
                value,
                rtol=1e-5,
                atol=1e-6,
                msg=lambda m, s=step, n=name: f"step {s} clipped grad {n}: {m}",
            )
        clipped += coef < 1
    assert clipped >= 3
    # The state the run ends with is the slow reference's.
    if method in WINDOWED:
        _close(record["window"], slow.history[-options["window"] :], "window", 1e-5)
    elif method == "zclip":
        state = record["clipper_state"]["state"]
        assert int(state["num_seen"]) == STEPS - 1  # the NaN norm was not counted
        _close(state["mean"], slow.mean, "ZClip mean", 1e-5)
        _close(state["var"], slow.var, "ZClip var", 1e-4)


@pytest.mark.parametrize("config_id", STATEFUL_CONFIGS)
def test_ddp_state_round_trip_resumes_exactly(
    round_trips: list[dict[str, Any]], config_id: str
) -> None:
    """state_dict after STOP_AT steps, loaded into a fresh DDP model and optimizer: the
    rest of the run equals the uninterrupted one bit for bit, on every rank."""
    ranks = per_rank(round_trips, config_id)
    for rank, result in enumerate(ranks):
        full, resumed = result["full"], result["resumed"]
        assert result["has_clipper_state"]
        assert_bitwise_equal(result["loaded_checksum"], result["saved_checksum"], "loaded state")
        assert not torch.equal(result["fresh_checksum"], result["saved_checksum"])
        assert resumed["step"] == full["step"][STOP_AT:] == list(range(STOP_AT + 1, STEPS + 1))
        for field in STATS:
            assert_bitwise_equal(resumed[field], full[field][STOP_AT:], f"rank {rank} {field}")
        for step, (a, b) in enumerate(zip(resumed["grads"], full["grads"][STOP_AT:], strict=True)):
            for name in a:
                assert_bitwise_equal(a[name], b[name], f"rank {rank} step {STOP_AT + step} {name}")
        for name, value in full["params"].items():
            assert_bitwise_equal(resumed["params"][name], value, f"rank {rank} final {name}")
        assert_bitwise_equal(resumed["checksum"], full["checksum"], f"rank {rank} final state")
        # Something was clipped after the resume point, so the state mattered.
        assert bool((full["clip_coef"][STOP_AT:] < 1).any())
    assert_bitwise_equal(ranks[1]["resumed"]["checksum"], ranks[0]["resumed"]["checksum"], "ranks")
    assert_bitwise_equal(
        ranks[1]["resumed"]["threshold"], ranks[0]["resumed"]["threshold"], "ranks"
    )


def test_agc_refuses_layouts_that_split_rows(group2: ProcessGroupHarness) -> None:
    """AGC needs whole rows: a dim-1 split (row-wise TP's weight) and FSDP1 flat shards
    are refused at construction naming the layout; a dim-0 split (colwise TP) is fine."""
    for outcome in group2.run(workers_methods.agc_refusals):
        assert outcome["tp_colwise_weight"] == "built"
        assert "method 'agc' needs every weight row whole on a rank" in outcome["tp_rowwise_weight"]
        assert "Shard(dim=1)" in outcome["tp_rowwise_weight"]
        assert "method 'agc' cannot run on FSDP1" in outcome["fsdp1"]
