"""The ``hand_tp`` layout: Megatron-style tensor parallelism on plain tensors.

The layouts MLP's ``fc1`` is column parallel (each tensor-parallel rank holds a block
of its output rows and bias) and ``fc2`` row parallel (a block of its input columns;
its bias whole); the partial outputs of ``fc2`` are summed over the tensor-parallel
group in the forward (the backward passes the gradient through, as Megatron's
``reduce_from_tensor_model_parallel_region``). Nothing here is a DTensor: distclip can
only know the layout because it is told, with :func:`distclip.mark_layout`. ``fc3`` and
``out`` are replicated plain tensors, or with ``mixed=True`` FSDP2 DTensors over the
data-parallel dimension.

On 2 ranks the tensor-parallel group is the world; on 4 a ``("dp", "tp")`` 2 x 2
mesh, and the gradients of the hand-sharded tensors are averaged over the
data-parallel group by hand (as DDP would).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

import distclip
from tests.support.layouts import Prepared, gather_named, layout, local_numel, make_model, mesh_2x2
from tests.support.problem import Problem

#: The parameters split across the tensor-parallel group, and along which dimension.
SPLIT_DIM = {"fc1.weight": 0, "fc1.bias": 0, "fc2.weight": 1}


class _SumOverGroup(torch.autograd.Function):
    """Forward: all-reduce (sum) over ``group``; backward: the gradient as it is."""

    @staticmethod
    def forward(ctx: Any, partial: Tensor, group: Any) -> Tensor:
        out = partial.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class HandTP(nn.Module):
    """The MLP with ``fc1`` / ``fc2`` split by hand over ``tp_group``."""

    def __init__(self, full: nn.Module, tp_group: Any) -> None:
        super().__init__()
        self.tp_group = tp_group
        size, rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
        rows = full.fc1.out_features // size
        block = slice(rank * rows, (rank + 1) * rows)
        self.fc1 = nn.Linear(full.fc1.in_features, rows)
        self.fc2 = nn.Linear(rows, full.fc2.out_features)
        self.fc3 = full.fc3
        self.out = full.out
        with torch.no_grad():
            self.fc1.weight.copy_(full.fc1.weight[block])
            self.fc1.bias.copy_(full.fc1.bias[block])
            self.fc2.weight.copy_(full.fc2.weight[:, block])
            self.fc2.bias.copy_(full.fc2.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.fc1(x))
        h = _SumOverGroup.apply(nn.functional.linear(h, self.fc2.weight), self.tp_group)
        h = torch.tanh(h + self.fc2.bias)
        h = torch.tanh(self.fc3(h))
        return self.out(h)  # type: ignore[no-any-return]


def _gather_split(tensor: Tensor, dim: int, group: Any) -> Tensor:
    pieces = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, tensor.contiguous(), group=group)
    return torch.cat(pieces, dim=dim)


@layout("hand_tp")
def hand_tp(problem: Problem, *, mixed: bool = False, **options: Any) -> Prepared:
    """Build the hand-sharded layout and mark it (``mixed``: FSDP2 on ``fc3`` and ``out``)."""

    if dist.get_world_size() == 2:
        tp_group, dp_group, dp_mesh, data = dist.group.WORLD, None, None, (0, 1)
    else:
        mesh = mesh_2x2(("dp", "tp"))
        tp_group, dp_group, dp_mesh = mesh["tp"].get_group(), mesh["dp"].get_group(), mesh["dp"]
        data = (mesh.get_local_rank("dp"), 2)
    module = HandTP(make_model(problem, **options), tp_group)
    by_hand = [module.fc1.weight, module.fc1.bias, module.fc2.weight]
    distclip.mark_layout(by_hand, sharded_over=tp_group, replicated_over=dp_group)
    replicated = [g for g in (tp_group, dp_group) if g is not None]
    distclip.mark_layout(module.fc2.bias, replicated_over=replicated)
    averaged = [*by_hand, module.fc2.bias]
    if mixed:
        from torch.distributed.fsdp import fully_shard

        for layer in (module.fc3, module.out):
            fully_shard(layer, mesh=dp_mesh)
    else:
        averaged += [*module.fc3.parameters(), *module.out.parameters()]

    def average_over_dp() -> None:
        if dp_group is not None:  # what DDP would do for the plain tensors
            for p in averaged:
                dist.all_reduce(p.grad, group=dp_group)
                p.grad.div_(dist.get_world_size(dp_group))

    def full(what: str) -> dict[str, Tensor]:
        out = gather_named(module, what)
        for name, dim in SPLIT_DIM.items():
            out[name] = _gather_split(out[name], dim, tp_group)
        return out

    return Prepared(
        problem=problem,
        module=module,
        inner=module,
        params=list(module.parameters()),
        data=data,
        full_params=lambda: full("params"),
        full_grads=lambda: full("grads"),
        post_backward=average_over_dp,
        info={
            "data": data,
            "local_numel": {n: local_numel(p) for n, p in module.named_parameters()},
        },
    )
