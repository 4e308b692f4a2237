"""Build one sharded layout of the ``layouts_setup`` models on the current rank.

:func:`build` turns a plain ``spec`` dict into a :class:`Prepared`: the module, the
parameters an optimizer gets, what distclip must be told (``model=`` for FSDP1,
``pipeline_groups=``), how to run one step's forward/backward on this rank's share
of the data, and how to gather full parameters and gradients for the reference.

Layouts (``spec["layout"]``):

* ``ddp``: DistributedDataParallel over every rank;
* ``fsdp1``: FullyShardedDataParallel, ``fc1`` and ``fc2`` wrapped as their own
  units, ``fc3`` and ``out`` in the root's (``sharding``: a ``ShardingStrategy``
  name; ``HYBRID_SHARD`` on a 2x2 ``("replicate", "shard")`` device mesh;
  ``use_orig_params``; ``ignored``: ``out`` is left to the user, who all-reduces its
  gradients as DDP would);
* ``fsdp2``: ``fully_shard`` on each Linear and the root, on a 1-D mesh (``hsdp``:
  on a 2x2 ``("replicate", "shard")`` mesh);
* ``tp``: ``fc1`` ColwiseParallel, ``fc2`` RowwiseParallel over every rank; ``fc3``
  and ``out`` stay plain (replicated) tensors; every rank sees the whole batch;
* ``fsdp2_tp``: a 2x2 ``("dp", "tp")`` mesh, TP as above on ``mesh["tp"]``,
  ``fully_shard`` on ``mesh["dp"]`` (``fc3`` and the root's ``out`` only there);
* ``hand_tp``: Megatron-style tensor parallelism on plain tensors, told to distclip
  with ``mark_layout`` (see ``layouts_hand``);
* ``pipeline``: two stages of ``TiedMLP`` (rank ``r`` of 2 holds stage ``r``; on 4
  ranks a ``("pp", "dp")`` mesh, each stage ``fully_shard``-ed over ``mesh["dp"]``),
  activations and their gradients sent point to point, the tied weight's gradient
  summed over the two stages (as Megatron's embedding group does) and its stage-1
  copy marked shared (``shared``: ``"mark_shared"`` or ``"attr"``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from layouts_setup import Stage, batch_slice, loss_fn, make_model
from torch import Tensor, nn

import distclip


@dataclass
class Prepared:
    """One rank's part of a layout, ready to train."""

    module: nn.Module
    params: list[Tensor]
    backward: Callable[[int], None]
    full_params: Callable[[], dict[str, Tensor]]
    full_grads: Callable[[], dict[str, Tensor]]
    model: nn.Module | None = None
    pipeline_groups: Any = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def layout_kwargs(self) -> dict[str, Any]:
        """What distclip is told about the layout."""
        return {"model": self.model, "pipeline_groups": self.pipeline_groups}


def _full(tensor: Tensor) -> Tensor:
    """The whole tensor: ``full_tensor()`` of a DTensor (a collective), else a copy."""
    if hasattr(tensor, "full_tensor"):
        return tensor.full_tensor().detach().clone()
    return tensor.detach().clone()


def _local_numel(tensor: Tensor) -> int:
    return int(getattr(tensor, "_local_tensor", tensor).numel())


def _gather_named(module: nn.Module, what: str) -> dict[str, Tensor]:
    out = {}
    for name, p in module.named_parameters():
        out[name] = _full(p if what == "params" else p.grad)
    return out


def _simple(
    module: nn.Module, data: tuple[int, int], post_backward: Callable[[], None] | None = None
) -> Prepared:
    """A layout whose forward/backward is one call on the module with this rank's slice."""

    def backward(step: int) -> None:
        x, y = batch_slice(step, *data)
        loss_fn(module(x), y).backward()
        if post_backward is not None:
            post_backward()

    return Prepared(
        module=module,
        params=list(module.parameters()),
        backward=backward,
        full_params=lambda: _gather_named(module, "params"),
        full_grads=lambda: _gather_named(module, "grads"),
        info={
            "data": data,
            "local_numel": {n: _local_numel(p) for n, p in module.named_parameters()},
            "placements": {
                n: str(tuple(p.placements)) if hasattr(p, "placements") else None
                for n, p in module.named_parameters()
            },
        },
    )


def _hsdp_mesh() -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))


