"""The registry of parallel layouts: one builder function per layout, for every suite.

:func:`build` turns ``(problem, name, **options)`` into a :class:`Prepared` on the
current rank (every rank calls it together): the module to call, the parameters an
optimizer gets, the slice of each global batch this rank trains on, what distclip
must be told (``model=`` for FSDP1, ``pipeline_groups=``), and how to gather whole
parameters and gradients for a reference. Adding a layout is one function decorated
with :func:`layout`; a suite runs it by naming it.

Options every builder takes: ``seed`` (the model's), ``frozen`` (parameter names frozen
before wrapping), ``dtype`` (the parameters' dtype before wrapping). The layouts:

* ``single``: the plain model in one process (no process group), the whole batch;
* ``ddp``: DistributedDataParallel over every rank (``ddp_kwargs``);
* ``fsdp1``: FullyShardedDataParallel with ``fc1`` and ``fc2`` as their own units,
  the rest in the root's (``sharding``: a ``ShardingStrategy`` name, ``HYBRID_SHARD``
  on a 2x2 ``("replicate", "shard")`` mesh; ``use_orig_params``; ``ignored``: ``out``
  left to the user, who all-reduces its gradients as DDP would);
* ``fsdp2``: ``fully_shard`` on every trainable Linear and the root, on a 1-D mesh
  (``hsdp``: on a 2x2 ``("replicate", "shard")`` mesh);
* ``tp``: ``fc1`` ColwiseParallel, ``fc2`` RowwiseParallel over every rank, the rest
  plain (replicated); every rank sees the whole batch;
* ``fsdp2_tp``: a 2x2 ``("dp", "tp")`` mesh, TP as above on ``mesh["tp"]``,
  ``fully_shard`` on ``mesh["dp"]`` (``fc3`` and the root's ``out`` only there);
* ``pipeline``: two stages of :class:`~tests.support.problem.TiedMLP` (rank ``r`` of 2
  holds stage ``r``; on 4 ranks a ``("pp", "dp")`` mesh, each stage ``fully_shard``-ed
  over ``mesh["dp"]``), activations sent point to point, the tied weight's gradient
  summed over the stages (Megatron's embedding group) and its stage-1 copy marked
  shared (``shared``: ``"mark_shared"`` or ``"attr"``; ``new_group``);
* ``hand_tp``: Megatron-style tensor parallelism on plain tensors, told to distclip
  with ``mark_layout`` (``mixed``: FSDP2 on ``fc3`` and ``out``); see ``layouts_hand``.

The pipeline and hand-marked builders live in ``layouts_pipeline`` and ``layouts_hand``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from tests.support.problem import Problem, loss_fn

__all__ = [
    "LAYOUTS",
    "STAGE_PARAMS",
    "Prepared",
    "build",
    "gather_named",
    "layout",
    "local_numel",
]


@dataclass
class Prepared:
    """One rank's part of a layout, ready to train.

    Attributes:
        module: what the forward pass calls (the DDP wrapper, the FSDP root, a stage).
        inner: the model under any wrapper (its parameter names are the model's).
        params: what the optimizer gets.
        data: ``(index, count)``: this rank trains on slice ``index`` of ``count`` of
            each global batch.
        model: the FSDP1 root distclip is told about (``model=``), if any.
        pipeline_groups: the pipeline groups distclip is told about, if any.
        info: facts the tests check (local sizes, placements, the stage).
    """

    problem: Problem
    module: nn.Module
    inner: nn.Module
    params: list[Tensor]
    data: tuple[int, int]
    full_params: Callable[[], dict[str, Tensor]]
    full_grads: Callable[[], dict[str, Tensor]]
    model: nn.Module | None = None
    pipeline_groups: Any = None
    backward_fn: Callable[[int], None] | None = None
    post_backward: Callable[[], None] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def layout_kwargs(self) -> dict[str, Any]:
        """What distclip is told about the layout."""
        return {"model": self.model, "pipeline_groups": self.pipeline_groups}

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        """This rank's slice of step ``step``'s global batch."""
        return self.problem.batch_slice(step, *self.data)

    def backward(self, step: int) -> None:
        """Forward and backward of step ``step`` on this rank's share of the data."""
        if self.backward_fn is not None:
            self.backward_fn(step)
            return
        x, y = self.batch(step)
        loss_fn(self.module(x), y).backward()
        if self.post_backward is not None:
            self.post_backward()


#: Every layout by name: ``builder(problem, **options) -> Prepared``.
LAYOUTS: dict[str, Callable[..., Prepared]] = {}


def layout(name: str) -> Callable[[Callable[..., Prepared]], Callable[..., Prepared]]:
    """Register the decorated builder as layout ``name``."""

    def register(builder: Callable[..., Prepared]) -> Callable[..., Prepared]:
        if name in LAYOUTS:
            raise ValueError(f"layout {name!r} is registered twice")
        LAYOUTS[name] = builder
        return builder

    return register


def build(problem: Problem, name: str, **options: Any) -> Prepared:
    """Layout ``name`` of ``problem`` on this rank (every rank must call it together)."""
    if name not in LAYOUTS:
        raise ValueError(f"unknown layout {name!r}; registered: {', '.join(sorted(LAYOUTS))}")
    return LAYOUTS[name](problem, **options)


# ------------------------------------------------------------------------ helpers
def local_numel(tensor: Tensor) -> int:
    """Elements of this rank's part of ``tensor`` (a DTensor's local shard)."""
    return int(getattr(tensor, "_local_tensor", tensor).numel())


def _full(tensor: Tensor) -> Tensor:
    """The whole tensor: ``full_tensor()`` of a DTensor (a collective), else a copy."""
    if hasattr(tensor, "full_tensor"):
        return tensor.full_tensor().detach().clone()
    return tensor.detach().clone()


def gather_named(module: nn.Module, what: str) -> dict[str, Tensor]:
    """Whole parameters (``what="params"``) or gradients of ``module``, by name."""
    return {name: _full(p if what == "params" else p.grad) for name, p in module.named_parameters()}


def make_model(
    problem: Problem,
    *,
    seed: int | None = None,
    frozen: Iterable[str] = (),
    dtype: torch.dtype | None = None,
    kind: str = "mlp",
) -> nn.Module:
    """The problem's model with the common options applied (before any wrapping)."""
    model = problem.model(seed, kind=kind, dtype=dtype)
    names = set(frozen)
    for name, param in model.named_parameters():
        if name in names:
            param.requires_grad_(False)
    return model


def simple_layout(
    problem: Problem,
    module: nn.Module,
    data: tuple[int, int],
    inner: nn.Module | None = None,
    **fields: Any,
) -> Prepared:
    """A layout whose forward/backward is one call on ``module`` with this rank's slice."""
    inner = module if inner is None else inner
    return Prepared(
        problem=problem,
        module=module,
        inner=inner,
        params=[p for p in module.parameters() if p.requires_grad],
        data=data,
        full_params=lambda: gather_named(inner, "params"),
        full_grads=lambda: gather_named(inner, "grads"),
        info={
            "data": data,
            "local_numel": {n: local_numel(p) for n, p in inner.named_parameters()},
            "placements": {
                n: str(tuple(p.placements)) if hasattr(p, "placements") else None
                for n, p in inner.named_parameters()
            },
        },
        **fields,
    )


@functools.cache
def world_mesh() -> Any:
    """The 1-D mesh of every rank, made once per worker (a mesh makes process groups)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (dist.get_world_size(),))


def mesh_2x2(names: tuple[str, str]) -> Any:
    """A 2 x 2 CPU device mesh with dimension ``names`` (4 ranks)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (2, 2), mesh_dim_names=names)


