"""AutoClip: the threshold is a quantile of a rolling window of past global norms."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from distclip.clippers.base import Clipper
from distclip.clippers.config import (
    ClipConfig,
    check_int,
    check_positive_finite,
    check_unit_interval,
)
from distclip.reduction import ReductionPlan
from distclip.window import NormWindow

__all__ = ["AutoClip", "AutoClipConfig"]


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


class AutoClip(Clipper):
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

    method = "autoclip"
    class_prefix = "AutoClipped"
    config_cls = AutoClipConfig
    config: AutoClipConfig

    def _init_state(self, plan: ReductionPlan) -> None:
        self.window = NormWindow(self.config.window, device=plan.device, dtype=plan.dtype)

    def _threshold(self, total_norm: Tensor, finite: Tensor) -> Tensor:
        self.window.push_(total_norm, finite)
        threshold = self.window.quantile(self.config.q).to(total_norm.dtype)
        if self.config.min_norm is not None or self.config.max_norm is not None:
            threshold = threshold.clamp(min=self.config.min_norm, max=self.config.max_norm)
        return threshold

    def _state(self) -> dict[str, Any]:
        return {"window": self.window.state_dict()}

    def _validate_state(self, state: dict[str, Any]) -> None:
        window = state.get("window")
        if not isinstance(window, dict):
            raise ValueError(f"an autoclip state must hold a 'window' dict, got {window!r:.80}")
        self.window.validate_state_dict(window)

    def _load_state(self, state: dict[str, Any]) -> None:
        self.window.load_state_dict(state["window"])

    def _reset_state(self) -> None:
        self.window.reset()

    def _state_tensors(self) -> list[Tensor]:
        return [self.window.values, self.window.num_seen]

    def _finite_count(self) -> Tensor | None:
        return self.window.num_seen

    def _state_finite_count(self, state: dict[str, Any]) -> int | None:
        return int(state["window"]["num_seen"])
