"""The training problem of the integration tests, and its plain reference loop.

A small MLP regressed onto targets whose scale changes from sample to sample, so that
the gradient norms move around and AutoClip clips on some steps and not on others.
Sample ``i`` of the data set is a fixed function of ``i``. The model records the
sample indices of every forward pass (``model.seen``), so a test knows exactly which
samples each rank trained on at each step, whatever order the framework's sampler
chose, and the reference replays them.

:func:`reference_run` is the independent reference: a plain torch loop in one process
with distclip's ``ClippedOptimizer(SGD)`` on the concatenation of every rank's batch
of each step (DDP and DeepSpeed average the ranks' gradients of equal-sized batches:
the gradient of the mean loss over the concatenation). Nothing here imports a
framework.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

import distclip

IN_FEATURES = 4
HIDDEN = 8
BATCH = 4
LR = 0.05
NUM_SAMPLES = 256
#: AutoClip with a short window that wraps within a run, below the norms seen here.
METHOD = "autoclip"
OPTIONS: dict[str, Any] = {"q": 0.3, "window": 4}


def sample(index: int) -> tuple[Tensor, Tensor]:
    """Sample ``index``: features and a target whose scale varies (1 to 5)."""
    generator = torch.Generator().manual_seed(10_000 + index)
    x = torch.randn(IN_FEATURES, generator=generator)
    y = torch.randn(1, generator=generator) * (1 + (index * 7) % 5)
    return x, y


class IndexedData(torch.utils.data.Dataset[dict[str, Tensor]]):
    """``NUM_SAMPLES`` samples as the dicts HF Trainer and Accelerate loops expect."""

    def __len__(self) -> int:
        return NUM_SAMPLES

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        x, y = sample(index)
        return {"x": x, "y": y, "idx": torch.tensor(index)}


class TinyNet(nn.Module):
    """The MLP; ``forward`` returns ``{"loss": mse}`` and records the sample indices."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.net = nn.Sequential(
                nn.Linear(IN_FEATURES, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 1)
            )
        self.seen: list[list[int]] = []

    def forward(self, x: Tensor, y: Tensor, idx: Tensor) -> dict[str, Tensor]:
        if self.training:
            self.seen.append([int(i) for i in idx.reshape(-1)])
        return {"loss": nn.functional.mse_loss(self.net(x.float()), y.float())}


def flat_params(module: nn.Module) -> Tensor:
    """Every parameter of ``module``, flattened and concatenated (float32 copy)."""
    return torch.cat([p.detach().float().reshape(-1).clone() for p in module.parameters()])


def step_batches(seen_per_rank: list[list[list[int]]], gas: int = 1) -> list[list[int]]:
    """The global batch of each optimizer step: every rank's indices, rank 0 first.

    With ``gas`` micro-batches per step (each loss divided by ``gas``), the step's
    gradient is that of the mean loss over the union of its equal-sized micro-batches.
    """
    passes = {len(seen) for seen in seen_per_rank}
    if len(passes) != 1 or passes.copy().pop() % gas:
        raise AssertionError(f"the ranks ran {sorted(passes)} forward passes, gas={gas}")
    num_steps = passes.pop() // gas
    return [
        [i for seen in seen_per_rank for micro in range(gas) for i in seen[gas * step + micro]]
        for step in range(num_steps)
    ]


def reference_run(
    batches: list[list[int]],
    *,
    method: str = METHOD,
    options: dict[str, Any] | None = None,
    lr: float = LR,
) -> dict[str, Any]:
    """The plain loop: ``ClippedOptimizer(SGD)`` on ``batches``, one optimizer step each.

    Returns the per-step ``total_norm`` and ``threshold`` (floats), the final
    parameters (flat float32) and the window (oldest first).
    """
    model = TinyNet()
    optimizer_cls = distclip.ClippedOptimizer(
        torch.optim.SGD, method, **(OPTIONS if options is None else options)
    )
    optimizer = optimizer_cls(model.parameters(), lr=lr)
    norms, thresholds = [], []
    for batch in batches:
        x = torch.stack([sample(i)[0] for i in batch])
        y = torch.stack([sample(i)[1] for i in batch])
        optimizer.zero_grad(set_to_none=True)
        model(x, y, torch.tensor(batch))["loss"].backward()
        optimizer.step()
        record = optimizer.last_clip.as_record()
        norms.append(record["total_norm"])
        thresholds.append(record["threshold"])
    return {
        "total_norm": norms,
        "threshold": thresholds,
        "params": flat_params(model),
        "window": optimizer.clipper.window.chronological().tolist(),
    }


def max_rel_diff(actual: list[float], expected: list[float]) -> float:
    """The largest ``|a - e| / |e|`` over two equally long sequences."""
    if len(actual) != len(expected):
        raise AssertionError(f"{len(actual)} values, expected {len(expected)}")
    return max((abs(a - e) / abs(e) for a, e in zip(actual, expected, strict=True)), default=0.0)
