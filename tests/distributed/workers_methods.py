"""Functions run on every rank by ``test_methods_distributed.py`` (through the harness).

Each trains the ``METHODS`` problem with one clipped SGD per configuration of
:data:`CONFIGS`, on this rank's half of every global batch, under a layout of
``tests.support.layouts`` (``ddp``, ``fsdp2``; ``single`` in the pytest process: the
same loop on the full batch), and returns plain tensors and numbers (this rank's local
view; FSDP2's final parameters gathered whole). Many configurations run in one call,
so the group is paid for once. Nothing here asserts: a configuration that raises is
returned as its traceback and the test for that configuration fails with it.
"""

from __future__ import annotations

import copy
import io
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from tests.support import layouts
from tests.support.problem import METHODS, loss_fn
from tests.support.training import STATS_FIELDS, clipped_class, clipped_optimizer

STEPS = 20
#: At this step the first row of rank 1's half gets a NaN input (``METHODS.nan``): the
#: global norm is NaN on every rank, the step is skipped everywhere and no state may
#: change (the single-process run sees the same NaN row).
NAN_STEP = METHODS.nan[0][0]
#: SGD without foreach/fused kernels (torch's fused SGD has no DTensor rule).
SGD_KWARGS: dict[str, Any] = {"lr": 0.05, "momentum": 0.5, "foreach": False}

#: Clipping configurations: id -> (method, options). Every name of
#: ``distclip.available_methods()`` appears (aliases included), with options under
#: which the method clips on this data; a few extra variants follow.
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "norm": ("norm", {"max_norm": 1.0}),
    "value": ("value", {"clip_value": 0.15}),
    "coordinate_wise": ("coordinate_wise", {"clip_value": 0.25}),
    "autoclip": ("autoclip", {"q": 0.3, "window": 8, "max_norm": 1.5}),
    "auto_clip": ("auto_clip", {"q": 0.5, "window": 30}),
    "linear_stoch_norm": ("linear_stoch_norm", {"max_norm": 0.8, "beta": 0.5, "seed": 3}),
    "quadratic_stoch_norm": ("quadratic_stoch_norm", {"max_norm": 0.8, "beta": 0.3, "seed": 11}),
    "layer_wise": ("layer_wise", {"max_norm": 0.5}),
    "linear_stoch_autoclip": (
        "linear_stoch_autoclip",
        {"q": 0.3, "window": 8, "beta": 0.5, "seed": 5},
    ),
    "quadratic_stoch_autoclip": (
        "quadratic_stoch_autoclip",
        {"q": 0.2, "window": 6, "beta": 0.4, "seed": 9, "max_norm": 1.0},
    ),
    "zclip": ("zclip", {"alpha": 0.9, "z_thresh": 2.0, "warmup_steps": 5}),
    "agc": ("agc", {"clip_factor": 1.0}),
    # Variants beyond one per name.
    "zclip-mean-maxnorm": (
        "zclip",
        {"alpha": 0.8, "z_thresh": 1.5, "warmup_steps": 4, "mode": "mean", "max_norm": 2.0},
    ),
    "agc-eps": ("agc", {"clip_factor": 0.3, "eps": 2.0}),
}


def optimizer_class(config_id: str) -> type[torch.optim.Optimizer]:
    """The clipped SGD class of ``config_id``."""
    method, options = CONFIGS[config_id]
    return clipped_class(torch.optim.SGD, method, options)


def build_optimizer(config_id: str, params: Any) -> torch.optim.Optimizer:
    """The clipped SGD of ``config_id`` over ``params``."""
    method, options = CONFIGS[config_id]
    optimizer, _ = clipped_optimizer(
        params, optimizer_kwargs=SGD_KWARGS, method=method, options=options
    )
    return optimizer


def local(tensor: Tensor) -> Tensor:
    """This rank's part of ``tensor`` (a DTensor's local shard), detached and copied."""
    part = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return part.detach().clone()


def train_loop(
    optimizer: Any,
    named_params: list[tuple[str, Tensor]],
    forward_backward: Callable[[int], None],
    steps: range,
    records: dict[str, list[Any]] | None = None,
) -> dict[str, list[Any]]:
    """Run ``steps``: zero grads, ``forward_backward(step)``, ``optimizer.step()``.

    Records, per step and in this rank's local view (a DTensor's shard): the
    parameters before the step, the largest gradient element before clipping, the
    gradients after clipping (what the update used) and ``last_clip``'s fields.
    """
    if records is None:
        records = {
            name: [] for name in (*STATS_FIELDS, "step", "params_before", "grads", "max_abs")
        }
    for step in steps:
        optimizer.zero_grad(set_to_none=True)
        forward_backward(step)
        records["params_before"].append({n: local(p) for n, p in named_params})
        records["max_abs"].append(
            max(
                (
                    float(local(p.grad).abs().max())
                    for _, p in named_params
                    if local(p.grad).numel()
                ),
                default=0.0,
            )
        )
        optimizer.step()
        records["grads"].append({n: local(p.grad) for n, p in named_params})
        stats = optimizer.last_clip
        for field in STATS_FIELDS:
            records[field].append(getattr(stats, field).detach().clone())
        records["step"].append(stats.step)
    return records