# -------------------------------------------------------------- replicated layouts
@layout("single")
def single(problem: Problem, **options: Any) -> Prepared:
    """The plain model in this process: no process group, the whole batch."""
    return simple_layout(problem, make_model(problem, **options), (0, 1))


@layout("ddp")
def ddp(problem: Problem, *, ddp_kwargs: dict[str, Any] | None = None, **options: Any) -> Prepared:
    """DistributedDataParallel over every rank (``ddp_kwargs``: its extra arguments)."""
    from torch.nn.parallel import DistributedDataParallel

    model = make_model(problem, **options)
    module = DistributedDataParallel(model, **(ddp_kwargs or {}))
    return simple_layout(problem, module, (dist.get_rank(), dist.get_world_size()), inner=model)


# --------------------------------------------------------------------------- FSDP1
@layout("fsdp1")
def fsdp1(
    problem: Problem,
    *,
    sharding: str = "FULL_SHARD",
    use_orig_params: bool = True,
    ignored: bool = False,
    **options: Any,
) -> Prepared:
    """FSDP1: ``fc1`` and ``fc2`` as units of their own, the rest in the root's."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy
    from torch.distributed.fsdp._common_utils import clean_tensor_name

    from tests.support.layouts_fsdp1 import fsdp1_full_grads

    world = dist.get_world_size()
    strategy = ShardingStrategy[sharding]
    kwargs: dict[str, Any] = {
        "sharding_strategy": strategy,
        "use_orig_params": use_orig_params,
        "device_id": torch.device("cpu"),
    }
    if strategy == ShardingStrategy.HYBRID_SHARD:
        # Without an explicit mesh, FSDP1's hybrid groups silently stop syncing on CPU.
        kwargs["device_mesh"] = mesh_2x2(("replicate", "shard"))
    model = make_model(problem, **options)
    model.fc1 = FSDP(model.fc1, **kwargs)
    model.fc2 = FSDP(model.fc2, **kwargs)
    left_out = [model.out] if ignored else []
    root = FSDP(model, ignored_modules=left_out, **kwargs)

    def average_ignored_grads() -> None:
        # What DDP would do for the module FSDP leaves alone: identical grads everywhere.
        for module in left_out:
            for p in module.parameters():
                dist.all_reduce(p.grad)
                p.grad.div_(world)

    def full_params() -> dict[str, Tensor]:
        with FSDP.summon_full_params(root):
            return {clean_tensor_name(n): p.detach().clone() for n, p in root.named_parameters()}

    prepared = simple_layout(
        problem, root, (dist.get_rank(), world), model=root, post_backward=average_ignored_grads
    )
    prepared.full_params = full_params
    prepared.full_grads = lambda: fsdp1_full_grads(root, use_orig_params)
    prepared.info["local_numel"] = {
        clean_tensor_name(n): v for n, v in prepared.info["local_numel"].items()
    }
    return prepared


# --------------------------------------------------------------- FSDP2, TP and 2-D
def shard_linears(model: nn.Module, mesh: Any, layers: Iterable[nn.Module] | None = None) -> None:
    """``fully_shard`` each trainable Linear of ``model`` (or ``layers``), then the root."""
    from torch.distributed.fsdp import fully_shard

    if layers is None:
        layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    for module in layers:
        if any(p.requires_grad for p in module.parameters()):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)


@layout("fsdp2")
def fsdp2(problem: Problem, *, hsdp: bool = False, **options: Any) -> Prepared:
    """FSDP2 on every trainable Linear and the root (``hsdp``: on a 2 x 2 mesh)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = mesh_2x2(("replicate", "shard")) if hsdp else world_mesh()
    model = make_model(problem, **options)
    shard_linears(model, mesh)
    return simple_layout(problem, model, (rank, world))


