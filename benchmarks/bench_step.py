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

``--grads spiky`` swaps the two gradient sets for three, one of them a loss spike
(norm 8x) on every 10th call of each variant, so that the spike detectors clip. After
every timed call an untimed probe reads whether that call clipped (the "clipped calls"
column).
"""

from __future__ import annotations

import argparse
import gc
import math
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
SPIKE_SCALE = 8.0  # --grads spiky: the spike set's scale (8x and 5.3x the two others)
SPIKE_EVERY = 10  # --grads spiky: every 10th call of each variant is a spike

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


@dataclass(frozen=True)
class Schedule:
    """Which preallocated gradient set refills ``p.grad`` before a call."""

    name: str
    scales: tuple[float, ...]  # x 1e-3 x N(0, 1), one per set
    per_variant: bool  # index by the variant's own call count, not the global one
    spike_set: int | None  # the set that is a spike, if any

    def set_index(self, i: int) -> int:
        if self.spike_set is not None and i % SPIKE_EVERY == SPIKE_EVERY - 1:
            return self.spike_set
        return i % GRAD_SETS

    def describe(self) -> str:
        scales = ", ".join(f"{s:g}" for s in self.scales)
        if self.spike_set is None:
            return (
                f"gradients refilled (untimed) before each call from {len(self.scales)} "
                f"preallocated random sets (scales {scales} x 1e-3 x N(0, 1))"
            )
        return (
            f"gradients refilled (untimed) before each call from {len(self.scales)} "
            f"preallocated random sets (scales {scales} x 1e-3 x N(0, 1)); a variant's "
            f"i-th call (warm-up included, from 0) uses the spike set (scale "
            f"{self.scales[self.spike_set]:g}) when i % {SPIKE_EVERY} == {SPIKE_EVERY - 1}, "
            f"else set i % {GRAD_SETS}; every variant sees the same sequence, and in a "
            f"given round every variant gets the same set"
        )


SCHEDULES = {
    # Alternating sets, indexed by each variant's own call count: every variant sees
    # the same sequence (a counter shared by all variants gave each variant a single
    # set during the warm-up, which biased the adaptive clippers' statistics).
    "alternating": Schedule(
        "alternating", tuple(1.0 + 0.5 * i for i in range(GRAD_SETS)), True, None
    ),
    "spiky": Schedule(
        "spiky",
        (*(1.0 + 0.5 * i for i in range(GRAD_SETS)), SPIKE_SCALE),
        True,
        GRAD_SETS,
    ),
}


@dataclass
class Impl:
    """A variant's step, and untimed probes around it."""

    step: Callable[[], object]
    # After the call: did this call clip (the norm exceeded the variant's threshold)?
    clipped: Callable[[], bool] | None = None
    before: Callable[[], None] | None = None  # before the call (a probe's set-up)
    # The library's own count of clipped steps, to cross-check the probe.
    own_count: Callable[[], int] | None = None


@dataclass
class Variant:
    key: str
    label: str
    step: Callable[[], object] | None  # None: not available
    note: str = ""
    times_ms: list[float] = field(default_factory=list)
    syncs: int | None = None
    impl: Impl | None = None
    calls: int = 0  # calls so far, warm-up included
    spike: list[bool] = field(default_factory=list)  # per timed call
    clipped: list[bool] = field(default_factory=list)  # per timed call (with a probe)
    mismatch: str = ""  # the probe disagreed with the library's own count


def fused_adamw(params: list[torch.nn.Parameter]) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=LR, fused=True)


def distclip_probe(opt: torch.optim.Optimizer) -> Impl:
    """distclip: ``last_clip`` says whether the norm exceeded the threshold."""
    clipper = distclip.get_clipper(opt)

    def clipped() -> bool:
        stats = opt.last_clip  # type: ignore[attr-defined]
        return bool(stats.total_norm > stats.threshold)

    return Impl(opt.step, clipped, own_count=lambda: int(clipper.num_clipped))


