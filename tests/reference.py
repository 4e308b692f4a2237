"""Slow, obviously correct references the fast code is checked against."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

EPS = 1e-6

#: Options under which every method clips something on gradients of unit scale (so a
#: count of a step's ops or host transfers covers the clipping path of each method).
CLIPPING_OPTIONS: dict[str, dict[str, Any]] = {
    "norm": {"max_norm": 0.5},
    "value": {"clip_value": 0.05},
    "coordinate_wise": {"clip_value": 0.05},
    "autoclip": {"q": 0.5, "window": 10},
    "auto_clip": {"q": 0.5, "window": 10},
    "linear_stoch_norm": {"max_norm": 0.5},
    "quadratic_stoch_norm": {"max_norm": 0.5},
    "linear_stoch_autoclip": {"q": 0.5, "window": 10},
    "quadratic_stoch_autoclip": {"q": 0.5, "window": 10},
    "layer_wise": {"max_norm": 0.1},
    "zclip": {"warmup_steps": 2},
    "agc": {"clip_factor": 0.01},
}


def norm_of(grads: Sequence[torch.Tensor], p: float = 2.0) -> float:
    """The p-norm of all elements of ``grads`` as one vector, in float64 with numpy.

    Every norm type: ``inf`` / ``-inf`` the largest / smallest ``|x|``, ``0`` the
    number of non-zero elements (NaN counts: it is not 0), other p
    ``(sum |x| ** p) ** (1 / p)`` with ``|0| ** p = inf`` for p < 0. No elements: 0.
    """
    flat = np.concatenate([g.detach().double().reshape(-1).numpy() for g in grads] or [np.zeros(0)])
    if flat.size == 0:
        return 0.0
    magnitude = np.abs(flat)
    if p == math.inf:
        return float(np.max(magnitude))
    if p == -math.inf:
        return float(np.min(magnitude))
    if p == 0:
        return float(np.count_nonzero(flat))
    with np.errstate(divide="ignore", over="ignore"):
        return float(np.sum(magnitude**p) ** (1.0 / p))


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


class SlowZClip:
    """ZClip on Python floats, as METHODS.md states it."""

    def __init__(
        self,
        alpha=0.97,
        z_thresh=2.5,
        warmup_steps=25,
        max_norm=None,
        mode="adaptive_scaling",
        eps=EPS,
    ):  # type: ignore[no-untyped-def]
        self.alpha, self.z_thresh, self.warmup_steps = alpha, z_thresh, warmup_steps
        self.max_norm, self.mode, self.eps = max_norm, mode, eps
        self.warmup: list[float] = []
        self.mean: float | None = None
        self.var = 0.0

    def threshold(self, norm: float) -> float:
        """This step's threshold (inf when no spike); updates the statistics."""
        tau = math.inf
        if not math.isfinite(norm):
            pass
        elif self.mean is None:
            self.warmup.append(norm)
            if len(self.warmup) == self.warmup_steps:
                self.mean = float(np.mean(self.warmup))
                self.var = float(np.var(self.warmup))
        else:
            std = math.sqrt(self.var)
            z = (norm - self.mean) / (std + self.eps)
            if z > self.z_thresh:
                tau = (
                    self.mean
                    if self.mode == "mean"
                    else self.mean + self.z_thresh * std * self.z_thresh / z
                )
            clipped = min(norm, tau)
            self.mean = self.alpha * self.mean + (1 - self.alpha) * clipped
            self.var = self.alpha * self.var + (1 - self.alpha) * (clipped - self.mean) ** 2
        if self.max_norm is not None:
            tau = min(tau, self.max_norm)
        return tau


def agc_reference(
    grad: torch.Tensor, weight: torch.Tensor, clip_factor: float, eps: float
) -> torch.Tensor:
    """AGC of one tensor, row by row with numpy (whole tensor for vectors)."""
    g, w = grad.detach().double().numpy().copy(), weight.detach().double().numpy()
    if g.ndim <= 1:
        rows_g, rows_w = [g.reshape(-1)], [w.reshape(-1)]
    else:
        rows_g, rows_w = list(g.reshape(g.shape[0], -1)), list(w.reshape(w.shape[0], -1))
    out = []
    for gr, wr in zip(rows_g, rows_w, strict=True):
        gn, wn = float(np.linalg.norm(gr)), max(float(np.linalg.norm(wr)), eps)
        out.append(gr * (clip_factor * wn / max(gn, 1e-6)) if gn > clip_factor * wn else gr)
    return torch.from_numpy(np.stack(out).reshape(g.shape))
