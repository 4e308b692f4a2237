"""Stochastic norm clipping (torch-clip's rules 1, 2, 6, 7) with global, rank-identical draws.

With level :math:`\\lambda` (fixed, or AutoClip's quantile :math:`P`), the global norm
:math:`n`, a base :math:`\\beta \\in (0, 1]` and one draw :math:`u \\sim U(0, 1)` per
step for the whole model (the same on every rank):

* linear: :math:`\\pi = \\beta^{\\lambda / n}`; quadratic: :math:`\\pi = \\beta^{(\\lambda / n)^2}`;
* if :math:`n \\ge \\lambda` and :math:`u < \\pi`: :math:`c = \\lambda / n`, else :math:`c = 1`.

A spike (:math:`\\lambda / n \\to 0`) is clipped almost surely; a norm just above
:math:`\\lambda` with probability about :math:`\\beta`. :math:`\\beta = 1` always clips
above :math:`\\lambda`. The draw is a hash of ``seed`` and the step count computed on the
device (:func:`~distclip.functional.step_uniform`), so runs are reproducible, resume
exactly and draw alike on every rank and device.

One class serves the four methods, with two options fixed by the registered name: the
``power`` (1: linear, 2: quadratic) and the ``level`` (``"fixed"``: ``max_norm``;
``"autoclip"``: AutoClip's windowed quantile, window first).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from distclip._checks import is_real
from distclip.clippers.autoclip import AutoClipConfig, window_threshold
from distclip.clippers.config import ClipConfig, check_int, check_positive_finite
from distclip.clippers.kinds import Decision, GlobalFactorClipper
from distclip.clippers.registry import register_method
from distclip.clippers.state import MethodState, WindowState
from distclip.functional import step_uniform
from distclip.reduction import ReductionPlan

__all__ = ["StochAutoClipConfig", "StochNormConfig", "StochasticClip", "stochastic_coefficient"]

#: Default stochastic base: norms just above the level are clipped half the time.
DEFAULT_BETA = 0.5


def _check_beta(value: Any) -> float:
    if not is_real(value):
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


@dataclass(frozen=True)
class StochAutoClipConfig(AutoClipConfig):
    """Options of stochastic AutoClip: AutoClip's (``q``, ``window``, ``max_norm``) plus
    ``beta`` in (0, 1] (default 0.5) and ``seed`` >= 0 (default 0)."""

    beta: float = DEFAULT_BETA
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_draw_options(self)


@register_method(
    "linear_stoch_norm",
    config=StochNormConfig,
    class_prefix="LinearStochNormClipped",
    power=1,
    level="fixed",
)
@register_method(
    "quadratic_stoch_norm",
    config=StochNormConfig,
    class_prefix="QuadraticStochNormClipped",
    power=2,
    level="fixed",
)
@register_method(
    "linear_stoch_autoclip",
    config=StochAutoClipConfig,
    class_prefix="LinearStochAutoClipped",
    power=1,
    level="autoclip",
)
@register_method(
    "quadratic_stoch_autoclip",
    config=StochAutoClipConfig,
    class_prefix="QuadraticStochAutoClipped",
    power=2,
    level="autoclip",
)
class StochasticClip(GlobalFactorClipper):
    """Stochastic norm clipping (see the module docstring); build it by method name.

    ``power`` and ``level`` are fixed by the registered name
    (``linear_stoch_norm``, ``quadratic_stoch_norm``, ``linear_stoch_autoclip``,
    ``quadratic_stoch_autoclip``); the adaptive ones keep AutoClip's window (saved in
    checkpoints). The draw of step ``t`` (0-based) is ``step_uniform(seed, t)``, with
    ``t`` kept on the device too, so that a step issues no tensor from host data and
    can be captured in a graph.
    """

    config: Any

    @property
    def power(self) -> int:
        """1 (linear) or 2 (quadratic): the exponent of ``level / n`` in the probability."""
        return int(self.spec.preset["power"])

    @property
    def adaptive(self) -> bool:
        """True when the level is AutoClip's quantile, False when it is ``max_norm``."""
        return bool(self.spec.preset["level"] == "autoclip")

    def _make_state(self, plan: ReductionPlan) -> MethodState:
        self._draw_step = torch.zeros((), dtype=torch.long, device=plan.device)
        if self.adaptive:
            return WindowState(self.config.window, device=plan.device, dtype=plan.dtype)
        return MethodState()

    def decide(self, total_norm: Tensor, finite: Tensor, *, engine: bool = False) -> Decision:
        """The level, the draw's factor, and the draw as an engine threshold.

        A clipping draw gives the engine ``level * (n + eps) / n`` (so its factor
        ``min(1, t / (n + eps))`` is exactly ``level / n``); any other gives ``inf``.
        """
        if self.adaptive:
            assert isinstance(self.state, WindowState)
            level = window_threshold(self.state.window, self.config, total_norm, finite)
        else:
            level = torch.full_like(total_norm, self.config.max_norm)
        u = step_uniform(self.config.seed, self._draw_step, total_norm.device)
        self._draw_step.add_(1)
        coef, clipped = stochastic_coefficient(
            total_norm, level, self.config.beta, self.power, u, finite
        )
        if not engine:
            return Decision(level, coef, clipped)
        exact = level * (total_norm + self.config.eps) / total_norm
        return Decision(level, coef, clipped, torch.where(clipped, exact, float("inf")))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load as :meth:`Clipper.load_state_dict`; the draws continue from ``num_steps``."""
        super().load_state_dict(state_dict)
        self._draw_step.fill_(self.num_steps)

    def reset(self) -> None:
        """Forget the history as :meth:`Clipper.reset`; the draws start again from step 0."""
        super().reset()
        self._draw_step.zero_()