def build_variants(model: torch.nn.Module) -> list[Variant]:
    params = list(model.parameters())
    variants: list[Variant] = []

    def add(key: str, label: str, make: Callable[[], Impl]) -> None:
        try:
            impl = make()
        except Exception as exc:  # a peer that is missing or breaks is reported
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:120]
            variants.append(Variant(key, label, None, f"not installable: {reason}"))
            return
        variants.append(Variant(key, label, impl.step, impl=impl))

    def baseline() -> Impl:
        return Impl(fused_adamw(params).step)

    def torch_clip() -> Impl:
        opt = fused_adamw(params)
        norm: list[torch.Tensor] = []

        def step() -> None:
            norm[:] = [torch.nn.utils.clip_grad_norm_(params, TORCH_MAX_NORM, foreach=True)]
            opt.step()

        # clip_grad_norm_ always multiplies, by min(1, max_norm / (norm + 1e-6)).
        return Impl(step, lambda: float(norm[0]) > TORCH_MAX_NORM)

    def distclip_auto(window: int) -> Callable[[], Impl]:
        def make() -> Impl:
            cls = distclip.AutoClippedOptimizer(torch.optim.AdamW, q=AUTOCLIP_Q, window=window)
            return distclip_probe(cls(params, lr=LR, fused=True))

        return make

    def distclip_zclip() -> Impl:
        cls = distclip.ClippedOptimizer(torch.optim.AdamW, method="zclip")
        return distclip_probe(cls(params, lr=LR, fused=True))

    def gn_autoclipper() -> Impl:
        from autoclipper import AutoClippedOptimizer

        cls = AutoClippedOptimizer(torch.optim.AdamW, q=AUTOCLIP_Q, window=200, max_norm=None)
        opt = cls(params, lr=LR, fused=True)

        def clipped() -> bool:
            # Its own threshold, recomputed from its state after the step: the
            # q-quantile of the history (this norm included), at least 1.
            hist = opt.state["grad_history"]
            return bool(hist[-1] > hist.quantile(AUTOCLIP_Q).clamp(min=1.0))

        return Impl(opt.step, clipped)

    def autoclip_quantile() -> Impl:
        from autoclip.torch import QuantileClip

        clipper = QuantileClip(
            params, quantile=AUTOCLIP_Q, history_length=200, global_threshold=True
        )
        opt = fused_adamw(params)

        def step() -> None:
            clipper.step()
            opt.step()

        # Its threshold is the quantile of the history before this step's norm is
        # appended: read it before the call, compare with the appended norm after.
        threshold = [math.inf]

        def before() -> None:
            hist = clipper.state["global_history"]
            threshold[0] = float(torch.quantile(hist, AUTOCLIP_Q)) if len(hist) else math.inf

        def clipped() -> bool:
            return float(clipper.state["global_history"][-1]) > threshold[0]

        return Impl(step, clipped, before)

    def zclip_peer() -> Impl:
        from zclip import ZClip

        clipper = ZClip(max_grad_norm=None)  # distclip's zclip defaults: no absolute cap
        opt = fused_adamw(params)

        def step() -> None:
            clipper.step(model)
            opt.step()

        # zclip multiplies the gradients only where apply_in_place_clipping finds
        # global_norm > max_global_norm (both Python floats). Record that test: one
        # extra Python call per step inside the timed call, no tensor work.
        apply = clipper.apply_in_place_clipping
        flag = [False]

        def spy(module: torch.nn.Module, global_norm: float, max_global_norm: float) -> None:
            flag[0] = global_norm > max_global_norm
            apply(module, global_norm, max_global_norm)

        clipper.apply_in_place_clipping = spy  # type: ignore[method-assign]

        def before() -> None:
            flag[0] = False  # not called during zclip's warm-up

        return Impl(step, lambda: flag[0], before)

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