def _tensor_parallel(model: nn.Module, mesh: Any) -> None:
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    parallelize_module(model, mesh, {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})


@layout("tp")
def tp(problem: Problem, **options: Any) -> Prepared:
    """Tensor parallelism over every rank: ``fc1`` column-, ``fc2`` row-wise."""
    model = make_model(problem, **options)
    _tensor_parallel(model, world_mesh())
    return simple_layout(problem, model, (0, 1))


@layout("fsdp2_tp")
def fsdp2_tp(problem: Problem, **options: Any) -> Prepared:
    """FSDP2 over ``dp`` and tensor parallelism over ``tp`` of a 2 x 2 mesh."""
    mesh = mesh_2x2(("dp", "tp"))
    model = make_model(problem, **options)
    _tensor_parallel(model, mesh["tp"])
    # fc3 is not tensor parallel: its parameters live on the dp sub-mesh only (as does
    # the root's `out`), the TP ones on the whole 2-D mesh.
    shard_linears(model, mesh["dp"], layers=(model.fc1, model.fc2, model.fc3))
    return simple_layout(problem, model, (mesh.get_local_rank("dp"), 2))


# The pipeline and the hand-marked layouts live in modules of their own, which build
# on this one.
from tests.support import layouts_hand, layouts_pipeline  # noqa: E402, F401
from tests.support.layouts_pipeline import STAGE_PARAMS  # noqa: E402
