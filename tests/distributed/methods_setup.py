"""The training problem and the clipping configurations of ``test_methods_distributed.py``.

A small MLP ``6 -> 8 -> 3 -> 1`` (tanh) regressed onto targets with Student-t noise
(heavy tails) plus a few deliberate outlier batches (:data:`SPIKES`), so every
method meets norms far above its level, and one batch with a NaN input
(:data:`NAN_STEP`) that every method must skip on every rank alike. Its shapes
exercise the sharded layouts: under FSDP2 on 2 ranks ``fc2`` (3 rows) is split
2 + 1 and ``out`` (1 row, and its 1-element bias) leaves rank 1 with an empty shard.

Every step has one fixed global batch of :data:`BATCH` rows; data-parallel rank
``r`` of ``w`` takes the contiguous slice ``r`` (equal sizes and a mean loss: the
averaged gradient is the full batch's). The single-process run trains the same
distclip optimizer on the full batch with :func:`train_loop`, the loop the
distributed workers run too, so the only difference is the layout.

Nothing here imports ``torch.distributed``: the pytest process uses it without a
process group.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import distclip

IN_FEATURES = 6
BATCH = 16
MODEL_SEED = 0
DATA_SEED = 2024
#: Degrees of freedom of the Student-t noise in the targets (< 2: infinite variance).
NOISE_DF = 1.5
#: Steps whose targets get an extra outlier offset: norm spikes every method must see.
SPIKES = {8: 8.0, 13: 4.0, 17: 12.0}
STEPS = 20
#: At this step the first row of rank 1's half gets a NaN input: the global norm is
#: NaN on every rank, the step is skipped everywhere and no state may change (the
#: single-process run sees the same NaN row). During ZClip's warm-up on purpose.
NAN_STEP = 3
NAN_ROW = BATCH // 2
#: SGD without foreach/fused kernels (torch's fused SGD has no DTensor rule).
SGD_KWARGS: dict[str, Any] = {"lr": 0.05, "momentum": 0.5, "foreach": False}

#: Clipping configurations: id -> (method, options). Every name of
#: ``distclip.available_methods()`` appears (aliases included), with options under
#: which the method clips on this data; a few extra variants follow.
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "norm": ("norm", {"max_norm": 1.0}),
    "value": ("value", {"clip_value": 0.15}),
    "coordinate_wise": ("coordinate_wise", {"clip_value": 0.25}),
    "autoclip": ("autoclip", {"q": 0.3, "window": 8, "max_norm": 1.5}),
    "auto_clip": ("auto_clip", {"q": 0.5, "window": 30}),
    "linear_stoch_norm": ("linear_stoch_norm", {"max_norm": 0.8, "beta": 0.5, "seed": 3}),
    "quadratic_stoch_norm": ("quadratic_stoch_norm", {"max_norm": 0.8, "beta": 0.3, "seed": 11}),
    "layer_wise": ("layer_wise", {"max_norm": 0.5}),
    "linear_stoch_autoclip": (
        "linear_stoch_autoclip",
        {"q": 0.3, "window": 8, "beta": 0.5, "seed": 5},
    ),
    "quadratic_stoch_autoclip": (
        "quadratic_stoch_autoclip",
        {"q": 0.2, "window": 6, "beta": 0.4, "seed": 9, "max_norm": 1.0},
    ),
    "zclip": ("zclip", {"alpha": 0.9, "z_thresh": 2.0, "warmup_steps": 5}),
    "agc": ("agc", {"clip_factor": 1.0}),
    # Variants beyond one per name.
    "zclip-mean-maxnorm": (
        "zclip",
        {"alpha": 0.8, "z_thresh": 1.5, "warmup_steps": 4, "mode": "mean", "max_norm": 2.0},
    ),
    "agc-eps": ("agc", {"clip_factor": 0.3, "eps": 2.0}),
}

#: Fields of ``last_clip`` recorded every step.
STATS_FIELDS = ("total_norm", "threshold", "clip_coef", "skipped")


class Net(nn.Module):
    """``fc1 (6->8), fc2 (8->3), out (3->1)`` with tanh in between."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(IN_FEATURES, 8)
        self.fc2 = nn.Linear(8, 3)
        self.out = nn.Linear(3, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def make_model(seed: int = MODEL_SEED, dtype: torch.dtype = torch.float32) -> Net:
    """The MLP, initialised from ``seed`` (the global RNG is left as it was)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Net().to(dtype)


def full_batch(step: int) -> tuple[Tensor, Tensor]:
    """Step ``step``'s whole batch ``(x, y)`` in float32."""
    teacher = np.random.default_rng(DATA_SEED).standard_normal((IN_FEATURES, 1))
    rng = np.random.default_rng([DATA_SEED, step])
    x = rng.standard_normal((BATCH, IN_FEATURES))
    y = np.tanh(x @ teacher) + 0.5 * rng.standard_t(NOISE_DF, size=(BATCH, 1))
    if step in SPIKES:
        y[: BATCH // 4] += SPIKES[step]  # rows of rank 0 only: the ranks' halves differ
    if step == NAN_STEP:
        x[NAN_ROW, 0] = np.nan
    return torch.from_numpy(x).float(), torch.from_numpy(y).float()


def batch_slice(step: int, index: int, count: int) -> tuple[Tensor, Tensor]:
    """Contiguous slice ``index`` of ``count`` of step ``step``'s batch."""
    if BATCH % count:
        raise ValueError(f"BATCH={BATCH} must be divisible by {count}")
    per = BATCH // count
    x, y = full_batch(step)
    return x[index * per : (index + 1) * per], y[index * per : (index + 1) * per]


def loss_fn(prediction: Tensor, target: Tensor) -> Tensor:
    return nn.functional.mse_loss(prediction, target)


def optimizer_class(config_id: str) -> type[torch.optim.Optimizer]:
    """The clipped SGD class of ``config_id``."""
    method, options = CONFIGS[config_id]
    return distclip.ClippedOptimizer(torch.optim.SGD, method=method, **options)


def build_optimizer(config_id: str, params: Any) -> torch.optim.Optimizer:
    return optimizer_class(config_id)(params, **SGD_KWARGS)


def local(tensor: Tensor) -> Tensor:
    """This rank's part of ``tensor`` (a DTensor's local shard), detached and copied."""
    part = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return part.detach().clone()


def train_loop(
    optimizer: Any,
    named_params: list[tuple[str, Tensor]],
    forward_backward: Callable[[int], None],
    steps: range,
    records: dict[str, list[Any]] | None = None,
) -> dict[str, list[Any]]:
    """Run ``steps``: zero grads, ``forward_backward(step)``, ``optimizer.step()``.

    Records, per step and in this rank's local view (a DTensor's shard): the
    parameters before the step, the largest gradient element before clipping, the
    gradients after clipping (what the update used) and ``last_clip``'s fields.
    """
    if records is None:
        records = {
            name: [] for name in (*STATS_FIELDS, "step", "params_before", "grads", "max_abs")
        }
    for step in steps:
        optimizer.zero_grad(set_to_none=True)
        forward_backward(step)
        records["params_before"].append({n: local(p) for n, p in named_params})
        records["max_abs"].append(
            max(
                (
                    float(local(p.grad).abs().max())
                    for _, p in named_params
                    if local(p.grad).numel()
                ),
                default=0.0,
            )
        )
        optimizer.step()
        records["grads"].append({n: local(p.grad) for n, p in named_params})
        stats = optimizer.last_clip
        for field in STATS_FIELDS:
            records[field].append(getattr(stats, field).detach().clone())
        records["step"].append(stats.step)
    return records


def summarize(records: dict[str, list[Any]]) -> dict[str, Any]:
    """The per-step stats stacked into 1-D tensors; the rest as recorded."""
    out = dict(records)
    for field in STATS_FIELDS:
        out[field] = torch.stack(records[field]) if records[field] else torch.empty(0)
    return out


def single_process_run(config_id: str, steps: int = STEPS) -> dict[str, Any]:
    """The same distclip optimizer on the full batch in this process (no process group)."""
    model = make_model()
    optimizer = build_optimizer(config_id, model.parameters())
    named = list(model.named_parameters())

    def forward_backward(step: int) -> None:
        x, y = full_batch(step)
        loss_fn(model(x), y).backward()

    out = summarize(train_loop(optimizer, named, forward_backward, range(steps)))
    out["params"] = {n: p.detach().clone() for n, p in named}
    out["checksum"] = optimizer.clipper.state_checksum()  # type: ignore[attr-defined]
    out["num_clipped"] = int(optimizer.clipper.num_clipped)  # type: ignore[attr-defined]
    return out
