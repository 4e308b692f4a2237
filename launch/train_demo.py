"""distclip demo: AutoClip under DDP, FSDP1, FSDP2, tensor parallel or 2-D FSDP2+TP, on CPU.

A small MLP learns a fixed random "teacher" network from synthetic data whose targets
carry heavy-tailed noise (Student-t with 2 degrees of freedom: infinite variance) and,
now and then, a whole batch of outliers. Such data produce rare, huge gradient norms,
the case AutoClip is made for: each step's gradients are scaled down to the q-quantile
of the last ``window`` global gradient norms. One step also gets a NaN target on one
rank only: the global norm is NaN, and the step is skipped on every rank alike.

Run with torchrun (``launch/demo.sh`` does this)::

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 launch/train_demo.py

Without torchrun the script runs as a single process (world size 1).

``--layout`` picks the parallelism (``ddp``, ``fsdp1``, ``fsdp2``, ``tp``, ``fsdp2+tp``,
which needs an even number of ranks, and ``deepspeed``: ZeRO-2, DeepSpeed's own norm
driving distclip's threshold; it needs the ``deepspeed`` extra). A layout is a small function that wraps the
model and says which data shard this rank trains on; see ``LAYOUTS``. Every layout
trains the same model on the same global batches, so the norms, thresholds and losses
it prints agree across layouts up to floating-point rounding.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import distclip
import distclip.deepspeed  # does not import DeepSpeed until it is used

IN_FEATURES = 16
HIDDEN = 64
NOISE_SCALE = 0.3  # scale of the Student-t target noise
OUTLIER_PROB = 0.02  # chance that a whole batch gets outlier targets
OUTLIER_SCALE = 30.0  # how far outlier targets are pushed
QUANTILES = {"min": 0.0, "10%": 0.1, "50%": 0.5, "90%": 0.9, "max": 1.0}


# --------------------------------------------------------------------------- setup
@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job."""

    rank: int
    world_size: int
    device: torch.device
    backend: str


def init_distributed() -> DistEnv:
    """Join the torchrun job (gloo on CPU), or form a group of one without torchrun."""
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    else:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    return DistEnv(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        device=torch.device("cpu"),
        backend=str(dist.get_backend()),
    )


# ------------------------------------------------------------------------- layouts
@dataclass(frozen=True)
class Prepared:
    """A model wrapped for a layout, the data shard this rank trains on, and what the
    clipped optimizer needs to know about the layout (e.g. ``model=`` for FSDP1)."""

    model: nn.Module
    shard: int
    num_shards: int
    optimizer_kwargs: dict[str, Any] = field(default_factory=dict)
    #: How torch's SGD runs: fused where it can (the clip and the NaN/inf skip then stay
    #: on the device); fused SGD has no DTensor rule, and foreach cannot mix DTensors
    #: with plain tensors (TP leaves the output layer a plain tensor).
    sgd_impl: dict[str, bool] = field(default_factory=lambda: {"fused": True})
    #: A DeepSpeed config: the model is trained by a DeepSpeed engine instead, and
    #: distclip is configured by the config's "distclip" section.
    deepspeed_config: dict[str, Any] | None = None


def layout_ddp(model: nn.Module, env: DistEnv) -> Prepared:
    """DistributedDataParallel: every rank holds the whole model; gradients are averaged."""
    return Prepared(DistributedDataParallel(model), shard=env.rank, num_shards=env.world_size)


def layout_fsdp1(model: nn.Module, env: DistEnv) -> Prepared:
    """FSDP1, FULL_SHARD: flat parameter shards; distclip needs the root (``model=``)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    wrapped = FullyShardedDataParallel(model, device_id=env.device, use_orig_params=True)
    return Prepared(wrapped, env.rank, env.world_size, {"model": wrapped})


def layout_fsdp2(model: nn.Module, env: DistEnv) -> Prepared:
    """FSDP2 (``fully_shard``): every parameter a DTensor sharded on dim 0."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(env.device.type, (env.world_size,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return Prepared(model, env.rank, env.world_size, sgd_impl={"foreach": True})


