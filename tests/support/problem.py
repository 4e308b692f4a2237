"""The one training problem of the test suites: a small tanh MLP regressed onto noisy data.

Every suite trains an instance of :class:`Problem` (the presets at the bottom): a model
(``widths``, named layers or an ``nn.Sequential``, optionally a tied or a side layer),
its standard optimizer, clipping options and number of steps (which a suite's specs
may vary), and data of one of two kinds:

* ``"teacher"``: step ``s`` has one fixed global batch of ``batch`` rows,
  ``y = tanh(x @ teacher) + noise_scale * t(noise_df)`` (Student-t noise with
  ``noise_df < 2``: infinite variance, heavy tails, so that adaptive clipping clips
  often), drawn with numpy from ``[data_seed, s]``. Optional target ``spikes`` (an
  offset on the first quarter of the rows at given steps: norm outliers) and NaN
  inputs (``nan``: ``(step, row)`` pairs). Data-parallel rank ``r`` of ``w`` trains on
  the contiguous slice ``r`` of ``w`` (:meth:`Problem.batch_slice`): with equal slices
  and a mean loss, the averaged gradient is the full batch's, whatever the world size;
* ``"seeded"``: every rank draws its own micro-batches (:meth:`Problem.micro_batch`)
  from a generator seeded by ``data_seed + step_stride * step + rank_stride * rank +
  micro``, with targets scaled by ``1 + (7 * step + micro) % 5`` (norms that move from
  step to step). The reference concatenates the ranks' micro-batches.

Nothing here imports ``torch.distributed``: the pytest process uses the problem
without a process group, and the workers import it by name.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "DDP",
    "DEEPSPEED",
    "FAULTS",
    "INTEGRATIONS",
    "LAYOUTS",
    "LIGHTNING",
    "METHODS",
    "RESUME",
    "Problem",
    "TiedMLP",
    "loss_fn",
    "mlp",
]


def mlp(widths: tuple[int, ...], names: tuple[str, ...] | None = None) -> nn.Sequential:
    """Linear layers of ``widths`` with tanh in between (none after the last).

    ``names``: the Linear layers' names (``fc1``, ...; the activations are ``act1``,
    ...); ``None``: a plain ``nn.Sequential`` (``0``, ``2``, ...).
    """
    linears = [nn.Linear(a, b) for a, b in itertools.pairwise(widths)]
    if names is None:
        layers: list[nn.Module] = []
        for index, linear in enumerate(linears):
            layers += [linear] if index == len(linears) - 1 else [linear, nn.Tanh()]
        return nn.Sequential(*layers)
    if len(names) != len(linears):
        raise ValueError(f"{len(linears)} layers need {len(linears)} names, got {names}")
    named: OrderedDict[str, nn.Module] = OrderedDict()
    for index, (name, linear) in enumerate(zip(names, linears, strict=True)):
        named[name] = linear
        if index < len(linears) - 1:
            named[f"act{index + 1}"] = nn.Tanh()
    return nn.Sequential(named)


class TiedMLP(nn.Module):
    """``fc1 .. out`` of the layouts MLP with an ``in x in`` weight ``tied`` used twice.

    ``tanh(fc1(x @ tied.T))`` is pipeline stage 0; stage 1 is
    ``out(tanh(fc3(tanh(tanh(fc2(h)) @ tied))))`` (the tied weight appears in both).
    """

    def __init__(self, widths: tuple[int, ...]) -> None:
        super().__init__()
        width = widths[0]
        self.tied = nn.Parameter(torch.randn(width, width) / width**0.5)
        self.fc1, self.fc2, self.fc3, self.out = (
            nn.Linear(a, b) for a, b in itertools.pairwise(widths)
        )

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
    return module.out(h)  # type: ignore[no-any-return]


class WithSide(nn.Module):
    """``mlp`` plus ``side`` (``in -> out``), added to the output while ``use_side``."""

    def __init__(self, body: nn.Module, side: nn.Linear) -> None:
        super().__init__()
        self.mlp = body
        self.side = side
        self.use_side = True

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.mlp(x)
        return out + self.side(x) if self.use_side else out


def loss_fn(prediction: Tensor, target: Tensor) -> Tensor:
    """The loss of every problem: the mean squared error."""
    return nn.functional.mse_loss(prediction, target)


@dataclass(frozen=True)
class Problem:
    """A training problem: the model's shape and seed, the data's kind and seeds.

    Attributes:
        widths: input, hidden and output widths of the MLP.
        names: names of its Linear layers (``None``: an ``nn.Sequential``).
        model_seed: the default initialisation seed.
        side_seed: add a side layer initialised from this seed (:class:`WithSide`).
        data: ``"teacher"`` or ``"seeded"`` (see the module docstring).
        data_seed: the data's seed.
        batch: rows of a global batch (teacher) or of a micro-batch (seeded).
        noise_df, noise_scale: the Student-t noise of the teacher data.
        spikes: ``(step, offset)``: the offset added to the first quarter of the targets.
        nan: ``(step, row)``: a NaN in ``x[row, 0]`` of that step's global batch.
        step_stride, rank_stride: the seeded data's seed formula.
        steps: optimizer steps of a run.
        optimizer, optimizer_kwargs: the ``torch.optim`` class name and its arguments.
        method, options: the distclip method and its options.
    """

    widths: tuple[int, ...]
    names: tuple[str, ...] | None = None
    model_seed: int = 0
    side_seed: int | None = None
    data: str = "teacher"
    data_seed: int = 0
    batch: int = 16
    noise_df: float = 1.5
    noise_scale: float = 0.5
    spikes: tuple[tuple[int, float], ...] = ()
    nan: tuple[tuple[int, int], ...] = ()
    step_stride: int = 1000
    rank_stride: int = 10
    steps: int = 24
    optimizer: str = "SGD"
    optimizer_kwargs: dict[str, Any] = field(default_factory=lambda: {"lr": 0.05}, hash=False)
    method: str = "autoclip"
    options: dict[str, Any] = field(default_factory=lambda: {"q": 0.3, "window": 8}, hash=False)

    def replace(self, **changes: Any) -> Problem:
        """A copy with ``changes`` (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------- model
    def model(
        self, seed: int | None = None, *, kind: str = "mlp", dtype: torch.dtype | None = None
    ) -> nn.Module:
        """A fresh model, initialised from ``seed`` (the global RNG is left as it was).

        ``kind``: ``"mlp"`` (with the side layer if ``side_seed`` is set) or ``"tied"``
        (:class:`TiedMLP`, for the pipeline layouts).
        """
        with torch.random.fork_rng():
            torch.manual_seed(self.model_seed if seed is None else seed)
            if kind == "tied":
                model: nn.Module = TiedMLP(self.widths)
            elif kind == "mlp":
                model = mlp(self.widths, self.names)
            else:
                raise ValueError(f"kind must be 'mlp' or 'tied', got {kind!r}")
        if self.side_seed is not None and kind == "mlp":
            with torch.random.fork_rng():
                torch.manual_seed(self.side_seed)
                side = nn.Linear(self.widths[0], self.widths[-1])
            model = WithSide(model, side)
        return model if dtype is None else model.to(dtype)

    # -------------------------------------------------------------------- data
    def full_batch(self, step: int) -> tuple[Tensor, Tensor]:
        """Step ``step``'s whole batch ``(x, y)`` in float32 (teacher data)."""
        self._needs("teacher")
        inputs, outputs = self.widths[0], self.widths[-1]
        teacher = np.random.default_rng(self.data_seed).standard_normal((inputs, outputs))
        rng = np.random.default_rng([self.data_seed, step])
        x = rng.standard_normal((self.batch, inputs))
        noise = rng.standard_t(self.noise_df, size=(self.batch, outputs))
        y = np.tanh(x @ teacher) + self.noise_scale * noise
        for spike_step, offset in self.spikes:
            if spike_step == step:
                y[: self.batch // 4] += offset
        for nan_step, row in self.nan:
            if nan_step == step:
                x[row, 0] = np.nan
        return torch.from_numpy(x).float(), torch.from_numpy(y).float()

    def batch_slice(self, step: int, index: int, count: int) -> tuple[Tensor, Tensor]:
        """Contiguous slice ``index`` of ``count`` equal slices of step ``step``'s batch."""
        if self.batch % count:
            raise ValueError(f"batch={self.batch} must be divisible by {count}")
        per = self.batch // count
        x, y = self.full_batch(step)
        return x[index * per : (index + 1) * per], y[index * per : (index + 1) * per]

    def first_row(self, rank: int, world_size: int) -> int:
        """The first row of the full batch that data-parallel ``rank`` of ``world_size`` trains on."""
        return rank * (self.batch // world_size)

    def micro_batch(self, step: int, rank: int = 0, micro: int = 0) -> tuple[Tensor, Tensor]:
        """Rank ``rank``'s micro-batch ``micro`` of optimizer step ``step`` (seeded data)."""
        self._needs("seeded")
        seed = self.data_seed + self.step_stride * step + self.rank_stride * rank + micro
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(self.batch, self.widths[0], generator=generator)
        y = torch.randn(self.batch, self.widths[-1], generator=generator)
        return x, y * (1 + (7 * step + micro) % 5)

    def global_micro_batch(self, step: int, micro: int, world_size: int) -> tuple[Tensor, Tensor]:
        """Every rank's micro-batch ``micro`` of step ``step``, concatenated in rank order."""
        parts = [self.micro_batch(step, rank, micro) for rank in range(world_size)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _needs(self, kind: str) -> None:
        if self.data != kind:
            raise ValueError(f"this problem's data is {self.data!r}, not {kind!r}")


#: ``test_ddp.py``: ``0 (6 -> 16), 2 (16 -> 1)``.
DDP = Problem(widths=(6, 16, 1), data_seed=1234)
#: The sharded layouts: ``fc1 (8 -> 16), fc2 (16 -> 8), fc3 (8 -> 3), out (3 -> 1)``.
#: ``fc1``/``fc2`` split evenly under tensor parallelism over 2 or 4 ranks; ``fc3`` (3
#: rows) shards unevenly under FSDP2 and ``out`` (1 row) leaves ranks with empty shards.
LAYOUTS = Problem(widths=(8, 16, 8, 3, 1), names=("fc1", "fc2", "fc3", "out"), data_seed=4321)
#: The fault injections: the layouts MLP plus a side layer (``mlp.*``, ``side.*``).
FAULTS = LAYOUTS.replace(
    side_seed=7,
    steps=14,
    optimizer_kwargs={"lr": 0.05, "momentum": 0.9},
    options={"q": 0.3, "window": 6},
)
#: Every method under DDP and FSDP2: ``fc1 (6 -> 8), fc2 (8 -> 3), out (3 -> 1)``, spikes
#: on the first quarter of the rows (rank 0's half) and a NaN in rank 1's first row at
#: step 3 (during ZClip's warm-up on purpose). SGD without foreach/fused kernels
#: (torch's fused SGD has no DTensor rule).
METHODS = Problem(
    widths=(6, 8, 3, 1),
    names=("fc1", "fc2", "out"),
    data_seed=2024,
    spikes=((8, 8.0), (13, 4.0), (17, 12.0)),
    nan=((3, 8),),
    steps=20,
    optimizer_kwargs={"lr": 0.05, "momentum": 0.5, "foreach": False},
)
#: Crash / resume and resharding (4, 2 and 1 ranks): the hidden layers shard evenly on
#: 4 and 2 ranks, the 3 outputs do not (uneven and empty shards); an outlier batch
#: every 5 steps (clipped hard). AdamW with AutoClip (the seed API).
RESUME = Problem(
    widths=(8, 24, 24, 3),
    data_seed=4321,
    spikes=((4, 40.0), (9, 40.0), (14, 40.0), (19, 40.0)),
    steps=16,
    optimizer="AdamW",
    optimizer_kwargs={"lr": 1e-2, "weight_decay": 0.01},
    options={"q": 0.3, "window": 6},
)
#: DeepSpeed engines: micro-batches of 4 per rank and accumulation step.
DEEPSPEED = Problem(
    widths=(8, 16, 1),
    data="seeded",
    batch=4,
    steps=8,
    optimizer_kwargs={"lr": 0.1},
    options={"q": 0.3, "window": 4},
)
#: Lightning strategies: one micro-batch of 4 per rank and step.
LIGHTNING = DEEPSPEED.replace(rank_stride=1, optimizer_kwargs={"lr": 0.1, "momentum": 0.9})
#: HF Trainer and Accelerate: sample ``i`` of a data set is ``micro_batch(i)``'s one row.
INTEGRATIONS = Problem(
    widths=(4, 8, 1),
    data="seeded",
    batch=1,
    data_seed=10_000,
    step_stride=1,
    rank_stride=0,
    steps=8,
    options={"q": 0.3, "window": 4},
)
