"""The ``pipeline`` layout: two stages of ``TiedMLP``, point-to-point activations.

Rank ``r`` of 2 holds stage ``r``; on 4 ranks a ``("pp", "dp")`` mesh, each stage
``fully_shard``-ed over ``mesh["dp"]``. The tied weight's gradient is summed over the
stages (Megatron's embedding group) and its stage-1 copy is marked shared (``shared``:
``"mark_shared"`` or Megatron's ``"attr"``), so that it is scaled but counted once.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

import distclip
from tests.support.layouts import (
    Prepared,
    layout,
    make_model,
    mesh_2x2,
    shard_linears,
    simple_layout,
)
from tests.support.problem import Problem, loss_fn, stage0_forward, stage1_forward

__all__ = ["STAGE_PARAMS", "Stage", "pipeline"]


#: Parameter names (of ``TiedMLP``) held by each pipeline stage.
STAGE_PARAMS = (
    ("tied", "fc1.weight", "fc1.bias"),
    ("fc2.weight", "fc2.bias", "tied", "fc3.weight", "fc3.bias", "out.weight", "out.bias"),
)


def _copy_linear(linear: nn.Linear) -> nn.Linear:
    copy = nn.Linear(linear.in_features, linear.out_features)
    copy.load_state_dict(linear.state_dict())
    return copy


class Stage(nn.Module):
    """One pipeline stage of ``TiedMLP``: copies of that stage's parameters."""

    def __init__(self, full: nn.Module, stage: int) -> None:
        super().__init__()
        self.stage = stage
        self.tied = nn.Parameter(full.tied.detach().clone())
        self.fc1 = _copy_linear(full.fc1) if stage == 0 else None
        self.fc2 = _copy_linear(full.fc2) if stage == 1 else None
        self.fc3 = _copy_linear(full.fc3) if stage == 1 else None
        self.out = _copy_linear(full.out) if stage == 1 else None

    def forward(self, x: Tensor) -> Tensor:
        return stage0_forward(self, x) if self.stage == 0 else stage1_forward(self, x)


@layout("pipeline")
def pipeline(
    problem: Problem, *, shared: str = "mark_shared", new_group: bool = False, **options: Any
) -> Prepared:
    """Two pipeline stages of ``TiedMLP`` (see the module docstring)."""
    world = dist.get_world_size()
    mesh = None
    if world == 2:
        stage, dp_rank, dp_size = dist.get_rank(), 0, 1
        # One group holding one rank per stage: the world, or a new group of both.
        pp_group = dist.new_group([0, 1]) if new_group else dist.group.WORLD
    else:
        mesh = mesh_2x2(("pp", "dp"))
        stage, dp_rank, dp_size = mesh.get_local_rank("pp"), mesh.get_local_rank("dp"), 2
        pp_group = mesh["pp"].get_group()
    peer = next(r for r in dist.get_process_group_ranks(pp_group) if r != dist.get_rank())
    module = Stage(make_model(problem, kind="tied", **options), stage)
    if mesh is not None:
        layers = [m for m in (module.fc1, module.fc2, module.fc3, module.out) if m is not None]
        shard_linears(module, mesh["dp"], layers=layers)
    if stage == 1:  # the second copy of the tied weight: scaled, never counted
        if shared == "mark_shared":
            distclip.mark_shared(module.tied)
        else:
            module.tied.shared = True  # Megatron-LM's way

    def backward(step: int) -> None:
        x, y = problem.batch_slice(step, dp_rank, dp_size)
        if stage == 0:
            activation = module(x)
            dist.send(activation.detach().contiguous(), peer)
            grad = torch.empty_like(activation)
            dist.recv(grad, peer)
            activation.backward(grad)
        else:
            activation = torch.empty(x.shape[0], problem.widths[1])
            dist.recv(activation, peer)
            activation.requires_grad_(True)
            loss_fn(module(activation), y).backward()
            dist.send(activation.grad.contiguous(), peer)
        # Megatron's embedding group: both copies of the tied weight get the sum.
        dist.all_reduce(
            getattr(module.tied.grad, "_local_tensor", module.tied.grad), group=pp_group
        )

    prepared = simple_layout(
        problem,
        module,
        (dp_rank, dp_size),
        pipeline_groups=[pp_group] if new_group else pp_group,
        backward_fn=backward,
    )
    prepared.info = {
        "stage": stage,
        "data": (dp_rank, dp_size),
        "local_numel": prepared.info["local_numel"],
    }
    return prepared
