"""A clipping method of one's own, added through distclip's extension point: this file only.

``toy_mean_fraction`` clips to a fraction of the mean of the finite global norms seen so
far (this step's included): ``tau_t = fraction * mean(n_1..n_t)``, ``c = min(1, tau / (n + eps))``.
Registering the class is all it takes: ``ClippedOptimizer``, ``attach``, ``make_clipper``,
the DeepSpeed config section and the framework integrations then know the method, on
every layout distclip reduces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

import distclip
from distclip.clippers.config import check_positive_finite

__all__ = ["NAME", "MeanFractionClip", "MeanFractionConfig", "slow_thresholds"]

NAME = "toy_mean_fraction"


@dataclass(frozen=True)
class MeanFractionConfig(distclip.ClipConfig):
    """Options: ``fraction`` of the running mean that is the threshold (default 0.8)."""

    fraction: float = 0.8

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set("fraction", check_positive_finite("fraction", self.fraction))


class MeanState(distclip.MethodState):
    """The sum and the count of the finite norms so far."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.total = torch.zeros((), device=device, dtype=dtype)
        self.count = torch.zeros((), device=device, dtype=torch.long)

    def state_dict(self) -> dict[str, Any]:
        return {"total": self.total, "count": self.count}

    def validate_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("total", "count"):
            if not isinstance(state.get(key), Tensor):
                raise ValueError(f"a {NAME} state needs a tensor {key!r}")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total = state["total"].to(self.total.device, self.total.dtype, copy=True)
        self.count = state["count"].to(self.count.device, torch.long, copy=True)

    def reset(self) -> None:
        self.total.zero_()
        self.count.zero_()

    def tensors(self) -> list[Tensor]:
        return [self.total, self.count]


@distclip.register_method(NAME, config=MeanFractionConfig)
class MeanFractionClip(distclip.GlobalFactorClipper):
    """Clip to ``fraction`` times the mean of the finite global norms so far."""

    config: MeanFractionConfig
    state: MeanState

    def _make_state(self, plan: Any) -> MeanState:
        return MeanState(plan.device, plan.dtype)

    def threshold(self, total_norm: Tensor, finite: Tensor) -> Tensor:
        self.state.total.add_(torch.where(finite, total_norm, 0.0))
        self.state.count.add_(finite)
        mean = self.state.total / self.state.count.clamp(min=1)
        return self.config.fraction * mean


def slow_thresholds(norms: list[float], fraction: float) -> list[float]:
    """The thresholds of the rule in plain Python floats (the NaN/inf norms left out)."""
    seen: list[float] = []
    out = []
    for norm in norms:
        if norm == norm and norm != float("inf"):
            seen.append(norm)
        out.append(fraction * (sum(seen) / len(seen)) if seen else 0.0)
    return out