def _tensor_parallel(model: nn.Module, mesh: Any) -> None:
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    # Hidden layers split column-wise then row-wise; the output layer stays replicated.
    parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})


def layout_tp(model: nn.Module, env: DistEnv) -> Prepared:
    """Tensor parallel: every rank sees the same data and holds a slice of the layers."""
    from torch.distributed.device_mesh import init_device_mesh

    _tensor_parallel(model, init_device_mesh(env.device.type, (env.world_size,)))
    return Prepared(model, shard=0, num_shards=1, sgd_impl={"foreach": False})


def layout_fsdp2_tp(model: nn.Module, env: DistEnv) -> Prepared:
    """2-D: tensor parallel over pairs of ranks, FSDP2 over the data-parallel dimension."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if env.world_size % 2:
        raise ValueError(f"fsdp2+tp needs an even number of ranks, got {env.world_size}")
    mesh = init_device_mesh(env.device.type, (env.world_size // 2, 2), mesh_dim_names=("dp", "tp"))
    _tensor_parallel(model, mesh["tp"])
    fully_shard(model, mesh=mesh["dp"])
    dp_rank = mesh.get_coordinate()[0]  # type: ignore[index]
    return Prepared(
        model, shard=dp_rank, num_shards=env.world_size // 2, sgd_impl={"foreach": True}
    )


def layout_deepspeed(model: nn.Module, env: DistEnv) -> Prepared:
    """DeepSpeed ZeRO-2: DeepSpeed computes the norm, distclip supplies the threshold."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as err:
        raise SystemExit(
            "--layout deepspeed needs DeepSpeed: bash scripts/setup_env.sh demo,deepspeed "
            "(or bash launch/deepspeed.sh for the DeepSpeed example)"
        ) from err
    # DeepSpeed's CPU backend would otherwise compile its shared-memory op (tens of s).
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=env.backend)
    config = {
        "train_micro_batch_size_per_gpu": 1,  # set from --batch-size in train()
        "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 1.0,  # replaced by distclip's threshold every step
        "steps_per_print": 10**9,
    }
    return Prepared(model, env.rank, env.world_size, deepspeed_config=config)


#: Layout name -> function wrapping the model for that kind of parallelism.
LAYOUTS: dict[str, Callable[[nn.Module, DistEnv], Prepared]] = {
    "ddp": layout_ddp,
    "fsdp1": layout_fsdp1,
    "fsdp2": layout_fsdp2,
    "tp": layout_tp,
    "fsdp2+tp": layout_fsdp2_tp,
    "deepspeed": layout_deepspeed,
}


# ---------------------------------------------------------------------------- data
def make_mlp(out_features: int = 1, hidden: int = HIDDEN) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(IN_FEATURES, hidden),
        nn.Tanh(),
        nn.Linear(hidden, hidden),
        nn.Tanh(),
        nn.Linear(hidden, out_features),
    )


