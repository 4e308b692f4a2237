"""Functions run on every rank by ``test_layouts.py`` and ``test_layouts_4ranks.py``.

Each builds a layout of the ``LAYOUTS`` problem (``tests.support.layouts``), runs
distclip on it and returns plain tensors and numbers: per-step clip statistics, the
collectives each ``step()`` issued, the gathered final parameters, and what torch's own
functions do on the same gradients. Nothing here asserts: the tests compare with the
reference.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.distributed as dist

import distclip
from tests.support import internals, layouts
from tests.support.collectives import count_collectives, describe_norm, same_all_reduce, value_of
from tests.support.layouts import Prepared
from tests.support.problem import LAYOUTS
from tests.support.training import StatsRecorder, clipped_optimizer

#: ``clip_grad_norm_``'s ``max_norm`` in the functional checks (below every first norm).
FUNCTIONAL_MAX_NORM = 1.0

#: Norm types the functional checks measure on every layout: one per reduction (SUM,
#: MAX, MIN, a count) and a negative p (which sees FSDP1's padding if not excluded).
FUNCTIONAL_NORM_TYPES = (2.0, math.inf, -math.inf, 0.0, -1.5)

#: Options that only some layouts read (see ``tests.support.layouts``).
LAYOUT_OPTIONS = ("sharding", "use_orig_params", "ignored", "hsdp", "shared", "new_group", "mixed")


def make_spec(layout: str, **options: Any) -> dict[str, Any]:
    """A run: the layout and its options, AutoClip, SGD, steps.

    Defaults: 24 steps of AutoClip (q=0.3, window=8: the window wraps) with SGD
    (lr 0.05, no momentum, ``foreach=False``), the 2-norm, the subclass integration,
    the first-step consistency check on, the functional checks run first.
    """
    spec: dict[str, Any] = {
        "layout": layout,
        "kind": "tied" if layout == "pipeline" else "mlp",
        "steps": 24,
        "q": 0.3,
        "window": 8,
        "norm_type": 2.0,
        "lr": 0.05,
        "momentum": 0.0,
        "foreach": False,
        "integration": "subclass",
        "check_first_step": True,
        "functional": True,
    }
    unknown = set(options) - set(spec) - set(LAYOUT_OPTIONS)
    if unknown:
        raise TypeError(f"unknown spec option(s) {sorted(unknown)}")
    spec.update(options)
    return spec


def _quiet() -> None:
    # FSDP2 over TP warns that Linear returns a view; FSDP1 warns about its own
    # deprecation. Neither matters here.
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def build(spec: dict[str, Any]) -> Prepared:
    """The spec's layout of the ``LAYOUTS`` problem on this rank."""
    options = {k: spec[k] for k in LAYOUT_OPTIONS if k in spec}
    return layouts.build(LAYOUTS, spec["layout"], **options)


def _zero_grads(prepared: Prepared) -> None:
    for p in prepared.params:
        p.grad = None


def _unmarked_norm(prepared: Prepared) -> float | None:
    """The norm with the tied copy's ``shared`` mark removed (it then counts twice)."""
    marked = [p for p in prepared.params if getattr(p, "shared", False)]
    if not marked and prepared.pipeline_groups is None:
        return None
    for p in marked:
        del p.shared
    try:
        return value_of(distclip.grad_norm(prepared.params, **prepared.layout_kwargs))
    finally:
        for p in marked:
            p.shared = True


def functional_checks(prepared: Prepared, norm_type: float) -> dict[str, Any]:
    """The drop-ins on step 0's gradients, for every norm type of the functional checks.

    ``grad_norm`` of the parameters (its collectives counted), ``get_total_norm`` of
    the gradients (torch's idiom: each gradient's layout read from its parameter in
    the module), then ``clip_grad_norm_``. The gradients are left cleared (``None``)
    and the parameters untouched.
    """
    prepared.backward(0)
    kwargs = prepared.layout_kwargs
    gathered = prepared.full_grads()  # what the norms are of (gathering is a collective)
    owner = prepared.model if prepared.model is not None else prepared.module
    grads = [p.grad for p in prepared.params if p.grad is not None]
    out: dict[str, Any] = {
        "norms": {},
        "grads_norms": {},
        "counts": {},
        "any_dtensor": any(hasattr(g, "placements") for g in grads),
        "grads": gathered,
        "from_per_tensor": {},
    }
    plan = internals.build_plan(prepared.params, **kwargs)
    for p in FUNCTIONAL_NORM_TYPES:
        with count_collectives() as counts:
            out["norms"][p] = value_of(distclip.grad_norm(prepared.params, p, **kwargs))
        out["counts"][p] = dict(counts)
        norm = distclip.get_total_norm(
            grads, p, model=owner, pipeline_groups=prepared.pipeline_groups
        )
        out["grads_norms"][p] = describe_norm(norm)
        # What layer_wise measures: per-tensor power sums (vector all-reduce), then total.
        per_tensor = plan.per_tensor_powsums(p)
        out["from_per_tensor"][p] = float(plan.total_from_powsums(per_tensor, p))
    out["unmarked_norm"] = _unmarked_norm(prepared)
    out["clip_returned"] = describe_norm(
        distclip.clip_grad_norm_(prepared.params, FUNCTIONAL_MAX_NORM, norm_type, **kwargs)
    )
    out["clipped_grads"] = prepared.full_grads()
    out["plan_num_collectives"] = internals.build_plan(prepared.params, **kwargs).num_collectives
    _zero_grads(prepared)
    return out


