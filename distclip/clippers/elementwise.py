"""Clipping that needs no global threshold: value (coordinate-wise) and layer-wise."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from distclip.clippers.base import Clipper
from distclip.clippers.config import ClipConfig, check_positive_finite
from distclip.clippers.stats import ClipStats
from distclip.functional import powsum_to_norm
from distclip.reduction import ReductionPlan, local_tensor

__all__ = ["CoordinateWiseClip", "LayerWiseClip", "LayerWiseConfig", "ValueClip", "ValueConfig"]


@dataclass(frozen=True)
class ValueConfig(ClipConfig):
    """Options of value clipping (plus the common ones of :class:`ClipConfig`).

    Attributes:
        clip_value: every gradient element is clamped to ``[-clip_value, clip_value]``;
            a positive finite number (default 1.0).
    """

    clip_value: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set("clip_value", check_positive_finite("clip_value", self.clip_value))


class ValueClip(Clipper):
    r"""Value clipping: :math:`g \leftarrow \operatorname{clamp}(g, -v, v)` element by element.

    The clamp is local: it needs no communication. The global norm is still reduced
    (one scalar) for ``last_clip.total_norm`` and for skipping NaN/inf steps on every
    rank alike; on a skipped step nothing is clamped. ``last_clip.clip_coef`` is 1
    (no single factor describes an element-wise clamp) and ``num_clipped`` is not
    counted (it would need another reduction).
    """

    method = "value"
    supports_external_norm = False
    class_prefix = "ValueClipped"
    config_cls = ValueConfig
    config: ValueConfig

    def _apply(
        self, plan: ReductionPlan, total_norm: Tensor, finite: Tensor, measured: Any
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        threshold = torch.full_like(total_norm, self.config.clip_value)
        bound = torch.where(finite, threshold, torch.full_like(threshold, float("inf")))
        bounds: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}
        for grad in plan.grads():
            key = (grad.device, grad.dtype)
            if key not in bounds:
                upper = bound.to(grad.device, grad.dtype)
                bounds[key] = (-upper, upper)
            lower, upper = bounds[key]
            grad.clamp_(min=lower, max=upper)
        return threshold, torch.ones_like(total_norm), None

    @torch.no_grad()
    def observe_clamp_(self, total_norm: Tensor) -> ClipStats:
        """Record a step whose norm an engine computed and whose clamp the caller applies.

        For engines that compute the pre-clip global norm themselves (DeepSpeed): the
        norm updates the counters exactly as in :meth:`clip_` (``num_skipped`` for a
        NaN/inf norm, the consistency checks), but no gradient is touched; the caller
        clamps with :meth:`clamp_` and does not clip by the norm. The stats are those
        of :meth:`clip_`: ``threshold`` is ``clip_value``, ``clip_coef`` 1. No host
        read, except with ``nonfinite="error"``.

        Raises:
            NonFiniteNormError: as in :meth:`clip_`.
        """
        total_norm = total_norm.detach().to(self.plan.device, self.plan.dtype).reshape(())
        finite = self._finite_or_raise(total_norm)
        self._count(finite, None)
        threshold = torch.full_like(total_norm, self.config.clip_value)
        return self._finish_step(total_norm, threshold, torch.ones_like(total_norm), ~finite)

    @torch.no_grad()
    def clamp_(self, grads: Iterable[Tensor]) -> None:
        """Clamp every element of ``grads`` to ``[-clip_value, clip_value]``, in place.

        Element by element, so exact on any piece of the gradients (a flat ZeRO
        partition included); no communication, no host read.
        """
        bound = self.config.clip_value
        for grad in grads:
            grad.clamp_(min=-bound, max=bound)


class CoordinateWiseClip(ValueClip):
    """Coordinate-wise clipping (the torch-clip name of value clipping); see :class:`ValueClip`."""

    method = "coordinate_wise"
    class_prefix = "CoordinateWiseClipped"


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


class LayerWiseClip(Clipper):
    r"""Layer-wise clipping: each tensor :math:`i` by :math:`c_i = \min(1, \lambda / (\|g_i\| + \epsilon))`.

    :math:`\|g_i\|` is the tensor's norm over all its shards: one all-reduce of the
    vector of per-tensor power sums per process group (not one per tensor). The
    global norm is derived from the same vector. ``last_clip.clip_coef`` is the
    smallest :math:`c_i`; ``num_clipped`` counts steps where any tensor was clipped.
    """

    method = "layer_wise"
    supports_external_norm = False
    class_prefix = "LayerWiseClipped"
    config_cls = LayerWiseConfig
    config: LayerWiseConfig

    def _measure(self, plan: ReductionPlan) -> tuple[Tensor, Any]:
        norm_type = self.config.norm_type
        powsums = plan.per_tensor_powsums(norm_type, foreach=self.config.foreach)
        return plan.total_from_powsums(powsums, norm_type), powsums

    def _apply(
        self, plan: ReductionPlan, total_norm: Tensor, finite: Tensor, measured: Any
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        norms = powsum_to_norm(measured, self.config.norm_type)
        threshold = torch.full_like(total_norm, self.config.max_norm)
        coefs = (threshold / (norms + self.config.eps)).clamp(max=1.0)
        coefs = torch.where(finite, coefs, torch.ones_like(coefs))
        for index, param in enumerate(plan.params):
            if param.grad is not None:
                grad = local_tensor(param.grad)
                grad.mul_(coefs[index].to(grad.device))
        smallest = coefs.amin() if coefs.numel() else torch.ones_like(total_norm)
        return threshold, smallest, (coefs < 1.0).any()
