"""Pieces of gradients a piecewise clipper clips, and how their units' norms become global.

A piecewise method (:class:`~distclip.clippers.kinds.PiecewiseClipper`) sees only the
:class:`Pieces` protocol: clamp every element, get each unit's power sum over all its
pieces on all ranks (one reduction), scale each unit by a factor. Two builders:

* :class:`PlanPieces`, natively: the local gradients of a
  :class:`~distclip.reduction.ReductionPlan` (DDP replicas, FSDP2 / TP shards, FSDP1
  flat parameters, pipeline stages): per-tensor power sums come reduced from the plan;
  weight rows are whole on a rank (refused otherwise), so their norms are local;
* :class:`FlatPieces` (:mod:`distclip.clippers.flat_pieces`), for an engine that keeps
  flat buffers of fragments of several tensors (DeepSpeed's ZeRO partitions): partial
  sums per unit from this rank's fragments, one all-reduce over the engine's group.

A unit is an element (``"element"``), a whole tensor (``"tensor"``), or an output row
of a weight with 2 or more dimensions and the whole tensor otherwise (``"row"``).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor

from distclip.functional import accumulation_dtype, clamp_, scale_each_, tensor_powsums
from distclip.reduction import ReductionPlan, get_layout, is_dtensor, local_tensor

__all__ = ["UNITS", "Pieces", "PlanPieces"]

#: The units a piecewise clipper can clip by.
UNITS = ("element", "tensor", "row")


class Pieces(Protocol):
    """This rank's pieces of the gradients one piecewise clip acts on."""

    def clamp_(self, bound: float) -> None:
        """Clamp every element of every piece to ``[-bound, bound]``, in place."""

    def unit_sums(self, norm_type: float) -> Tensor:
        """Each unit's power sum of the gradients over all its pieces on all ranks (1-D)."""

    def unit_sums_with_weights(self, norm_type: float) -> tuple[Tensor, Tensor]:
        """:meth:`unit_sums` of the gradients and of the weights (the parameters), at once."""

    def scale_(self, factors: Tensor) -> None:
        """Multiply every piece of unit ``u`` by ``factors[u]`` (the order of :meth:`unit_sums`)."""


def _splits_only_rows(param: Tensor) -> bool:
    """True when every shard of ``param`` holds whole rows (or it is not split at all)."""
    if not is_dtensor(param):
        return True
    for placement in param.placements:  # type: ignore[attr-defined]
        if not placement.is_replicate() and getattr(placement, "dim", None) != 0:
            return False
    return True


