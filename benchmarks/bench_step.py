"""Time one optimizer step (clip + AdamW update) for distclip and its peers.

Run from the repository root, in the benchmark environment::

    bash benchmarks/setup_peers.sh
    benchmarks/.venv/bin/python benchmarks/bench_step.py            # 1M, 25M, 100M
    benchmarks/.venv/bin/python benchmarks/bench_step.py --sizes 1M,25M --reps 30

All variants share one model (a stack of square Linear layers), so its parameters and
gradient tensors exist once; each variant has its own optimizer (its own AdamW state)
and clipper. Before every timed call the gradients are refilled from a preallocated
set of random gradients (not timed), so every variant clips the same gradients. The
variants are timed round-robin in one process (the order rotates each round), and
the median and interquartile range of the per-call times are reported. Before timing,
one step of each variant runs under a TorchDispatchMode that counts
``aten._local_scalar_dense`` calls: the host synchronisations (``.item()``,
``float(t)``, ``bool(t)``) the step makes.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import distclip

LR = 1e-3
TORCH_MAX_NORM = 1.0
AUTOCLIP_Q = 0.1
GRAD_SETS = 2  # gradient sets cycled through, with different scales, so norms vary

# size name -> (width, layers): layers x (width^2 + width) parameters.
SIZES = {
    "1M": (256, 16),  # 1.05M parameters, 32 tensors
    "25M": (1024, 24),  # 25.2M parameters, 48 tensors
    "100M": (2048, 24),  # 100.7M parameters, 48 tensors
}
DEFAULT_REPS = {"1M": 300, "25M": 100, "100M": 40}


class SyncCounter(TorchDispatchMode):
    """Counts device-to-host reads of a scalar (``aten._local_scalar_dense``)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


@dataclass
class Variant:
    key: str
    label: str
    step: Callable[[], object] | None  # None: not available
    note: str = ""
    times_ms: list[float] = field(default_factory=list)
    syncs: int | None = None


def fused_adamw(params: list[torch.nn.Parameter]) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=LR, fused=True)


def build_variants(model: torch.nn.Module) -> list[Variant]:
    params = list(model.parameters())
    variants: list[Variant] = []

    def add(key: str, label: str, make: Callable[[], Callable[[], object]]) -> None:
        try:
            step = make()
        except Exception as exc:  # a peer that is missing or breaks is reported
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:120]
            variants.append(Variant(key, label, None, f"not installable: {reason}"))
            return
        variants.append(Variant(key, label, step))

    def baseline() -> Callable[[], object]:
        return fused_adamw(params).step

    def torch_clip() -> Callable[[], object]:
        opt = fused_adamw(params)

        def step() -> None:
            torch.nn.utils.clip_grad_norm_(params, TORCH_MAX_NORM, foreach=True)
            opt.step()

        return step

    def distclip_auto(window: int) -> Callable[[], Callable[[], object]]:
        def make() -> Callable[[], object]:
            cls = distclip.AutoClippedOptimizer(torch.optim.AdamW, q=AUTOCLIP_Q, window=window)
            return cls(params, lr=LR, fused=True).step

        return make

    def distclip_zclip() -> Callable[[], object]:
        cls = distclip.ClippedOptimizer(torch.optim.AdamW, method="zclip")
        return cls(params, lr=LR, fused=True).step

    def gn_autoclipper() -> Callable[[], object]:
        from autoclipper import AutoClippedOptimizer

        cls = AutoClippedOptimizer(torch.optim.AdamW, q=AUTOCLIP_Q, window=200, max_norm=None)
        return cls(params, lr=LR, fused=True).step

    def autoclip_quantile() -> Callable[[], object]:
        from autoclip.torch import QuantileClip

        clipper = QuantileClip(
            params, quantile=AUTOCLIP_Q, history_length=200, global_threshold=True
        )
        opt = fused_adamw(params)

        def step() -> None:
            clipper.step()
            opt.step()

        return step

    def zclip_peer() -> Callable[[], object]:
        from zclip import ZClip

        clipper = ZClip(max_grad_norm=None)  # distclip's zclip defaults: no absolute cap
        opt = fused_adamw(params)

        def step() -> None:
            clipper.step(model)
            opt.step()

        return step

    add("1", "fused AdamW, no clipping", baseline)
    add("2", "torch clip_grad_norm_ (foreach) + fused AdamW", torch_clip)
    add("3", "distclip AutoClip, window 200", distclip_auto(200))
    add("4", "distclip AutoClip, window 10000", distclip_auto(10000))
    add("5", "distclip ZClip", distclip_zclip)
    add("6", "gradientnorm-autoclipper 1.0.0, window 200", gn_autoclipper)
    add("7", "autoclip 0.2.1 QuantileClip (global) + fused AdamW", autoclip_quantile)
    add("8", "zclip 1.0.0 ZClip + fused AdamW", zclip_peer)
    return variants