def run_size(
    name: str, reps: int, warmup: int, seed: int, schedule: Schedule = SCHEDULES["alternating"]
) -> dict[str, object]:
    width, layers = SIZES[name]
    torch.manual_seed(seed)
    model = make_model(width, layers)
    params = list(model.parameters())
    numel = sum(p.numel() for p in params)
    # Gradients live once, in p.grad; each call refills them from one of the sets.
    for p in params:
        p.grad = torch.empty_like(p)
    grads = [p.grad for p in params]
    grad_sets = [[torch.randn_like(p).mul_(1e-3 * s) for p in params] for s in schedule.scales]

    variants = build_variants(model)
    active = [v for v in variants if v.step is not None]
    counter = 0

    def refill(v: Variant) -> bool:
        """Refill the gradients for ``v``'s next call; True if it is a spike."""
        nonlocal counter
        k = schedule.set_index(v.calls if schedule.per_variant else counter)
        torch._foreach_copy_(grads, grad_sets[k])
        counter += 1
        v.calls += 1
        return k == schedule.spike_set

    # Warm-up: past ZClip's 25 warm-up steps, every variant in steady state.
    for _ in range(warmup):
        for v in active:
            refill(v)
            v.step()  # type: ignore[misc]
    for v in active:
        refill(v)
        with SyncCounter() as sc:
            v.step()  # type: ignore[misc]
        v.syncs = sc.count

    own_before = {v.key: v.impl.own_count() for v in active if v.impl and v.impl.own_count}
    gc.collect()
    gc.disable()
    try:
        for r in range(reps):
            k = r % len(active)
            for v in active[k:] + active[:k]:
                v.spike.append(refill(v))
                impl = v.impl
                if impl is not None and impl.before is not None:
                    impl.before()
                t0 = time.perf_counter_ns()
                v.step()  # type: ignore[misc]
                v.times_ms.append((time.perf_counter_ns() - t0) / 1e6)
                if impl is not None and impl.clipped is not None:
                    v.clipped.append(impl.clipped())
    finally:
        gc.enable()
    for v in active:
        if v.key in own_before:
            own = v.impl.own_count() - own_before[v.key]  # type: ignore[union-attr,misc]
            if own != sum(v.clipped):
                v.mismatch = f"library counted {own}, probe {sum(v.clipped)}"
                print(f"{name} {v.label}: {v.mismatch}", file=sys.stderr)
        v.step = v.impl = None  # free the optimizers before the next size
    return {
        "name": name,
        "numel": numel,
        "tensors": len(params),
        "variants": variants,
        "schedule": schedule,
    }


def fmt_params(numel: int) -> str:
    return f"{numel / 1e6:.1f}M"


def clip_rate(flags: list[bool]) -> str:
    return f"{sum(flags)}/{len(flags)}"


def weighted_median(v: Variant) -> float:
    """Spike-call and other-call medians, weighted by their counts."""
    spikes = [t for t, s in zip(v.times_ms, v.spike, strict=True) if s]
    others = [t for t, s in zip(v.times_ms, v.spike, strict=True) if not s]
    parts = [(len(xs), statistics.median(xs)) for xs in (spikes, others) if xs]
    return sum(n * m for n, m in parts) / sum(n for n, _ in parts)


def table(results: list[dict[str, object]]) -> str:
    spiky = any(res["schedule"].spike_set is not None for res in results)  # type: ignore[attr-defined]
    extra = (
        " median ms, spike calls | ÷ (2), spike calls | spike calls clipped "
        "| weighted ms | ÷ (2), weighted |"
        if spiky
        else ""
    )
    lines = [
        "| # | variant | params | median ms | IQR ms | ÷ (2) torch clip + step "
        "| ÷ (1) unclipped | host syncs/step | clipped calls |" + extra,
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
        + (" ---: | ---: | ---: | ---: | ---: |" if spiky else ""),
    ]
    for res in results:
        variants: list[Variant] = res["variants"]  # type: ignore[assignment]
        med = {v.key: statistics.median(v.times_ms) for v in variants if v.times_ms}
        spike_med = {
            v.key: statistics.median(t for t, s in zip(v.times_ms, v.spike, strict=True) if s)
            for v in variants
            if any(v.spike)
        }
        weighted = {v.key: weighted_median(v) for v in variants if any(v.spike)}
        for v in variants:
            size = fmt_params(res["numel"])  # type: ignore[arg-type]
            if not v.times_ms:
                blanks = " |" * (5 if spiky else 0)
                lines.append(f"| {v.key} | {v.label} | {size} | {v.note} | | | | | |" + blanks)
                continue
            q1, m, q3 = quartiles(v.times_ms)
            r2 = f"{m / med['2']:.3f}" if "2" in med else "n/a"
            r1 = f"{m / med['1']:.3f}" if "1" in med else "n/a"
            rate = clip_rate(v.clipped) if v.clipped else "n/a"
            if v.mismatch:
                rate += f" ({v.mismatch})"
            row = (
                f"| {v.key} | {v.label} | {size} | {m:.2f} | {q3 - q1:.2f} "
                f"| {r2} | {r1} | {v.syncs} | {rate} |"
            )
            if spiky:
                sm = spike_med.get(v.key)
                sr = sm / spike_med["2"] if sm is not None and "2" in spike_med else None
                spike_flags = (
                    [c for c, s in zip(v.clipped, v.spike, strict=True) if s] if v.clipped else []
                )
                w = weighted.get(v.key)
                wr = w / weighted["2"] if w is not None and "2" in weighted else None
                row += (
                    (f" {sm:.2f} |" if sm is not None else " n/a |")
                    + (f" {sr:.3f} |" if sr is not None else " n/a |")
                    + (f" {clip_rate(spike_flags)} |" if v.clipped else " n/a |")
                    + (f" {w:.2f} |" if w is not None else " n/a |")
                    + (f" {wr:.3f} |" if wr is not None else " n/a |")
                )
            lines.append(row)
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


