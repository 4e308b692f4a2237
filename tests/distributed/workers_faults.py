"""Functions run on every rank by ``test_faults.py``: faults injected into real runs.

Each returns plain tensors and numbers; nothing here asserts. A run is a spec dict:

* ``layout``: ``"ddp"`` or ``"fsdp2"`` of ``tests.support.layouts`` (the ``FAULTS``
  problem: the layouts MLP and a side layer);
* ``steps``, ``q``, ``window``, ``lr``, ``momentum``: AutoClip + SGD (``foreach=False``);
* ``optimizer``: ``"sgd"`` or ``"sgd_fused"`` (fused SGD: the skip happens on the device);
* ``fault``: ``{"step", "rank", "param", "value"}``: at ``step``, one element of
  ``rank``'s gradient of ``param`` is set to ``value``: under FSDP2 in its local
  shard after the reduce-scatter, under DDP in its own gradient before DDP averages
  it (after the average each rank holds a full replica, which distclip does not
  reduce again);
* ``omit``: steps the run never sees (the reference for a skipped step);
* ``micro``: micro-batches per step, accumulated without gradient sync but the last
  (DDP ``no_sync``, FSDP2 ``set_requires_gradient_sync(False)``);
* ``frozen``: parameter names frozen before wrapping; ``side_every``: the side layer
  is used on steps divisible by it only (so its gradients are ``None`` otherwise);
* ``nonfinite``: distclip's option; ``dtype``: ``"float32"`` or ``"bfloat16"`` params.
"""

from __future__ import annotations

import contextlib
import math
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

import distclip
from tests.support import layouts
from tests.support.problem import FAULTS, loss_fn
from tests.support.reference import SlowAutoClip, norm_of
from tests.support.training import clipped_optimizer