# ------------------------------------------------------------------------------ FSDP1
def _fsdp1_flat_full_grads(root: nn.Module) -> dict[str, Tensor]:
    """Whole gradients of every original parameter, gathered from FSDP1's flat shards.

    ``summon_full_params(with_grads=True)`` needs ``use_orig_params=True``; this reads
    the flat parameter's own bookkeeping instead (names, shapes, padding).
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp._common_utils import clean_tensor_name

    out: dict[str, Tensor] = {}
    for prefix, module in root.named_modules():
        handle = getattr(module, "_handle", None) if isinstance(module, FSDP) else None
        if handle is None:
            continue
        flat = handle.flat_param
        grad = flat.grad
        if handle.uses_sharded_strategy:
            world = dist.get_world_size(module.process_group)
            gathered = grad.new_empty(grad.numel() * world)
            dist.all_gather_into_tensor(gathered, grad.contiguous(), group=module.process_group)
        else:
            gathered = grad
        full = gathered[: flat._unpadded_unsharded_size.numel()]
        names, shapes = iter(flat._fqns), iter(flat._shapes)
        for view, padding in zip(
            full.split(flat._numels_with_padding), flat._is_padding_mask, strict=True
        ):
            if not padding:
                name = clean_tensor_name(f"{prefix}.{next(names)}".lstrip("."))
                out[name] = view.reshape(next(shapes)).clone()
    for name, p in root.named_parameters():  # parameters FSDP does not manage
        name = clean_tensor_name(name)
        if name not in out and p.grad is not None and not getattr(p, "_is_flat_param", False):
            out[name] = p.grad.detach().clone()
    return out


def fsdp1_full_grads(root: nn.Module, use_orig_params: bool) -> dict[str, Tensor]:
    """Every original parameter's whole gradient under the FSDP1 ``root``, by clean name."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp._common_utils import clean_tensor_name

    if not use_orig_params:
        return _fsdp1_flat_full_grads(root)
    with FSDP.summon_full_params(root, with_grads=True):
        return {clean_tensor_name(n): p.grad.clone() for n, p in root.named_parameters()}


def fsdp1(spec: dict[str, Any]) -> Prepared:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy
    from torch.distributed.fsdp._common_utils import clean_tensor_name

    rank, world = dist.get_rank(), dist.get_world_size()
    strategy = ShardingStrategy[spec["sharding"]]
    kwargs: dict[str, Any] = {
        "sharding_strategy": strategy,
        "use_orig_params": spec["use_orig_params"],
        "device_id": torch.device("cpu"),
    }
    if strategy == ShardingStrategy.HYBRID_SHARD:
        # Without an explicit mesh, FSDP1's hybrid groups silently stop syncing on CPU.
        kwargs["device_mesh"] = _hsdp_mesh()
    model = make_model("mlp")
    model.fc1 = FSDP(model.fc1, **kwargs)
    model.fc2 = FSDP(model.fc2, **kwargs)
    ignored = [model.out] if spec.get("ignored") else []
    root = FSDP(model, ignored_modules=ignored, **kwargs)

    def average_ignored_grads() -> None:
        # What DDP would do for the module FSDP leaves alone: identical grads everywhere.
        for module in ignored:
            for p in module.parameters():
                dist.all_reduce(p.grad)
                p.grad.div_(world)

    def full_params() -> dict[str, Tensor]:
        with FSDP.summon_full_params(root):
            return {clean_tensor_name(n): p.detach().clone() for n, p in root.named_parameters()}

    def full_grads() -> dict[str, Tensor]:
        return fsdp1_full_grads(root, spec["use_orig_params"])

    prepared = _simple(root, (rank, world), average_ignored_grads)
    prepared.full_params, prepared.full_grads, prepared.model = full_params, full_grads, root
    prepared.info["local_numel"] = {
        clean_tensor_name(n): v for n, v in prepared.info["local_numel"].items()
    }
    return prepared


# ------------------------------------------------------------------- FSDP2, TP, 2-D
def fsdp2(spec: dict[str, Any]) -> Prepared:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = _hsdp_mesh() if spec.get("hsdp") else init_device_mesh("cpu", (world,))
    model = make_model("mlp")
    for layer in (model.fc1, model.fc2, model.fc3, model.out):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return _simple(model, (rank, world))


