"""distclip with DeepSpeed: AutoClip driven by DeepSpeed's own gradient norm, on CPU.

A small MLP learns a random "teacher" MLP from targets with heavy-tailed noise and,
now and then, a batch of outliers: rare huge gradient norms, the case AutoClip is
for. The DeepSpeed config (``launch/ds_config.json``) carries a ``"distclip"``
section; ``distclip.deepspeed.initialize`` reads it and hooks the engine, so every
optimizer step DeepSpeed's own pre-clip global norm enters the window and DeepSpeed
clips by the window's quantile. One step gets a NaN target on one rank: DeepSpeed
skips it, and the norm stays out of the window.

Run it with torchrun or with the DeepSpeed launcher (``launch/deepspeed.sh`` sets up
``.venv`` and does the first)::

    bash launch/deepspeed.sh
    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc-per-node 2 \\
        launch/deepspeed_train.py --steps 300
    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 .venv/bin/deepspeed --num_gpus 2 \\
        launch/deepspeed_train.py --steps 300

``--zero-stage`` and ``--bf16`` override the config file's ZeRO stage and precision.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")

import deepspeed
import deepspeed.comm as ds_dist
from torch import Tensor, nn

import distclip
import distclip.deepspeed

IN_FEATURES = 16
HIDDEN = 64
NOISE_SCALE = 0.3
OUTLIER_PROB = 0.02
OUTLIER_SCALE = 30.0
DEFAULT_CONFIG = Path(__file__).resolve().with_name("ds_config.json")


def make_mlp(hidden: int = HIDDEN) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(IN_FEATURES, hidden),
        nn.Tanh(),
        nn.Linear(hidden, hidden),
        nn.Tanh(),
        nn.Linear(hidden, 1),
    )


class SyntheticRegression:
    """Teacher-MLP targets plus Student-t noise; batch ``(step, rank, micro)`` is fixed."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        with torch.random.fork_rng():
            torch.manual_seed(seed + 1)
            self.teacher = make_mlp(hidden=32).requires_grad_(False)

    def batch(self, step: int, rank: int, micro: int, size: int) -> tuple[Tensor, Tensor]:
        gen = torch.Generator().manual_seed(((self.seed * 100_003 + step) * 64 + rank) * 8 + micro)
        x = torch.randn(size, IN_FEATURES, generator=gen)
        z, a, b = torch.randn(3, size, 1, generator=gen)
        student_t = z / ((a * a + b * b) / 2).sqrt()  # 2 degrees of freedom
        y = self.teacher(x) + NOISE_SCALE * student_t
        if float(torch.rand((), generator=gen)) < OUTLIER_PROB:
            y = y + OUTLIER_SCALE * torch.randn(size, 1, generator=gen)
        return x, y


def init_distributed() -> None:
    """Join the job (torchrun's or the deepspeed launcher's environment)."""
    if os.environ["DS_ACCELERATOR"] == "cpu":
        # DeepSpeed's CPU backend would otherwise compile its shared-memory op
        # (tens of seconds) when the process group starts.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if "RANK" not in os.environ:  # plain `python launch/deepspeed_train.py`: one process
        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29511"
        )
    deepspeed.init_distributed()