def make_model(width: int, layers: int) -> torch.nn.Module:
    return torch.nn.Sequential(*(torch.nn.Linear(width, width) for _ in range(layers)))


def available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    q1, med, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, med, q3


def run_size(name: str, reps: int, warmup: int, seed: int) -> dict[str, object]:
    width, layers = SIZES[name]
    torch.manual_seed(seed)
    model = make_model(width, layers)
    params = list(model.parameters())
    numel = sum(p.numel() for p in params)
    # Gradients live once, in p.grad; each call refills them from one of the sets.
    for p in params:
        p.grad = torch.empty_like(p)
    grads = [p.grad for p in params]
    scales = [1.0 + 0.5 * i for i in range(GRAD_SETS)]
    grad_sets = [[torch.randn_like(p).mul_(1e-3 * s) for p in params] for s in scales]

    variants = build_variants(model)
    active = [v for v in variants if v.step is not None]
    counter = 0

    def refill() -> None:
        nonlocal counter
        torch._foreach_copy_(grads, grad_sets[counter % GRAD_SETS])
        counter += 1

    # Warm-up: past ZClip's 25 warm-up steps, every variant in steady state.
    for _ in range(warmup):
        for v in active:
            refill()
            v.step()  # type: ignore[misc]
    for v in active:
        refill()
        with SyncCounter() as sc:
            v.step()  # type: ignore[misc]
        v.syncs = sc.count

    gc.collect()
    gc.disable()
    try:
        for r in range(reps):
            k = r % len(active)
            for v in active[k:] + active[:k]:
                refill()
                t0 = time.perf_counter_ns()
                v.step()  # type: ignore[misc]
                v.times_ms.append((time.perf_counter_ns() - t0) / 1e6)
    finally:
        gc.enable()
    return {"name": name, "numel": numel, "tensors": len(params), "variants": variants}


def fmt_params(numel: int) -> str:
    return f"{numel / 1e6:.1f}M"


