"""AutoClip: the threshold is a quantile of a rolling window of past global norms."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from distclip.clippers.config import (
    ClipConfig,
    check_int,
    check_positive_finite,
    check_unit_interval,
)
from distclip.clippers.kinds import GlobalFactorClipper
from distclip.clippers.registry import register_method
from distclip.clippers.state import WindowState
from distclip.reduction import ReductionPlan
from distclip.window import NormWindow

__all__ = ["AutoClip", "AutoClipConfig", "window_threshold"]


@dataclass(frozen=True)
class AutoClipConfig(ClipConfig):
    """Options of AutoClip (plus the common ones of :class:`ClipConfig`).

    Attributes:
        q: the quantile of the window used as threshold, in [0, 1] (default 0.1).
        window: how many past finite norms are kept, an integer >= 1 (default 200).
        max_norm: an absolute cap on the threshold, > 0, or None (default: no cap).
        min_norm: a floor on the threshold, > 0, or None (default: no floor).
            ``min_norm=1.0`` reproduces the published AutoClipper package, which
            floors the threshold at 1.0 without saying so.
    """

    q: float = 0.1
    window: int = 200
    max_norm: float | None = None
    min_norm: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set("q", check_unit_interval("q", self.q))
        check_int("window", self.window, minimum=1)
        self._set("max_norm", check_positive_finite("max_norm", self.max_norm, allow_none=True))
        self._set("min_norm", check_positive_finite("min_norm", self.min_norm, allow_none=True))
        if (
            self.max_norm is not None
            and self.min_norm is not None
            and self.min_norm > self.max_norm
        ):
            raise ValueError(
                f"min_norm must not exceed max_norm, got min_norm={self.min_norm!r} > "
                f"max_norm={self.max_norm!r}"
            )


def window_threshold(
    window: NormWindow, config: AutoClipConfig, total_norm: Tensor, finite: Tensor
) -> Tensor:
    """AutoClip's threshold: the finite norm enters ``window`` first, then its capped quantile."""
    window.push_(total_norm, finite)
    threshold = window.quantile(config.q).to(total_norm.dtype)
    if config.min_norm is not None or config.max_norm is not None:
        threshold = threshold.clamp(min=config.min_norm, max=config.max_norm)
    return threshold


@register_method(
    "autoclip", config=AutoClipConfig, class_prefix="AutoClipped", aliases=("auto_clip",)
)
class AutoClip(GlobalFactorClipper):
    r"""AutoClip (Seetharaman et al. 2020) with a rolling window, rank-consistent.

    At step t the global norm :math:`n_t` enters the window first (only if finite);
    then

    .. math::
        \tau_t = \min(\max(Q_q(W_t), \text{min\_norm}), \text{max\_norm}), \qquad
        c_t = \min\left(1, \frac{\tau_t}{n_t + \epsilon}\right)

    where :math:`W_t` holds the last ``window`` finite norms (this step's included) and
    :math:`Q_q` is the linearly interpolated quantile of ``torch.quantile``.
    State: the window (values + count), saved in checkpoints.

    Args:
        params: the tensors (or param groups) whose gradients are clipped.
        q, window, max_norm, min_norm, norm_type, nonfinite, eps, foreach, check_every:
            see :class:`AutoClipConfig` and :class:`~distclip.clippers.config.ClipConfig`.
    """

    config: AutoClipConfig
    state: WindowState

    def _make_state(self, plan: ReductionPlan) -> WindowState:
        return WindowState(self.config.window, device=plan.device, dtype=plan.dtype)

    def threshold(self, total_norm: Tensor, finite: Tensor) -> Tensor:
        return window_threshold(self.state.window, self.config, total_norm, finite)

    @property
    def window(self) -> NormWindow:
        """The window of past global norms (:class:`~distclip.window.NormWindow`)."""
        return self.state.window