def make_optimizer(
    prepared: Prepared, spec: dict[str, Any]
) -> tuple[torch.optim.Optimizer, distclip.Clipper]:
    """AutoClip + SGD over the layout's parameters, as a subclass or attached."""
    return clipped_optimizer(
        prepared.params,
        optimizer_kwargs={
            "lr": spec["lr"],
            "momentum": spec["momentum"],
            "foreach": spec["foreach"],
        },
        options={
            "q": spec["q"],
            "window": spec["window"],
            "norm_type": spec["norm_type"],
            "check_first_step": spec["check_first_step"],
        },
        integration=spec["integration"],
        layout=prepared.layout_kwargs,
    )


def train(spec: dict[str, Any]) -> dict[str, Any]:
    """Build ``spec``'s layout, optionally run the functional checks, then train.

    Returns this rank's per-step clip statistics (0-dim tensors stacked), the
    collectives of every ``step()``, the gathered final parameters and window.
    """
    _quiet()
    prepared = build(spec)
    result: dict[str, Any] = {
        "rank": dist.get_rank(),
        "info": prepared.info,
        "same_all_reduce": same_all_reduce(),
    }
    if spec["functional"]:
        result["functional"] = functional_checks(prepared, spec["norm_type"])
    optimizer, clipper = make_optimizer(prepared, spec)
    recorder = StatsRecorder()
    counts: list[dict[str, int]] = []
    for step in range(spec["steps"]):
        optimizer.zero_grad(set_to_none=True)
        prepared.backward(step)
        with count_collectives() as step_counts:
            optimizer.step()
        counts.append(dict(step_counts))
        recorder.record(optimizer.last_clip)  # type: ignore[attr-defined]
    plan = internals.plan_of(clipper)
    result.update(
        records=recorder.stacked(),
        counts=counts,
        num_collectives=plan.num_collectives,
        plan=plan.describe(),
        window=clipper.window.chronological(),  # type: ignore[attr-defined]
        params=prepared.full_params(),
        class_name=type(optimizer).__name__,
    )
    return result


def fsdp1_without_model(spec: dict[str, Any]) -> dict[str, str | None]:
    """FSDP1 parameters given to distclip without ``model=``: what each entry point raises."""
    _quiet()
    prepared = build(spec)
    out: dict[str, str | None] = {}

    def error_of(name: str, make: Any) -> None:
        try:
            make()
        except ValueError as exc:
            out[name] = str(exc)
        else:
            out[name] = None

    cls = distclip.AutoClippedOptimizer(torch.optim.SGD, q=0.3, window=8)
    error_of("subclass", lambda: cls(prepared.params, lr=0.05))
    error_of("attach", lambda: distclip.attach(torch.optim.SGD(prepared.params, lr=0.05), q=0.3))
    error_of("get_total_norm", lambda: distclip.get_total_norm(prepared.params))
    error_of("grad_norm", lambda: distclip.grad_norm(prepared.params))
    return out