def header(args: argparse.Namespace, reps: dict[str, int], schedules: list[Schedule]) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if len(schedules) == 1:
        grads = f"- {schedules[0].describe()}"
    else:
        grads = "\n".join(f"- `--grads {s.name}`: {s.describe()}" for s in schedules)
    notes = (
        "- clipped calls: timed calls whose gradient norm exceeded the variant's own "
        "threshold, read by an untimed probe after each call (n/a: no clipping)"
    )
    if any(s.spike_set is not None for s in schedules):
        notes += (
            "\n- spike calls: the timed calls that got the spike set; the plain median "
            "and IQR are over all calls; weighted ms = the median of the spike calls and "
            "the median of the other calls, weighted by their counts (a per-step cost "
            "that includes the spike calls, less sensitive to outliers than the mean)"
        )
    return (
        f"- date: {time.strftime('%Y-%m-%d %H:%M')}; torch {torch.__version__}; "
        f"distclip {distclip.__version__}; Python {platform.python_version()}\n"
        f"- CPU: {cpu}, {os.cpu_count()} logical cores visible; "
        f"torch.set_num_threads({args.threads})\n"
        f"- repetitions per variant (round-robin, interleaved): "
        + ", ".join(f"{k}: {n}" for k, n in reps.items())
        + f"; warm-up rounds: {args.warmup}\n"
        + grads
        + "\n"
        + notes
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1M,25M,100M", help="comma list of 1M, 25M, 100M")
    parser.add_argument("--reps", type=int, default=None, help="rounds per size (default by size)")
    parser.add_argument("--warmup", type=int, default=30, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--grads",
        default="alternating",
        help="comma list of gradient schedules: alternating (default: 2 sets, scales 1 "
        f"and 1.5), spiky (adds a set of scale {SPIKE_SCALE:g} on every "
        f"{SPIKE_EVERY}th call of each variant); each runs every size",
    )
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
    names = list(dict.fromkeys(s.strip() for s in args.grads.split(",") if s.strip()))
    unknown = [s for s in names if s not in SCHEDULES]
    if unknown or not names:
        parser.error(f"unknown --grads {unknown}; choose from {list(SCHEDULES)}")
    schedules = [SCHEDULES[s] for s in names]

    results: dict[str, list[dict[str, object]]] = {s.name: [] for s in schedules}
    reps: dict[str, int] = {}
    skipped: list[str] = []
    for schedule in schedules:
        for name in sizes:
            width, layers = SIZES[name]
            numel = layers * (width * width + width)
            # params + grads + gradient sets + 2 AdamW states for each of 8 variants, +25%
            need = int(numel * 4 * (2 + len(schedule.scales) + 16) * 1.25)
            avail = available_bytes()
            if avail is not None and need > avail:
                msg = (
                    f"{name}: skipped, needs ~{need / 2**30:.1f} GiB, {avail / 2**30:.1f} available"
                )
                print(msg, file=sys.stderr)
                if msg not in skipped:
                    skipped.append(msg)
                continue
            reps[name] = args.reps or DEFAULT_REPS[name]
            tag = f" ({schedule.name} gradients)" if len(schedules) > 1 else ""
            print(f"{name}{tag}: {reps[name]} rounds ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            results[schedule.name].append(
                run_size(name, reps[name], args.warmup, args.seed, schedule)
            )
            print(
                f"{name}{tag}: done in {time.perf_counter() - t0:.0f} s",
                file=sys.stderr,
                flush=True,
            )

    parts = ["# One optimizer step: clip + AdamW update (CPU)", header(args, reps, schedules)]
    for schedule in schedules:
        level = "##" if len(schedules) == 1 else "###"
        if len(schedules) > 1:
            parts.append(f"## `--grads {schedule.name}`")
        parts += [
            table(results[schedule.name]),
            f"{level} Targets (distclip AutoClip, window 200, vs the rest)",
            targets(results[schedule.name]),
        ]
    if skipped:
        parts.append("Skipped sizes:\n\n" + "\n".join(f"- {s}" for s in skipped))
    text = "\n\n".join(parts)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(f"\nwritten: {os.path.relpath(args.out)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
