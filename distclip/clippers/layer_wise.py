"""Layer-wise clipping (torch-clip's rule 3): each tensor by its own norm over all its shards."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from distclip.clippers.config import ClipConfig, check_positive_finite
from distclip.clippers.kinds import PiecewiseClipper, Units
from distclip.clippers.pieces import Pieces
from distclip.clippers.registry import register_method
from distclip.functional import powsum_to_norm

__all__ = ["LayerWiseClip", "LayerWiseConfig"]


@dataclass(frozen=True)
class LayerWiseConfig(ClipConfig):
    """Options of layer-wise clipping (plus the common ones of :class:`ClipConfig`).

    Attributes:
        max_norm: the bound on each parameter tensor's gradient norm (default 1.0).
    """

    max_norm: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set("max_norm", check_positive_finite("max_norm", self.max_norm))


@register_method("layer_wise", config=LayerWiseConfig, class_prefix="LayerWiseClipped")
class LayerWiseClip(PiecewiseClipper):
    r"""Layer-wise clipping: each tensor :math:`i` by :math:`c_i = \min(1, \lambda / (\|g_i\| + \epsilon))`.

    :math:`\|g_i\|` is the tensor's norm over all its shards: one all-reduce of the
    vector of per-tensor power sums per process group (not one per tensor), from which
    the global norm is derived too. ``last_clip.clip_coef`` is the smallest
    :math:`c_i`; ``num_clipped`` counts steps where any tensor was clipped.
    """

    unit: ClassVar[str] = "tensor"
    config: LayerWiseConfig

    def level(self) -> float:
        return self.config.max_norm

    def clip_units_(self, pieces: Pieces, finite: Tensor) -> Units:
        norm_type = self.config.norm_type
        norms = powsum_to_norm(pieces.unit_sums(norm_type), norm_type)
        coefs = (self.level_like(norms) / (norms + self.config.eps)).clamp(max=1.0)
        coefs = torch.where(finite.to(coefs.device), coefs, 1.0)
        pieces.scale_(coefs)
        if coefs.numel() == 0:
            return Units(None, None)
        return Units(coefs.amin(), (coefs < 1.0).any())
