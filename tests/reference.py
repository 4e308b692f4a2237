"""Slow, obviously correct references the fast code is checked against."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

EPS = 1e-6


def norm_of(grads: Sequence[torch.Tensor], p: float = 2.0) -> float:
    """The p-norm of all elements of ``grads``, in float64 with numpy."""
    flat = np.concatenate([g.detach().double().reshape(-1).numpy() for g in grads] or [np.zeros(0)])
    if flat.size == 0:
        return 0.0
    if math.isinf(p):
        return float(np.max(np.abs(flat)))
    return float(np.sum(np.abs(flat) ** p) ** (1.0 / p))


class SlowAutoClip:
    """AutoClip on a Python list: the window is the last ``window`` finite norms."""

    def __init__(
        self,
        q: float = 0.1,
        window: int = 200,
        max_norm: float | None = None,
        min_norm: float | None = None,
    ) -> None:
        self.q, self.window, self.max_norm, self.min_norm = q, window, max_norm, min_norm
        self.history: list[float] = []

    def threshold(self, norm: float) -> float:
        """Push ``norm`` (if finite) and return this step's threshold."""
        if math.isfinite(norm):
            self.history.append(norm)
            self.history = self.history[-self.window :]
        if not self.history:
            return math.inf
        tau = float(
            np.quantile(np.asarray(self.history, dtype=np.float64), self.q, method="linear")
        )
        if self.min_norm is not None:
            tau = max(tau, self.min_norm)
        if self.max_norm is not None:
            tau = min(tau, self.max_norm)
        return tau

    def coefficient(self, norm: float) -> tuple[float, float]:
        """(threshold, coefficient) for this step's ``norm``; coefficient 1 if not finite."""
        tau = self.threshold(norm)
        if not math.isfinite(norm):
            return tau, 1.0
        return tau, min(1.0, tau / (norm + EPS))
