"""A slow, obviously correct single-process reference of clipped training.

It shares nothing with distclip: plain ``torch.optim`` (per-parameter loops, never
fused or foreach) on the full batch, the global norm summed in float64 in Python, the
window a Python list, the threshold ``numpy.quantile(method="linear")``, and the
gradients scaled by an explicit ``p.grad.mul_(min(1, tau / (n + 1e-6)))``. A step
whose norm is NaN/inf is skipped entirely (no update, the window untouched).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from ddp_setup import full_batch, loss_fn, make_model, nan_rows

EPS = 1e-6


@dataclass
class Reference:
    """Per-step values (Python floats) and the final state of a reference run."""

    total_norm: list[float] = field(default_factory=list)
    threshold: list[float] = field(default_factory=list)
    clip_coef: list[float] = field(default_factory=list)
    skipped: list[bool] = field(default_factory=list)
    window: list[float] = field(default_factory=list)
    params: dict[str, torch.Tensor] = field(default_factory=dict)

    def clipped_steps(self, tie_rtol: float = 1e-5) -> tuple[int, int]:
        """(steps clearly clipped, steps whose norm is within ``tie_rtol`` of the threshold).

        A float32 run and this float64 reference may disagree on ``n > tau`` only in
        the second kind.
        """
        clear = ties = 0
        for n, tau, skipped in zip(self.total_norm, self.threshold, self.skipped, strict=True):
            if skipped:
                continue
            if math.isclose(n, tau, rel_tol=tie_rtol):
                ties += 1
            elif n > tau:
                clear += 1
        return clear, ties


def _threshold(spec: dict[str, Any], window: list[float]) -> float:
    clip = spec["clip"]
    if spec["method"] == "norm":
        return float(clip["max_norm"])
    if not window:
        tau = math.inf
    else:
        tau = float(np.quantile(np.asarray(window, dtype=np.float64), clip["q"], method="linear"))
    if clip.get("min_norm") is not None:
        tau = max(tau, clip["min_norm"])
    if clip.get("max_norm") is not None:
        tau = min(tau, clip["max_norm"])
    return tau


def reference_train(spec: dict[str, Any], world_size: int = 2) -> Reference:
    """Train ``spec`` in this process on the full batch; ``world_size`` only places the NaNs."""
    kwargs = {k: v for k, v in spec["optimizer_kwargs"].items() if k not in ("fused", "foreach")}
    model = make_model()
    params = list(model.parameters())
    optimizer = getattr(torch.optim, spec["optimizer"])(params, **kwargs, foreach=False)
    out = Reference()
    window: list[float] = []
    for step in range(spec["steps"]):
        x, y = full_batch(step, nan_rows(spec, step, world_size))
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        n = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in params))
        if not math.isfinite(n):
            out.total_norm.append(n)
            out.threshold.append(_threshold(spec, window))
            out.clip_coef.append(1.0)
            out.skipped.append(True)
            continue
        if spec["method"] == "autoclip":
            window.append(n)
            del window[: -spec["clip"]["window"]]
        tau = _threshold(spec, window)
        coef = min(1.0, tau / (n + EPS))
        with torch.no_grad():
            for p in params:
                p.grad.mul_(coef)
        optimizer.step()
        out.total_norm.append(n)
        out.threshold.append(tau)
        out.clip_coef.append(coef)
        out.skipped.append(False)
    out.window = list(window)
    out.params = {name: p.detach().clone() for name, p in model.named_parameters()}
    return out
