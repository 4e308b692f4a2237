"""Functions run on every rank by ``test_methods_distributed.py`` (through the harness).

Each trains the ``methods_setup`` model with one clipped SGD per configuration, on
this rank's half of every global batch, under DDP or FSDP2, and returns plain
tensors and numbers (this rank's local view; FSDP2's final parameters gathered
whole). Many configurations run in one call, so the group is paid for once.
Nothing here asserts: a configuration that raises is returned as its traceback
and the test for that configuration fails with it.
"""

from __future__ import annotations

import copy
import io
import traceback
from typing import Any

import torch
import torch.distributed as dist
from methods_setup import (
    MODEL_SEED,
    batch_slice,
    build_optimizer,
    loss_fn,
    make_model,
    summarize,
    train_loop,
)
from torch import nn


class Run:
    """One configuration on one layout: the sharded/replicated model and its optimizer."""

    def __init__(
        self, layout: str, config_id: str, mesh: Any = None, model_seed: int = MODEL_SEED
    ) -> None:
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        model = make_model(model_seed)
        if layout == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            self.forward_module: nn.Module = DistributedDataParallel(model)
            self.module: nn.Module = self.forward_module.module
        elif layout == "fsdp2":
            from torch.distributed.fsdp import fully_shard

            for layer in (model.fc1, model.fc2, model.out):
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            self.forward_module = self.module = model
        else:
            raise ValueError(f"unknown layout {layout!r}")
        self.layout = layout
        self.optimizer = build_optimizer(config_id, self.forward_module.parameters())
        self.named = list(self.module.named_parameters())
        self.records: dict[str, list[Any]] | None = None

    def forward_backward(self, step: int) -> None:
        x, y = batch_slice(step, self.rank, self.world)
        loss_fn(self.forward_module(x), y).backward()

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


def _mesh(layout: str) -> Any:
    if layout != "fsdp2":
        return None
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (dist.get_world_size(),))


def train_all(layout: str, config_ids: list[str], steps: int) -> dict[str, Any]:
    """Train every configuration ``steps`` steps on ``layout``; ``{id: result or error}``."""
    mesh = _mesh(layout)
    out: dict[str, Any] = {}
    for config_id in config_ids:
        try:
            run = Run(layout, config_id, mesh)
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
    torch.save({"model": full.module.state_dict(), "optim": full.optimizer.state_dict()}, buffer)
    saved_checksum = full.optimizer.clipper.state_checksum()  # type: ignore[attr-defined]
    full.train(range(stop_at, steps))  # the uninterrupted run goes on

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed = Run("ddp", config_id, model_seed=MODEL_SEED + 777)
    fresh_checksum = resumed.optimizer.clipper.state_checksum()  # type: ignore[attr-defined]
    resumed.module.load_state_dict(checkpoint["model"])
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
