"""The training problem shared by the sharded-layout workers and their reference.

Two small models, both regressed onto targets with Student-t noise (heavy tails: a
few batches have gradient norms far above the rest, so AutoClip clips often):

* :class:`MLP` ``8 -> 16 -> 8 -> 3 -> 1`` (tanh). ``fc1``/``fc2`` have every
  dimension divisible by 4, so tensor parallelism over 2 or 4 ranks splits them
  evenly; ``fc3`` (3 rows) shards unevenly under FSDP2 (2 + 1 on 2 ranks, an empty
  shard on the 4th of 4 ranks) and ``out`` (1 row) leaves every rank but one with an
  empty FSDP2 shard, and FSDP1 (``use_orig_params=True``, one unit per layer) with an
  empty view of ``out.bias`` on rank 0.
* :class:`TiedMLP`, the same with an 8x8 weight ``tied`` used twice (as an input
  projection in stage 0 and again in stage 1), for the pipeline layouts: stage 0 is
  ``tied, fc1``, stage 1 is ``fc2, tied, fc3, out``.

Every step has one fixed global batch of :data:`BATCH` rows derived from a seed. A
data-parallel rank takes its contiguous slice (equal sizes, mean loss: the averaged
gradient is the full batch's); tensor-parallel ranks of one replica see the same
slice. The reference trains on the full batch in one process.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

IN_FEATURES = 8
BATCH = 16
MODEL_SEED = 0
DATA_SEED = 4321
#: Degrees of freedom of the Student-t noise in the targets (< 2: infinite variance).
NOISE_DF = 1.5


class MLP(nn.Module):
    """``fc1 (8->16), fc2 (16->8), fc3 (8->3), out (3->1)`` with tanh in between."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(IN_FEATURES, 16)
        self.fc2 = nn.Linear(16, 8)
        self.fc3 = nn.Linear(8, 3)
        self.out = nn.Linear(3, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.fc1(x))
        h = torch.tanh(self.fc2(h))
        h = torch.tanh(self.fc3(h))
        return self.out(h)


class TiedMLP(nn.Module):
    """:class:`MLP` with an 8x8 weight ``tied`` applied before ``fc1`` and after ``fc2``."""

    def __init__(self) -> None:
        super().__init__()
        self.tied = nn.Parameter(torch.randn(IN_FEATURES, IN_FEATURES) / IN_FEATURES**0.5)
        self.fc1 = nn.Linear(IN_FEATURES, 16)
        self.fc2 = nn.Linear(16, 8)
        self.fc3 = nn.Linear(8, 3)
        self.out = nn.Linear(3, 1)

    def forward(self, x: Tensor) -> Tensor:
        return stage1_forward(self, stage0_forward(self, x))


def stage0_forward(module: nn.Module, x: Tensor) -> Tensor:
    """Pipeline stage 0 of :class:`TiedMLP` (``module`` holds ``tied`` and ``fc1``)."""
    return torch.tanh(module.fc1(x @ module.tied.t()))


def stage1_forward(module: nn.Module, h: Tensor) -> Tensor:
    """Pipeline stage 1 of :class:`TiedMLP` (``module`` holds ``fc2, tied, fc3, out``)."""
    h = torch.tanh(module.fc2(h))
    h = torch.tanh(h @ module.tied)
    h = torch.tanh(module.fc3(h))
    return module.out(h)


#: Parameter names (of :class:`TiedMLP`) held by each pipeline stage.
STAGE_PARAMS = (
    ("tied", "fc1.weight", "fc1.bias"),
    ("fc2.weight", "fc2.bias", "tied", "fc3.weight", "fc3.bias", "out.weight", "out.bias"),
)


class Stage(nn.Module):
    """One pipeline stage of :class:`TiedMLP`: copies of that stage's parameters."""

    def __init__(self, full: TiedMLP, stage: int) -> None:
        super().__init__()
        self.stage = stage
        self.tied = nn.Parameter(full.tied.detach().clone())
        self.fc1 = copy_linear(full.fc1) if stage == 0 else None
        self.fc2 = copy_linear(full.fc2) if stage == 1 else None
        self.fc3 = copy_linear(full.fc3) if stage == 1 else None
        self.out = copy_linear(full.out) if stage == 1 else None

    def forward(self, x: Tensor) -> Tensor:
        return stage0_forward(self, x) if self.stage == 0 else stage1_forward(self, x)


def copy_linear(linear: nn.Linear) -> nn.Linear:
    copy = nn.Linear(linear.in_features, linear.out_features)
    copy.load_state_dict(linear.state_dict())
    return copy


MODELS = {"mlp": MLP, "tied": TiedMLP}


def make_model(kind: str = "mlp", seed: int = MODEL_SEED) -> nn.Module:
    """A fresh model of ``kind`` initialised from ``seed`` (the global RNG is left alone)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return MODELS[kind]()


def full_batch(step: int) -> tuple[Tensor, Tensor]:
    """Step ``step``'s whole batch ``(x, y)``: ``y = tanh(x @ teacher) + 0.5 t(1.5)``."""
    teacher = np.random.default_rng(DATA_SEED).standard_normal((IN_FEATURES, 1))
    rng = np.random.default_rng([DATA_SEED, step])
    x = rng.standard_normal((BATCH, IN_FEATURES))
    y = np.tanh(x @ teacher) + 0.5 * rng.standard_t(NOISE_DF, size=(BATCH, 1))
    return torch.from_numpy(x).float(), torch.from_numpy(y).float()


def batch_slice(step: int, index: int, count: int) -> tuple[Tensor, Tensor]:
    """Slice ``index`` of ``count`` equal contiguous slices of step ``step``'s batch."""
    if BATCH % count:
        raise ValueError(f"BATCH={BATCH} must be divisible by {count}")
    per = BATCH // count
    x, y = full_batch(step)
    return x[index * per : (index + 1) * per], y[index * per : (index + 1) * per]


def loss_fn(prediction: Tensor, target: Tensor) -> Tensor:
    return nn.functional.mse_loss(prediction, target)


def make_spec(layout: str, **options: Any) -> dict[str, Any]:
    """A run: the layout (see ``layouts_build``) and its options, AutoClip, SGD, steps.

    Defaults: 24 steps of AutoClip (q=0.3, window=8: the window wraps) with SGD
    (lr 0.05, no momentum, ``foreach=False``), the 2-norm, the subclass integration,
    the first-step consistency check on, the functional checks run first.
    """
    spec: dict[str, Any] = {
        "layout": layout,
        "kind": "tied" if layout == "pipeline" else "mlp",
        "steps": 24,
        "q": 0.3,
        "window": 8,
        "norm_type": 2.0,
        "lr": 0.05,
        "momentum": 0.0,
        "foreach": False,
        "integration": "subclass",
        "check_first_step": True,
        "functional": True,
    }
    unknown = set(options) - set(spec) - LAYOUT_OPTIONS
    if unknown:
        raise TypeError(f"unknown spec option(s) {sorted(unknown)}")
    spec.update(options)
    return spec


#: Options that only some layouts read (see ``layouts_build``).
LAYOUT_OPTIONS = {
    "sharding",
    "use_orig_params",
    "ignored",
    "hsdp",
    "shared",
    "new_group",
    "mixed",
}