class SyntheticRegression:
    """Targets from a fixed random teacher MLP plus heavy-tailed noise.

    Batch ``step`` is drawn from a generator seeded by ``(seed, step)``; a rank keeps
    its shard (a contiguous slice) of it, so every rank's data are deterministic and
    the global batch does not depend on how many ranks share it.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        with torch.random.fork_rng():
            torch.manual_seed(seed + 1)
            self.teacher = make_mlp(hidden=32).requires_grad_(False)

    def _generator(self, stream: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + stream)

    def batch(
        self, step: int, batch_size: int, shard: int, num_shards: int
    ) -> tuple[Tensor, Tensor]:
        gen = self._generator(step + 1)
        x = torch.randn(batch_size, IN_FEATURES, generator=gen)
        z, a, b = torch.randn(3, batch_size, 1, generator=gen)
        student_t = z / ((a * a + b * b) / 2).sqrt()  # Student-t, 2 degrees of freedom
        y = self.teacher(x) + NOISE_SCALE * student_t
        if float(torch.rand((), generator=gen)) < OUTLIER_PROB:  # a batch of outliers
            y = y + OUTLIER_SCALE * torch.randn(batch_size, 1, generator=gen)
        size = batch_size // num_shards
        rows = slice(shard * size, (shard + 1) * size)
        return x[rows], y[rows]

    def held_out(self, size: int = 2048) -> tuple[Tensor, Tensor]:
        """A noise-free evaluation set: how well the teacher itself is learnt."""
        x = torch.randn(size, IN_FEATURES, generator=self._generator(0))
        return x, self.teacher(x)


@torch.no_grad()
def evaluate(model: nn.Module, data: tuple[Tensor, Tensor]) -> float:
    """Mean squared error on ``data`` (every rank evaluates the same set)."""
    x, y = data
    return float(nn.functional.mse_loss(model(x), y))


# ---------------------------------------------------------------------------- main
def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="ddp")
    parser.add_argument("--q", type=float, default=0.1, help="AutoClip quantile, in [0, 1]")
    parser.add_argument("--window", type=int, default=200, help="how many past norms are kept")
    parser.add_argument("--max-norm", type=float, default=None, help="cap on the threshold")
    parser.add_argument("--steps", type=positive_int, default=1000, help="training steps")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seeds the model and the data")
    parser.add_argument(
        "--batch-size", type=positive_int, default=64, help="global batch, split over the ranks"
    )
    parser.add_argument(
        "--nan-step",
        type=int,
        default=500,
        help="at this step one rank's batch gets a NaN target, so the step is skipped "
        "on every rank (-1: never)",
    )
    parser.add_argument(
        "--log-every", type=positive_int, default=10, help="progress bar update interval"
    )
    parser.add_argument(
        "--metrics",
        default=None,
        help="write the per-step record here as JSON lines (rank 0; see distclip.MetricsWriter)"
        "; draw it with python -m distclip.plot",
    )
    parser.add_argument(
        "--metrics-every",
        type=positive_int,
        default=1,
        help="write every N-th step to --metrics (each line is one copy to the host)",
    )
    return parser.parse_args(argv)


def quantile_row(name: str, values: Tensor) -> str:
    qs = torch.nanquantile(
        values.double(), torch.tensor(list(QUANTILES.values()), dtype=torch.float64)
    )
    return f"  {name:<16}" + "".join(f"{v:>10.4g}" for v in qs.tolist())


def train(args: argparse.Namespace, env: DistEnv) -> None:
    is_main = env.rank == 0
    torch.manual_seed(args.seed)
    prepared = LAYOUTS[args.layout](make_mlp().to(env.device), env)
    model = prepared.model
    if args.batch_size % prepared.num_shards:
        raise ValueError(
            f"--batch-size {args.batch_size} must be divisible by the number of data "
            f"shards ({prepared.num_shards})"
        )
    if prepared.deepspeed_config is None:
        optimizer_cls = distclip.AutoClippedOptimizer(
            torch.optim.SGD, q=args.q, window=args.window, max_norm=args.max_norm
        )
        optimizer = optimizer_cls(
            model.parameters(),
            lr=args.lr,
            momentum=0.9,
            **prepared.sgd_impl,
            **prepared.optimizer_kwargs,
        )
        clipper = optimizer.clipper

        def update(loss: Tensor) -> None:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        def last_clip() -> distclip.ClipStats | None:
            return optimizer.last_clip  # type: ignore[no-any-return]

    else:
        config = {
            **prepared.deepspeed_config,
            "train_micro_batch_size_per_gpu": args.batch_size // prepared.num_shards,
            "distclip": {"method": "autoclip", "q": args.q, "window": args.window},
        }
        if args.max_norm is not None:
            config["distclip"]["max_norm"] = args.max_norm
        engine, *_ = distclip.deepspeed.initialize(
            model=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9),
            config=config,
        )
        model = engine
        adapter = distclip.deepspeed.get_adapter(engine)
        clipper = adapter.clipper

        def update(loss: Tensor) -> None:
            engine.backward(loss)
            engine.step()

        def last_clip() -> distclip.ClipStats | None:
            return adapter.last_clip

    assert isinstance(clipper, distclip.AutoClip)

    data = SyntheticRegression(args.seed)
    held_out = data.held_out()
    initial_loss = evaluate(model, held_out)
    if is_main:
        print(
            f"distclip {distclip.__version__} demo: layout={args.layout}, "
            f"{env.world_size} rank(s) ({env.backend}, {env.device.type}), "
            f"AutoClip q={args.q} window={args.window} max_norm={args.max_norm}, "
            f"SGD lr={args.lr}, global batch {args.batch_size}",
            flush=True,
        )

    norms: list[Tensor] = []
    thresholds: list[Tensor] = []
    writer = (
        distclip.MetricsWriter(args.metrics, every=args.metrics_every, rank=env.rank)
        if args.metrics
        else None
    )
    start = time.perf_counter()
    with tqdm(total=args.steps, disable=not is_main, unit="step", mininterval=0.5) as bar:
        for step in range(args.steps):
            x, y = data.batch(step, args.batch_size, prepared.shard, prepared.num_shards)
            x, y = x.to(env.device), y.to(env.device)
            if step == args.nan_step and prepared.shard == prepared.num_shards - 1:
                y = torch.full_like(y, float("nan"))  # one rank only: DDP spreads it
            loss = nn.functional.mse_loss(model(x), y)
            update(loss)
            stats = last_clip()
            assert stats is not None
            norms.append(stats.total_norm.detach().clone())  # tensors: no host sync
            thresholds.append(stats.threshold.detach().clone())
            if writer is not None:
                writer.write(stats)  # a host copy on the steps it writes, on rank 0
            bar.update(1)
            if is_main and (step + 1) % args.log_every == 0:
                seen = stats.as_floats()  # the only host reads: once per interval
                bar.set_postfix(
                    loss=f"{float(loss.detach()):.3g}",
                    norm=f"{seen['total_norm']:.3g}",
                    threshold=f"{seen['threshold']:.3g}",
                    refresh=False,
                )
    elapsed = time.perf_counter() - start
    if writer is not None:
        writer.close()

    final_loss = evaluate(model, held_out)
    # Debug check: every rank's window must be bit-for-bit the same.
    clipper.check_consistency()  # raises distclip.RankDesyncError otherwise
    window = clipper.window.chronological()
    gathered = [torch.empty_like(window) for _ in range(env.world_size)]
    dist.all_gather(gathered, window)
    identical = all(torch.equal(w, window) for w in gathered)

    if is_main:
        norm_values, threshold_values = torch.stack(norms), torch.stack(thresholds)
        num_clipped, num_skipped = int(clipper.num_clipped), int(clipper.num_skipped)
        print(
            f"\nsummary ({args.steps} steps in {elapsed:.1f} s, "
            f"{args.steps / elapsed:.0f} steps/s)\n"
            f"  steps            {args.steps}\n"
            f"  steps clipped    {num_clipped} ({100 * num_clipped / args.steps:.1f}%)\n"
            f"  steps skipped    {num_skipped} (NaN/inf global norm)\n"
            f"  {'':<16}" + "".join(f"{label:>10}" for label in QUANTILES) + "\n"
            f"{quantile_row('pre-clip norm', norm_values)}\n"
            f"{quantile_row('threshold', threshold_values)}\n"
            f"  held-out loss    {initial_loss:.4g} initially -> {final_loss:.4g} at the end\n"
            f"  window           {window.numel()} norms, "
            + (
                f"identical on all {env.world_size} rank(s) (check_consistency passed)"
                if identical
                else "DIFFERENT between ranks"
            ),
            flush=True,
        )
        if writer is not None:
            print(f"  metrics          {writer.num_written} lines in {args.metrics}", flush=True)
    if not identical:
        raise distclip.RankDesyncError("the AutoClip windows differ between ranks")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    env = init_distributed()
    try:
        train(args, env)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
