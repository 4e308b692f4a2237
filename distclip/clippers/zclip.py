"""ZClip (Kumar et al. 2025): clip norm spikes detected by a z-score against an EMA."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from distclip._checks import is_real, refuse_meta
from distclip.clippers.config import (
    ClipConfig,
    check_choice,
    check_int,
    check_positive_finite,
)
from distclip.clippers.kinds import GlobalFactorClipper
from distclip.clippers.registry import register_method
from distclip.clippers.state import MethodState
from distclip.reduction import ReductionPlan
from distclip.window import COUNT_DTYPES

__all__ = ["ZClip", "ZClipConfig"]

ZCLIP_MODES = ("adaptive_scaling", "mean")


@dataclass(frozen=True)
class ZClipConfig(ClipConfig):
    """Options of ZClip (plus the common ones of :class:`ClipConfig`).

    Attributes:
        alpha: EMA decay of the norm's mean and variance, in (0, 1) (default 0.97).
        z_thresh: z-score above which a norm is a spike, > 0 (default 2.5).
        warmup_steps: finite norms that initialise the mean and variance before any
            clipping, an integer >= 1 (default 25).
        max_norm: an absolute cap on the threshold, or None (default: no cap).
        mode: ``"adaptive_scaling"`` (default: the further the spike, the lower the
            threshold) or ``"mean"`` (clip spikes to the mean).
    """

    alpha: float = 0.97
    z_thresh: float = 2.5
    warmup_steps: int = 25
    max_norm: float | None = None
    mode: str = "adaptive_scaling"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not is_real(self.alpha):
            raise TypeError(f"alpha must be a real number in (0, 1), got {self.alpha!r}")
        if not 0.0 < float(self.alpha) < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha!r}")
        self._set("alpha", float(self.alpha))
        self._set("z_thresh", check_positive_finite("z_thresh", self.z_thresh))
        check_int("warmup_steps", self.warmup_steps, minimum=1)
        self._set("max_norm", check_positive_finite("max_norm", self.max_norm, allow_none=True))
        check_choice("mode", self.mode, ZCLIP_MODES)


@register_method("zclip", config=ZClipConfig, class_prefix="ZClipped")
class ZClip(GlobalFactorClipper):
    r"""ZClip: EMA z-score spike detection on the global norm, rank-consistent and checkpointed.

    The first ``warmup_steps`` finite norms are collected without clipping; their
    mean and (population) variance initialise :math:`\mu` and :math:`v`. Afterwards,
    with :math:`\sigma = \sqrt{v}` and :math:`z = (n - \mu) / (\sigma + \epsilon)`:

    * if :math:`z > z_{thr}`: :math:`\tau = \mu + z_{thr} \sigma \cdot z_{thr} / z`
      (``mode="adaptive_scaling"``) or :math:`\tau = \mu` (``mode="mean"``);
      otherwise :math:`\tau = \infty`; then :math:`\tau = \min(\tau, \text{max\_norm})`;
    * :math:`c = \min(1, \tau / (n + \epsilon))`;
    * the EMA is updated with the z-clipped norm :math:`n' = \min(n, \tau_z)` (the
      spike rule's threshold, before the absolute cap):
      :math:`\mu \leftarrow \alpha\mu + (1-\alpha) n'`,
      :math:`v \leftarrow \alpha v + (1-\alpha)(n' - \mu)^2` (with the updated :math:`\mu`).

    NaN/inf norms change nothing (the published code is poisoned by one). State:
    warm-up buffer, count, :math:`\mu`, :math:`v`, all saved in checkpoints.
    """

    config: ZClipConfig
    state: ZClipState

    def _make_state(self, plan: ReductionPlan) -> ZClipState:
        return ZClipState(self.config.warmup_steps, device=plan.device, dtype=plan.dtype)

    def threshold(self, total_norm: Tensor, finite: Tensor) -> Tensor:
        cfg, st = self.config, self.state
        norm = total_norm.to(st.mean.dtype)
        in_warmup = st.num_seen < cfg.warmup_steps
        # Warm-up: collect the norm; the step that fills the buffer initialises mu, v.
        position = st.num_seen.clamp(max=cfg.warmup_steps - 1).reshape(1)
        collect = finite & in_warmup
        current = st.warmup_norms.gather(0, position)
        st.warmup_norms.scatter_(0, position, torch.where(collect, norm.reshape(1), current))
        st.num_seen.add_(finite.to(torch.long))
        completes = collect & (st.num_seen == cfg.warmup_steps)
        mean = torch.where(completes, st.warmup_norms.mean(), st.mean)
        var = torch.where(completes, st.warmup_norms.var(unbiased=False), st.var)
        # After warm-up: z-score against the EMA as it was before this step.
        active = finite & ~in_warmup
        std = var.sqrt()
        z = (norm - mean) / (std + cfg.eps)
        spike = active & (z > cfg.z_thresh)
        if cfg.mode == "mean":
            spike_threshold = mean
        else:
            spike_threshold = mean + cfg.z_thresh * std * cfg.z_thresh / z
        inf = torch.full_like(norm, math.inf)
        z_threshold = torch.where(spike, spike_threshold, inf)
        clipped_norm = torch.minimum(norm, z_threshold)
        new_mean = cfg.alpha * mean + (1.0 - cfg.alpha) * clipped_norm
        new_var = cfg.alpha * var + (1.0 - cfg.alpha) * (clipped_norm - new_mean) ** 2
        st.mean.copy_(torch.where(active, new_mean, mean))
        st.var.copy_(torch.where(active, new_var, var))
        threshold = z_threshold
        if cfg.max_norm is not None:
            threshold = threshold.clamp(max=cfg.max_norm)
        return threshold.to(total_norm.dtype)

    # The EMA's tensors, as earlier releases exposed them on the clipper.
    @property
    def mean(self) -> Tensor:
        """The EMA of the norm's mean."""
        return self.state.mean

    @property
    def var(self) -> Tensor:
        """The EMA of the norm's variance."""
        return self.state.var

    @property
    def num_seen(self) -> Tensor:
        """Finite norms seen so far."""
        return self.state.num_seen

    @property
    def warmup_norms(self) -> Tensor:
        """The warm-up buffer."""
        return self.state.warmup_norms


class ZClipState(MethodState):
    """ZClip's state: the warm-up buffer, the count of finite norms, the EMA's mean and variance."""

    _KEYS = ("warmup_norms", "num_seen", "mean", "var")

    def __init__(self, warmup_steps: int, *, device: torch.device, dtype: torch.dtype) -> None:
        self.warmup_steps = warmup_steps
        self.warmup_norms = torch.zeros(warmup_steps, device=device, dtype=dtype)
        self.num_seen = torch.zeros((), device=device, dtype=torch.long)
        self.mean = torch.zeros((), device=device, dtype=dtype)
        self.var = torch.zeros((), device=device, dtype=dtype)

    def state_dict(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in self._KEYS}

    def validate_state_dict(self, state: dict[str, Any]) -> None:
        size = self.warmup_steps
        expected = {"warmup_norms": (size,), "num_seen": (), "mean": (), "var": ()}
        for key, shape in expected.items():
            value = state.get(key)
            if not isinstance(value, Tensor) or tuple(value.shape) != shape:
                raise ValueError(
                    f"a zclip state needs '{key}' as a tensor of shape {shape} "
                    f"(warmup_steps={size}), got {value!r:.80}"
                )
            refuse_meta(f"zclip {key!r}", value)
            integer = key == "num_seen"
            if integer and value.dtype not in COUNT_DTYPES:
                raise ValueError(f"zclip 'num_seen' must be an integer tensor, got {value.dtype}")
            if not integer and not value.is_floating_point():
                raise ValueError(
                    f"zclip {key!r} must be a floating-point tensor, got {value.dtype}"
                )
        num_seen = int(state["num_seen"])
        if num_seen < 0:
            raise ValueError(f"zclip 'num_seen' must be an integer >= 0, got {num_seen}")
        dtype = self.mean.dtype
        valid = state["warmup_norms"][: min(num_seen, size)].to(dtype)
        mean, var = state["mean"].to(dtype), state["var"].to(dtype)
        if not bool(torch.isfinite(valid).all() & torch.isfinite(mean) & torch.isfinite(var)):
            raise ValueError(
                f"a zclip state must hold finite numbers (in {dtype}): 'mean', 'var' and the "
                "valid 'warmup_norms' entries; got a NaN or inf"
            )
        if bool(var < 0):
            raise ValueError(f"zclip 'var' must be >= 0, got {float(var)}")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device, dtype = self.mean.device, self.mean.dtype
        for key in ("warmup_norms", "mean", "var"):
            setattr(self, key, state[key].detach().to(device, dtype, copy=True))
        self.num_seen = state["num_seen"].detach().to(device, torch.long, copy=True)

    def reset(self) -> None:
        for tensor in (self.warmup_norms, self.num_seen, self.mean, self.var):
            tensor.zero_()

    def tensors(self) -> list[Tensor]:
        return [getattr(self, key) for key in self._KEYS]

    def finite_count(self) -> Tensor | None:
        return self.num_seen

    @staticmethod
    def saved_finite_count(state: dict[str, Any]) -> int | None:
        return int(state["num_seen"])
