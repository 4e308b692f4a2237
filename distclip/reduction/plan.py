"""The reduction plan: which gradient lives where, decided once per clipper.

A plan groups the parameters by layout (see :mod:`distclip.reduction.layouts`): a
replicated group, reduced by nobody, and one group per distinct process group (or set
of groups, for an explicit layout) that sharded gradients are reduced over. Each step
it computes one local power sum per group (foreach kernels, fp32 accumulation), issues
exactly one all-reduce per distinct process group (SUM; MAX for the inf-norm, MIN for
-inf), adds the replicated contribution once, all-reduces the result over the pipeline
groups if any, and takes the root once. Every rank joins every collective whether or
not it holds gradients this step.

A plan measures the gradients of its parameters (``of="grad"``, what the clippers
use) or the tensors it was built from (``of="value"``: ``get_total_norm``'s
contract, the tensors being gradients whose layout is read from the parameter that
owns them).
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
    powsum_identity,
    powsum_to_norm,
    reduce_op,
    tensor_powsums,
)
from distclip.reduction.collectives import all_reduce_powsum
from distclip.reduction.layouts import (
    Placement,
    as_group_list,
    classify,
    flat_shard_pieces,
    fsdp1_groups,
    grad_owners,
    is_dtensor,
    mesh_dims_in_use,
    model_params,
)
from distclip.reduction.marks import check_layout_covers, get_layout

__all__ = ["GradGroup", "ReductionPlan"]


_EMPTY = torch.zeros(0)


def _local(grad: Tensor) -> Tensor:
    return grad._local_tensor if is_dtensor(grad) else grad  # type: ignore[attr-defined, no-any-return]


def _groups_of(process_group: Any) -> tuple[Any, ...]:
    """The process groups a :class:`GradGroup` reduces over, in order (empty: none)."""
    if process_group is None:
        return ()
    return process_group if isinstance(process_group, tuple) else (process_group,)


def _reduce(powsum: Tensor, norm_type: float, process_group: Any) -> Tensor:
    """All-reduce ``powsum`` over each group of ``process_group`` in turn."""
    for group in _groups_of(process_group):
        powsum = all_reduce_powsum(powsum, norm_type, group)
    return powsum


def _ranks_per_stage(pipeline_groups: Sequence[Any]) -> int:
    """How many ranks one copy of the model spans: the world over the pipeline stages."""
    stages = math.prod(dist.get_world_size(g) for g in pipeline_groups)
    return dist.get_world_size() // stages


def _group_key(placement: Placement) -> tuple[str, tuple[int, ...]]:
    """Parameters with equal keys share one reduction (one all-reduce per distinct group)."""
    groups = _groups_of(placement.process_group)
    return (placement.kind if not groups else "sharded", tuple(map(id, groups)))


@dataclass(frozen=True)
class GradGroup:
    """Parameters whose power sums are reduced over one process group.

    ``process_group`` is ``None`` for the replicated group (nothing to reduce), one
    process group, or a tuple of them reduced in turn (an explicit layout sharded
    along several dimensions). ``params`` are all of them (every one is scaled).
    ``counts_here[i]``: this rank's local part of ``params[i]`` enters the reduction (one
    copy of replicated data does); ``shared[i]``: a tied copy, left out of the global
    norm. ``of`` says what is measured and scaled: ``"grad"``, each parameter's
    ``.grad``; ``"value"``, the tensors in ``params`` themselves (gradients).
    """

    kind: str
    params: tuple[Tensor, ...]
    counts_here: tuple[bool, ...]
    shared: tuple[bool, ...]
    process_group: Any = None
    of: str = "grad"
    #: Per parameter, the padding-free pieces of an FSDP1 flat shard (``None``: whole).
    pieces: tuple[tuple[tuple[int, int], ...] | None, ...] = ()

    def _measured(self, param: Tensor) -> Tensor | None:
        if self.of != "grad":
            return param
        # A non-leaf tensor (FSDP1's unsharded views after a forward) has no .grad, and
        # reading it warns.
        return param.grad if param.is_leaf or param.retains_grad else None

    def _parts(self, index: int, tensor: Tensor, exclude_padding: bool) -> list[Tensor]:
        """``tensor`` (the local gradient of ``params[index]``), without FSDP1's padding."""
        pieces = self.pieces[index] if exclude_padding and self.pieces else None
        if pieces is None:
            return [tensor]
        flat = tensor.reshape(-1)
        return [flat.narrow(0, offset, numel) for offset, numel in pieces]

    @property
    def counted(self) -> tuple[Tensor, ...]:
        """The parameters whose local part counts in the global norm on this rank."""
        return tuple(
            p
            for p, lead, tied in zip(self.params, self.counts_here, self.shared, strict=True)
            if lead and not tied
        )

    def grads(self) -> list[Tensor]:
        """The local gradient tensors of this group that exist this step."""
        measured = (self._measured(p) for p in self.params)
        return [_local(t) for t in measured if t is not None]

    def counted_grads(self, *, exclude_padding: bool = False) -> list[Tensor]:
        """The local gradients that count in the global norm on this rank.

        With ``exclude_padding``, FSDP1 flat shards are given as views of their real
        elements (what norms with a negative p need).
        """
        out: list[Tensor] = []
        for index, (param, lead, tied) in enumerate(
            zip(self.params, self.counts_here, self.shared, strict=True)
        ):
            measured = self._measured(param) if lead and not tied else None
            if measured is not None:
                out.extend(self._parts(index, _local(measured), exclude_padding))
        return out


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
        #: Values derived from the layout once, by whoever needs them (index tensors).
        self.cache: dict[Any, Any] = {}

    @property
    def total_mask(self) -> Tensor:
        """Which entries of :meth:`per_tensor_powsums` enter the global norm (made once).

        Made on first use, not when the plan is built: a plan built for one call (the
        functional drop-ins) then copies nothing from the host.
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
        of: str = "grad",
    ) -> ReductionPlan:
        """Classify every parameter by layout and group them (once, not per step).

        Args:
            params: the parameters whose gradients are clipped; with ``of="value"``,
                the tensors (gradients) to measure themselves.
            model: the FSDP1 root module, needed when FSDP1 manages the parameters.
                With ``of="value"`` each tensor's layout is that of the parameter of
                ``model`` whose ``.grad`` it is, and every process group ``model``'s
                gradients are reduced over is joined even if no tensor of it is given.
            pipeline_groups: process group(s) across which the stages' norms are
                summed (one rank per stage), for pipeline parallelism.
            of: ``"grad"`` (measure and scale ``param.grad``) or ``"value"``.

        Raises:
            ValueError: FSDP1 parameters without ``model=``; an explicit layout whose
                groups do not cover the job; parameters on the meta device.
        """
        tensors = list(params)
        pipeline = as_group_list(pipeline_groups)
        owners: dict[int, Tensor] = {}
        joined: list[Tensor] = []  # parameters whose reductions every rank must join
        if of == "value" and model is not None:
            owners = grad_owners(model)
            joined = model_params(model)
        sources = [owners.get(id(t), t) for t in tensors]
        layout_of = [*joined, *sources]
        fsdp1 = fsdp1_groups(model) if model is not None else None
        dims_in_use = mesh_dims_in_use(layout_of)
        by_group: dict[tuple[str, tuple[int, ...]], tuple[Placement, list[Any]]] = {}
        for position, source in enumerate(layout_of):
            layout = get_layout(source)
            if layout is not None:
                check_layout_covers(layout, _ranks_per_stage(pipeline))
            placement = classify(
                source, fsdp1=fsdp1, fold_into_root=not pipeline, dims_in_use=dims_in_use
            )
            entry = by_group.setdefault(_group_key(placement), (placement, []))
            if position >= len(joined):
                entry[1].append((tensors[position - len(joined)], placement, source))
        groups = [
            GradGroup(
                first.kind,
                tuple(t for t, _, _ in members),
                tuple(p.counted for _, p, _ in members),
                tuple(p.shared for _, p, _ in members),
                first.process_group,
                of,
                tuple(flat_shard_pieces(source) for _, _, source in members),
            )
            for first, members in by_group.values()
        ]
        device = tensors[0].device if tensors else torch.device("cpu")
        if device.type == "meta":
            raise ValueError("distclip: parameters on the meta device have no gradients to clip")
        dtype = accumulation_dtype([t.dtype for t in tensors])
        return cls(groups, device, dtype, pipeline)

    @property
    def num_collectives(self) -> int:
        """All-reduces per step: one per distinct process group, plus one per pipeline group."""
        return sum(len(_groups_of(g.process_group)) for g in self.groups) + len(
            self.pipeline_groups
        )

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
                self.groups[0].counted_grads(exclude_padding=norm_type < 0),
                norm_type,
                device=self.device,
                dtype=self.dtype,
                foreach=foreach,
            )
        powsums: list[Tensor] = []
        for group in self.groups:
            local = local_powsum(
                group.counted_grads(exclude_padding=norm_type < 0),
                norm_type,
                device=self.device,
                dtype=self.dtype,
                foreach=foreach,
            )
            powsums.append(_reduce(local, norm_type, group.process_group))
        if not powsums:
            total = torch.full((), powsum_identity(norm_type), device=self.device, dtype=self.dtype)
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
        device, dtype = self.device, self.dtype
        for group in self.groups:
            tensors: list[list[Tensor]] = []
            for index, (param, lead) in enumerate(
                zip(group.params, group.counts_here, strict=True)
            ):
                source = param.grad if of == "grad" else param  # callers run under no_grad
                if source is None or not lead:
                    tensors.append([_EMPTY])
                else:
                    tensors.append(group._parts(index, _local(source), norm_type < 0))
            if all(len(t) == 1 for t in tensors):
                local = tensor_powsums(
                    [t[0] for t in tensors], norm_type, device=device, dtype=dtype, foreach=foreach
                )
            else:  # FSDP1 flat shards in pieces (a negative p): one power sum per parameter
                local = torch.stack(
                    [
                        local_powsum(t, norm_type, device=device, dtype=dtype, foreach=foreach)
                        for t in tensors
                    ]
                )
            parts.append(_reduce(local, norm_type, group.process_group))
        if not parts:
            return torch.zeros(0, device=self.device, dtype=self.dtype)
        return torch.cat(parts)

    def total_from_powsums(self, powsums: Tensor, norm_type: float) -> Tensor:
        """The global norm from :meth:`per_tensor_powsums` (pipeline groups summed)."""
        counted = powsums
        if any(self._shared):  # tied copies have their own norm but no part in the total
            counted = torch.where(self.total_mask, powsums, powsum_identity(norm_type))
        if counted.numel() == 0:
            total = torch.full((), powsum_identity(norm_type), device=self.device, dtype=self.dtype)
        else:
            op = reduce_op(norm_type)
            total = (
                counted.amax() if op == "max" else counted.amin() if op == "min" else counted.sum()
            )
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
                "group_size": math.prod(
                    dist.get_world_size(pg) for pg in _groups_of(g.process_group)
                ),
            }
            for g in self.groups
        ]