def _tensor_parallel(model: nn.Module, mesh: Any) -> None:
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    parallelize_module(model, mesh, {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})


def tp(spec: dict[str, Any]) -> Prepared:
    from torch.distributed.device_mesh import init_device_mesh

    model = make_model("mlp")
    _tensor_parallel(model, init_device_mesh("cpu", (dist.get_world_size(),)))
    return _simple(model, (0, 1))


def fsdp2_tp(spec: dict[str, Any]) -> Prepared:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = make_model("mlp")
    _tensor_parallel(model, mesh["tp"])
    # fc3 is not tensor parallel: its parameters live on the dp sub-mesh only (as does
    # the root's `out`), the TP ones on the whole 2-D mesh.
    for layer in (model.fc1, model.fc2, model.fc3):
        fully_shard(layer, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    dp_rank = mesh.get_local_rank("dp")
    return _simple(model, (dp_rank, 2))


def ddp(spec: dict[str, Any]) -> Prepared:
    from torch.nn.parallel import DistributedDataParallel

    module = DistributedDataParallel(make_model("mlp"))
    prepared = _simple(module, (dist.get_rank(), dist.get_world_size()))
    prepared.full_params = lambda: _gather_named(module.module, "params")
    prepared.full_grads = lambda: _gather_named(module.module, "grads")
    return prepared


# --------------------------------------------------------------------------- pipeline
def pipeline(spec: dict[str, Any]) -> Prepared:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    world = dist.get_world_size()
    if world == 2:
        stage, dp_rank, dp_size = dist.get_rank(), 0, 1
        # One group holding one rank per stage: the world, or a new group of both.
        pp_group = dist.new_group([0, 1]) if spec.get("new_group") else dist.group.WORLD
    else:
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "dp"))
        stage, dp_rank, dp_size = mesh.get_local_rank("pp"), mesh.get_local_rank("dp"), 2
        pp_group = mesh["pp"].get_group()
    peer = next(r for r in dist.get_process_group_ranks(pp_group) if r != dist.get_rank())
    module = Stage(make_model("tied"), stage)
    if world == 4:
        for layer in (module.fc1, module.fc2, module.fc3, module.out):
            if layer is not None:
                fully_shard(layer, mesh=mesh["dp"])
        fully_shard(module, mesh=mesh["dp"])
    if stage == 1:  # the second copy of the tied weight: scaled, never counted
        if spec["shared"] == "mark_shared":
            distclip.mark_shared(module.tied)
        else:
            module.tied.shared = True  # Megatron-LM's way

    def backward(step: int) -> None:
        x, y = batch_slice(step, dp_rank, dp_size)
        if stage == 0:
            activation = module(x)
            dist.send(activation.detach().contiguous(), peer)
            grad = torch.empty_like(activation)
            dist.recv(grad, peer)
            activation.backward(grad)
        else:
            activation = torch.empty(x.shape[0], 16)
            dist.recv(activation, peer)
            activation.requires_grad_(True)
            loss_fn(module(activation), y).backward()
            dist.send(activation.grad.contiguous(), peer)
        # Megatron's embedding group: both copies of the tied weight get the sum.
        dist.all_reduce(
            getattr(module.tied.grad, "_local_tensor", module.tied.grad), group=pp_group
        )

    groups = [pp_group] if spec.get("new_group") else pp_group
    return Prepared(
        module=module,
        params=list(module.parameters()),
        backward=backward,
        full_params=lambda: _gather_named(module, "params"),
        full_grads=lambda: _gather_named(module, "grads"),
        pipeline_groups=groups,
        info={
            "stage": stage,
            "data": (dp_rank, dp_size),
            "local_numel": {n: _local_numel(p) for n, p in module.named_parameters()},
        },
    )


BUILDERS: dict[str, Callable[[dict[str, Any]], Prepared]] = {
    "ddp": ddp,
    "fsdp1": fsdp1,
    "fsdp2": fsdp2,
    "tp": tp,
    "fsdp2_tp": fsdp2_tp,
    "pipeline": pipeline,
}


def build(spec: dict[str, Any]) -> Prepared:
    """The layout ``spec["layout"]`` of this rank (every rank must call it together)."""
    if spec["layout"] == "hand_tp":  # its own module: it builds on this one
        from layouts_hand import hand_tp

        return hand_tp(spec)
    return BUILDERS[spec["layout"]](spec)
