"""Time one optimizer step on 2 ranks (gloo, CPU): unclipped, torch's clip, distclip.

Run from the repository root, in the benchmark environment::

    bash benchmarks/setup_peers.sh
    benchmarks/.venv/bin/python benchmarks/bench_ranks.py                 # 1M and 25M
    benchmarks/.venv/bin/python benchmarks/bench_ranks.py --sizes 1M --reps 100

Two processes (``torch.multiprocessing.spawn``, world size 2, gloo, one thread each:
``OMP_NUM_THREADS=1`` and ``torch.set_num_threads(1)``) time, side by side and
interleaved round-robin, per step:

1. fused AdamW, unclipped;
2. ``torch.nn.utils.clip_grad_norm_(foreach=True)`` + fused AdamW;
3. distclip AutoClip (``AutoClippedOptimizer``, fused AdamW), window 200;
4. the same with window 10000;

in two layouts of the same model (square ``nn.Linear`` layers, as ``bench_step.py``):

* DDP: the model wrapped in ``DistributedDataParallel``; every rank holds every
  gradient (DDP has averaged them), so neither torch's clip nor distclip communicates;
* FSDP2: every layer and the root ``fully_shard``-ed over a 1-D CPU mesh; every rank
  holds half of each gradient (a ``Shard(0)`` DTensor). torch's ``clip_grad_norm_``
  reduces a DTensor norm; distclip all-reduces one scalar.

No backward pass runs: before every timed call (not timed) each rank writes fresh
gradients into ``p.grad`` (the local shard under FSDP2) from one of two
preallocated random sets, so all variants clip the same gradients. Both ranks pass a
barrier (not timed) before each call; a call's time is the slower rank's. Before
timing, one step of each variant runs with the collectives counted (every
``torch.distributed`` and functional-collective call, DTensor's included).
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import socket
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

LR = 1e-3
TORCH_MAX_NORM = 1.0
AUTOCLIP_Q = 0.1
GRAD_SETS = 2
WORLD_SIZE = 2

# size name -> (width, layers), as bench_step.py.
SIZES = {"1M": (256, 16), "25M": (1024, 24)}
DEFAULT_REPS = {"1M": 200, "25M": 60}
LAYOUTS = ("DDP", "FSDP2")

#: Collective entry points counted (those that exist in the installed torch).
_DIST_COLLECTIVES = (
    "all_reduce",
    "all_reduce_coalesced",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_to_all",
    "all_to_all_single",
    "broadcast",
    "reduce",
    "gather",
    "scatter",
    "barrier",
)
_FUNCOL_COLLECTIVES = (
    "all_reduce",
    "all_reduce_coalesced",
    "all_gather_tensor",
    "all_gather_single",
    "all_gather_into_tensor_coalesced",
    "reduce_scatter_tensor",
    "reduce_scatter_single",
    "reduce_scatter_tensor_coalesced",
    "all_to_all_single",
    "broadcast",
)


@contextmanager
def count_collectives() -> Iterator[list[str]]:
    """Count the outermost collective calls made inside the block (a list of names).

    Wraps ``torch.distributed``'s collectives and those of
    ``torch.distributed._functional_collectives`` (which DTensor uses), for the
    duration of the block only, so timed calls run unwrapped.
    """
    import torch.distributed._functional_collectives as funcol

    calls: list[str] = []
    depth = [0]
    saved: list[tuple[Any, str, Any]] = []

    def wrap(module: Any, prefix: str, name: str) -> None:
        original = getattr(module, name, None)
        if original is None:
            return

        @functools.wraps(original)
        def counted(*args: Any, **kwargs: Any) -> Any:
            if depth[0] == 0:
                calls.append(f"{prefix}{name}")
            depth[0] += 1
            try:
                return original(*args, **kwargs)
            finally:
                depth[0] -= 1

        saved.append((module, name, original))
        setattr(module, name, counted)

    for name in _DIST_COLLECTIVES:
        wrap(dist, "dist.", name)
    for name in _FUNCOL_COLLECTIVES:
        wrap(funcol, "funcol.", name)
    try:
        yield calls
    finally:
        for module, name, original in reversed(saved):
            setattr(module, name, original)


@dataclass
class Variant:
    """One timed step function and what was measured of it."""

    key: str
    label: str
    step: Callable[[], object]
    times_ms: list[float] = field(default_factory=list)
    collectives: list[str] = field(default_factory=list)


def build_variants(params: list[torch.nn.Parameter]) -> list[Variant]:
    """The four variants, each with its own fused AdamW (and clipper) on ``params``."""
    import distclip

    def fused() -> torch.optim.AdamW:
        return torch.optim.AdamW(params, lr=LR, fused=True)

    unclipped = fused()
    torch_opt = fused()

    def torch_clip_step() -> None:
        torch.nn.utils.clip_grad_norm_(params, TORCH_MAX_NORM, foreach=True)
        torch_opt.step()

    def autoclip(window: int) -> Callable[[], object]:
        cls = distclip.AutoClippedOptimizer(torch.optim.AdamW, q=AUTOCLIP_Q, window=window)
        return cls(params, lr=LR, fused=True).step  # type: ignore[no-any-return]

    return [
        Variant("1", "fused AdamW, no clipping", unclipped.step),
        Variant("2", "torch clip_grad_norm_ (foreach) + fused AdamW", torch_clip_step),
        Variant("3", "distclip AutoClip, window 200", autoclip(200)),
        Variant("4", "distclip AutoClip, window 10000", autoclip(10000)),
    ]


def make_model(width: int, layers: int) -> torch.nn.Module:
    """A stack of ``layers`` square ``nn.Linear(width, width)`` (same weights on every rank)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(*(torch.nn.Linear(width, width) for _ in range(layers)))


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor, or the tensor itself."""
    return tensor._local_tensor if hasattr(tensor, "_local_tensor") else tensor  # type: ignore[no-any-return]


def layout_params(model: torch.nn.Module, layout: str) -> list[torch.nn.Parameter]:
    """Wrap ``model`` in DDP or shard it with FSDP2; return the parameters to step."""
    if layout == "DDP":
        from torch.nn.parallel import DistributedDataParallel

        return list(DistributedDataParallel(model).parameters())
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return list(model.parameters())


def run_config(rank: int, layout: str, size: str, reps: int, warmup: int) -> dict[str, Any]:
    """Time the variants for one (layout, size) on this rank; return its measurements."""
    width, layers = SIZES[size]
    model = make_model(width, layers)
    params = layout_params(model, layout)
    for p in params:
        p.grad = torch.zeros_like(p)
    grads = [local_part(p.grad) for p in params]  # type: ignore[arg-type]
    # DDP: the same gradients on both ranks (DDP averaged them); FSDP2: each rank's shard.
    gen = torch.Generator().manual_seed(1 + (rank if layout == "FSDP2" else 0))
    grad_sets = [
        [torch.randn(g.shape, generator=gen).mul_(1e-3 * (1.0 + 0.5 * i)) for g in grads]
        for i in range(GRAD_SETS)
    ]
    variants = build_variants(params)
    counter = 0

    def refill() -> None:
        nonlocal counter
        torch._foreach_copy_(grads, grad_sets[counter % GRAD_SETS])
        counter += 1

    # Sanity: distclip's global norm is torch's (DTensor-aware) norm of the same gradients.
    import distclip

    refill()
    torch_norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
    torch_norm = torch_norm.full_tensor() if hasattr(torch_norm, "full_tensor") else torch_norm
    ours = distclip.get_total_norm([p.grad for p in params], foreach=True)
    ours = ours.full_tensor() if hasattr(ours, "full_tensor") else ours
    if not torch.allclose(ours, torch_norm, rtol=1e-5):
        raise AssertionError(f"{layout} {size}: distclip norm {ours} != torch's {torch_norm}")

    for _ in range(warmup):
        for v in variants:
            refill()
            v.step()
    for v in variants:
        refill()
        dist.barrier()
        with count_collectives() as calls:
            v.step()
        v.collectives = list(calls)

    import gc

    gc.collect()
    gc.disable()
    try:
        for r in range(reps):
            k = r % len(variants)
            for v in variants[k:] + variants[:k]:
                refill()
                dist.barrier()
                t0 = time.perf_counter_ns()
                v.step()
                v.times_ms.append((time.perf_counter_ns() - t0) / 1e6)
    finally:
        gc.enable()
    numel = sum(p.numel() for p in params)
    local_numel = sum(g.numel() for g in grads)
    return {
        "layout": layout,
        "size": size,
        "numel": numel,
        "local_numel": local_numel,
        "variants": [
            {"key": v.key, "label": v.label, "times": v.times_ms, "collectives": v.collectives}
            for v in variants
        ],
    }


def worker(
    rank: int, port: int, configs: list[tuple[str, str, int]], warmup: int, out: str
) -> None:
    """One rank: join the gloo group, run every configuration, rank 0 writes the results."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        results = []
        for layout, size, reps in configs:
            if rank == 0:
                print(f"{layout} {size}: {reps} rounds ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            mine = run_config(rank, layout, size, reps, warmup)
            gathered: list[Any] = [None] * WORLD_SIZE
            dist.all_gather_object(gathered, mine)
            results.append(gathered)
            if rank == 0:
                print(f"{layout} {size}: done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    """(q1, median, q3), inclusive method."""
    q1, med, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, med, q3


def summarize(per_rank: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per variant: each call's time as the slower rank's; collectives of rank 0 (and 1)."""
    rows = []
    for i, v0 in enumerate(per_rank[0]["variants"]):
        per_call = [
            max(ts) for ts in zip(*(r["variants"][i]["times"] for r in per_rank), strict=True)
        ]
        counts = {len(r["variants"][i]["collectives"]) for r in per_rank}
        rows.append(
            {
                "key": v0["key"],
                "label": v0["label"],
                "times": per_call,
                "collectives": v0["collectives"],
                "same_on_ranks": len(counts) == 1,
            }
        )
    return rows


def describe_collectives(names: list[str]) -> str:
    """``"1 (funcol.all_reduce)"`` from a list of call names."""
    if not names:
        return "0"
    kinds: dict[str, int] = {}
    for name in names:
        kinds[name] = kinds.get(name, 0) + 1
    return (
        f"{len(names)} ("
        + ", ".join(f"{n}" if c == 1 else f"{c} x {n}" for n, c in kinds.items())
        + ")"
    )


def table(results: list[list[dict[str, Any]]]) -> str:
    """The markdown table of medians, IQRs, ratios and collectives."""
    lines = [
        "| layout | params (per rank) | # | variant | median ms | IQR ms "
        "| ÷ (2) torch clip + step | paired ÷ (2), median | ÷ (1) unclipped "
        "| collectives/step |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for per_rank in results:
        info = per_rank[0]
        rows = summarize(per_rank)
        med = {r["key"]: statistics.median(r["times"]) for r in rows}
        size = f"{info['numel'] / 1e6:.1f}M ({info['local_numel'] / 1e6:.1f}M)"
        for r in rows:
            q1, m, q3 = quartiles(r["times"])
            paired = statistics.median(
                [a / b for a, b in zip(r["times"], rows[1]["times"], strict=True)]
            )
            coll = describe_collectives(r["collectives"])
            if not r["same_on_ranks"]:
                coll += " (differs by rank)"
            lines.append(
                f"| {info['layout']} | {size} | {r['key']} | {r['label']} | {m:.2f} "
                f"| {q3 - q1:.2f} | {m / med['2']:.3f} | {paired:.3f} | {m / med['1']:.3f} "
                f"| {coll} |"
            )
    return "\n".join(lines)


def header(args: argparse.Namespace, reps: dict[str, int]) -> str:
    """Date, versions, machine and method lines for the report."""
    import distclip

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"- date: {time.strftime('%Y-%m-%d %H:%M')}; torch {torch.__version__}; "
        f"distclip {distclip.__version__}; Python {platform.python_version()}\n"
        f"- CPU: {cpu}, {os.cpu_count()} logical cores visible; {WORLD_SIZE} ranks "
        "(torch.multiprocessing.spawn, gloo), OMP_NUM_THREADS=1 and "
        "torch.set_num_threads(1) per rank\n"
        "- rounds per configuration (round-robin, interleaved, start rotating): "
        + ", ".join(f"{k}: {n}" for k, n in reps.items())
        + f"; warm-up rounds: {args.warmup}\n"
        f"- gradients refilled (untimed) into p.grad (the local shard under FSDP2) before "
        f"each call from {GRAD_SETS} preallocated random sets; a barrier (untimed) "
        "before each call; a call's time is the slower rank's\n"
        "- paired ÷ (2): the median over rounds of (variant ÷ torch clip + step) timed "
        "in the same round"
    )


def free_port() -> int:
    """A TCP port nobody listens on now, for the rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    """Parse the options, spawn the 2 ranks, print and write the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1M,25M", help="comma list of 1M, 25M")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help="comma list of DDP, FSDP2")
    parser.add_argument("--reps", type=int, default=None, help="rounds (default by size)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed rounds first")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "results" / "bench_ranks.md",
        help="Markdown file to write (default: benchmarks/results/bench_ranks.md)",
    )
    args = parser.parse_args(argv)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    layouts = [s.strip() for s in args.layouts.split(",") if s.strip()]
    if bad := [s for s in sizes if s not in SIZES] + [x for x in layouts if x not in LAYOUTS]:
        parser.error(f"unknown size(s)/layout(s) {bad}")
    reps = {s: args.reps or DEFAULT_REPS[s] for s in sizes}
    configs = [(layout, size, reps[size]) for size in sizes for layout in layouts]

    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned ranks
    raw = args.out.with_suffix(".pt")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    mp.spawn(worker, args=(free_port(), configs, args.warmup, str(raw)), nprocs=WORLD_SIZE)
    results = torch.load(raw, weights_only=False)
    raw.unlink()

    text = "\n\n".join(
        [
            f"# One optimizer step on {WORLD_SIZE} ranks: clip + AdamW update (CPU, gloo)",
            header(args, reps),
            table(results),
        ]
    )
    print(text)
    args.out.write_text(text + "\n")
    print(f"\nwritten: {os.path.relpath(args.out)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
