"""The slow, obviously correct reference clipper every suite checks distclip against.

It shares nothing with distclip: norms in float64 with numpy, the window a Python
list, the threshold ``numpy.quantile(method="linear")``, each method's rule written out
as METHODS.md states it, and a plain ``torch.optim`` training loop
(:func:`reference_train`, per-parameter loops: never fused or foreach) that scales the
gradients by an explicit ``min(1, tau / (n + eps))`` before the update and skips a
step whose norm is NaN/inf entirely (no update, the window untouched).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tests.support.problem import Problem, loss_fn

__all__ = [
    "EPS",
    "Reference",
    "SlowAutoClip",
    "SlowNormClip",
    "SlowZClip",
    "agc_min_factor",
    "agc_reference",
    "agc_units_clipped",
    "layer_wise_coefficients",
    "norm_of",
    "reference_grads",
    "reference_train",
    "slow_clipper",
    "stochastic_coefficient",
]

EPS = 1e-6


def norm_of(grads: Iterable[Tensor], p: float = 2.0) -> float:
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


# ------------------------------------------------------------- global-factor rules
class SlowNormClip:
    """Fixed-norm clipping: the threshold is ``max_norm``, always."""

    def __init__(self, max_norm: float = 1.0) -> None:
        self.max_norm = max_norm

    def threshold(self, norm: float) -> float:
        """This step's threshold (``norm`` plays no part)."""
        return float(self.max_norm)

    def coefficient(self, norm: float) -> tuple[float, float]:
        """(threshold, coefficient) for this step's ``norm``; coefficient 1 if not finite."""
        return _coefficient(self.threshold(norm), norm)


class SlowAutoClip:
    """AutoClip on a Python list: the window is the last ``window`` finite norms.

    ``tau = clamp(quantile_q(window), min_norm, max_norm)``; an empty window has no
    threshold (inf), which ``max_norm`` caps.
    """

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
        tau = math.inf
        if self.history:
            values = np.asarray(self.history, dtype=np.float64)
            tau = float(np.quantile(values, self.q, method="linear"))
        if self.min_norm is not None:
            tau = max(tau, self.min_norm)
        if self.max_norm is not None:
            tau = min(tau, self.max_norm)
        return tau

    def coefficient(self, norm: float) -> tuple[float, float]:
        """(threshold, coefficient) for this step's ``norm``; coefficient 1 if not finite."""
        return _coefficient(self.threshold(norm), norm)


class SlowZClip:
    """ZClip on Python floats, as METHODS.md states it."""

    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        warmup_steps: int = 25,
        max_norm: float | None = None,
        mode: str = "adaptive_scaling",
        eps: float = EPS,
    ) -> None:
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

    def coefficient(self, norm: float) -> tuple[float, float]:
        """(threshold, coefficient) for this step's ``norm``; coefficient 1 if not finite."""
        return _coefficient(self.threshold(norm), norm)


def _coefficient(tau: float, norm: float) -> tuple[float, float]:
    if not math.isfinite(norm):
        return tau, 1.0
    return tau, min(1.0, tau / (norm + EPS))


#: The reference of each method whose rule is one global factor ``min(1, tau / (n + eps))``.
_SLOW: dict[str, Callable[..., Any]] = {
    "norm": SlowNormClip,
    "autoclip": SlowAutoClip,
    "auto_clip": SlowAutoClip,
    "zclip": SlowZClip,
}


def slow_clipper(method: str, **options: Any) -> Any:
    """The reference of ``method`` (norm, autoclip, zclip) with its options.

    Options the rule does not read (``foreach``, ``check_every``, ``nonfinite``, ...)
    are dropped.
    """
    known = {
        "norm": ("max_norm",),
        "autoclip": ("q", "window", "max_norm", "min_norm"),
        "auto_clip": ("q", "window", "max_norm", "min_norm"),
        "zclip": ("alpha", "z_thresh", "warmup_steps", "max_norm", "mode", "eps"),
    }[method]
    return _SLOW[method](**{k: v for k, v in options.items() if k in known})


def stochastic_coefficient(norm: float, level: float, beta: float, power: int, u: float) -> float:
    """The stochastic rules: ``c = level / n`` if ``n >= level`` and ``u < beta ** ((level / n) ** power)``."""
    if norm >= level and u < beta ** ((level / norm) ** power):
        return level / norm
    return 1.0


# ----------------------------------------------------------------- piecewise rules
def layer_wise_coefficients(grads: Sequence[Tensor], max_norm: float) -> list[float]:
    """Layer-wise clipping: ``c_i = min(1, max_norm / (||g_i|| + eps))`` per tensor."""
    return [min(1.0, max_norm / (norm_of([g]) + EPS)) for g in grads]


def _units(grad: Tensor, weight: Tensor) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """AGC's units of one tensor in float64: its output rows, or the whole vector."""
    g, w = grad.detach().double().numpy().copy(), weight.detach().double().numpy()
    if g.ndim <= 1:
        return [g.reshape(-1)], [w.reshape(-1)]
    return list(g.reshape(g.shape[0], -1)), list(w.reshape(w.shape[0], -1))


