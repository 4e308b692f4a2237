"""A slow, obviously correct single-process reference for the sharded-layout tests.

It shares nothing with distclip: the unsharded model of ``layouts_setup`` trained on
the full batch of every step with plain ``torch.optim.SGD`` (``foreach=False``); the
global norm taken in float64 with numpy over every gradient element (each parameter
once, so a tied weight counts once); the window a Python list of the last ``window``
norms; the threshold ``numpy.quantile(method="linear")``; the gradients multiplied
by an explicit ``min(1, tau / (n + 1e-6))`` before the update.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from layouts_setup import full_batch, loss_fn, make_model

from tests import reference

EPS = 1e-6


@dataclass
class Reference:
    """Per-step values (Python floats) and the final parameters of a reference run."""

    total_norm: list[float] = field(default_factory=list)
    threshold: list[float] = field(default_factory=list)
    clip_coef: list[float] = field(default_factory=list)
    window: list[float] = field(default_factory=list)
    params: dict[str, torch.Tensor] = field(default_factory=dict)

    def num_clipped(self, tie_rtol: float = 1e-5) -> int:
        """Steps whose norm is above the threshold by more than ``tie_rtol``."""
        return sum(
            n > tau and not math.isclose(n, tau, rel_tol=tie_rtol)
            for n, tau in zip(self.total_norm, self.threshold, strict=True)
        )


def norm_of(grads: Iterable[torch.Tensor], norm_type: float) -> float:
    """The ``norm_type``-norm of every element of ``grads``, in float64 with numpy."""
    return reference.norm_of(list(grads), norm_type)


def reference_grads(kind: str, step: int = 0) -> dict[str, torch.Tensor]:
    """The gradients of the freshly initialised model ``kind`` on step ``step``'s full batch."""
    model = make_model(kind)
    x, y = full_batch(step)
    loss_fn(model(x), y).backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def reference_train(
    kind: str,
    *,
    steps: int,
    q: float,
    window: int,
    norm_type: float = 2.0,
    lr: float = 0.05,
    momentum: float = 0.0,
) -> Reference:
    """AutoClip + SGD on the full batch in this process, step by step."""
    model = make_model(kind)
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, foreach=False)
    out = Reference()
    history: list[float] = []
    for step in range(steps):
        x, y = full_batch(step)
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        n = norm_of([p.grad for p in params], norm_type)
        history.append(n)
        del history[:-window]
        tau = float(np.quantile(np.asarray(history, dtype=np.float64), q, method="linear"))
        coef = min(1.0, tau / (n + EPS))
        with torch.no_grad():
            for p in params:
                p.grad.mul_(coef)
        optimizer.step()
        out.total_norm.append(n)
        out.threshold.append(tau)
        out.clip_coef.append(coef)
    out.window = list(history)
    out.params = {name: p.detach().clone() for name, p in model.named_parameters()}
    return out
