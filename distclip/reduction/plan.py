"""The reduction plan: which gradient lives where, decided once per clipper.

A plan groups the parameters by how their gradients are laid out across processes:

* ``REPLICATED``: every rank holds the whole gradient and the same values (a single
  process, or DDP, which has already averaged the gradients). Its power sum is taken
  locally and never reduced again.

Each step the plan computes one local power sum per group, issues at most one
all-reduce per distinct process group (SUM, or MAX for the inf-norm), adds the
replicated contributions once, and takes the root once. Sharded layouts (FSDP1 flat
shards, FSDP2/TP DTensors, pipeline stages) slot in as further groups that carry the
process group their power sums are reduced over.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from distclip.functional import (
    accumulation_dtype,
    combine_powsums,
    local_powsum,
    powsum_to_norm,
)
from distclip.reduction.collectives import all_reduce_powsum

__all__ = ["GradGroup", "Layout", "ReductionPlan"]


class Layout(enum.Enum):
    """How one group of gradients is spread over the processes."""

    REPLICATED = "replicated"


@dataclass(frozen=True)
class GradGroup:
    """Parameters sharing one layout, and the group their power sums are reduced over.

    ``process_group`` is ``None`` when nothing needs reducing (replicated gradients).
    """

    layout: Layout
    params: tuple[Tensor, ...]
    process_group: dist.ProcessGroup | None = None

    def grads(self) -> list[Tensor]:
        """The gradients of this group's parameters that exist this step."""
        return [p.grad for p in self.params if p.grad is not None]


def _is_dtensor(param: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(param, DTensor)


def _is_fsdp1_param(param: Tensor) -> bool:
    return bool(getattr(param, "_is_flat_param", False) or getattr(param, "_fsdp_flattened", False))


def _classify(param: Tensor) -> Layout:
    """The layout of one parameter's gradient; refuses layouts not supported yet."""
    if _is_dtensor(param):
        raise NotImplementedError(
            "distclip: a parameter is a DTensor (FSDP2 fully_shard or tensor parallel); "
            "the reduction plan of this version supports a single process and DDP "
            "(replicated gradients) only. Computing a shard-local norm would be wrong, "
            "so distclip refuses rather than clip by it."
        )
    if _is_fsdp1_param(param):
        raise NotImplementedError(
            "distclip: a parameter is managed by FSDP1 (FullyShardedDataParallel); the "
            "reduction plan of this version supports a single process and DDP "
            "(replicated gradients) only. Computing a shard-local norm would be wrong, "
            "so distclip refuses rather than clip by it."
        )
    return Layout.REPLICATED


class ReductionPlan:
    """Built once from the parameters; computes the global gradient norm each step.

    The norm is a 0-dim tensor on the device of the first parameter, in float32
    (float64 if any parameter is float64), identical on every rank because every
    rank takes it from the same reduced power sums.
    """

    def __init__(
        self, groups: Sequence[GradGroup], device: torch.device, dtype: torch.dtype
    ) -> None:
        self.groups = tuple(groups)
        self.device = device
        self.dtype = dtype

    @classmethod
    def build(cls, params: Iterable[Tensor]) -> ReductionPlan:
        """Classify every parameter by layout and group them (done once, not per step)."""
        params = list(params)
        by_layout: dict[Layout, list[Tensor]] = {}
        for param in params:
            by_layout.setdefault(_classify(param), []).append(param)
        groups = [GradGroup(layout, tuple(ps)) for layout, ps in by_layout.items()]
        device = params[0].device if params else torch.device("cpu")
        dtype = accumulation_dtype([p.dtype for p in params])
        return cls(groups, device, dtype)

    @property
    def num_collectives(self) -> int:
        """All-reduces per step: one per distinct process group."""
        return len({id(g.process_group) for g in self.groups if g.process_group is not None})

    def grads(self) -> list[Tensor]:
        """Every local gradient tensor that exists this step (what scaling touches)."""
        return [grad for group in self.groups for grad in group.grads()]

    def total_norm(self, norm_type: float, *, foreach: bool | None = None) -> Tensor:
        """The global ``norm_type``-norm of all gradients (0-dim, no host sync).

        One local power sum per group, one all-reduce per distinct process group,
        replicated groups added once, one root.
        """
        powsums: list[Tensor] = []
        pending: dict[int, tuple[dist.ProcessGroup, list[Tensor]]] = {}
        for group in self.groups:
            local = local_powsum(
                group.grads(), norm_type, device=self.device, dtype=self.dtype, foreach=foreach
            )
            if group.process_group is None:
                powsums.append(local)
            else:
                pending.setdefault(id(group.process_group), (group.process_group, []))[1].append(
                    local
                )
        for process_group, locals_ in pending.values():
            powsums.append(
                all_reduce_powsum(combine_powsums(locals_, norm_type), norm_type, process_group)
            )
        if not powsums:
            return torch.zeros((), device=self.device, dtype=self.dtype)
        return powsum_to_norm(combine_powsums(powsums, norm_type), norm_type)