class PlanPieces:
    """The local gradients of a reduction plan, as pieces of ``unit`` (built per step).

    Tensor units: each parameter's power sum over all its shards comes from
    :meth:`ReductionPlan.per_tensor_powsums` (one vector all-reduce per process group);
    the global norm is derived from the same sums. Row units: every weight row is whole
    on a rank (:meth:`check`), so a row's norm is local: the rows of all weights of one
    width are measured from one concatenation; vectors split across ranks get their
    norms from the plan's reduction. Nothing is copied from the host after the first step.
    """

    def __init__(self, plan: ReductionPlan, unit: str, *, foreach: bool | None = None) -> None:
        self.plan = plan
        self.unit = unit
        self.foreach = foreach
        self._tensor_sums: dict[tuple[float, str], Tensor] = {}
        if unit == "row":
            self._collect_rows()

    # ------------------------------------------------------------ refusals
    @staticmethod
    def check(plan: ReductionPlan, unit: str, method: str) -> None:
        """Refuse a layout whose units the plan cannot see (once per plan).

        Raises:
            NotImplementedError: row units on FSDP1 flat shards, on a weight split along
                another dimension than its rows (column-wise tensor parallel), or on a
                weight with an explicit sharded layout (which does not say along which
                dimension it is split).
        """
        if unit != "row":
            return
        for group in plan.groups:
            for param in group.params:
                if group.kind == "fsdp1":
                    raise NotImplementedError(
                        f"distclip: method {method!r} cannot run on FSDP1: its flat shards "
                        "split weight rows across ranks. Use FSDP2 (fully_shard, rows stay "
                        "whole), DDP or a single process."
                    )
                if param.dim() < 2:
                    continue
                layout = get_layout(param)
                if layout is not None and layout.sharded_over:
                    raise NotImplementedError(
                        f"distclip: method {method!r} needs every weight row whole on a rank, "
                        f"but a parameter of shape {tuple(param.shape)} has an explicit "
                        "sharded layout (mark_layout), which does not say along which "
                        "dimension it is split. Use FSDP2 Shard(0) or row-wise tensor "
                        "parallel (DTensor), DDP or a single process."
                    )
                if not _splits_only_rows(param):
                    raise NotImplementedError(
                        f"distclip: method {method!r} needs every weight row whole on a rank, "
                        f"but a parameter of shape {tuple(param.shape)} is split along "
                        f"another dimension ({tuple(param.placements)}, e.g. column-wise "  # type: ignore[attr-defined]
                        "tensor parallel). Use FSDP2 Shard(0), row-wise tensor parallel, DDP "
                        "or a single process."
                    )

    # -------------------------------------------------------------- the norm
    def total_norm(self, norm_type: float) -> Tensor:
        """The global norm of the gradients (for tensor units, from the per-tensor sums)."""
        if self.unit == "tensor":
            return self.plan.total_from_powsums(self._per_tensor(norm_type, "grad"), norm_type)
        return self.plan.total_norm(norm_type, foreach=self.foreach)

    def _per_tensor(self, norm_type: float, of: str) -> Tensor:
        """The plan's reduced per-tensor power sums of ``of`` (made once a step)."""
        sums = self._tensor_sums.get((norm_type, of))
        if sums is None:
            sums = self.plan.per_tensor_powsums(norm_type, of=of, foreach=self.foreach)
            self._tensor_sums[(norm_type, of)] = sums
        return sums

    # -------------------------------------------------------------- Pieces
    def clamp_(self, bound: float) -> None:
        clamp_(self.plan.grads(), bound, foreach=self.foreach)

    def unit_sums(self, norm_type: float) -> Tensor:
        if self.unit == "row":
            return self._row_sums(False)[0]
        return self._per_tensor(norm_type, "grad")

    def unit_sums_with_weights(self, norm_type: float) -> tuple[Tensor, Tensor]:
        if self.unit == "row":
            grads, weights = self._row_sums(True)
            assert weights is not None
            return grads, weights
        return self._per_tensor(norm_type, "grad"), self._per_tensor(norm_type, "param")

    def scale_(self, factors: Tensor) -> None:
        if self.unit == "row":
            self._scale_rows(factors)
            return
        present = [i for i, p in enumerate(self.plan.params) if p.grad is not None]
        each = factors.unbind(0)
        scale_each_(
            [local_tensor(self.plan.params[i].grad) for i in present],  # type: ignore[arg-type]
            [each[i] for i in present],
            foreach=self.foreach,
        )

    # ------------------------------------------------------------- row units
    def _collect_rows(self) -> None:
        """Sort this step's gradients into (rows, width) matrices by width, and vectors."""
        groups: dict[tuple[Any, ...], list[tuple[Tensor, Tensor]]] = {}
        self._vectors: list[tuple[int, Tensor, Tensor]] = []
        for index, param in enumerate(self.plan.params):
            if param.grad is None:
                continue
            # The parameter itself, not .detach(): under no_grad nothing is recorded, and
            # a detach per tensor is an op per tensor.
            grad, weight = local_tensor(param.grad), local_tensor(param)
            if grad.numel() == 0:
                continue
            if grad.dim() < 2:
                self._vectors.append((index, grad, weight))
                continue
            if grad.dim() > 2:
                grad, weight = grad.flatten(1), weight.flatten(1)
            key = (grad.device, grad.dtype, grad.shape[1], weight.dtype)
            groups.setdefault(key, []).append((grad, weight))
        self._row_groups = list(groups.values())
        #: The vectors' norms need the plan's reduction when some of them are split.
        self._reduce_vectors = any(
            group.process_group is not None and param.dim() < 2
            for group in self.plan.groups
            for param in group.params
        )

    def _row_sums(self, weights: bool) -> tuple[Tensor, Tensor | None]:
        acc = self.plan.dtype
        grad_parts: list[Tensor] = []
        weight_parts: list[Tensor] = []
        for group in self._row_groups:
            dtype = accumulation_dtype([acc, group[0][0].dtype])
            grads = torch.cat([g for g, _ in group])
            grad_parts.append(torch.linalg.vector_norm(grads, dim=1, dtype=dtype).square())
            if weights:
                matrix = torch.cat([w for _, w in group])
                weight_parts.append(torch.linalg.vector_norm(matrix, dim=1, dtype=dtype).square())
        if self._vectors:
            grad_parts.append(self._vector_sums("grad"))
            if weights:
                weight_parts.append(self._vector_sums("param"))
        device = self.plan.device
        grad_sums = torch.cat([p.to(device, acc) for p in grad_parts]) if grad_parts else None
        if grad_sums is None:
            grad_sums = torch.zeros(0, device=device, dtype=acc)
        if not weights:
            return grad_sums, None
        if not weight_parts:
            return grad_sums, grad_sums
        return grad_sums, torch.cat([p.to(device, acc) for p in weight_parts])

    def _vector_sums(self, of: str) -> Tensor:
        if self._reduce_vectors:  # some vectors are split across ranks: the plan reduces
            positions = self._vector_positions()
            return self._per_tensor(2.0, of).index_select(0, positions)
        tensors = [g if of == "grad" else w for _, g, w in self._vectors]
        return tensor_powsums(
            tensors, 2.0, device=self.plan.device, dtype=self.plan.dtype, foreach=self.foreach
        )

    def _vector_positions(self) -> Tensor:
        """The vectors' positions in ``plan.params`` (an index made once per plan)."""
        key = ("vector positions", *(i for i, _, _ in self._vectors))
        index = self.plan.cache.get(key)
        if index is None:
            index = torch.tensor(key[1:], dtype=torch.long, device=self.plan.device)
            self.plan.cache[key] = index
        return index  # type: ignore[no-any-return]

    def _scale_rows(self, factors: Tensor) -> None:
        sizes = [sum(g.shape[0] for g, _ in group) for group in self._row_groups]
        sizes.append(len(self._vectors))
        parts = factors.split(sizes)
        for group, part in zip(self._row_groups, parts, strict=False):
            grads = [g for g, _ in group]
            splits = part.to(grads[0].dtype).unsqueeze(1).split([g.shape[0] for g in grads])
            scale_each_(grads, list(splits), foreach=self.foreach)
        if self._vectors:
            scale_each_(
                [g for _, g, _ in self._vectors], list(parts[-1].unbind(0)), foreach=self.foreach
            )