def torch_inf_norm_on_empty_shards(spec: dict[str, Any]) -> dict[str, Any]:
    """torch's own norms of FSDP2 gradients where some rank holds empty shards.

    torch's ``get_total_norm`` (the first, local half of ``clip_grad_norm_``) runs on
    every rank; a rank that raises would leave the others waiting in the collective
    of ``full_tensor()``, so the ranks first agree whether any raised. Where it
    raised, ``clip_grad_norm_`` is called too (it raises before any collective).
    """
    _quiet()
    prepared = build(spec)
    prepared.backward(0)
    grads = [p.grad for p in prepared.params]
    before = [g._local_tensor.clone() for g in grads]
    out: dict[str, Any] = {"empty": [n for n, k in prepared.info["local_numel"].items() if k == 0]}
    for p in (2.0, math.inf):
        error = None
        try:
            local = torch.nn.utils.get_total_norm(grads, p)
        except RuntimeError as exc:
            error = str(exc)
        failed = torch.tensor([float(error is not None)])
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        out[f"torch_error_{p}"] = error
        out[f"torch_norm_{p}"] = None if bool(failed) else float(local.full_tensor())
        if error is not None:
            try:
                torch.nn.utils.clip_grad_norm_(prepared.params, 1.0, norm_type=p)
            except RuntimeError as exc:
                out[f"torch_clip_error_{p}"] = str(exc)
        out[f"distclip_norm_{p}"] = value_of(distclip.grad_norm(prepared.params, p))
    out["grads_unchanged"] = all(
        torch.equal(g._local_tensor, b) for g, b in zip(grads, before, strict=True)
    )
    return out


def torch_clip_on_2d_mesh(spec: dict[str, Any]) -> dict[str, Any]:
    """torch's ``clip_grad_norm_`` on FSDP2 + TP gradients living on two meshes.

    Every rank fails alike in sharding propagation (before any collective).
    """
    _quiet()
    prepared = build(spec)
    prepared.backward(0)
    out: dict[str, Any] = {
        "meshes": sorted({str(p.device_mesh.mesh_dim_names) for p in prepared.params})
    }
    try:
        torch.nn.utils.clip_grad_norm_(prepared.params, 1.0)
    except RuntimeError as exc:
        out["torch_error"] = str(exc)
    else:
        out["torch_error"] = None
    out["distclip_norm"] = value_of(distclip.grad_norm(prepared.params))
    return out


def forgot_pipeline_groups(spec: dict[str, Any]) -> dict[str, Any]:
    """A pipeline layout given to distclip WITHOUT ``pipeline_groups``.

    Returns the norm distclip computes then (``get_total_norm``) and what the first
    ``step()`` raised: its first-step consistency check is meant to turn this mistake
    into a ``RankDesyncError``.
    """
    _quiet()
    prepared = build(spec)
    prepared.backward(0)
    out: dict[str, Any] = {"norm": value_of(distclip.grad_norm(prepared.params))}
    cls = distclip.AutoClippedOptimizer(torch.optim.SGD, q=spec["q"], window=spec["window"])
    optimizer = cls(prepared.params, lr=0.0)
    try:
        optimizer.step()
    except distclip.RankDesyncError as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    else:
        out["error"] = None
    return out


def mark_layout_errors() -> dict[str, str | None]:
    """What each wrong explicit layout raises on this rank (2 ranks), and where.

    A wrong type, a group this rank is not in, overlapping groups (at
    ``mark_layout``); groups that do not cover the job (when a plan is built: by
    every entry point); AGC on a hand-split weight.
    """
    _quiet()
    out: dict[str, str | None] = {}

    def error_of(name: str, make: Any) -> None:
        try:
            make()
        except (TypeError, ValueError, NotImplementedError) as exc:
            out[name] = f"{type(exc).__name__}: {exc}"
        else:
            out[name] = None

    rank0_only = dist.new_group([0])  # every rank must create it
    error_of(
        "type", lambda: distclip.mark_layout(torch.nn.Parameter(torch.ones(2)), sharded_over="tp")
    )
    error_of(
        "not_member",
        lambda: distclip.mark_layout(torch.nn.Parameter(torch.ones(2)), sharded_over=rank0_only),
    )
    world = dist.group.WORLD
    error_of(
        "overlap",
        lambda: distclip.mark_layout(
            torch.nn.Parameter(torch.ones(2)), sharded_over=world, replicated_over=world
        ),
    )
    model = torch.nn.Linear(3, 2)
    distclip.mark_layout(model)  # neither sharded nor replicated over the 2 ranks: too few
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    params = list(model.parameters())
    error_of("coverage_norm_clip", lambda: distclip.NormClip(params))
    error_of(
        "coverage_optimizer",
        lambda: distclip.ClippedOptimizer(torch.optim.SGD, method="zclip")(params, lr=0.1),
    )
    error_of("coverage_attach", lambda: distclip.attach(torch.optim.SGD(params, lr=0.1)))
    error_of("coverage_clip_grad_norm", lambda: distclip.clip_grad_norm_(params, 1.0))
    error_of(
        "coverage_get_total_norm",
        lambda: distclip.get_total_norm([p.grad for p in params], model=model),
    )
    weight = torch.nn.Parameter(torch.ones(4, 3))
    distclip.mark_layout(weight, sharded_over=world)
    error_of("agc", lambda: distclip.make_clipper("agc", [weight]))
    return out
