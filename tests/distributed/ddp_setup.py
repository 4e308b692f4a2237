"""The training problem shared by the DDP workers and the single-process reference.

A small MLP regressed onto targets with Student-t noise (heavy tails: some batches
have gradient norms far above the rest, so AutoClip clips often), a fixed full batch
per step derived from a seed. Under DDP rank ``r`` of ``w`` takes rows
``[r * B / w, (r + 1) * B / w)`` of that batch; DDP averages the gradients of the
equal-sized halves' mean losses, which is the full batch's mean-loss gradient: the
gradient the reference computes in one process.

A run is described by a plain, picklable ``spec`` dict (see :func:`make_spec`).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import distclip

IN_FEATURES = 6
HIDDEN = 16
BATCH = 16
MODEL_SEED = 0
DATA_SEED = 1234
#: Degrees of freedom of the Student-t noise in the targets (< 2: infinite variance).
NOISE_DF = 1.5


def make_model(seed: int = MODEL_SEED) -> nn.Module:
    """The MLP, initialised from ``seed`` (the global RNG is left as it was)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(IN_FEATURES, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 1))


def full_batch(step: int, nan_rows: tuple[int, ...] = ()) -> tuple[Tensor, Tensor]:
    """Step ``step``'s whole batch ``(x, y)``; a NaN in ``x[row, 0]`` for each row given."""
    teacher = np.random.default_rng(DATA_SEED).standard_normal((IN_FEATURES, 1))
    rng = np.random.default_rng([DATA_SEED, step])
    x = rng.standard_normal((BATCH, IN_FEATURES))
    y = np.tanh(x @ teacher) + 0.5 * rng.standard_t(NOISE_DF, size=(BATCH, 1))
    for row in nan_rows:
        x[row, 0] = np.nan
    return torch.from_numpy(x).float(), torch.from_numpy(y).float()


def rows_of(rank: int, world_size: int) -> range:
    """The rows of the full batch that ``rank`` trains on."""
    if BATCH % world_size:
        raise ValueError(f"BATCH={BATCH} must be divisible by world_size={world_size}")
    per_rank = BATCH // world_size
    return range(rank * per_rank, (rank + 1) * per_rank)


def nan_rows(spec: dict[str, Any], step: int, world_size: int) -> tuple[int, ...]:
    """Rows of the full batch poisoned at ``step``: the first row of each rank listed."""
    ranks = spec["nan_steps"].get(step, ())
    return tuple(rows_of(rank, world_size)[0] for rank in ranks)


def local_batch(
    spec: dict[str, Any], step: int, rank: int, world_size: int
) -> tuple[Tensor, Tensor]:
    """Rank ``rank``'s share of step ``step``'s batch (NaN-poisoned where the spec says)."""
    x, y = full_batch(step, nan_rows(spec, step, world_size))
    rows = rows_of(rank, world_size)
    return x[rows.start : rows.stop], y[rows.start : rows.stop]


def loss_fn(prediction: Tensor, target: Tensor) -> Tensor:
    return nn.functional.mse_loss(prediction, target)


def make_spec(
    optimizer: str = "SGD",
    optimizer_kwargs: dict[str, Any] | None = None,
    *,
    integration: str = "subclass",
    method: str = "autoclip",
    clip: dict[str, Any] | None = None,
    steps: int = 24,
    nan_steps: dict[int, tuple[int, ...]] | None = None,
    closure: bool = False,
    ddp_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A run: which optimizer, how distclip is attached, its options, the data.

    Args:
        optimizer: a class name in ``torch.optim``.
        optimizer_kwargs: its arguments (``fused``/``foreach`` allowed).
        integration: ``"subclass"`` (``AutoClippedOptimizer`` / ``ClippedOptimizer``)
            or ``"attach"`` (``distclip.attach`` on a plain optimizer).
        method: ``"autoclip"`` or ``"norm"``.
        clip: the method's options (default: AutoClip with q=0.3, window=8).
        steps: training steps.
        nan_steps: ``{step: ranks}``: those ranks get a NaN in their input batch.
        closure: pass the forward/backward to ``step()`` as a closure.
        ddp_kwargs: extra arguments of ``DistributedDataParallel``.
    """
    if clip is None:
        clip = {"q": 0.3, "window": 8} if method == "autoclip" else {"max_norm": 1.0}
    return {
        "optimizer": optimizer,
        "optimizer_kwargs": dict(optimizer_kwargs or {"lr": 0.05}),
        "integration": integration,
        "method": method,
        "clip": dict(clip),
        "steps": steps,
        "nan_steps": dict(nan_steps or {}),
        "closure": closure,
        "ddp_kwargs": dict(ddp_kwargs or {}),
    }


def build_optimizer(
    spec: dict[str, Any], params: Any
) -> tuple[torch.optim.Optimizer, distclip.Clipper]:
    """The clipped optimizer of ``spec`` over ``params``, and its clipper."""
    base = getattr(torch.optim, spec["optimizer"])
    kwargs = spec["optimizer_kwargs"]
    clip = dict(spec["clip"])
    if spec["integration"] == "attach":
        optimizer = base(params, **kwargs)
        handle = distclip.attach(optimizer, method=spec["method"], **clip)
        return optimizer, handle.clipper
    if spec["integration"] != "subclass":
        raise ValueError(f"unknown integration {spec['integration']!r}")
    if spec["method"] == "autoclip":
        cls = distclip.AutoClippedOptimizer(
            base, q=clip.pop("q"), window=clip.pop("window"), **clip
        )
    else:
        cls = distclip.ClippedOptimizer(base, method=spec["method"], **clip)
    optimizer = cls(params, **kwargs)
    return optimizer, optimizer.clipper  # type: ignore[attr-defined]


def snapshot(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Copies of the parameters and of the optimizer's whole state_dict (clipper included)."""
    return {
        "params": {name: p.detach().clone() for name, p in module.named_parameters()},
        "optimizer": copy.deepcopy(optimizer.state_dict()),
    }
