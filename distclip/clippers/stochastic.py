"""Stochastic norm clipping (torch-clip's rules 1, 2, 6, 7) with global, rank-identical draws.

With level :math:`\\lambda` (fixed, or AutoClip's quantile :math:`P`), the global norm
:math:`n`, a base :math:`\\beta \\in (0, 1]` and one draw :math:`u \\sim U(0, 1)` per
step for the whole model (the same on every rank):

* linear: :math:`\\pi = \\beta^{\\lambda / n}`; quadratic: :math:`\\pi = \\beta^{(\\lambda / n)^2}`;
* if :math:`n \\ge \\lambda` and :math:`u < \\pi`: :math:`c = \\lambda / n`, else :math:`c = 1`.

A spike (:math:`\\lambda / n \\to 0`) is clipped almost surely; a norm just above
:math:`\\lambda` with probability about :math:`\\beta`. :math:`\\beta = 1` always clips
above :math:`\\lambda`. The draw comes from a generator seeded with ``seed`` and the
step count, so runs are reproducible and resume exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from distclip.clippers.autoclip import AutoClip, AutoClipConfig
from distclip.clippers.base import Clipper
from distclip.clippers.config import ClipConfig, check_int, check_positive_finite
from distclip.functional import step_uniform
from distclip.reduction import ReductionPlan

__all__ = [
    "LinearStochAutoClip",
    "LinearStochNormClip",
    "QuadraticStochAutoClip",
    "QuadraticStochNormClip",
    "StochAutoClipConfig",
    "StochNormConfig",
]

#: Default stochastic base: norms just above the level are clipped half the time.
DEFAULT_BETA = 0.5


def _check_beta(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"beta must be a real number in (0, 1], got {value!r}")
    if not 0.0 < float(value) <= 1.0:
        raise ValueError(f"beta must be in (0, 1] (0 would never clip), got {value!r}")
    return float(value)


def stochastic_coefficient(
    total_norm: Tensor, level: Tensor, beta: float, power: int, u: Tensor, finite: Tensor
) -> tuple[Tensor, Tensor]:
    """``(c, clipped)``: ``c = level / n`` where ``n >= level`` and ``u < beta ** ((level/n) ** power)``."""
    ratio = level / total_norm
    probability = torch.pow(beta, ratio if power == 1 else ratio.pow(power))
    clipped = finite & (total_norm >= level) & (u.to(total_norm.dtype) < probability)
    return torch.where(clipped, ratio, torch.ones_like(ratio)), clipped


def _check_draw_options(config: Any) -> None:
    """Validate ``beta`` and ``seed`` of a stochastic method's configuration."""
    config._set("beta", _check_beta(config.beta))
    check_int("seed", config.seed, minimum=0)


class _Stochastic:
    """Shared by the four stochastic methods: the draw and the scaling around a level.

    The draw of step ``t`` (0-based) is ``step_uniform(seed, t)``; ``t`` is kept on the
    device as well (``_draw_step``), so that a step issues no tensor from host data
    and can be captured in a graph.
    """

    power: int
    config: Any
    num_steps: int

    def _init_state(self, plan: ReductionPlan) -> None:
        super()._init_state(plan)  # type: ignore[misc]
        self._draw_step = torch.zeros((), dtype=torch.long, device=plan.device)

    def _level(self, total_norm: Tensor, finite: Tensor) -> Tensor:
        """This step's level (the fixed ``max_norm``, or AutoClip's threshold)."""
        raise NotImplementedError

    def _draw(self, total_norm: Tensor, finite: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(level, coef, clipped)`` of this step; advances the draw counter."""
        level = self._level(total_norm, finite)
        u = step_uniform(self.config.seed, self._draw_step, total_norm.device)
        self._draw_step.add_(1)
        coef, clipped = stochastic_coefficient(
            total_norm, level, self.config.beta, self.power, u, finite
        )
        return level, coef, clipped

    def _external_threshold(
        self, total_norm: Tensor, finite: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The level as threshold, and the draw as an engine threshold.

        A clipping draw gives the engine ``level * (n + eps) / n`` (so its factor
        ``min(1, t / (n + eps))`` is exactly ``level / n``); any other gives ``inf``.
        """
        level, coef, clipped = self._draw(total_norm, finite)
        exact = level * (total_norm + self.config.eps) / total_norm
        return level, coef, clipped, torch.where(clipped, exact, float("inf"))

    def _apply(
        self, plan: ReductionPlan, total_norm: Tensor, finite: Tensor, measured: Any
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        level, coef, clipped = self._draw(total_norm, finite)
        self._scale(plan, coef)  # type: ignore[attr-defined]
        return level, coef, clipped

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load as :meth:`Clipper.load_state_dict`; the draws continue from ``num_steps``."""
        super().load_state_dict(state_dict)  # type: ignore[misc]
        self._draw_step.fill_(self.num_steps)

    def reset(self) -> None:
        """Forget the history as :meth:`Clipper.reset`; the draws start again from step 0."""
        super().reset()  # type: ignore[misc]
        self._draw_step.zero_()


@dataclass(frozen=True)
class StochNormConfig(ClipConfig):
    """Options of stochastic norm clipping (plus the common ones).

    Attributes:
        max_norm: the level :math:`\\lambda`, a positive finite number (default 1.0).
        beta: the stochastic base, in (0, 1] (default 0.5).
        seed: seeds the per-step draws, an integer >= 0 (default 0).
    """

    max_norm: float = 1.0
    beta: float = DEFAULT_BETA
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set("max_norm", check_positive_finite("max_norm", self.max_norm))
        _check_draw_options(self)


class LinearStochNormClip(_Stochastic, Clipper):
    """Linear stochastic norm clipping: :math:`\\pi = \\beta^{\\lambda/n}` (module docstring)."""

    method = "linear_stoch_norm"
    class_prefix = "LinearStochNormClipped"
    config_cls = StochNormConfig
    config: StochNormConfig
    power = 1

    def _level(self, total_norm: Tensor, finite: Tensor) -> Tensor:
        return torch.full_like(total_norm, self.config.max_norm)


class QuadraticStochNormClip(LinearStochNormClip):
    """Quadratic stochastic norm clipping: :math:`\\pi = \\beta^{(\\lambda/n)^2}`."""

    method = "quadratic_stoch_norm"
    class_prefix = "QuadraticStochNormClipped"
    power = 2


@dataclass(frozen=True)
class StochAutoClipConfig(AutoClipConfig):
    """Options of stochastic AutoClip: AutoClip's (``q``, ``window``, ``max_norm``) plus
    ``beta`` in (0, 1] (default 0.5) and ``seed`` >= 0 (default 0)."""

    beta: float = DEFAULT_BETA
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_draw_options(self)


class LinearStochAutoClip(_Stochastic, AutoClip):
    """Linear stochastic AutoClip: the level is AutoClip's threshold :math:`P` (window first)."""

    method = "linear_stoch_autoclip"
    class_prefix = "LinearStochAutoClipped"
    config_cls = StochAutoClipConfig
    config: StochAutoClipConfig
    power = 1

    def _level(self, total_norm: Tensor, finite: Tensor) -> Tensor:
        return self._threshold(total_norm, finite)


class QuadraticStochAutoClip(LinearStochAutoClip):
    """Quadratic stochastic AutoClip: :math:`\\pi = \\beta^{(P/n)^2}`."""

    method = "quadratic_stoch_autoclip"
    class_prefix = "QuadraticStochAutoClipped"
    power = 2
