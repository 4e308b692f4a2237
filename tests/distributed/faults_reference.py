"""A slow single-process reference for the fault tests (``test_faults.py``).

Plain torch on the full batch of every step, sharing nothing with distclip: the
model of ``layouts_setup`` (optionally with a side layer used on even steps only, and
with frozen parameters), SGD with momentum (``foreach=False``), the global norm in
float64 with numpy over the gradients that exist, the window a Python list and the
threshold ``numpy.quantile``. ``omit`` names steps the reference never sees: a run
that skipped a faulty step must end where a run without that step ends.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from layouts_reference import EPS, norm_of
from layouts_setup import IN_FEATURES, full_batch, loss_fn, make_model
from torch import Tensor, nn

__all__ = ["FaultModel", "RefRun", "build_model", "reference_run"]


class FaultModel(nn.Module):
    """The ``layouts_setup`` MLP plus ``side`` (8 -> 1), added to the output on even steps."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = make_model("mlp")
        with torch.random.fork_rng():
            torch.manual_seed(7)
            self.side = nn.Linear(IN_FEATURES, 1)
        self.use_side = True

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.mlp(x)
        return out + self.side(x) if self.use_side else out


def build_model(frozen: Iterable[str] = ()) -> FaultModel:
    """A fresh :class:`FaultModel` with the parameters named in ``frozen`` frozen."""
    model = FaultModel()
    names = set(frozen)
    for name, param in model.named_parameters():
        if name in names:
            param.requires_grad_(False)
    return model


@dataclass
class RefRun:
    """Per-step numbers of a reference run (one entry per step it saw) and its end state."""

    steps: list[int] = field(default_factory=list)
    total_norm: list[float] = field(default_factory=list)
    threshold: list[float] = field(default_factory=list)
    window: list[float] = field(default_factory=list)
    params: dict[str, Tensor] = field(default_factory=dict)


def reference_run(
    *,
    steps: int,
    q: float,
    window: int,
    lr: float = 0.05,
    momentum: float = 0.9,
    omit: Iterable[int] = (),
    frozen: Iterable[str] = (),
    side_every: int = 0,
) -> RefRun:
    """AutoClip + SGD over ``steps`` full batches, leaving out the steps in ``omit``.

    ``side_every``: the side layer is used on steps divisible by it only (0: always).
    """
    model = build_model(frozen)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, foreach=False)
    left_out = set(omit)
    out = RefRun()
    history: list[float] = []
    for step in range(steps):
        if step in left_out:
            continue
        model.use_side = side_every == 0 or step % side_every == 0
        x, y = full_batch(step)
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        grads = [p.grad for p in params if p.grad is not None]
        n = norm_of(grads, 2.0)
        history.append(n)
        del history[:-window]
        tau = float(np.quantile(np.asarray(history, dtype=np.float64), q, method="linear"))
        coef = min(1.0, tau / (n + EPS))
        with torch.no_grad():
            for g in grads:
                g.mul_(coef)
        optimizer.step()
        out.steps.append(step)
        out.total_norm.append(n)
        out.threshold.append(tau)
    out.window = list(history)
    out.params = {name: p.detach().clone() for name, p in model.named_parameters()}
    return out
