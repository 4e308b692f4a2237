"""Adaptive gradient clipping (Brock et al. 2021, NFNets): per-unit, relative to the weights."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from distclip.clippers.base import Clipper
from distclip.clippers.config import ClipConfig, check_positive_finite
from distclip.clippers.elementwise import (
    AllReduce,
    TensorFragment,
    fragment_step,
    observe_for_fragments,
    record_fragments,
)
from distclip.clippers.stats import ClipStats
from distclip.functional import accumulation_dtype, powsum_to_norm, scale_each_, tensor_powsums
from distclip.reduction import ReductionPlan, get_layout, is_dtensor, local_tensor

__all__ = ["AGC", "AGCConfig", "RowPlan"]

#: Floor on a unit's gradient norm in the division (as timm's implementation).
_GRAD_FLOOR = 1e-6


@dataclass(frozen=True)
class AGCConfig(ClipConfig):
    """Options of AGC (plus the common ones of :class:`ClipConfig`).

    Attributes:
        clip_factor: :math:`\\lambda`, the largest allowed ratio of a unit's gradient
            norm to its weight norm, > 0 (default 0.01).
        eps: the floor on a unit's weight norm, ``max(||W_row||, eps)`` (default 1e-3).
    """

    clip_factor: float = 0.01
    eps: float = 1e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set("clip_factor", check_positive_finite("clip_factor", self.clip_factor))


def _splits_only_rows(param: Tensor) -> bool:
    """True when every shard of ``param`` holds whole rows (or it is not split at all)."""
    if not is_dtensor(param):
        return True
    for placement in param.placements:  # type: ignore[attr-defined]
        if not placement.is_replicate() and getattr(placement, "dim", None) != 0:
            return False
    return True


def _by_width(rows: list[tuple[Tensor, Tensor]]) -> list[list[tuple[Tensor, Tensor]]]:
    """Group (rows, width) views by (device, dtype, width): each group is one matrix."""
    groups: dict[tuple[torch.device, torch.dtype, int, torch.dtype], list[tuple[Tensor, Tensor]]]
    groups = {}
    for grad, weight in rows:
        key = (grad.device, grad.dtype, grad.shape[1], weight.dtype)
        groups.setdefault(key, []).append((grad, weight))
    return list(groups.values())


def _agc_factor(
    grad_norm: Tensor, weight_norm: Tensor, lam: float, eps: float, finite: Tensor
) -> Tensor:
    """Each unit's factor ``min(1, lam * max(||W||, eps) / ||G||)``; 1 on a skipped step."""
    allowed = weight_norm.clamp(min=eps) * lam
    factor = torch.where(grad_norm > allowed, allowed / grad_norm.clamp(min=_GRAD_FLOOR), 1.0)
    return torch.where(finite.to(factor.device), factor, 1.0)


class RowPlan(NamedTuple):
    """Where the AGC units (rows) of a set of fragments lie: see :meth:`AGC.fragment_plan`.

    Attributes:
        pieces: ``(buffer, offset, rows, width, first_row)`` per run of one or more
            whole or partial rows inside one fragment: ``rows`` rows of ``width``
            elements from ``offset`` in flat buffer ``buffer``, the first being row
            ``first_row`` of the step's row vector.
        row_index: the row of each element of the concatenated per-row partial sums of
            the pieces (int64).
        num_rows: how many rows (units) the whole tensors have together.
    """

    pieces: list[tuple[int, int, int, int, int]]
    row_index: Tensor
    num_rows: int