def load_config(args: argparse.Namespace) -> dict[str, Any]:
    config: dict[str, Any] = json.loads(Path(args.config).read_text())
    if args.zero_stage is not None:
        config.setdefault("zero_optimization", {})["stage"] = args.zero_stage
    if args.bf16:
        config["bf16"] = {"enabled": True}
    return config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="DeepSpeed config (JSON)")
    parser.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=None)
    parser.add_argument("--bf16", action="store_true", help="train in bf16")
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--nan-step", type=int, default=150, help="step whose rank-0 target is NaN (-1: never)"
    )
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--save", default=None, help="save a checkpoint here at the end")
    parser.add_argument("--load", default=None, help="resume from a checkpoint saved with --save")
    parser.add_argument(
        "--metrics", default=None, help="write the per-step record here as JSON lines (rank 0)"
    )
    parser.add_argument(
        "--metrics-every", type=int, default=1, help="write every N-th step to --metrics"
    )
    # The deepspeed launcher passes --local_rank; torchrun sets LOCAL_RANK instead.
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def train(args: argparse.Namespace) -> None:
    rank, world = ds_dist.get_rank(), ds_dist.get_world_size()
    is_main = rank == 0
    torch.manual_seed(args.seed)
    model = make_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    config = load_config(args)
    engine, _, _, _ = distclip.deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    adapter = distclip.deepspeed.get_adapter(engine)
    clipper = adapter.clipper
    start_step = 0
    if args.load:
        load_path, _ = engine.load_checkpoint(args.load)
        start_step = int(engine.global_steps)
        if is_main:
            print(f"resumed from {load_path}: step {start_step}, window restored", flush=True)

    gas = engine.gradient_accumulation_steps()
    micro = engine.train_micro_batch_size_per_gpu()
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
    if is_main:
        print(
            f"distclip {distclip.__version__} + DeepSpeed {deepspeed.__version__}: {world} rank(s), "
            f"ZeRO {engine.zero_optimization_stage()}, {str(dtype).removeprefix('torch.')}, "
            f"hook {adapter.hook_point}, {adapter.method} {adapter.section.options}, "
            f"{gas} x {micro} samples per rank and step",
            flush=True,
        )
    data = SyntheticRegression(args.seed)
    norms, thresholds = [], []
    writer = (
        distclip.MetricsWriter(
            args.metrics, every=args.metrics_every, rank=rank, append=bool(args.load)
        )
        if args.metrics
        else None
    )
    started = time.perf_counter()
    for step in range(start_step, args.steps):
        for m in range(gas):
            x, y = data.batch(step, rank, m, micro)
            # Both on the engine's device: on a GPU the model's output is there too.
            x, y = x.to(engine.device, dtype), y.to(engine.device)
            if step == args.nan_step and rank == 0:
                y = torch.full_like(y, float("nan"))
            loss = nn.functional.mse_loss(engine(x).float(), y)
            engine.backward(loss)
            engine.step()
        stats = adapter.last_clip
        assert stats is not None
        norms.append(stats.total_norm.detach().clone())
        thresholds.append(stats.threshold.detach().clone())
        if writer is not None:
            writer.write(stats)
        if is_main and (step + 1) % args.log_every == 0:
            seen = stats.as_floats()
            print(
                f"step {step + 1:5d}  loss {float(loss.detach()):8.4g}  DeepSpeed norm "
                f"{float(engine.get_global_grad_norm()):8.4g}  threshold {seen['threshold']:8.4g}  "
                f"coef {seen['clip_coef']:.3f}",
                flush=True,
            )
    elapsed = time.perf_counter() - started
    if writer is not None:
        writer.close()
    if args.save:
        engine.save_checkpoint(args.save)
    clipper.check_consistency()  # raises distclip.RankDesyncError if the ranks disagree
    if is_main and norms:
        norm_t, thr_t = torch.stack(norms), torch.stack(thresholds)
        finite = torch.isfinite(norm_t)
        print(
            f"\nsummary: {len(norms)} steps in {elapsed:.1f} s; since the start of training "
            f"{clipper.num_steps} steps, {int(clipper.num_clipped)} clipped, "
            f"{int(clipper.num_skipped)} skipped (NaN/inf norm: DeepSpeed skipped the update)\n"
            f"  median norm {float(norm_t[finite].median()):.4g}, max norm "
            f"{float(norm_t[finite].max()):.4g}, last threshold {float(thr_t[-1]):.4g}\n"
            f"  clipper state identical on all {world} rank(s) (check_consistency passed)",
            flush=True,
        )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    init_distributed()
    train(args)


if __name__ == "__main__":
    main()