def _local(tensor: Tensor) -> Tensor:
    """The rank-local part of a (D)Tensor."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _full(tensor: Tensor) -> Tensor:
    """The whole tensor (a collective for a DTensor), detached, as a float64 copy."""
    whole = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
    return whole.detach().to(torch.float64).clone()


def _wrap(spec: dict[str, Any]) -> tuple[nn.Module, Any]:
    """The model of the spec on this rank and what trains it (DDP wrapper or the FSDP2 root)."""
    dtype = torch.bfloat16 if spec.get("dtype", "float32") == "bfloat16" else None
    prepared = layouts.build(FAULTS, spec["layout"], frozen=spec.get("frozen", ()), dtype=dtype)
    return prepared.inner, prepared.module


def _optimizer(spec: dict[str, Any], model: nn.Module) -> torch.optim.Optimizer:
    fused = spec.get("optimizer", "sgd") == "sgd_fused"
    params = [p for p in model.parameters() if p.requires_grad]
    groups: list[dict[str, Any]] = [{"params": params}]
    if spec.get("empty_group"):
        groups.append({"params": [], "lr": 0.5})
    kwargs: dict[str, Any] = {"fused": True} if fused else {"foreach": False}
    optimizer, _ = clipped_optimizer(
        groups,
        optimizer_kwargs={
            "lr": spec.get("lr", 0.05),
            "momentum": spec.get("momentum", 0.9),
            **kwargs,
        },
        options={
            "q": spec["q"],
            "window": spec["window"],
            "nonfinite": spec.get("nonfinite", "skip"),
        },
    )
    return optimizer


def _sync_context(wrapped: Any, sync: bool) -> contextlib.AbstractContextManager[Any]:
    """Accumulate without gradient sync unless ``sync`` (DDP ``no_sync``; FSDP2's switch)."""
    if hasattr(wrapped, "no_sync"):
        return contextlib.nullcontext() if sync else wrapped.no_sync()  # type: ignore[no-any-return]
    wrapped.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def _snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Local parameters, optimizer state and clipper state (clones), for bit comparisons."""
    state = optimizer.state_dict()
    clip = state["param_groups"][0]["distclip"]
    return {
        "params": {n: _local(p).detach().clone() for n, p in model.named_parameters()},
        "optim": {
            k: {name: _local(v).clone() for name, v in s.items() if isinstance(v, Tensor)}
            for k, s in state["state"].items()
        },
        "window": {k: v.clone() for k, v in clip["state"]["window"].items() if k != "size"},
        "num_skipped": int(clip["num_skipped"]),
        "num_steps": clip["num_steps"],
    }


def train(spec: dict[str, Any]) -> dict[str, Any]:
    """Run the spec; return per-step stats, snapshots around the fault and the end state."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model, wrapped = _wrap(spec)
    optimizer = _optimizer(spec, model)
    dtype = next(model.parameters()).dtype
    fault: dict[str, Any] = spec.get("fault") or {}
    micro = spec.get("micro", 1)
    side_every = spec.get("side_every", 0)
    out: dict[str, Any] = {"steps": [], "stats": [], "ref_norm": [], "errors": []}
    for step in range(spec["steps"]):
        if step in spec.get("omit", ()):
            continue
        model.use_side = side_every == 0 or step % side_every == 0
        optimizer.zero_grad(set_to_none=True)
        faulty = bool(fault) and step == fault["step"]
        handle = None
        if faulty and rank == fault["rank"] and spec["layout"] == "ddp":
            # Into this rank's own gradient, before DDP averages it over the ranks.
            handle = dict(model.named_parameters())[fault["param"]].register_hook(
                lambda g: g.flatten().index_fill(0, torch.tensor([0]), fault["value"]).view_as(g)
            )
        x, y = FAULTS.batch_slice(step, rank, world)
        per = x.shape[0] // micro
        for j in range(micro):
            with _sync_context(wrapped, j == micro - 1):
                xj, yj = x[j * per : (j + 1) * per], y[j * per : (j + 1) * per]
                loss = loss_fn(wrapped(xj.to(dtype)), yj.to(dtype)) / micro
                loss.backward()
        if spec["layout"] == "fsdp2" and micro > 1:
            wrapped.set_requires_gradient_sync(True)
        if spec.get("measure_full"):
            grads = [_full(p.grad) for p in model.parameters() if p.grad is not None]
            out["ref_norm"].append(norm_of(grads, 2.0))
        if handle is not None:
            handle.remove()
        if faulty and rank == fault["rank"] and spec["layout"] == "fsdp2":
            # Into one element of this rank's shard, after FSDP2's reduce-scatter.
            target = dict(model.named_parameters())[fault["param"]].grad
            assert target is not None
            grad = _local(target)
            grad.view(-1)[0] = fault["value"]
        if faulty:
            out["before"] = _snapshot(model, optimizer)
        try:
            optimizer.step()
        except distclip.NonFiniteNormError as error:
            out["errors"].append((step, type(error).__name__, str(error)))
            out["after"] = _snapshot(model, optimizer)
            break
        if faulty:
            out["after"] = _snapshot(model, optimizer)
        out["steps"].append(step)
        out["stats"].append(optimizer.last_clip.as_floats())  # type: ignore[attr-defined]
    clipper = distclip.get_clipper(optimizer)
    out["window"] = clipper.window.chronological().tolist()  # type: ignore[attr-defined]
    out["num_skipped"] = int(clipper.num_skipped)
    out["num_steps"] = clipper.num_steps
    out["checksum"] = clipper.state_checksum()
    out["params"] = {n: _full(p) for n, p in model.named_parameters()}
    out["local_numel"] = sum(_local(p).numel() for p in model.parameters())
    return out


# ------------------------------------------------------------------------ GradScaler
def train_amp(spec: dict[str, Any]) -> dict[str, Any]:
    """fp16 autocast + ``torch.amp.GradScaler`` under DDP, distclip against manual clipping.

    Two DDP models train side by side on the same data: one with distclip's
    ``AutoClippedOptimizer``, one with the plain optimizer clipped by hand (the
    reference: ``scaler.unscale_``, float64 norm, the slow ``SlowAutoClip``, explicit
    multiply, ``scaler.step``). ``spec["unscale"]``: whether the distclip
    run calls ``scaler.unscale_`` before ``scaler.step`` (without it, a fused
    optimizer receives the scale as ``grad_scale``).
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    kwargs: dict[str, Any] = ({"fused": True} if spec["fused"] else {"foreach": False}) | spec[
        "optim_kwargs"
    ]
    base: type[torch.optim.Optimizer] = getattr(torch.optim, spec["optimizer"])
    runs = {}
    for name in ("distclip", "reference"):
        prepared = layouts.build(FAULTS, "ddp")
        module, ddp = prepared.inner, prepared.module
        cls = (
            distclip.AutoClippedOptimizer(base, q=spec["q"], window=spec["window"])
            if name == "distclip"
            else base
        )
        scaler = torch.amp.GradScaler(
            "cpu", init_scale=spec["init_scale"], growth_interval=spec["growth_interval"]
        )
        runs[name] = (module, ddp, cls(module.parameters(), **kwargs), scaler)
    slow = SlowAutoClip(q=spec["q"], window=spec["window"])
    out: dict[str, Any] = {"distclip": [], "reference": [], "scale": []}
    for step in range(spec["steps"]):
        x, y = FAULTS.batch_slice(step, rank, world)
        for name, (_, ddp, optimizer, scaler) in runs.items():
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.float16):
                loss = loss_fn(ddp(x * spec["input_gain"]), y)
            scaler.scale(loss).backward()
            if name == "reference":
                scaler.unscale_(optimizer)
                grads = [p.grad for p in ddp.parameters() if p.grad is not None]
                n = norm_of(grads, 2.0)
                tau, coef = slow.coefficient(n)
                record = {"total_norm": n, "threshold": tau, "skipped": 1.0}
                if math.isfinite(n):
                    with torch.no_grad():
                        for g in grads:
                            g.mul_(coef)
                    record["skipped"] = 0.0
                out[name].append(record)
            else:
                if spec["unscale"]:
                    scaler.unscale_(optimizer)
            scale_before = float(scaler.get_scale())
            steps_before = distclip.get_clipper(optimizer).num_steps if name == "distclip" else 0
            scaler.step(optimizer)
            scaler.update()
            if name == "distclip":
                if distclip.get_clipper(optimizer).num_steps == steps_before:
                    # The scaler found an overflow and did not call step() at all.
                    out[name].append({"skipped": 1.0, "by": "scaler"})
                else:
                    out[name].append(optimizer.last_clip.as_floats())  # type: ignore[attr-defined]
                out["scale"].append(scale_before)
    clipper = distclip.get_clipper(runs["distclip"][2])
    out["window"] = clipper.window.chronological().tolist()  # type: ignore[attr-defined]
    out["reference_window"] = list(slow.history)
    out["num_skipped"] = int(clipper.num_skipped)
    out["params"] = {
        name: {n: p.detach().clone() for n, p in run[0].named_parameters()}
        for name, run in runs.items()
    }
    out["attrs_left"] = [
        a for a in ("grad_scale", "found_inf") if a in runs["distclip"][2].__dict__
    ]
    return out


# -------------------------------------------------------------- a rank with no grads
def rank_without_grads(steps: int) -> dict[str, Any]:
    """Two pipeline "stages": rank 0's parameters have gradients, rank 1's never do.

    A standalone AutoClip clipper on each rank's parameters with
    ``pipeline_groups=WORLD``: rank 1 still joins every all-reduce, and both ranks get
    rank 0's norm. Returns each step's stats and rank 0's float64 norm.
    """
    rank = dist.get_rank()
    torch.manual_seed(100 + rank)
    params = [nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(4))]
    clipper = distclip.make_clipper(
        "autoclip", params, pipeline_groups=dist.group.WORLD, q=0.5, window=3
    )
    out: dict[str, Any] = {"stats": [], "local_norm": []}
    for step in range(steps):
        if rank == 0:
            gen = torch.Generator().manual_seed(step)
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen) * (1 + step % 3)
            out["local_norm"].append(norm_of([p.grad for p in params], 2.0))
        stats = clipper.clip_()
        out["stats"].append(stats.as_floats())
    out["grads_none"] = all(p.grad is None for p in params)
    return out


# ---------------------------------------------------------------- guard and timeouts
def missing_rank(timeout_s: float) -> dict[str, Any]:
    """Rank 1 never reaches the collective; rank 0 must get an error, not hang.

    On a fresh gloo group with a short timeout: (1) a clip on a layout reduced over
    that group (``pipeline_groups``), (2) ``check_consistency(group, timeout=...)``,
    which names the missing rank. Returns what rank 0 raised, and how long it took.
    """
    import time

    rank = dist.get_rank()
    out: dict[str, Any] = {}
    for what in ("clip", "check"):
        group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        param = nn.Parameter(torch.ones(3))
        param.grad = torch.ones(3)
        clipper = distclip.make_clipper(
            "autoclip", [param], pipeline_groups=group, q=0.5, window=4, check_first_step=False
        )
        if rank == 0:
            start = time.monotonic()
            try:
                if what == "clip":
                    clipper.clip_()
                else:
                    clipper.check_consistency(group, timeout=timedelta(seconds=timeout_s))
            except (RuntimeError, distclip.RankDesyncError) as error:
                out[what] = (type(error).__name__, str(error), time.monotonic() - start)
            else:
                out[what] = None
        dist.barrier()  # rank 1 waits here until rank 0 has given up
        dist.destroy_process_group(group)
    return out


def train_sharded_scaler(steps: int, inf_step: int) -> dict[str, Any]:
    """FSDP2 + non-fused SGD + ``ShardedGradScaler``; an inf in rank 1's shard only.

    The scaler all-reduces its overflow flag, so both ranks skip ``step()`` together
    (a rank-local ``GradScaler`` would let rank 0 step alone and wait in distclip's
    all-reduce). Returns per-step records and parameter snapshots around the fault.
    """
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    rank, world = dist.get_rank(), dist.get_world_size()
    model, wrapped = _wrap({"layout": "fsdp2"})
    optimizer = _optimizer({"q": 0.3, "window": 6}, model)
    clipper = distclip.get_clipper(optimizer)
    scaler = ShardedGradScaler("cpu", init_scale=2.0**8, growth_interval=1000)
    out: dict[str, Any] = {"stepped": [], "stats": [], "scale": []}
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        x, y = FAULTS.batch_slice(step, rank, world)
        scaler.scale(loss_fn(wrapped(x), y)).backward()
        if step == inf_step and rank == 1:
            grad = dict(model.named_parameters())["mlp.fc2.weight"].grad
            assert grad is not None
            _local(grad).view(-1)[0] = math.inf
        if step == inf_step:
            out["before"] = _snapshot(model, optimizer)
        steps_before = clipper.num_steps
        scaler.step(optimizer)
        scaler.update()
        if step == inf_step:
            out["after"] = _snapshot(model, optimizer)
        out["stepped"].append(clipper.num_steps > steps_before)
        out["scale"].append(float(scaler.get_scale()))
        if clipper.num_steps > steps_before:
            out["stats"].append(optimizer.last_clip.as_floats())  # type: ignore[attr-defined]
    out["checksum"] = clipper.state_checksum()
    out["window"] = clipper.window.chronological().tolist()  # type: ignore[attr-defined]
    return out