class AGC(Clipper):
    r"""AGC: each unit's gradient is bounded relative to its weight.

    A unit is an output row of a weight with 2 or more dimensions (``W[i]``) and the
    whole tensor for vectors and scalars (biases, gains), as in NFNets and timm. With
    :math:`r = \|G_u\| / \max(\|W_u\|, \text{eps})`:
    if :math:`r > \lambda`: :math:`G_u \leftarrow G_u \cdot \lambda \max(\|W_u\|, \text{eps}) / \|G_u\|`.

    Layouts: rows must be whole on a rank (a single process, DDP, FSDP2 ``Shard(0)``,
    row-wise tensor parallel); vectors split across ranks get their norms from one
    vector all-reduce per group. FSDP1 flat shards and column-split tensors are
    refused at construction. ``last_clip.clip_coef`` is this rank's smallest unit
    factor; ``num_clipped`` is not counted (it would need another reduction).
    """

    method = "agc"
    supports_external_norm = False
    class_prefix = "AGCClipped"
    config_cls = AGCConfig
    config: AGCConfig

    def _init_state(self, plan: ReductionPlan) -> None:
        self._checked_plan: ReductionPlan | None = None
        self._positions: dict[tuple[int, ...], Tensor] = {}
        self._check_layout(plan)

    def _check_layout(self, plan: ReductionPlan) -> None:
        """Refuse layouts that split rows; note whether vectors need a reduction (once per plan)."""
        if self._checked_plan is plan:
            return
        for group in plan.groups:
            for param in group.params:
                if group.kind == "fsdp1":
                    raise NotImplementedError(
                        "distclip: method 'agc' cannot run on FSDP1: its flat shards split "
                        "weight rows across ranks. Use FSDP2 (fully_shard, rows stay whole), "
                        "DDP or a single process."
                    )
                layout = get_layout(param)
                if param.dim() >= 2 and layout is not None and layout.sharded_over:
                    raise NotImplementedError(
                        "distclip: method 'agc' needs every weight row whole on a rank, but a "
                        f"parameter of shape {tuple(param.shape)} has an explicit sharded "
                        "layout (mark_layout), which does not say along which dimension it "
                        "is split. Use FSDP2 Shard(0) or row-wise tensor parallel (DTensor), "
                        "DDP or a single process."
                    )
                if param.dim() >= 2 and not _splits_only_rows(param):
                    raise NotImplementedError(
                        "distclip: method 'agc' needs every weight row whole on a rank, but a "
                        f"parameter of shape {tuple(param.shape)} is split along another "
                        f"dimension ({tuple(param.placements)}, e.g. column-wise tensor "  # type: ignore[attr-defined]
                        "parallel). Use FSDP2 Shard(0), row-wise tensor parallel, DDP or a "
                        "single process."
                    )
        self._reduce_vectors = any(
            group.process_group is not None and param.dim() < 2
            for group in plan.groups
            for param in group.params
        )
        self._checked_plan = plan
        self._positions = {}

    def _apply(
        self, plan: ReductionPlan, total_norm: Tensor, finite: Tensor, measured: Any
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        self._check_layout(plan)
        lam, eps = self.config.clip_factor, self.config.eps
        rows: list[tuple[Tensor, Tensor]] = []  # (grad, weight) as (rows, width) views
        whole: list[tuple[int, Tensor, Tensor]] = []  # (index in plan.params, grad, weight)
        for index, param in enumerate(plan.params):
            if param.grad is None:
                continue
            # The parameter itself, not .detach(): under no_grad nothing is recorded, and
            # a detach per tensor is an op per tensor.
            grad, weight = local_tensor(param.grad), local_tensor(param)
            if grad.numel() == 0:
                continue
            if grad.dim() > 2:
                rows.append((grad.flatten(1), weight.flatten(1)))
            elif grad.dim() == 2:
                rows.append((grad, weight))
            else:
                whole.append((index, grad, weight))
        acc = plan.dtype
        smallest: list[Tensor] = []
        for group in _by_width(rows):
            grads = [g for g, _ in group]
            dtype = accumulation_dtype([acc, grads[0].dtype])
            grad_norm = torch.linalg.vector_norm(torch.cat(grads), dim=1, dtype=dtype)
            weights = torch.cat([w for _, w in group])
            weight_norm = torch.linalg.vector_norm(weights, dim=1, dtype=dtype)
            factor = _agc_factor(grad_norm, weight_norm, lam, eps, finite)
            splits = factor.to(grads[0].dtype).unsqueeze(1).split([g.shape[0] for g in grads])
            scale_each_(grads, list(splits), foreach=self.config.foreach)
            smallest.append(factor.amin())
        if whole:
            if self._reduce_vectors:  # vectors split across ranks: their norms are reduced
                grad_norm = powsum_to_norm(plan.per_tensor_powsums(2.0, of="grad"), 2.0)
                weight_norm = powsum_to_norm(plan.per_tensor_powsums(2.0, of="param"), 2.0)
                chosen = self._vector_positions(plan, [i for i, _, _ in whole], grad_norm.device)
                grad_norm, weight_norm = grad_norm[chosen], weight_norm[chosen]
            else:
                grad_norm, weight_norm = (
                    powsum_to_norm(
                        tensor_powsums(
                            tensors, 2.0, device=plan.device, dtype=acc, foreach=self.config.foreach
                        ),
                        2.0,
                    )
                    for tensors in ([g for _, g, _ in whole], [w for _, _, w in whole])
                )
            factor = _agc_factor(grad_norm, weight_norm, lam, eps, finite)
            scale_each_(
                [g for _, g, _ in whole], list(factor.unbind(0)), foreach=self.config.foreach
            )
            smallest.append(factor.amin())
        threshold = torch.full_like(total_norm, lam)
        if not smallest:
            return threshold, self._one, None
        least = smallest[0] if len(smallest) == 1 else torch.stack(smallest).amin()
        return threshold, least.to(total_norm.dtype), None

    def _vector_positions(self, plan: ReductionPlan, indices: list[int], device: Any) -> Tensor:
        """The positions of the vector parameters in ``plan.params`` (an index made once)."""
        key = tuple(indices)
        cached = self._positions.get(key)
        if cached is None:
            cached = torch.tensor(indices, dtype=torch.long, device=device)
            self._positions[key] = cached
        return cached

    # ------------------------------------------------ engines with flat partitions
    @torch.no_grad()
    def observe_fragments_(self, total_norm: Tensor) -> ClipStats:
        """Record a step whose global norm an engine computed (DeepSpeed).

        The gradients are clipped afterwards by :meth:`clip_fragments_`, wherever the
        engine keeps them. ``threshold`` is ``clip_factor``; ``clip_coef`` (the
        smallest unit factor of all ranks) is completed in place by
        :meth:`clip_fragments_`; ``num_clipped`` is not counted, as in :meth:`clip_`.
        A NaN/inf ``total_norm`` counts as a skipped step and leaves the gradients
        unscaled. No host read, except with ``nonfinite="error"``.

        Raises:
            NonFiniteNormError: as in :meth:`clip_`.
        """
        return observe_for_fragments(
            self, total_norm, self.config.clip_factor, counts_clipped=False
        )

    def fragment_plan(
        self,
        shapes: Sequence[Sequence[int]],
        fragments: Sequence[TensorFragment],
        device: torch.device | None = None,
    ) -> RowPlan:
        """Cut this rank's fragments into runs of rows (computed once, reused each step).

        A unit is an output row of a tensor with 2 or more dimensions and the whole
        tensor otherwise, as in :meth:`clip_`. A fragment may start or end inside a
        row (a ZeRO partition boundary): that partial row is its own piece, and its
        partial sums are added to the other ranks' by the reduction.

        Args:
            shapes: the shape of every whole tensor the fragments belong to (the same
                list on every rank that shares the reduction).
            fragments: this rank's pieces of those tensors.
            device: where the gradients will be (the row index is made there once, so
                the steps copy nothing from the host).
        """
        first_rows, widths = [], []
        num_rows = 0
        for shape in shapes:
            numel = math.prod(shape)
            rows = shape[0] if len(shape) >= 2 else 1
            first_rows.append(num_rows)
            widths.append(numel // rows if rows else 0)
            num_rows += rows if numel else 0
        pieces: list[tuple[int, int, int, int, int]] = []
        for frag in fragments:
            width = widths[frag.tensor]
            position, end, offset = frag.start, frag.start + frag.numel, frag.offset
            while position < end:
                row, within = divmod(position, width)
                if within:  # a partial row at the start
                    count, rows = min(width - within, end - position), 1
                elif end - position >= width:  # whole rows
                    rows = (end - position) // width
                    count = rows * width
                else:  # a partial row at the end
                    count, rows = end - position, 1
                pieces.append(
                    (frag.buffer, offset, rows, count // rows, first_rows[frag.tensor] + row)
                )
                position += count
                offset += count
        index = [row + k for _, _, rows, _, row in pieces for k in range(rows)]
        return RowPlan(pieces, torch.tensor(index, dtype=torch.long, device=device), num_rows)

    @torch.no_grad()
    def clip_fragments_(
        self,
        plan: RowPlan,
        grads: Sequence[Tensor | None],
        weights: Sequence[Tensor],
        all_reduce: AllReduce | None = None,
    ) -> None:
        """Clip every unit whose pieces ``plan`` describes, as :meth:`clip_` does.

        Each unit's gradient and weight norms are taken over all its pieces on all
        ranks: this rank's per-row partial sums of squares (gradient and weight, one
        vector), summed over the ranks by ``all_reduce`` (``None``: this rank holds
        every piece), one call for the whole vector. Then, with
        ``allowed = clip_factor * max(||W_u||, eps)``, each piece of a unit with
        ``||G_u|| > allowed`` is multiplied by ``allowed / ||G_u||``. Every rank that
        shares the reduction must call this, with or without pieces.

        Args:
            plan: :meth:`fragment_plan` of this rank's fragments.
            grads: the flat gradient buffers (``None``: no gradient; those pieces
                count 0 and are not scaled).
            weights: the flat parameter buffers, laid out as ``grads``.
            all_reduce: sums a 1-D tensor over the ranks (``None``: no reduction).

        Raises:
            RuntimeError: no step was opened by :meth:`observe_fragments_`.
        """
        step = fragment_step(self)
        lam, eps = self.config.clip_factor, self.config.eps
        device = weights[0].device if weights else step.finite.device
        acc = torch.float64 if any(w.dtype == torch.float64 for w in weights) else torch.float32
        num_rows = plan.num_rows
        sums = torch.zeros(2 * num_rows, device=device, dtype=acc)
        grad_views: list[tuple[Tensor, int, int]] = []
        partial: list[Tensor] = []
        weight_partial: list[Tensor] = []
        for buffer, offset, rows, width, row in plan.pieces:
            weight = weights[buffer].narrow(0, offset, rows * width).view(rows, width)
            weight_partial.append(torch.linalg.vector_norm(weight, dim=1, dtype=acc).square())
            grad_buffer = grads[buffer]
            if grad_buffer is None:
                partial.append(torch.zeros(rows, device=device, dtype=acc))
                continue
            grad = grad_buffer.narrow(0, offset, rows * width).view(rows, width)
            partial.append(torch.linalg.vector_norm(grad, dim=1, dtype=acc).square())
            grad_views.append((grad, row, rows))
        if plan.pieces:
            index = plan.row_index.to(device)
            sums[:num_rows].index_add_(0, index, torch.cat(partial).to(device))
            sums[num_rows:].index_add_(0, index, torch.cat(weight_partial).to(device))
        if all_reduce is not None:
            sums = all_reduce(sums).to(device)
        grad_norm = powsum_to_norm(sums[:num_rows], 2.0)
        weight_norm = powsum_to_norm(sums[num_rows:], 2.0)
        allowed = weight_norm.clamp(min=eps) * lam
        factor = torch.where(grad_norm > allowed, allowed / grad_norm.clamp(min=_GRAD_FLOOR), 1.0)
        factor = torch.where(step.finite.to(device), factor, 1.0)
        for grad, row, rows in grad_views:
            grad.mul_(factor[row : row + rows].unsqueeze(1).to(grad.device, grad.dtype))
        if num_rows:
            record_fragments(self, step, factor.amin(), None)