def _agc_factors(grad: Tensor, weight: Tensor, clip_factor: float, eps: float) -> list[float]:
    """Each unit's AGC factor: ``clip_factor * max(||W_u||, eps) / ||G_u||`` where above, else 1."""
    factors = []
    for gr, wr in zip(*_units(grad, weight), strict=True):
        gn, wn = float(np.linalg.norm(gr)), max(float(np.linalg.norm(wr)), eps)
        factors.append(clip_factor * wn / max(gn, 1e-6) if gn > clip_factor * wn else 1.0)
    return factors


def agc_reference(grad: Tensor, weight: Tensor, clip_factor: float, eps: float) -> Tensor:
    """AGC of one tensor, unit by unit with numpy (float64)."""
    units, _ = _units(grad, weight)
    factors = _agc_factors(grad, weight, clip_factor, eps)
    out = [unit * factor for unit, factor in zip(units, factors, strict=True)]
    return torch.from_numpy(np.stack(out).reshape(tuple(grad.shape)))


def agc_min_factor(grad: Tensor, weight: Tensor, clip_factor: float, eps: float) -> float:
    """The smallest unit factor AGC applies to one tensor (1 when no unit is clipped)."""
    return min(_agc_factors(grad, weight, clip_factor, eps))


def agc_units_clipped(
    grad: Tensor, weight: Tensor, clip_factor: float, eps: float = 1e-3
) -> tuple[int, int]:
    """``(units AGC clips, units)`` of one tensor."""
    factors = _agc_factors(grad, weight, clip_factor, eps)
    return sum(f < 1.0 for f in factors), len(factors)


# -------------------------------------------------------------- a reference run
@dataclass
class Reference:
    """Per-step values (Python floats) of a reference run and its end state."""

    steps: list[int] = field(default_factory=list)
    total_norm: list[float] = field(default_factory=list)
    threshold: list[float] = field(default_factory=list)
    clip_coef: list[float] = field(default_factory=list)
    skipped: list[bool] = field(default_factory=list)
    window: list[float] = field(default_factory=list)
    params: dict[str, Tensor] = field(default_factory=dict)

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

    def without(self, step: int) -> Reference:
        """This run's records with step ``step`` left out (its end state kept)."""
        keep = [i for i, s in enumerate(self.steps) if s != step]
        return Reference(
            steps=[self.steps[i] for i in keep],
            total_norm=[self.total_norm[i] for i in keep],
            threshold=[self.threshold[i] for i in keep],
            clip_coef=[self.clip_coef[i] for i in keep],
            skipped=[self.skipped[i] for i in keep],
            window=self.window,
            params=self.params,
        )


def reference_train(
    problem: Problem,
    *,
    steps: int,
    method: str = "autoclip",
    options: dict[str, Any] | None = None,
    optimizer: str = "SGD",
    optimizer_kwargs: dict[str, Any] | None = None,
    norm_type: float = 2.0,
    kind: str = "mlp",
    batch: Callable[[int], tuple[Tensor, Tensor]] | None = None,
    omit: Iterable[int] = (),
    frozen: Iterable[str] = (),
    side_every: int = 0,
) -> Reference:
    """``method`` (norm, autoclip, zclip) + a plain ``torch.optim`` in one process.

    Args:
        problem: the model (``kind``) and, by default, its full batches.
        optimizer, optimizer_kwargs: a ``torch.optim`` class name and its arguments
            (``fused`` / ``foreach`` are dropped: the loop is per parameter).
        batch: step -> ``(x, y)``, the whole global batch (default:
            ``problem.full_batch``).
        omit: steps the run never sees.
        frozen: parameter names frozen before the optimizer is built.
        side_every: the side layer is used on steps divisible by it only (0: always).
    """
    model = problem.model(kind=kind)
    names = set(frozen)
    for name, param in model.named_parameters():
        if name in names:
            param.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = {
        k: v for k, v in (optimizer_kwargs or {"lr": 0.05}).items() if k not in ("fused", "foreach")
    }
    torch_optimizer = getattr(torch.optim, optimizer)(params, **kwargs, foreach=False)
    policy = slow_clipper(method, **(options or {}))
    batch = batch or problem.full_batch
    left_out = set(omit)
    out = Reference()
    for step in range(steps):
        if step in left_out:
            continue
        if side_every:
            model.use_side = step % side_every == 0
        x, y = batch(step)
        torch_optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        grads = [p.grad for p in params if p.grad is not None]
        n = norm_of(grads, norm_type)
        tau, coef = policy.coefficient(n)
        out.steps.append(step)
        out.total_norm.append(n)
        out.threshold.append(tau)
        out.clip_coef.append(coef)
        out.skipped.append(not math.isfinite(n))
        if not math.isfinite(n):
            continue
        with torch.no_grad():
            for g in grads:
                g.mul_(coef)
        torch_optimizer.step()
    out.window = list(getattr(policy, "history", []))
    out.params = {name: p.detach().clone() for name, p in model.named_parameters()}
    return out


def reference_grads(problem: Problem, step: int = 0, *, kind: str = "mlp") -> dict[str, Tensor]:
    """The gradients of the freshly initialised model on step ``step``'s full batch."""
    model = problem.model(kind=kind)
    x, y = problem.full_batch(step)
    loss_fn(model(x), y).backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}