def table(results: list[dict[str, object]]) -> str:
    lines = [
        "| # | variant | params | median ms | IQR ms | ÷ (2) torch clip + step "
        "| ÷ (1) unclipped | host syncs/step |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for res in results:
        variants: list[Variant] = res["variants"]  # type: ignore[assignment]
        med = {v.key: statistics.median(v.times_ms) for v in variants if v.times_ms}
        for v in variants:
            size = fmt_params(res["numel"])  # type: ignore[arg-type]
            if not v.times_ms:
                lines.append(f"| {v.key} | {v.label} | {size} | {v.note} | | | | |")
                continue
            q1, m, q3 = quartiles(v.times_ms)
            r2 = f"{m / med['2']:.3f}" if "2" in med else "n/a"
            r1 = f"{m / med['1']:.3f}" if "1" in med else "n/a"
            lines.append(
                f"| {v.key} | {v.label} | {size} | {m:.2f} | {q3 - q1:.2f} "
                f"| {r2} | {r1} | {v.syncs} |"
            )
    return "\n".join(lines)


def paired_ratio(a: Variant, b: Variant) -> tuple[float, float, float]:
    """Quartiles of a/b over rounds (the two were timed in the same round)."""
    return quartiles([x / y for x, y in zip(a.times_ms, b.times_ms, strict=True)])


def targets(results: list[dict[str, object]]) -> str:
    out = []
    for res in results:
        vs = {v.key: v for v in res["variants"]}  # type: ignore[attr-defined]
        name = res["name"]
        auto, w10k, tc = vs["3"], vs["4"], vs["2"]
        if not (auto.times_ms and tc.times_ms):
            continue
        m3 = statistics.median(auto.times_ms)
        m2 = statistics.median(tc.times_ms)
        q1, pr, q3 = paired_ratio(auto, tc)
        ok = "met" if m3 <= 0.95 * m2 else "not met"
        out.append(
            f"- {name}: AutoClip ≤ 0.95 x (torch clip + step): **{ok}**: ratio of medians "
            f"{m3 / m2:.3f} (per-round paired ratio median {pr:.3f}, IQR {q1:.3f} to {q3:.3f})"
        )
        peers = [vs[k] for k in ("6", "7", "8")]
        measured = [p for p in peers if p.times_ms]
        missing = [p.label for p in peers if not p.times_ms]
        slower = [p for p in measured if statistics.median(p.times_ms) <= m3]
        if measured:
            best = min(measured, key=lambda p: statistics.median(p.times_ms))
            mb = statistics.median(best.times_ms)
            verdict = "met" if not slower else "not met"
            out.append(
                f"- {name}: AutoClip faster than every peer: **{verdict}**: fastest peer "
                f"({best.label}) {mb:.2f} ms vs {m3:.2f} ms ({mb / m3:.2f}x)"
                + (f"; not measured: {', '.join(missing)}" if missing else "")
            )
        if w10k.times_ms:
            m4 = statistics.median(w10k.times_ms)
            q1, pr, q3 = paired_ratio(w10k, auto)
            ok = "met" if m4 < 1.02 * m3 else "not met"
            out.append(
                f"- {name}: window 10000 < 1.02 x window 200: **{ok}**: ratio of medians "
                f"{m4 / m3:.3f} (paired median {pr:.3f}, IQR {q1:.3f} to {q3:.3f})"
            )
        syncs = {v.label: v.syncs for v in (auto, w10k, vs["5"]) if v.syncs is not None}
        ok = "met" if all(s == 0 for s in syncs.values()) else "not met"
        out.append(
            f"- {name}: 0 host syncs per step (distclip variants): **{ok}**: "
            + ", ".join(f"{k}: {s}" for k, s in syncs.items())
        )
    return "\n".join(out)


def header(args: argparse.Namespace, reps: dict[str, int]) -> str:
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
        f"- CPU: {cpu}, {os.cpu_count()} logical cores visible; "
        f"torch.set_num_threads({args.threads})\n"
        f"- repetitions per variant (round-robin, interleaved): "
        + ", ".join(f"{k}: {n}" for k, n in reps.items())
        + f"; warm-up rounds: {args.warmup}\n"
        f"- gradients refilled (untimed) before each call from {GRAD_SETS} preallocated "
        f"random sets (scales {', '.join(f'{1.0 + 0.5 * i:g}' for i in range(GRAD_SETS))} "
        f"x 1e-3 x N(0, 1))"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1M,25M,100M", help="comma list of 1M, 25M, 100M")
    parser.add_argument("--reps", type=int, default=None, help="rounds per size (default by size)")
    parser.add_argument("--warmup", type=int, default=30, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "results" / "bench_step.md",
        help="Markdown file to write (default: benchmarks/results/bench_step.md)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        parser.error(f"unknown size(s) {unknown}; choose from {list(SIZES)}")

    results: list[dict[str, object]] = []
    reps: dict[str, int] = {}
    skipped: list[str] = []
    for name in sizes:
        width, layers = SIZES[name]
        numel = layers * (width * width + width)
        # params + grads + gradient sets + 2 AdamW states for each of 8 variants, +25%
        need = int(numel * 4 * (2 + GRAD_SETS + 16) * 1.25)
        avail = available_bytes()
        if avail is not None and need > avail:
            msg = f"{name}: skipped, needs ~{need / 2**30:.1f} GiB, {avail / 2**30:.1f} available"
            print(msg, file=sys.stderr)
            skipped.append(msg)
            continue
        reps[name] = args.reps or DEFAULT_REPS[name]
        print(f"{name}: {reps[name]} rounds ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        results.append(run_size(name, reps[name], args.warmup, args.seed))
        print(f"{name}: done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

    text = "\n\n".join(
        [
            "# One optimizer step: clip + AdamW update (CPU)",
            header(args, reps),
            table(results),
            "## Targets (distclip AutoClip, window 200, vs the rest)",
            targets(results),
        ]
        + (["Skipped sizes:\n\n" + "\n".join(f"- {s}" for s in skipped)] if skipped else [])
    )
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(f"\nwritten: {os.path.relpath(args.out)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
