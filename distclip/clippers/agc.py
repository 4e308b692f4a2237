"""Adaptive gradient clipping (Brock et al. 2021, NFNets): per-unit, relative to the weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from distclip.clippers.config import ClipConfig, check_positive_finite
from distclip.clippers.kinds import PiecewiseClipper, Units
from distclip.clippers.pieces import Pieces
from distclip.clippers.registry import register_method

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


@register_method("agc", config=AGCConfig, class_prefix="AGCClipped")
class AGC(PiecewiseClipper):
    r"""AGC: each unit's gradient is bounded relative to its weight.

    A unit is an output row of a weight with 2 or more dimensions (``W[i]``) and the
    whole tensor for vectors and scalars (biases, gains), as in NFNets and timm. With
    :math:`r = \|G_u\| / \max(\|W_u\|, \text{eps})`:
    if :math:`r > \lambda`: :math:`G_u \leftarrow G_u \cdot \lambda \max(\|W_u\|, \text{eps}) / \|G_u\|`.

    Layouts: rows must be whole on a rank (a single process, DDP, FSDP2 ``Shard(0)``,
    row-wise tensor parallel); vectors split across ranks get their norms from one
    vector all-reduce per group. FSDP1 flat shards and column-split tensors are
    refused at construction. Under DeepSpeed, rows cut by a partition boundary get their
    norms from the partitions' reduction. ``last_clip.clip_coef`` is this rank's
    smallest unit factor natively (every rank's under DeepSpeed); ``num_clipped`` is
    not counted (it would need another reduction).
    """

    unit: ClassVar[str] = "row"
    counts_clipped: ClassVar[bool] = False
    config: AGCConfig

    def level(self) -> float:
        return self.config.clip_factor

    def clip_units_(self, pieces: Pieces, finite: Tensor) -> Units:
        lam, eps = self.config.clip_factor, self.config.eps
        grad_sums, weight_sums = pieces.unit_sums_with_weights(2.0)
        grad_norm, weight_norm = grad_sums.sqrt(), weight_sums.sqrt()
        allowed = weight_norm.clamp(min=eps) * lam
        factor = torch.where(grad_norm > allowed, allowed / grad_norm.clamp(min=_GRAD_FLOOR), 1.0)
        factor = torch.where(finite.to(factor.device), factor, 1.0)
        pieces.scale_(factor)
        return Units(factor.amin() if factor.numel() else None, None)
