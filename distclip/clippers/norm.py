"""Fixed global-norm clipping, as ``torch.nn.utils.clip_grad_norm_`` but layout-correct."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from distclip.clippers.config import ClipConfig, check_positive_finite
from distclip.clippers.kinds import GlobalFactorClipper
from distclip.clippers.registry import register_method

__all__ = ["NormClip", "NormClipConfig"]


@dataclass(frozen=True)
class NormClipConfig(ClipConfig):
    """Options of fixed norm clipping (plus the common ones of :class:`ClipConfig`).

    Attributes:
        max_norm: the threshold, a positive finite number (default 1.0).
    """

    max_norm: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set("max_norm", check_positive_finite("max_norm", self.max_norm))


@register_method("norm", config=NormClipConfig, class_prefix="NormClipped")
class NormClip(GlobalFactorClipper):
    r"""Fixed global-norm clipping: :math:`c = \min(1, \text{max\_norm} / (n + \epsilon))`.

    :math:`n` is the global norm over every rank's gradients. Stateless apart from
    the step counters.

    Args:
        params: the tensors (or param groups) whose gradients are clipped.
        max_norm, norm_type, nonfinite, eps, foreach, check_every: see
            :class:`NormClipConfig` and :class:`~distclip.clippers.config.ClipConfig`.
    """

    config: NormClipConfig

    def threshold(self, total_norm: Tensor, finite: Tensor) -> Tensor:
        return torch.full_like(total_norm, self.config.max_norm)
