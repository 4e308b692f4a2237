"""The reduction plan: which gradient lives where, decided once per clipper.

A plan groups the parameters by layout (see :mod:`distclip.reduction.layouts`): a
replicated group, reduced by nobody, and one group per distinct process group that
sharded gradients are reduced over. Each step it computes one local power sum per
group (foreach kernels, fp32 accumulation), issues exactly one all-reduce per distinct
process group (SUM, or MAX for the inf-norm), adds the replicated contribution once,
all-reduces the result over the pipeline groups if any, and takes the root once.
Every rank joins every collective whether or not it holds gradients this step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from distclip.functional import (
    accumulation_dtype,
    combine_powsums,
    local_norm,
    local_powsum,
    powsum_to_norm,
    tensor_powsums,
)
from distclip.reduction.collectives import all_reduce_powsum
from distclip.reduction.layouts import (
    as_group_list,
    classify,
    fsdp1_groups,
    is_dtensor,
    is_fsdp1_param,
    mesh_dims_in_use,
)

__all__ = ["GradGroup", "ReductionPlan"]


_EMPTY = torch.zeros(0)


def _local(grad: Tensor) -> Tensor:
    return grad._local_tensor if is_dtensor(grad) else grad  # type: ignore[attr-defined, no-any-return]


@dataclass(frozen=True)
class GradGroup:
    """Parameters whose power sums are reduced over one process group.

    ``process_group`` is ``None`` for the replicated group (nothing to reduce).
    ``params`` are all of them (every one is scaled). ``leader[i]``: this rank's
    local part of ``params[i]`` enters the reduction (one copy of replicated data
    does); ``shared[i]``: a tied copy, left out of the global norm.
    """

    kind: str
    params: tuple[Tensor, ...]
    leader: tuple[bool, ...]
    shared: tuple[bool, ...]
    process_group: Any = None

    @property
    def counted(self) -> tuple[Tensor, ...]:
        """The parameters whose local part counts in the global norm on this rank."""
        return tuple(
            p
            for p, lead, tied in zip(self.params, self.leader, self.shared, strict=True)
            if lead and not tied
        )

    def grads(self) -> list[Tensor]:
        """The local gradient tensors of this group that exist this step."""
        return [_local(p.grad) for p in self.params if p.grad is not None]

    def counted_grads(self) -> list[Tensor]:
        """The local gradients that count in the global norm on this rank."""
        return [_local(p.grad) for p in self.counted if p.grad is not None]


class ReductionPlan:
    """Built once from the parameters; computes the global gradient norm each step.

    The norm is a 0-dim tensor on the device of the first parameter, in float32
    (float64 if any parameter is float64), identical on every rank because every
    rank takes it from the same reduced power sums.
    """

    def __init__(
        self,
        groups: Sequence[GradGroup],
        device: torch.device,
        dtype: torch.dtype,
        pipeline_groups: Sequence[Any] = (),
    ) -> None:
        self.groups = tuple(groups)
        self.device = device
        self.dtype = dtype
        self.pipeline_groups = tuple(pipeline_groups)
        self._shared = [tied for g in self.groups for tied in g.shared]
        self._total_mask: Tensor | None = None

    @property
    def total_mask(self) -> Tensor:
        """Which entries of :meth:`per_tensor_powsums` enter the global norm (bool, 1-D).

        Made on the device at the first use (a copy from the host, once per plan).
        """
        if self._total_mask is None:
            self._total_mask = torch.tensor(
                [not tied for tied in self._shared], dtype=torch.bool, device=self.device
            )
        return self._total_mask

    @classmethod
    def build(
        cls,
        params: Iterable[Tensor],
        *,
        model: torch.nn.Module | None = None,
        pipeline_groups: Any = None,
    ) -> ReductionPlan:
        """Classify every parameter by layout and group them (once, not per step).

        Args:
            params: the parameters whose gradients are clipped.
            model: the FSDP1 root module, needed when FSDP1 manages the parameters.
            pipeline_groups: process group(s) across which the stages' norms are
                summed (one rank per stage), for pipeline parallelism.
        """
        params = list(params)
        pipeline = as_group_list(pipeline_groups)
        fsdp1 = (
            fsdp1_groups(model) if model is not None and any(map(is_fsdp1_param, params)) else None
        )
        dims_in_use = mesh_dims_in_use(params)
        by_group: dict[tuple[str, int], tuple[str, Any, list[Tensor], list[bool], list[bool]]] = {}
        for param in params:
            placement = classify(
                param, fsdp1=fsdp1, fold_into_root=not pipeline, dims_in_use=dims_in_use
            )
            key = (
                placement.kind if placement.process_group is None else "sharded",
                id(placement.process_group),
            )
            entry = by_group.setdefault(key, (placement.kind, placement.process_group, [], [], []))
            entry[2].append(param)
            entry[3].append(placement.counted)
            entry[4].append(placement.shared)
        groups = [
            GradGroup(kind, tuple(ps), tuple(lead), tuple(tied), pg)
            for kind, pg, ps, lead, tied in by_group.values()
        ]
        device = params[0].device if params else torch.device("cpu")
        if device.type == "meta":
            raise ValueError("distclip: parameters on the meta device have no gradients to clip")
        dtype = accumulation_dtype([p.dtype for p in params])
        return cls(groups, device, dtype, pipeline)

    @property
    def num_collectives(self) -> int:
        """All-reduces per step: one per distinct process group, plus one per pipeline group."""
        return sum(g.process_group is not None for g in self.groups) + len(self.pipeline_groups)

    def grads(self) -> list[Tensor]:
        """Every local gradient tensor that exists this step (what scaling touches)."""
        return [grad for group in self.groups for grad in group.grads()]

    def total_norm(self, norm_type: float, *, foreach: bool | None = None) -> Tensor:
        """The global ``norm_type``-norm of all gradients (0-dim, no host sync).

        One local power sum per group, one all-reduce per distinct process group,
        the replicated group added once, pipeline groups summed, one root.
        """
        if len(self.groups) == 1 and self.num_collectives == 0:  # nothing to combine
            return local_norm(
                self.groups[0].counted_grads(),
                norm_type,
                device=self.device,
                dtype=self.dtype,
                foreach=foreach,
            )
        powsums: list[Tensor] = []
        for group in self.groups:
            local = local_powsum(
                group.counted_grads(),
                norm_type,
                device=self.device,
                dtype=self.dtype,
                foreach=foreach,
            )
            if group.process_group is not None:
                local = all_reduce_powsum(local, norm_type, group.process_group)
            powsums.append(local)
        if not powsums:
            total = torch.zeros((), device=self.device, dtype=self.dtype)
        else:
            total = combine_powsums(powsums, norm_type)
        for pipeline_group in self.pipeline_groups:
            total = all_reduce_powsum(total, norm_type, pipeline_group)
        return powsum_to_norm(total, norm_type)

    @property
    def params(self) -> tuple[Tensor, ...]:
        """Every parameter, in the order of :meth:`per_tensor_norms`."""
        return tuple(p for group in self.groups for p in group.params)

    def per_tensor_powsums(
        self, norm_type: float, *, of: str = "grad", foreach: bool | None = None
    ) -> Tensor:
        """Each parameter's power sum over all its shards (1-D, order of :attr:`params`).

        ``of="grad"`` measures the gradients, ``of="param"`` the parameters themselves.
        One local vector per group (a missing gradient, or a copy another rank
        counts, contributes 0), one vector all-reduce per distinct process group.
        No host sync. An entry is the same on every rank holding that parameter;
        tied copies get their own norm (:attr:`total_mask` keeps them out of the total).
        """
        parts: list[Tensor] = []
        for group in self.groups:
            tensors = []
            for param, lead in zip(group.params, group.leader, strict=True):
                source = param.grad if of == "grad" else param  # callers run under no_grad
                tensors.append(_local(source) if source is not None and lead else _EMPTY)
            local = tensor_powsums(
                tensors, norm_type, device=self.device, dtype=self.dtype, foreach=foreach
            )
            if group.process_group is not None:
                local = all_reduce_powsum(local, norm_type, group.process_group)
            parts.append(local)
        if not parts:
            return torch.zeros(0, device=self.device, dtype=self.dtype)
        return torch.cat(parts)

    def total_from_powsums(self, powsums: Tensor, norm_type: float) -> Tensor:
        """The global norm from :meth:`per_tensor_powsums` (pipeline groups summed)."""
        counted = powsums
        if any(self._shared):  # tied copies have their own norm but no part in the total
            counted = torch.where(self.total_mask, powsums, 0.0)
        if counted.numel() == 0:
            total = torch.zeros((), device=self.device, dtype=self.dtype)
        else:
            total = counted.amax() if math.isinf(norm_type) else counted.sum()
        for pipeline_group in self.pipeline_groups:
            total = all_reduce_powsum(total, norm_type, pipeline_group)
        return powsum_to_norm(total, norm_type)

    def describe(self) -> list[dict[str, Any]]:
        """One row per group: kind, number of parameters, counted here, reduced or not."""
        return [
            {
                "kind": g.kind,
                "num_params": len(g.params),
                "num_counted": len(g.counted),
                "reduced": g.process_group is not None,
                "group_size": dist.get_world_size(g.process_group)
                if g.process_group is not None
                else 1,
            }
            for g in self.groups
        ]
