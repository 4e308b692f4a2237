"""Adaptive gradient clipping (Brock et al. 2021, NFNets): per-unit, relative to the weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from distclip.clippers.base import Clipper
from distclip.clippers.config import ClipConfig, check_positive_finite
from distclip.functional import powsum_to_norm
from distclip.reduction import ReductionPlan, is_dtensor, local_tensor

__all__ = ["AGC", "AGCConfig"]

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

    def _apply(
        self, plan: ReductionPlan, total_norm: Tensor, finite: Tensor, measured: Any
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        self._check_layout(plan)
        lam, eps = self.config.clip_factor, self.config.eps
        vector_norms: tuple[Tensor, Tensor] | None = None
        if self._reduce_vectors:
            vector_norms = (
                powsum_to_norm(plan.per_tensor_powsums(2.0, of="grad"), 2.0),
                powsum_to_norm(plan.per_tensor_powsums(2.0, of="param"), 2.0),
            )
        smallest = torch.ones((), device=total_norm.device, dtype=total_norm.dtype)
        for index, param in enumerate(plan.params):
            if param.grad is None:
                continue
            grad, weight = local_tensor(param.grad), local_tensor(param.detach())
            if grad.numel() == 0:
                continue
            acc = torch.promote_types(torch.float32, grad.dtype)
            if grad.dim() >= 2:
                grad_norm = torch.linalg.vector_norm(grad.flatten(1), dim=1, dtype=acc)
                weight_norm = torch.linalg.vector_norm(weight.flatten(1), dim=1, dtype=acc)
                shape = (-1,) + (1,) * (grad.dim() - 1)
            elif vector_norms is not None:
                grad_norm = vector_norms[0][index].to(grad.device, acc)
                weight_norm = vector_norms[1][index].to(grad.device, acc)
                shape = ()
            else:
                grad_norm = torch.linalg.vector_norm(grad, dtype=acc)
                weight_norm = torch.linalg.vector_norm(weight, dtype=acc)
                shape = ()
            allowed = weight_norm.clamp(min=eps) * lam
            factor = torch.where(
                grad_norm > allowed, allowed / grad_norm.clamp(min=_GRAD_FLOOR), 1.0
            )
            factor = torch.where(finite.to(factor.device), factor, 1.0)
            grad.mul_(factor.reshape(shape).to(grad.dtype))
            smallest = torch.minimum(smallest, factor.amin().to(smallest.device, smallest.dtype))
        threshold = torch.full_like(total_norm, lam)
        return threshold, smallest.to(total_norm.dtype), None
