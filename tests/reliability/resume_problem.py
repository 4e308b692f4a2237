"""The training problem shared by the crash/resume script and the resharding workers.

A small MLP regressed onto targets with heavy-tailed noise and, every few steps, a
batch of outliers (so AutoClip clips often), trained with
``distclip.AutoClippedOptimizer(torch.optim.AdamW, ...)``. Step ``s`` has one fixed
global batch; rank ``r`` of ``w`` trains on rows ``[r * B / w, (r + 1) * B / w)``, so
the averaged gradient (DDP, FSDP2's reduce-scatter) is the global batch's gradient
whatever the world size.

This module imports no test machinery: ``crash_train.py`` (run by torchrun) and the
harness workers import it by name.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

import distclip

IN_FEATURES = 8
#: Divisible by 4 and 2: the hidden layers shard evenly on 4 and 2 ranks ...
HIDDEN = 24
#: ... the output layer does not (3 rows over 2 or 4 ranks: uneven and empty shards).
OUT_FEATURES = 3
BATCH = 16
MODEL_SEED = 0
DATA_SEED = 4321
#: Every this many steps the whole batch gets outlier targets (a huge norm: clipped).
OUTLIER_EVERY = 5

AUTOCLIP: dict[str, Any] = {"q": 0.3, "window": 6}
ADAMW: dict[str, Any] = {"lr": 1e-2, "weight_decay": 0.01}
#: The fields of ``ClipStats.as_floats()`` the tests compare.
STAT_FIELDS = ("total_norm", "threshold", "clip_coef", "skipped")


def make_model(seed: int = MODEL_SEED) -> nn.Sequential:
    """The MLP, initialised from ``seed`` (the global RNG is left as it was)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Linear(IN_FEATURES, HIDDEN),
            nn.Tanh(),
            nn.Linear(HIDDEN, HIDDEN),
            nn.Tanh(),
            nn.Linear(HIDDEN, OUT_FEATURES),
        )


def make_optimizer(params: Any) -> torch.optim.Optimizer:
    """AdamW with AutoClip (q=0.3, window=6): distclip's seed API."""
    optimizer_cls = distclip.AutoClippedOptimizer(torch.optim.AdamW, **AUTOCLIP)
    return optimizer_cls(params, **ADAMW)


def global_batch(step: int) -> tuple[Tensor, Tensor]:
    """Step ``step``'s whole batch ``(x, y)``, the same in every process."""
    gen = torch.Generator().manual_seed(DATA_SEED * 1_000_003 + step)
    teacher = torch.linspace(-1.0, 1.0, IN_FEATURES * OUT_FEATURES).reshape(
        IN_FEATURES, OUT_FEATURES
    )
    x = torch.randn(BATCH, IN_FEATURES, generator=gen)
    z, a, b = torch.randn(3, BATCH, OUT_FEATURES, generator=gen)
    student_t = z / ((a * a + b * b) / 2).sqrt()  # Student-t, 2 degrees of freedom
    y = torch.tanh(x @ teacher) + 0.3 * student_t
    if step % OUTLIER_EVERY == OUTLIER_EVERY - 1:
        y = y + 20.0 * torch.randn(BATCH, OUT_FEATURES, generator=gen)
    return x, y


def local_batch(step: int, rank: int, world_size: int) -> tuple[Tensor, Tensor]:
    """Rank ``rank``'s rows of step ``step``'s global batch."""
    if BATCH % world_size:
        raise ValueError(f"BATCH={BATCH} must be divisible by world_size={world_size}")
    size = BATCH // world_size
    x, y = global_batch(step)
    return x[rank * size : (rank + 1) * size], y[rank * size : (rank + 1) * size]


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, step: int, rank: int, world_size: int
) -> dict[str, float]:
    """One forward/backward/clipped step on this rank's rows; the clip's numbers as floats."""
    x, y = local_batch(step, rank, world_size)
    optimizer.zero_grad(set_to_none=True)
    nn.functional.mse_loss(model(x), y).backward()
    optimizer.step()
    stats = distclip.get_clipper(optimizer).last_stats  # is ``optimizer.last_clip``
    if stats is None:
        raise RuntimeError("the optimizer step recorded no clip statistics")
    return stats.as_floats()


def window_of(optimizer: torch.optim.Optimizer) -> Tensor:
    """The AutoClip window's norms, oldest first (a copy)."""
    clipper = distclip.get_clipper(optimizer)
    if not isinstance(clipper, distclip.AutoClip):
        raise TypeError(f"expected an AutoClip clipper, got {type(clipper).__name__}")
    return clipper.window.chronological()


def window_num_seen(optimizer: torch.optim.Optimizer) -> int:
    """How many norms the AutoClip window has accepted so far."""
    clipper = distclip.get_clipper(optimizer)
    if not isinstance(clipper, distclip.AutoClip):
        raise TypeError(f"expected an AutoClip clipper, got {type(clipper).__name__}")
    return int(clipper.window.num_seen)


def full_params(model: nn.Module) -> dict[str, Tensor]:
    """Whole parameters by name: ``full_tensor()`` of DTensors (a collective), else copies."""
    out: dict[str, Tensor] = {}
    for name, param in model.named_parameters():
        full = param.full_tensor() if hasattr(param, "full_tensor") else param
        out[name] = full.detach().clone()
    return out


def shard_fsdp2(model: nn.Module) -> None:
    """``fully_shard`` each Linear and the root on a 1-D CPU mesh over every rank."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.children():
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