def summarize(records: dict[str, list[Any]]) -> dict[str, Any]:
    """The per-step stats stacked into 1-D tensors; the rest as recorded."""
    out = dict(records)
    for field in STATS_FIELDS:
        out[field] = torch.stack(records[field]) if records[field] else torch.empty(0)
    return out


class Run:
    """One configuration on one layout: the sharded/replicated model and its optimizer."""

    def __init__(self, layout: str, config_id: str, model_seed: int | None = None) -> None:
        self.prepared = layouts.build(METHODS, layout, seed=model_seed)
        self.layout = layout
        self.optimizer = build_optimizer(config_id, self.prepared.module.parameters())
        self.named = list(self.prepared.inner.named_parameters())
        self.records: dict[str, list[Any]] | None = None

    def forward_backward(self, step: int) -> None:
        x, y = self.prepared.batch(step)
        loss_fn(self.prepared.module(x), y).backward()

    def train(self, steps: range) -> None:
        self.records = train_loop(
            self.optimizer, self.named, self.forward_backward, steps, self.records
        )

    def result(self) -> dict[str, Any]:
        clipper = self.optimizer.clipper  # type: ignore[attr-defined]
        out = summarize(self.records or {})
        out.update(
            params={
                n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                for n, p in self.named
            },
            local_shapes={
                n: tuple((p.to_local() if hasattr(p, "to_local") else p).shape)
                for n, p in self.named
            },
            checksum=clipper.state_checksum(),
            num_clipped=int(clipper.num_clipped),
            num_steps=clipper.num_steps,
            class_name=type(self.optimizer).__name__,
            clipper_state=copy.deepcopy(clipper.state_dict()),
        )
        if hasattr(clipper, "window"):
            out["window"] = clipper.window.chronological()
        return out


def single_process_run(config_id: str, steps: int = STEPS) -> dict[str, Any]:
    """The same distclip optimizer on the full batch in this process (no process group)."""
    run = Run("single", config_id)
    run.train(range(steps))
    return run.result()


def train_all(layout: str, config_ids: list[str], steps: int) -> dict[str, Any]:
    """Train every configuration ``steps`` steps on ``layout``; ``{id: result or error}``."""
    out: dict[str, Any] = {}
    for config_id in config_ids:
        try:
            run = Run(layout, config_id)
            run.train(range(steps))
            out[config_id] = run.result()
        except Exception:
            out[config_id] = {"error": traceback.format_exc()}
    return out


def _round_trip(config_id: str, steps: int, stop_at: int) -> dict[str, Any]:
    """An uninterrupted DDP run, and one checkpointed after ``stop_at`` steps and resumed.

    The checkpoint (model and optimizer ``state_dict``, clipper included) goes through
    ``torch.save`` / ``torch.load(weights_only=True)``; the resumed run starts from a
    model of another seed and a fresh optimizer, so only the checkpoint can make the
    two runs agree.
    """
    full = Run("ddp", config_id)
    full.train(range(stop_at))
    buffer = io.BytesIO()
    torch.save(
        {"model": full.prepared.inner.state_dict(), "optim": full.optimizer.state_dict()}, buffer
    )
    saved_checksum = full.optimizer.clipper.state_checksum()  # type: ignore[attr-defined]
    full.train(range(stop_at, steps))  # the uninterrupted run goes on

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed = Run("ddp", config_id, model_seed=METHODS.model_seed + 777)
    fresh_checksum = resumed.optimizer.clipper.state_checksum()  # type: ignore[attr-defined]
    resumed.prepared.inner.load_state_dict(checkpoint["model"])
    resumed.optimizer.load_state_dict(checkpoint["optim"])
    loaded_checksum = resumed.optimizer.clipper.state_checksum()  # type: ignore[attr-defined]
    resumed.train(range(stop_at, steps))
    return {
        "full": full.result(),
        "resumed": resumed.result(),
        "saved_checksum": saved_checksum,
        "fresh_checksum": fresh_checksum,
        "loaded_checksum": loaded_checksum,
        "has_clipper_state": "distclip" in checkpoint["optim"]["param_groups"][0],
    }


def round_trip_all(config_ids: list[str], steps: int, stop_at: int) -> dict[str, Any]:
    """:func:`_round_trip` of every configuration; ``{id: result or error}``."""
    out: dict[str, Any] = {}
    for config_id in config_ids:
        try:
            out[config_id] = _round_trip(config_id, steps, stop_at)
        except Exception:
            out[config_id] = {"error": traceback.format_exc()}
    return out


def agc_refusals() -> dict[str, str]:
    """Build AGC on layouts that split rows; return each refusal's message (or "built")."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    import distclip

    outcomes: dict[str, str] = {}

    def attempt(name: str, params: Any, **layout: Any) -> None:
        try:
            distclip.make_clipper("agc", params, **layout)
            outcomes[name] = "built"
        except NotImplementedError as err:
            outcomes[name] = str(err)

    torch.manual_seed(0)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    attempt("tp_rowwise_weight", [model[2].weight])  # split along dim 1: rows are split
    attempt("tp_colwise_weight", [model[0].weight])  # split along dim 0: rows whole
    fsdp = FullyShardedDataParallel(
        nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), device_id=torch.device("cpu")
    )
    attempt("fsdp1", list(fsdp.parameters()), model=fsdp)
    return outcomes
