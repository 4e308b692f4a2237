#!/usr/bin/env python3
"""GPU readiness checks for distclip (see README.md next to this file).

Run through ``gpu_check.sh``. Sections (each sub-check prints PASS / FAIL / SKIP / INFO
with its reason; one failure never hides the others):

  env   versions, device, NCCL, where distclip is imported from
  a     host-device syncs per step: torch.cuda.set_sync_debug_mode("error") around
        steps 2..20 of AutoClip + fused AdamW (and other optimizers / methods /
        the functional API in "warn" mode, counted, with the distclip line of each sync)
  e     NaN / inf step skipped on the device: fused AdamW / SGD, GradScaler, zero syncs
  b     results equal a float64 CPU reference of the same gradients (norm, threshold,
        clip factor, exp_avg / exp_avg_sq, parameters), and a CPU run of distclip
  c     timing with CUDA events: unclipped fused AdamW vs torch clip_grad_norm_ + step
        vs distclip AutoClip (+ floors and variants), 25M / 100M / 1B, fp32 / bf16
  nccl  (subprocess) NCCL world size 1: DDP, FSDP2, FSDP1, DTensor norms, consistency
  d     (subprocess) torch.compile (default and reduce-overhead) and manual CUDA graphs
  ds    (subprocess, only if deepspeed imports) DeepSpeed ZeRO 0 / 2 on CUDA: syncs per
        step with and without distclip, distclip's norm against DeepSpeed's

Without CUDA (or with GPU_CHECK_DEVICE=cpu) everything runs on the CPU with tiny sizes
(a dry run of the script itself): syncs are then counted by a TorchDispatchMode proxy
(scalar reads, and tensors made from host data, which are host-to-device copies on a GPU).

Environment: GPU_CHECK_OUT (output folder), GPU_CHECK_BUDGET_S (default 360),
GPU_CHECK_SECTIONS (default env,a,e,b,c,nccl,d,ds), GPU_CHECK_SIZES (default
25M,100M,1B; CPU 0.2M,1M), GPU_CHECK_DTYPES (fp32,bf16), GPU_CHECK_REPS (50; CPU 6),
GPU_CHECK_WARMUP (10; CPU 2), GPU_CHECK_TENSORS (200), GPU_CHECK_DEVICE (auto|cpu),
GPU_CHECK_COMPILE_BACKEND (inductor on CUDA, aot_eager on CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

HERE = Path(__file__).resolve().parent
_WANT = os.environ.get("GPU_CHECK_DEVICE", "auto").lower()
IS_CUDA = _WANT != "cpu" and torch.cuda.is_available()
DEV = torch.device("cuda", 0) if IS_CUDA else torch.device("cpu")
OUT = Path(os.environ.get("GPU_CHECK_OUT") or tempfile.mkdtemp(prefix="gpu_check_"))
OUT.mkdir(parents=True, exist_ok=True)
BUDGET_S = float(os.environ.get("GPU_CHECK_BUDGET_S", "360"))
LR = 1e-3
SYNC_MSG = "synchronizing CUDA operation"

try:
    import distclip

    REPO: Path | None = Path(distclip.__file__).resolve().parent.parent
except Exception as _exc:  # reported by the env section
    distclip = None  # type: ignore[assignment]
    REPO = None
    _IMPORT_ERROR = f"{type(_exc).__name__}: {_exc}"
else:
    _IMPORT_ERROR = ""


# ============================================================================ report
class SkipCheck(Exception):
    """Raised inside a sub-check to report SKIP with a reason."""


class Report:
    def __init__(self, persist: Path | None = None) -> None:
        self.rows: list[dict[str, Any]] = []
        self.persist = persist  # a child writes its rows after each one (it may be killed)

    def add(self, key: str, status: str, reason: str, **data: Any) -> None:
        row: dict[str, Any] = {"key": key, "status": status, "reason": reason}
        if data:
            row["data"] = _jsonable(data)
        self.rows.append(row)
        print(f"[{status}] {key}: {reason}", flush=True)
        if self.persist is not None:
            with contextlib.suppress(Exception):
                self.persist.write_text(json.dumps(self.rows, indent=1))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


_NOISE = (
    "utils/_python_dispatch",
    "_ops.py",
    "overrides.py",
    "_tensor.py",
    "_dynamo/",
    "_compile.py",
    "utils/_contextlib.py",
    "autograd/grad_mode.py",
)


def _rel(filename: str) -> str | None:
    if str(HERE) in filename:
        return None
    if REPO is not None and filename.startswith(str(REPO) + os.sep):
        return filename[len(str(REPO)) + 1 :]
    if f"{os.sep}torch{os.sep}" in filename:
        tail = filename.split(f"{os.sep}torch{os.sep}", 1)[1]
        if tail.startswith(_NOISE):
            return None
        return "torch/" + tail
    if f"{os.sep}deepspeed{os.sep}" in filename:
        return "deepspeed/" + filename.split(f"{os.sep}deepspeed{os.sep}", 1)[1]
    return None


def site(frames: list[tuple[str, int, str]], depth: int = 3) -> str:
    """Where a stack came from: its innermost torch/repo frame, then the innermost
    ``depth`` distclip frames (innermost first)."""
    rels = []
    for filename, lineno, name in reversed(frames):
        rel = _rel(filename)
        if rel is not None:
            rels.append(f"{rel}:{lineno} {name}")
    if not rels:
        return "(no distclip/torch frame)"
    ours = [r for r in rels if r.startswith("distclip/")][:depth]
    parts = [] if ours and rels[0] == ours[0] else [rels[0]]
    return " <- ".join(parts + ours) if ours else f"not distclip: {' <- '.join(rels[:depth])}"


def frames_now() -> list[tuple[str, int, str]]:
    return [(f.filename, f.lineno or 0, f.name) for f in traceback.extract_stack()[:-1]]


def where(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    return site([(f.filename, f.lineno or 0, f.name) for f in tb])


def short(exc: BaseException, n: int = 300) -> str:
    text = " ".join(str(exc).split())
    return (text[:n] + "...") if len(text) > n else text


@contextlib.contextmanager
def subcheck(report: Report, key: str) -> Iterator[None]:
    try:
        yield
    except SkipCheck as skip:
        report.add(key, "SKIP", str(skip))
    except Exception as exc:
        report.add(key, "FAIL", f"{type(exc).__name__}: {short(exc)} [at {where(exc)}]")
        traceback.print_exc(limit=-8)
    finally:
        reset_sync_mode()


def run_section(report: Report, key: str, title: str, fn: Callable[[Report], None]) -> None:
    print(f"\n=== {key}: {title} (t={elapsed():.0f}s of {BUDGET_S:.0f}s) ===", flush=True)
    start = time.monotonic()
    try:
        fn(report)
    except SkipCheck as skip:
        report.add(key, "SKIP", str(skip))
    except Exception as exc:
        report.add(
            key, "FAIL", f"section raised {type(exc).__name__}: {short(exc)} [at {where(exc)}]"
        )
        traceback.print_exc(limit=-10)
    finally:
        reset_sync_mode()
        gc.collect()
        if IS_CUDA:
            with contextlib.suppress(Exception):
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
        print(f"--- {key} took {time.monotonic() - start:.1f} s", flush=True)


_T0 = time.monotonic()
_DEADLINE: float | None = None  # absolute time.time() for children


def elapsed() -> float:
    return time.monotonic() - _T0


def remaining() -> float:
    if _DEADLINE is not None:
        return _DEADLINE - time.time()
    return BUDGET_S - elapsed()


def need(seconds: float, what: str) -> None:
    if remaining() < seconds:
        raise SkipCheck(f"time budget: {remaining():.0f}s left, {what} needs about {seconds:.0f}s")


def sync() -> None:
    if IS_CUDA:
        torch.cuda.synchronize()


# ============================================================================= syncs
def reset_sync_mode() -> None:
    if IS_CUDA:
        with contextlib.suppress(Exception):
            torch.cuda.set_sync_debug_mode(0)


class _OpProbe(TorchDispatchMode):
    """Sees the aten ops of a block: scalar reads, tensors made from host data, copies."""

    def __init__(self, probe: SyncProbe) -> None:
        super().__init__()
        self.probe = probe

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            self.probe.scalar_reads.append(frames_now())
        elif func is torch.ops.aten.lift_fresh.default:
            self.probe.host_tensors.append(frames_now())
        elif func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            src = args[1] if func is torch.ops.aten.copy_.default else args[0]
            dst_dev = (
                args[0].device
                if func is torch.ops.aten.copy_.default
                else kwargs.get("device") or getattr(src, "device", None)
            )
            if isinstance(src, torch.Tensor) and dst_dev is not None:
                a, b = src.device.type, torch.device(dst_dev).type
                if a != b:
                    self.probe.cross_copies.append((f"{a}->{b}", frames_now()))
        return func(*args, **kwargs)


class SyncProbe:
    """Counts host-device synchronisations in a block, with where each one came from.

    CUDA: ``torch.cuda.set_sync_debug_mode("warn")``, every warning recorded with its
    Python stack (that is the real thing: it also sees blocking copies and syncs inside
    kernels). Both devices: a TorchDispatchMode that records scalar reads
    (``aten._local_scalar_dense``), tensors made from host data (``aten.lift_fresh``:
    ``torch.tensor(...)``, a host-to-device copy on a GPU) and cross-device copies.
    """

    def __init__(self, ops: bool = True) -> None:
        self.syncs: list[list[tuple[str, int, str]]] = []
        self.scalar_reads: list[list[tuple[str, int, str]]] = []
        self.host_tensors: list[list[tuple[str, int, str]]] = []
        self.cross_copies: list[tuple[str, list[tuple[str, int, str]]]] = []
        self._ops = ops

    def __enter__(self) -> SyncProbe:
        if IS_CUDA:
            self._cw = warnings.catch_warnings()
            self._cw.__enter__()
            warnings.simplefilter("always")
            self._prev_show = warnings.showwarning
            warnings.showwarning = self._show  # type: ignore[assignment]
            torch.cuda.set_sync_debug_mode("warn")
        self._mode = _OpProbe(self) if self._ops else None
        if self._mode is not None:
            self._mode.__enter__()
        return self

    def _show(self, message, category, filename, lineno, file=None, line=None):  # type: ignore[no-untyped-def]
        if SYNC_MSG in str(message):
            self.syncs.append(frames_now())
        else:
            self._prev_show(message, category, filename, lineno, file, line)

    def __exit__(self, *exc: Any) -> None:
        if self._mode is not None:
            self._mode.__exit__(*exc)
        if IS_CUDA:
            torch.cuda.set_sync_debug_mode(0)
            self._cw.__exit__(*exc)

    @property
    def count(self) -> int:
        """Syncs: the real ones on CUDA; on CPU the proxy (scalar reads + host tensors)."""
        if IS_CUDA:
            return len(self.syncs)
        return len(self.scalar_reads) + len(self.host_tensors)

    def sites(self, top: int = 3) -> str:
        events = self.syncs if IS_CUDA else self.scalar_reads + self.host_tensors
        counts = Counter(site(f) for f in events)
        ordered = sorted(counts.items(), key=lambda kv: (kv[0].startswith("not distclip"), -kv[1]))
        return "; ".join(f"{n}x {s}" for s, n in ordered[:top])

    def describe(self) -> str:
        parts = []
        if IS_CUDA:
            parts.append(f"{len(self.syncs)} sync(s)")
        parts.append(f"{len(self.scalar_reads)} scalar read(s)")
        parts.append(f"{len(self.host_tensors)} tensor(s) from host data")
        if self.cross_copies:
            kinds = Counter(k for k, _ in self.cross_copies)
            parts.append("copies " + ", ".join(f"{k} x{n}" for k, n in kinds.items()))
        return ", ".join(parts)


@contextlib.contextmanager
def strict_no_sync() -> Iterator[None]:
    """CUDA: set_sync_debug_mode("error") (any sync raises). CPU: the proxy must see none."""
    if IS_CUDA:
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(0)
    else:
        probe = SyncProbe()
        with probe:
            yield
        if probe.count:
            raise RuntimeError(f"CPU proxy saw {probe.describe()}: {probe.sites()}")


_CYCLES_PER_MS: float | None = None


def _cycles_per_ms() -> float:
    global _CYCLES_PER_MS
    if _CYCLES_PER_MS is None:
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        torch.cuda._sleep(int(5e7))
        e1.record()
        torch.cuda.synchronize()
        _CYCLES_PER_MS = 5e7 / max(e0.elapsed_time(e1), 1e-3)
    return _CYCLES_PER_MS


def host_blocks(fn: Callable[[], Any], sleep_ms: float = 150.0) -> tuple[bool | None, float]:
    """Does ``fn`` wait for the device? Queue ~``sleep_ms`` of GPU spinning, then time
    ``fn()`` on the host: any host-device sync inside (torch.distributed included, which
    sync-debug mode does not cover) makes the call wait for the spin. ``(None, nan)``
    without CUDA."""
    if not IS_CUDA:
        return None, math.nan
    torch.cuda.synchronize()
    torch.cuda._sleep(int(_cycles_per_ms() * sleep_ms))
    t0 = time.perf_counter()
    fn()
    host = (time.perf_counter() - t0) * 1e3
    torch.cuda.synchronize()
    return host > 0.5 * sleep_ms, host


def blocks_text(result: tuple[bool | None, float]) -> str:
    blocked, host = result
    if blocked is None:
        return "spin probe n/a on CPU"
    return (
        f"spin probe: the host {'WAITED for' if blocked else 'did not wait for'} 150 ms of queued "
        f"GPU work ({host:.1f} ms in the call)"
    )


# ============================================================================ models
SMALL_SHAPES = [
    (64, 32), (64,), (32, 64), (32,), (16, 8, 3), (10,),
    (128, 96), (96,), (1,), (7, 5), (256,), (48, 48),
]  # fmt: skip


def small_params(
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
    seed: int = 0,
    shapes: list[tuple[int, ...]] = SMALL_SHAPES,
) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        master = torch.randn(shape, generator=gen, dtype=torch.float64) * 0.1
        params.append(torch.nn.Parameter(master.to(device or DEV, dtype)))
    for p in params:
        p.grad = torch.zeros_like(p)
    return params


def master_grads(
    shapes: list[tuple[int, ...]],
    scales: list[float],
    seed: int = 1,
    nonfinite: dict[int, float] | None = None,
) -> list[list[torch.Tensor]]:
    """float64 CPU gradients per step; ``nonfinite[step] = value`` puts it in one element."""
    gen = torch.Generator().manual_seed(seed)
    steps = []
    for k, scale in enumerate(scales):
        grads = [
            torch.randn(s, generator=gen, dtype=torch.float64) * (scale * 1e-2) for s in shapes
        ]
        if nonfinite and k in nonfinite:
            grads[0].view(-1)[0] = nonfinite[k]
        steps.append(grads)
    return steps


def on_device(
    steps: list[list[torch.Tensor]], dtype: torch.dtype, device: torch.device | None = None
) -> list[list[torch.Tensor]]:
    return [[g.to(device or DEV, dtype) for g in grads] for grads in steps]


def load_grads(params: list[torch.nn.Parameter], grads: list[torch.Tensor]) -> None:
    torch._foreach_copy_([p.grad for p in params], grads)  # type: ignore[misc]


SCHEDULE = [1.0, 1.5, 1.0, 8.0, 1.2, 1.0, 2.5, 1.0, 1.5, 1.0, 3.0, 1.0, 1.1, 1.0, 6.0,
            1.0, 1.3, 1.0, 2.0, 1.0, 1.0, 1.4]  # fmt: skip


# =============================================================================== env
def sec_env(report: Report) -> None:
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "mode": "cuda" if IS_CUDA else "cpu (dry run / fallback)",
        "out": str(OUT),
        "budget_s": BUDGET_S,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            device=torch.cuda.get_device_name(0),
            capability=".".join(map(str, torch.cuda.get_device_capability(0))),
            memory_gib=round(props.total_memory / 2**30, 1),
            sms=props.multi_processor_count,
            device_count=torch.cuda.device_count(),
        )
        with contextlib.suppress(Exception):
            nccl_v = torch.cuda.nccl.version()
            info["nccl"] = ".".join(map(str, nccl_v)) if isinstance(nccl_v, tuple) else str(nccl_v)
        with contextlib.suppress(Exception):
            info["cudnn"] = torch.backends.cudnn.version()
    for name in ("triton", "deepspeed", "numpy"):
        try:
            from importlib.metadata import version

            info[name] = version(name)
        except Exception:
            info[name] = None
    info["distclip"] = (
        f"{distclip.__version__} from {distclip.__file__}"
        if distclip
        else f"NOT IMPORTABLE: {_IMPORT_ERROR}"
    )
    if REPO is not None and (REPO / ".git").exists():
        with contextlib.suppress(Exception):
            info["git"] = subprocess.run(
                ["git", "-C", str(REPO), "log", "-1", "--format=%h %s"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
    for key, value in info.items():
        print(f"  {key}: {value}")
    if distclip is None:
        report.add("env", "FAIL", f"distclip does not import: {_IMPORT_ERROR}", **info)
        raise SkipCheck("no distclip")
    report.add(
        "env",
        "INFO",
        f"{info['mode']}; torch {torch.__version__}; {info.get('device', 'cpu')}",
        **info,
    )


# ======================================================================== a: syncs
def _optimizer(
    kind: str, params: list[torch.nn.Parameter], method: str = "autoclip", **options: Any
) -> tuple[Any, Any]:
    """(optimizer, clipper) for a configuration name."""
    opts = {"autoclip": {"q": 0.1, "window": 200}}.get(method, {})
    opts.update(options)
    base, kw = {
        "adamw_fused": (torch.optim.AdamW, {"lr": LR, "fused": True}),
        "adam_fused": (torch.optim.Adam, {"lr": LR, "fused": True}),
        "sgd_fused": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "fused": True}),
        "adamw_foreach": (torch.optim.AdamW, {"lr": LR, "foreach": True}),
    }[kind.replace("attach_", "")]
    if kind.startswith("attach_"):
        opt = base(params, **kw)
        handle = distclip.attach(opt, method=method, **opts)
        return opt, handle.clipper
    opt = distclip.ClippedOptimizer(base, method=method, **opts)(params, **kw)
    return opt, opt.clipper


def _plain_optimizer(kind: str, params: list[torch.nn.Parameter]) -> tuple[Any, None]:
    base, kw = {
        "adamw_fused": (torch.optim.AdamW, {"lr": LR, "fused": True}),
        "adam_fused": (torch.optim.Adam, {"lr": LR, "fused": True}),
        "sgd_fused": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "fused": True}),
        "adamw_foreach": (torch.optim.AdamW, {"lr": LR, "foreach": True}),
    }[kind.replace("attach_", "")]
    return base(params, **kw), None


def _grad_schedule(
    params: list[torch.nn.Parameter], steps: int, nan_at: int | None, dtype: torch.dtype
) -> list[list[torch.Tensor]]:
    shapes = [tuple(p.shape) for p in params]
    scales = [SCHEDULE[i % len(SCHEDULE)] for i in range(steps)]
    nonfinite = {nan_at: math.nan} if nan_at is not None else None
    return on_device(master_grads(shapes, scales, nonfinite=nonfinite), dtype)


def sec_a(report: Report) -> None:
    steps, nan_at = 20, 11
    configs = [
        # key, optimizer kind, method, options, dtype, expected syncs per step after step 1
        ("a1.autoclip.adamw_fused", "adamw_fused", "autoclip", {}, torch.float32, 0),
        ("a2.autoclip.attach_adamw_fused", "attach_adamw_fused", "autoclip", {}, torch.float32, 0),
        ("a3.autoclip.adamw_fused.bf16", "adamw_fused", "autoclip", {}, torch.bfloat16, 0),
        (
            "a4.autoclip_w10000.adamw_fused",
            "adamw_fused",
            "autoclip",
            {"window": 10000},
            torch.float32,
            0,
        ),
        ("a5.zclip.adamw_fused", "adamw_fused", "zclip", {"warmup_steps": 5}, torch.float32, 0),
        ("a6.norm.adam_fused", "adam_fused", "norm", {"max_norm": 0.05}, torch.float32, 0),
        ("a7.autoclip.sgd_fused_momentum", "sgd_fused", "autoclip", {}, torch.float32, 0),
        ("a8.autoclip.adamw_foreach(non-fused)", "adamw_foreach", "autoclip", {}, torch.float32, 1),
    ]
    for key, kind, method, options, dtype, extra in configs:
        with subcheck(report, key):
            need(10, key)
            params = small_params(dtype)
            sched = _grad_schedule(params, steps, nan_at, dtype)
            # What the plain torch optimizer costs by itself (0 on CUDA for fused ones; on
            # the CPU proxy torch's own reads of CPU step counters show up here).
            base_params = small_params(dtype)
            plain, _ = _plain_optimizer(kind, base_params)
            base = []
            for i in range(4):
                load_grads(base_params, sched[i if i != nan_at else 0])
                with SyncProbe() as probe:
                    plain.step()
                base.append(probe.count)
            baseline = max(base[1:])
            expected = baseline + extra
            # Counted run: every step in "warn" mode (step 1 is allowed its one-off syncs).
            opt, clipper = _optimizer(kind, params, method, **options)
            per_step, sites, descs = [], Counter(), []
            for i in range(steps):
                load_grads(params, sched[i])
                with SyncProbe() as probe:
                    opt.step()
                per_step.append(probe.count)
                descs.append(probe.describe())
                if i > 0 and probe.count > baseline:
                    sites[probe.sites(1)] += 1
            skipped, clipped = int(clipper.num_skipped), int(clipper.num_clipped)
            later = per_step[1:]
            info = {
                "per_step": per_step,
                "baseline": base,
                "step1": descs[0],
                "skipped": skipped,
                "clipped": clipped,
            }
            # On the skipped step a non-fused base step does not run: at most `expected` there.
            ok_counts = (
                all(c == expected for i, c in enumerate(per_step) if 0 < i != nan_at)
                and per_step[nan_at] <= expected
            )
            # Strict run (fresh optimizer): steps 2..20 under set_sync_debug_mode("error").
            strict = "strict run not applicable (syncs expected)"
            if expected == 0:
                params2 = small_params(dtype)
                opt2, clipper2 = _optimizer(kind, params2, method, **options)
                load_grads(params2, sched[0])
                opt2.step()
                for i in range(1, steps):
                    load_grads(params2, sched[i])
                    with strict_no_sync():
                        opt2.step()
                strict = f"steps 2..{steps} under sync-debug 'error': nothing raised"
                if int(clipper2.num_skipped) != 1:
                    raise AssertionError(
                        f"strict run skipped {int(clipper2.num_skipped)} steps, want 1"
                    )
            load_grads(params, sched[2])
            spin = host_blocks(opt.step)
            strict += f"; {blocks_text(spin)}"
            ok_spin = not (spin[0] is not None and spin[0] != (expected > 0))
            if skipped != 1:
                raise AssertionError(f"num_skipped={skipped} after one NaN step, want 1")
            status = "PASS" if ok_counts and ok_spin else "FAIL"
            reason = (
                f"syncs per step (steps 2..{steps}) {sorted(set(later))}, want {expected} "
                f"(torch alone {baseline} + distclip {extra}); step 1: {descs[0]}; {strict}; "
                f"skipped {skipped}, clipped {clipped}/{steps}"
            )
            if sites:
                reason += (
                    f"; sites: {'; '.join(f'{n} steps: {s}' for s, n in sites.most_common(3))}"
                )
            report.add(key, status, reason, **info)

    # Every method's standalone clip_() (steps 2..8 counted; the README claims 0 for all).
    with subcheck(report, "a9.methods.clip_"):
        need(10, "a9")
        classes: dict[type, str] = {}
        for name in distclip.available_methods():
            cls = distclip.clippers.resolve_method(name)
            classes.setdefault(cls, name)
        rows, bad = {}, []
        for name in classes.values():
            try:
                params = small_params()
                sched = _grad_schedule(params, 8, 5, torch.float32)
                clipper = distclip.make_clipper(name, params)
                counts, sites = [], Counter()
                for i in range(8):
                    load_grads(params, sched[i])
                    with SyncProbe() as probe:
                        clipper.clip_()
                    if i:
                        counts.append(probe.count)
                        if probe.count:
                            sites[probe.sites(1)] += 1
                rows[name] = {"per_step": counts, "sites": dict(sites)}
                if any(counts):
                    bad.append(f"{name}: {max(counts)}/step at {sites.most_common(1)[0][0]}")
            except Exception as exc:
                rows[name] = {"error": f"{type(exc).__name__}: {short(exc, 160)}"}
                bad.append(f"{name}: raised {type(exc).__name__}: {short(exc, 120)} [{where(exc)}]")
        report.add(
            "a9.methods.clip_",
            "FAIL" if bad else "PASS",
            ("syncs in steps 2..8: " + " | ".join(bad))
            if bad
            else f"{len(rows)} methods, 0 syncs per clip_() in steps 2..8 (a NaN step included)",
            methods=rows,
        )

    # The functional API and torch's own clip for comparison.
    with subcheck(report, "a10.functional"):
        params = small_params()
        load_grads(params, _grad_schedule(params, 1, None, torch.float32)[0])
        results = {}
        for label, fn in (
            ("torch.nn.utils.clip_grad_norm_", lambda: torch.nn.utils.clip_grad_norm_(params, 1.0)),
            ("distclip.clip_grad_norm_", lambda: distclip.clip_grad_norm_(params, 1.0)),
            ("distclip.grad_norm", lambda: distclip.grad_norm(params)),
        ):
            fn()  # warm
            with SyncProbe() as probe:
                fn()
            results[label] = (
                f"{probe.count} ({probe.describe()}) {probe.sites(1) if probe.count else ''}"
            )
        dc = [v for k, v in results.items() if k.startswith("distclip") and not v.startswith("0 ")]
        report.add(
            "a10.functional",
            "FAIL" if dc else "PASS",
            "; ".join(f"{k}: {v}" for k, v in results.items()),
            **results,
        )


# ===================================================================== e: NaN skip
def _snapshot(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    out = [p.detach().clone() for p in params]
    for p in params:
        for value in opt.state.get(p, {}).values():
            if isinstance(value, torch.Tensor):
                out.append(value.detach().clone())
    return out


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=False))


def sec_e(report: Report) -> None:
    for key, kind, bad_value in (
        ("e1.nan.adamw_fused", "adamw_fused", math.nan),
        ("e2.inf.adamw_fused", "adamw_fused", math.inf),
        ("e3.nan.sgd_fused_momentum", "sgd_fused", math.nan),
        ("e4.nan.attach_adamw_fused", "attach_adamw_fused", math.nan),
    ):
        with subcheck(report, key):
            need(8, key)
            warm, bad = 4, 4
            shapes = SMALL_SHAPES
            scales = [SCHEDULE[i] for i in range(warm + 3)]
            masters = master_grads(shapes, scales, nonfinite={bad: bad_value})
            clean = [g for k, g in enumerate(masters) if k != bad]  # the twin never sees it
            sched, twin_sched = on_device(masters, torch.float32), on_device(clean, torch.float32)
            params, twin = small_params(), small_params()
            opt, clipper = _optimizer(kind, params, "autoclip", q=0.25, window=8)
            opt_t, _clipper_t = _optimizer(kind, twin, "autoclip", q=0.25, window=8)
            for i in range(warm):
                load_grads(params, sched[i])
                opt.step()
                load_grads(twin, twin_sched[i])
                opt_t.step()
            before = _snapshot(opt, params)
            window_before = (clipper.window.values.clone(), clipper.window.num_seen.clone())
            load_grads(params, sched[bad])
            with strict_no_sync():
                opt.step()
            after = _snapshot(opt, params)
            problems = []
            if not _same(before, after):
                problems.append("parameters / optimizer state changed on the skipped step")
            if not (
                torch.equal(window_before[0], clipper.window.values)
                and torch.equal(window_before[1], clipper.window.num_seen)
            ):
                problems.append("window changed")
            if not bool(opt.last_clip.skipped):
                problems.append("last_clip.skipped is False")
            if int(clipper.num_skipped) != 1:
                problems.append(f"num_skipped={int(clipper.num_skipped)}")
            # Later steps equal the twin's, bit for bit (state as if the step never happened).
            for j in range(bad + 1, len(masters)):
                load_grads(params, sched[j])
                with strict_no_sync():
                    opt.step()
                load_grads(twin, twin_sched[j - 1])
                opt_t.step()
                if not torch.equal(opt.last_clip.threshold, opt_t.last_clip.threshold):
                    problems.append(f"step {j + 1}: threshold differs from the twin's")
                if not _same(_snapshot(opt, params), _snapshot(opt_t, twin)):
                    problems.append(f"step {j + 1}: parameters / state differ from the twin's")
            report.add(
                key,
                "FAIL" if problems else "PASS",
                "; ".join(problems)
                if problems
                else f"{bad_value} step skipped on the device under sync-debug 'error' "
                "(params, state, window bit-identical); later steps bit-identical to a twin "
                "that never saw it",
            )

    # GradScaler (fp16 autocast on CUDA; bf16 on CPU), overflow injected in one step.
    for key, unscale in (
        ("e5.gradscaler.unscale_.adamw_fused", True),
        ("e6.gradscaler.no_unscale.adamw_fused", False),
    ):
        with subcheck(report, key):
            need(8, key)
            torch.manual_seed(0)
            model = torch.nn.Sequential(
                torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)
            ).to(DEV)
            x = torch.randn(16, 32, device=DEV)
            opt = distclip.AutoClippedOptimizer(torch.optim.AdamW, q=0.25, window=8)(
                model.parameters(), lr=LR, fused=True
            )
            scaler = torch.amp.GradScaler(DEV.type, init_scale=2.0**10)
            amp_dtype = torch.float16 if IS_CUDA else torch.bfloat16
            overflow_at, problems, strict_steps = 3, [], 0
            for i in range(6):
                opt.zero_grad()
                with torch.autocast(DEV.type, dtype=amp_dtype):
                    loss = model(x * (1 + i)).float().pow(2).mean()
                scaler.scale(loss).backward()
                if i == overflow_at:
                    next(model.parameters()).grad.view(-1)[0] = math.inf
                    before = _snapshot(opt, list(model.parameters()))
                    seen = int(opt.clipper.window.num_seen)
                ctx = strict_no_sync() if i >= 1 else contextlib.nullcontext()
                with ctx:
                    if unscale:
                        scaler.unscale_(opt)
                    scaler.step(opt)
                    scaler.update()
                strict_steps += i >= 1
                if i == overflow_at:
                    if not _same(before, _snapshot(opt, list(model.parameters()))):
                        problems.append("overflow step changed parameters / state")
                    if int(opt.clipper.window.num_seen) != seen:
                        problems.append("overflow norm entered the window")
            finite_window = bool(torch.isfinite(opt.clipper.window.chronological()).all())
            if not finite_window:
                problems.append("window holds a non-finite norm")
            report.add(
                key,
                "FAIL" if problems else "PASS",
                "; ".join(problems)
                if problems
                else f"{strict_steps} scaler steps under sync-debug 'error', overflow step "
                f"skipped, window finite ({int(opt.clipper.window.num_seen)} norms), scale "
                f"now {float(scaler.get_scale()):g}",
            )


# ==================================================================== b: reference
class RefAutoClip:
    """float64 AutoClip + AdamW (decoupled weight decay), the obvious way."""

    def __init__(self, params64: list[torch.Tensor], q: float, window: int, wd: float) -> None:
        self.p = [p.clone() for p in params64]
        self.m = [torch.zeros_like(p) for p in self.p]
        self.v = [torch.zeros_like(p) for p in self.p]
        self.t = 0
        self.q, self.window, self.wd = q, window, wd
        self.hist: list[float] = []

    def step(self, grads64: list[torch.Tensor]) -> dict[str, Any]:
        flat = torch.cat([g.reshape(-1) for g in grads64])
        norm = float(flat.pow(2).sum().sqrt())
        if not math.isfinite(norm):
            tau = (
                float(torch.quantile(torch.tensor(self.hist, dtype=torch.float64), self.q))
                if self.hist
                else math.inf
            )
            return {
                "norm": norm,
                "threshold": tau,
                "coef": 1.0,
                "skipped": True,
                "grads": [g.clone() for g in grads64],
            }
        self.hist = ([*self.hist, norm])[-self.window :]
        tau = float(torch.quantile(torch.tensor(self.hist, dtype=torch.float64), self.q))
        coef = min(1.0, tau / (norm + 1e-6))
        clipped = [g * coef for g in grads64]
        self.t += 1
        b1, b2, eps = 0.9, 0.999, 1e-8
        bc1, bc2 = 1 - b1**self.t, 1 - b2**self.t
        for i, g in enumerate(clipped):
            self.p[i] = self.p[i] * (1 - LR * self.wd)
            self.m[i] = b1 * self.m[i] + (1 - b1) * g
            self.v[i] = b2 * self.v[i] + (1 - b2) * g * g
            denom = self.v[i].sqrt() / math.sqrt(bc2) + eps
            self.p[i] = self.p[i] - (LR / bc1) * self.m[i] / denom
        return {"norm": norm, "threshold": tau, "coef": coef, "skipped": False, "grads": clipped}


def _maxrel(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    num = max(
        float((g.double().cpu() - w.double().cpu()).abs().max())
        for g, w in zip(got, want, strict=False)
    )
    den = max(float(w.double().abs().max()) for w in want)
    return num / max(den, 1e-300)


def _run_distclip(
    params: list[torch.nn.Parameter], sched: list[list[torch.Tensor]], q: float, window: int
) -> list[dict[str, Any]]:
    opt = distclip.AutoClippedOptimizer(torch.optim.AdamW, q=q, window=window)(
        params, lr=LR, fused=True
    )
    out = []
    for grads in sched:
        load_grads(params, grads)
        opt.step()
        s = opt.last_clip
        out.append(
            {
                "norm": float(s.total_norm),
                "threshold": float(s.threshold),
                "coef": float(s.clip_coef),
                "skipped": bool(s.skipped),
                "grads": [p.grad.detach().double().cpu() for p in params],
                "p": [p.detach().double().cpu() for p in params],
                "m": [
                    opt.state[p]["exp_avg"].double().cpu() if p in opt.state else torch.zeros(1)
                    for p in params
                ],
                "v": [
                    opt.state[p]["exp_avg_sq"].double().cpu() if p in opt.state else torch.zeros(1)
                    for p in params
                ],
            }
        )
    return out


def sec_b(report: Report) -> None:
    q, window, steps, nan_at = 0.1, 5, 12, 6
    shapes = SMALL_SHAPES
    masters = master_grads(
        shapes, [SCHEDULE[i] for i in range(steps)], seed=7, nonfinite={nan_at: math.nan}
    )
    for dtype, name, tol in ((torch.float32, "fp32", 1e-5), (torch.bfloat16, "bf16", 1e-5)):
        with subcheck(report, f"b1.reference.{name}"):
            need(10, "b1")
            params = small_params(dtype, seed=3)
            # The reference sees exactly the values the device sees (rounded to dtype).
            grads_dev = on_device(masters, dtype)
            grads64 = [[g.double().cpu() for g in gs] for gs in grads_dev]
            ref = RefAutoClip([p.detach().double().cpu() for p in params], q, window, wd=0.01)
            got = _run_distclip(params, grads_dev, q, window)
            worst: dict[str, float] = Counter()  # type: ignore[assignment]
            problems = []
            for k, g in enumerate(got):
                r = ref.step(grads64[k])  # the reference's state is now that of step k
                if g["skipped"] != r["skipped"]:
                    problems.append(f"step {k + 1}: skipped {g['skipped']} vs {r['skipped']}")
                    continue
                for field_ in ("norm", "threshold", "coef"):
                    a, b = g[field_], r[field_]
                    if math.isfinite(b):
                        worst[field_] = max(worst[field_], abs(a - b) / max(abs(b), 1e-30))
                    elif not (math.isnan(a) and math.isnan(b)) and a != b:
                        problems.append(f"step {k + 1}: {field_} {a} vs {b}")
                if not r["skipped"]:
                    worst["grad_after_step"] = max(
                        worst["grad_after_step"], _maxrel(g["grads"], r["grads"])
                    )
                if name == "fp32":
                    worst["exp_avg"] = max(worst["exp_avg"], _maxrel(g["m"], ref.m))
                    worst["exp_avg_sq"] = max(worst["exp_avg_sq"], _maxrel(g["v"], ref.v))
                    worst["param"] = max(worst["param"], _maxrel(g["p"], ref.p))
            limits = {
                "norm": tol,
                "threshold": tol,
                "coef": tol,
                "grad_after_step": 1e-5 if name == "fp32" else 8e-3,
                "exp_avg": 1e-5,
                "exp_avg_sq": 1e-4,
                "param": 3e-6,
            }
            over = {k: v for k, v in worst.items() if v > limits[k]}
            for k, v in over.items():
                problems.append(f"{k} max rel err {v:.2e} > {limits[k]:.0e}")
            summary = ", ".join(f"{k} {v:.1e}" for k, v in worst.items())
            report.add(
                f"b1.reference.{name}",
                "FAIL" if problems else "PASS",
                ("; ".join(problems) + f" (max rel errors: {summary})")
                if problems
                else f"{steps} steps (NaN at step {nan_at + 1}, window {window} wraps) vs float64 "
                f"CPU reference: max rel errors {summary}",
                worst=dict(worst),
            )

        with subcheck(report, f"b2.cpu_twin.{name}"):
            need(5, "b2")
            if not IS_CUDA:
                raise SkipCheck("device is the CPU already")
            params_d, params_c = small_params(dtype, seed=3), small_params(dtype, DEV_CPU, seed=3)
            got_d = _run_distclip(params_d, on_device(masters, dtype), q, window)
            got_c = _run_distclip(params_c, on_device(masters, dtype, DEV_CPU), q, window)
            worst = Counter()
            for d, c in zip(got_d, got_c, strict=False):
                for f in ("norm", "threshold", "coef"):
                    if math.isfinite(c[f]):
                        worst[f] = max(worst[f], abs(d[f] - c[f]) / max(abs(c[f]), 1e-30))
                for f in ("p", "m", "v"):
                    worst[f] = max(worst[f], _maxrel(d[f], c[f]))
            limit = 1e-5 if name == "fp32" else 1.6e-2
            bad = {k: v for k, v in worst.items() if v > limit}
            report.add(
                f"b2.cpu_twin.{name}",
                "FAIL" if bad else "PASS",
                f"GPU vs the same distclip on CPU ({name}): max rel diffs "
                + ", ".join(f"{k} {v:.1e}" for k, v in worst.items())
                + f" (limit {limit:g})",
            )

    with subcheck(report, "b3.mixed_dtypes_and_fp16_range"):
        need(5, "b3")
        gen = torch.Generator().manual_seed(11)
        specs = [
            ((300, 20), torch.float32),
            ((50,), torch.bfloat16),
            ((64, 64), torch.bfloat16),
            ((40, 40), torch.float16),
            ((17,), torch.float16),
        ]
        params = [torch.nn.Parameter(torch.zeros(s, dtype=d, device=DEV)) for s, d in specs]
        masters64 = []
        for p, (s, d) in zip(params, specs, strict=False):
            g = torch.randn(s, generator=gen, dtype=torch.float64) * (
                300.0 if d == torch.float16 else 1.0
            )
            p.grad = g.to(DEV, d)
            masters64.append(p.grad.double().cpu())
        ref = float(torch.cat([g.reshape(-1) for g in masters64]).pow(2).sum().sqrt())
        got = float(distclip.grad_norm(params))
        got_inf = float(distclip.grad_norm(params, float("inf")))
        ref_inf = max(float(g.abs().max()) for g in masters64)
        err = abs(got - ref) / ref
        ok = err < 1e-5 and got_inf == ref_inf
        report.add(
            "b3.mixed_dtypes_and_fp16_range",
            "PASS" if ok else "FAIL",
            f"fp32+bf16+fp16 grads (fp16 squares far past 65504): 2-norm rel err {err:.1e}, "
            f"inf-norm {got_inf} vs {ref_inf}",
        )

    with subcheck(report, "b4.stochastic_draws_by_device"):
        from distclip.functional import step_uniform

        if not IS_CUDA:
            raise SkipCheck("needs a CUDA device to compare with")
        dev = [float(step_uniform(0, s, DEV)) for s in range(4)]
        cpu = [float(step_uniform(0, s, DEV_CPU)) for s in range(4)]
        same = all(a == b for a, b in zip(dev, cpu, strict=False))
        report.add(
            "b4.stochastic_draws_by_device",
            "INFO",
            f"step_uniform(seed 0, steps 0..3): cuda {[round(x, 6) for x in dev]} vs cpu "
            f"{[round(x, 6) for x in cpu]}: {'the same' if same else 'DIFFERENT'} "
            "(Philox on CUDA, mt19937 on CPU: a run resumed on another device type, or a "
            "CPU reference, draws other numbers)",
        )


DEV_CPU = torch.device("cpu")


# ======================================================================= c: timing
def parse_size(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9}.get(text[-1], 1)
    return int(float(text[:-1] if text[-1] in "KMBG" else text) * mult)


def _quart(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q1, med, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, med, q3


class Variant:
    def __init__(self, key: str, label: str, step: Callable[[], Any]) -> None:
        self.key, self.label, self.step = key, label, step
        self.calls = 0
        self.gpu_ms: list[float] = []
        self.host_ms: list[float] = []
        self.host_only_ms: list[float] = []
        self.events: list[tuple[Any, Any]] = []


def _foreach_norm_f32(grads: list[torch.Tensor]) -> torch.Tensor:
    try:
        norms = torch._foreach_norm(grads, 2.0, dtype=torch.float32)
    except TypeError:  # older torch: no dtype argument
        norms = torch._foreach_norm(grads, 2.0)
    return torch.linalg.vector_norm(torch.stack(list(norms)).float())


def time_config(
    numel: int, dtype: torch.dtype, n_tensors: int, reps: int, warmup: int
) -> dict[str, Any]:
    n_mat = max(1, n_tensors // 2)
    width = max(1, int(math.sqrt(numel / n_mat)))
    shapes = [(width, width), (width,)] * n_mat
    total = n_mat * (width * width + width)
    elem = torch.empty((), dtype=dtype).element_size()
    n_opt = 6
    need_bytes = total * elem * (1 + 1 + 2 + 2 * n_opt) * 1.1
    if IS_CUDA:
        free, _ = torch.cuda.mem_get_info()
        if need_bytes > free:
            raise SkipCheck(f"needs ~{need_bytes / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free")
    gen = torch.Generator(device=DEV).manual_seed(0)
    params = [
        torch.nn.Parameter(torch.randn(s, device=DEV, dtype=dtype, generator=gen).mul_(0.02))
        for s in shapes
    ]
    for p in params:
        p.grad = torch.empty_like(p)
    grads = [p.grad for p in params]
    sets = [
        [torch.randn(s, device=DEV, dtype=dtype, generator=gen).mul_(1e-3 * scale) for s in shapes]
        for scale in (1.0, 1.5)
    ]

    def fused() -> torch.optim.AdamW:
        return torch.optim.AdamW(params, lr=LR, fused=True)

    o1, o2, o3, o5 = fused(), fused(), fused(), fused()
    auto = distclip.AutoClippedOptimizer(torch.optim.AdamW, q=0.1, window=200)(
        params, lr=LR, fused=True
    )
    auto_big = distclip.AutoClippedOptimizer(torch.optim.AdamW, q=0.1, window=10000)(
        params, lr=LR, fused=True
    )
    standalone = distclip.AutoClip(params, q=0.1, window=200)

    def norm_only() -> None:
        _foreach_norm_f32(grads)
        o2.step()

    def torch_clip() -> None:
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        o3.step()

    def separate() -> None:
        standalone.clip_()
        o5.step()

    variants = [
        Variant("1", "fused AdamW, no clipping", o1.step),
        Variant("2", "norm only (_foreach_norm) + fused AdamW [floor]", norm_only),
        Variant("3", "torch clip_grad_norm_(foreach) + fused AdamW", torch_clip),
        Variant("4", "distclip AutoClip w200, folded (grad_scale/found_inf)", auto.step),
        Variant("5", "distclip AutoClip w200, clip_() _foreach_mul_ + fused AdamW", separate),
        Variant("6", "distclip AutoClip w10000, folded", auto_big.step),
    ]

    def refill(v: Variant) -> None:
        torch._foreach_copy_(grads, sets[v.calls % 2])
        v.calls += 1

    for _ in range(warmup):
        for v in variants:
            refill(v)
            v.step()
    sync()
    gc.collect()
    gc.disable()
    try:
        for r in range(reps):
            k = r % len(variants)
            for v in variants[k:] + variants[:k]:
                refill(v)
                if IS_CUDA:
                    e0 = torch.cuda.Event(enable_timing=True)
                    e1 = torch.cuda.Event(enable_timing=True)
                    e0.record()
                t0 = time.perf_counter()
                v.step()
                t1 = time.perf_counter()
                if IS_CUDA:
                    e1.record()
                    v.events.append((e0, e1))
                v.host_ms.append((t1 - t0) * 1e3)
        sync()
        # Host cost alone: each call starts with an empty queue (no back-pressure).
        for _ in range(min(10, reps)):
            for v in variants:
                refill(v)
                sync()
                t0 = time.perf_counter()
                v.step()
                v.host_only_ms.append((time.perf_counter() - t0) * 1e3)
        sync()
    finally:
        gc.enable()
    for v in variants:
        v.gpu_ms = [a.elapsed_time(b) for a, b in v.events] if IS_CUDA else list(v.host_ms)
    clipped = int(auto.clipper.num_clipped)
    med = {v.key: statistics.median(v.gpu_ms) for v in variants}
    rows = []
    for v in variants:
        q1, m, q3 = _quart(v.gpu_ms)
        paired = statistics.median(
            a / b for a, b in zip(v.gpu_ms, variants[2].gpu_ms, strict=False)
        )
        rows.append(
            {
                "key": v.key,
                "variant": v.label,
                "median_ms": m,
                "iqr_ms": q3 - q1,
                "vs_unclipped": m / med["1"],
                "vs_torch_clip": m / med["3"],
                "paired_vs_torch_clip": paired,
                "host_ms": statistics.median(v.host_ms),
                "host_only_ms": statistics.median(v.host_only_ms),
            }
        )
    bytes_step = total * elem * 7  # fused AdamW: read p, g, m, v; write p, m, v
    result = {
        "numel": total,
        "tensors": len(params),
        "dtype": str(dtype).replace("torch.", ""),
        "width": width,
        "rows": rows,
        "reps": reps,
        "warmup": warmup,
        "baseline_GBps": bytes_step / (med["1"] * 1e-3) / 1e9,
        "distclip_clipped_calls": clipped,
        "distclip_calls": variants[3].calls,
    }
    return result  # everything above is freed with this frame (the caller collects)


def timing_table(results: list[dict[str, Any]]) -> str:
    timer = (
        "CUDA events (GPU time per step, stream idle gaps included)"
        if IS_CUDA
        else "time.perf_counter (CPU dry run)"
    )
    lines = [
        f"Timer: {timer}; median of {results[0]['reps']} interleaved rounds after "
        f"{results[0]['warmup']} warm-up rounds; gradients refilled (untimed) before every call.",
        "",
        "| params | dtype | tensors | # | variant | median ms | IQR ms | ÷ (1) unclipped "
        "| ÷ (3) torch clip | paired ÷ (3) | host ms in step() | host ms, empty queue |",
        "| --- | --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for res in results:
        for row in res["rows"]:
            lines.append(
                f"| {res['numel'] / 1e6:.1f}M | {res['dtype']} | {res['tensors']} | {row['key']} | "
                f"{row['variant']} | {row['median_ms']:.3f} | {row['iqr_ms']:.3f} | "
                f"{row['vs_unclipped']:.3f} | {row['vs_torch_clip']:.3f} | "
                f"{row['paired_vs_torch_clip']:.3f} | {row['host_ms']:.3f} | "
                f"{row['host_only_ms']:.3f} |"
            )
    lines += [
        "",
        "host ms in step(): CPU time inside step() during the timed rounds (it includes waiting "
        "on a full launch queue when the GPU is the bottleneck); host ms, empty queue: the same "
        "call after a synchronize (Python + launch cost only). When the host cost exceeds the GPU "
        "time, the GPU idles and the event time is the host's.",
        "",
        "Bandwidth model (bytes per parameter, fp32; bf16 halves every term): fused AdamW 28 "
        "(read p, g, m, v; write p, m, v); a norm pass +4; a separate multiply +8; the fused "
        "kernel writes the unscaled gradient back when grad_scale is set, +4. Bandwidth-bound "
        "ratios to (1): (2) 1.14, (3) 1.43, (4) 1.29, (5) 1.43.",
        "",
    ]
    for res in results:
        lines.append(
            f"- {res['numel'] / 1e6:.1f}M {res['dtype']}: unclipped fused AdamW moves "
            f"{res['baseline_GBps']:.0f} GB/s by the model above; distclip clipped "
            f"{res['distclip_clipped_calls']} of {res['distclip_calls']} calls."
        )
    return "\n".join(lines)


def sec_c(report: Report) -> None:
    default_sizes = "25M,100M,1B" if IS_CUDA else "0.2M,1M"
    sizes = [s for s in os.environ.get("GPU_CHECK_SIZES", default_sizes).split(",") if s.strip()]
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    names = [
        d.strip() for d in os.environ.get("GPU_CHECK_DTYPES", "fp32,bf16").split(",") if d.strip()
    ]
    reps = int(os.environ.get("GPU_CHECK_REPS", "50" if IS_CUDA else "6"))
    warmup = int(os.environ.get("GPU_CHECK_WARMUP", "10" if IS_CUDA else "2"))
    n_tensors = int(os.environ.get("GPU_CHECK_TENSORS", "200"))
    results = []
    for name in names:
        for size in sizes:
            key = f"c.{size}.{name}"
            with subcheck(report, key):
                numel = parse_size(size)
                # A rough guess of the cost, to stay inside the budget (H200: ~4 TB/s).
                guess = 8 + (numel / 1e9) * (20 if name == "fp32" else 10) * (reps + warmup) / 60
                need(guess + 10, key)
                try:
                    res = time_config(numel, dtypes[name], n_tensors, reps, warmup)
                finally:
                    gc.collect()
                    if IS_CUDA:
                        torch.cuda.empty_cache()
                results.append(res)
                r = {row["key"]: row for row in res["rows"]}
                report.add(
                    key,
                    "INFO",
                    f"{res['numel'] / 1e6:.1f}M {res['dtype']} in {res['tensors']} tensors: "
                    f"unclipped {r['1']['median_ms']:.3f} ms; ÷ unclipped: torch clip "
                    f"{r['3']['vs_unclipped']:.2f}, distclip folded {r['4']['vs_unclipped']:.2f}, "
                    f"separate mul {r['5']['vs_unclipped']:.2f}, w10000 {r['6']['vs_unclipped']:.2f}, "
                    f"norm-only floor {r['2']['vs_unclipped']:.2f}; distclip ÷ torch clip "
                    f"{r['4']['vs_torch_clip']:.3f} (paired {r['4']['paired_vs_torch_clip']:.3f}); "
                    f"host ms (empty queue) distclip {r['4']['host_only_ms']:.2f} vs torch clip "
                    f"{r['3']['host_only_ms']:.2f} vs unclipped {r['1']['host_only_ms']:.2f}",
                    result=res,
                )
    if results:
        text = timing_table(results)
        (OUT / "timing.md").write_text(text + "\n")
        print("\n" + text + "\n", flush=True)

    with subcheck(report, "c.launches_per_step"):
        need(15, "launch count")
        report.add("c.launches_per_step", "INFO", launch_counts(n_tensors))

    with subcheck(report, "c.foreach_mul_coef_dtype"):
        need(15, "foreach_mul dtype check")
        report.add("c.foreach_mul_coef_dtype", "INFO", foreach_mul_dtype(n_tensors))


def _device_ops(fn: Callable[[], Any]) -> str:
    """Kernels one call launches: CUDA kernels from the profiler, else aten ops (CPU)."""
    fn()
    sync()
    if IS_CUDA:
        try:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fn()
                sync()
            kernels = [
                e for e in prof.events() if str(getattr(e, "device_type", "")).endswith("CUDA")
            ]
            return f"{len(kernels)} CUDA kernels/memcpys"
        except Exception as exc:
            return f"profiler failed ({type(exc).__name__}: {short(exc, 80)})"

    class Ops(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if not func.overloadpacket.__name__.startswith(("view", "_record_function", "promote")):
                Ops.n += 1
            return func(*args, **(kwargs or {}))

    with Ops():
        fn()
    return f"{Ops.n} aten ops"


def launch_counts(n_tensors: int) -> str:
    params = [torch.nn.Parameter(torch.randn(256, 64, device=DEV)) for _ in range(n_tensors)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt1 = torch.optim.AdamW(params, lr=LR, fused=True)
    opt3 = torch.optim.AdamW(params, lr=LR, fused=True)

    def torch_clip() -> None:
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt3.step()

    rows = [("fused AdamW", opt1.step), ("torch clip_grad_norm_ + fused AdamW", torch_clip)]
    for method in ("autoclip", "zclip", "norm", "layer_wise", "value", "agc"):
        opt = distclip.ClippedOptimizer(torch.optim.AdamW, method=method)(params, lr=LR, fused=True)
        rows.append((f"distclip {method} + fused AdamW", opt.step))
    return f"per step with {n_tensors} tensors: " + "; ".join(
        f"{k}: {_device_ops(fn)}" for k, fn in rows
    )


def foreach_mul_dtype(n_tensors: int) -> str:
    """distclip scales bf16 gradients by a float32 0-dim coefficient (functional/scaling.py);
    torch's CUDA _foreach_mul_ takes its fast path only when the dtypes match."""
    rows, cols = (512, 1024) if IS_CUDA else (64, 64)
    grads = [torch.randn(rows, cols, device=DEV, dtype=torch.bfloat16) for _ in range(n_tensors)]
    out = []
    for label, coef in (
        ("fp32 coef", torch.full((), 0.5, device=DEV)),
        ("bf16 coef", torch.full((), 0.5, device=DEV, dtype=torch.bfloat16)),
    ):
        times = []
        for _ in range(12):
            sync()
            t0 = time.perf_counter()
            torch._foreach_mul_(grads, coef)
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
        out.append(
            f"{label} {statistics.median(times[2:]):.3f} ms "
            f"({_device_ops(lambda c=coef: torch._foreach_mul_(grads, c))})"
        )
    return (
        f"_foreach_mul_ of {n_tensors} bf16 tensors ({n_tensors * rows * cols / 1e6:.1f}M elements) "
        "by a 0-dim tensor: " + "; ".join(out)
    )


# ===================================================================== subprocesses
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_child(report: Report, name: str, cap_s: float, min_s: float = 20) -> None:
    limit = min(cap_s, remaining() - 5)
    if limit < min_s:
        report.add(
            name,
            "SKIP",
            f"time budget: {remaining():.0f}s left, the {name} child needs >= {min_s:.0f}s",
        )
        return
    result_file = OUT / f"child_{name}.json"
    result_file.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        name,
        "--deadline",
        str(time.time() + limit - 3),
    ]
    print(f"+ child {name} (limit {limit:.0f}s)", flush=True)
    proc = subprocess.Popen(cmd, stdout=sys.stdout, stderr=sys.stderr, start_new_session=True)
    try:
        rc = proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        proc.wait()
        rc = None
    rows = []
    if result_file.exists():
        with contextlib.suppress(Exception):
            rows = json.loads(result_file.read_text())
    for row in rows:
        report.rows.append(row)
    if rc is None:
        report.add(
            name,
            "FAIL",
            f"child timed out after {limit:.0f}s (killed); {len(rows)} sub-check(s) had reported",
        )
    elif rc != 0 and not rows:
        report.add(name, "FAIL", f"child exited {rc} without results")


def child_main(name: str) -> int:
    report = Report(persist=OUT / f"child_{name}.json")
    try:
        {"nccl": child_nccl, "d": child_compile, "ds": child_deepspeed}[name](report)
    except SkipCheck as skip:
        report.add(name, "SKIP", str(skip))
    except Exception as exc:
        report.add(
            name, "FAIL", f"child raised {type(exc).__name__}: {short(exc)} [at {where(exc)}]"
        )
        traceback.print_exc(limit=-10)
    finally:
        reset_sync_mode()
        (OUT / f"child_{name}.json").write_text(json.dumps(report.rows, indent=1))
    return 0


# ============================================================= nccl: world size one
@contextlib.contextmanager
def count_all_reduce() -> Iterator[list[str]]:
    import torch.distributed as dist

    calls: list[str] = []
    orig = dist.all_reduce

    def counted(tensor, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(
            f"{tuple(tensor.shape)} {str(tensor.dtype).replace('torch.', '')} {tensor.device}"
        )
        return orig(tensor, *args, **kwargs)

    dist.all_reduce = counted
    try:
        yield calls
    finally:
        dist.all_reduce = orig


def _mlp() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(32, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 8),
    )


def _ref_norm(grads: list[torch.Tensor]) -> float:
    from distclip.reduction import is_dtensor

    total = 0.0
    for g in grads:
        full = g.full_tensor() if is_dtensor(g) else g
        total += float(full.double().pow(2).sum())
    return math.sqrt(total)


def _train_layout(
    report: Report, key: str, model: torch.nn.Module, opt: Any, steps: int = 8, nan_step: int = 5
) -> None:
    from distclip.reduction import local_tensor

    x = torch.randn(16, 32, device=DEV, generator=torch.Generator(device=DEV).manual_seed(1))
    per_step_collectives, norm_errs, problems = [], [], []
    for i in range(steps):
        opt.zero_grad()
        xi = x * (1 + 0.3 * i)
        if i == nan_step:
            xi = xi.clone()
            xi[0, 0] = math.nan
        model(xi).float().pow(2).mean().backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        ref = _ref_norm(grads)
        if i == nan_step:
            before = [local_tensor(p.detach()).clone() for p in model.parameters()]
        ctx = strict_no_sync() if i >= 1 else contextlib.nullcontext()
        with count_all_reduce() as calls, ctx:
            opt.step()
        per_step_collectives.append(len(calls))
        got = float(opt.last_clip.total_norm)
        if i == nan_step:
            if not bool(opt.last_clip.skipped):
                problems.append("NaN step not skipped")
            if not all(
                torch.equal(a, local_tensor(b.detach()))
                for a, b in zip(before, model.parameters(), strict=False)
            ):
                problems.append("NaN step changed parameters")
        elif math.isfinite(ref):
            norm_errs.append(abs(got - ref) / ref)
    opt.zero_grad()
    model(x).float().pow(2).mean().backward()
    spin = host_blocks(opt.step)
    if spin[0]:
        problems.append("opt.step() waited for the device")
    plan = opt.clipper.plan
    worst = max(norm_errs) if norm_errs else float("nan")
    if worst > 1e-5:
        problems.append(f"norm rel err {worst:.1e}")
    expected = plan.num_collectives
    if any(c != expected for c in per_step_collectives[1:]):
        problems.append(f"all_reduce calls per step {per_step_collectives}, plan says {expected}")
    report.add(
        key,
        "FAIL" if problems else "PASS",
        ("; ".join(problems) + "; ")
        * bool(problems)
        + f"{steps} steps, steps 2..{steps} under sync-debug 'error' (NaN step "
        f"{nan_step + 1} skipped); all_reduce per step {per_step_collectives}; norm vs "
        f"float64 of the full grads: max rel err {worst:.1e}; {blocks_text(spin)}; "
        f"plan {plan.describe()}",
    )


def child_nccl(report: Report) -> None:
    import torch.distributed as dist

    need(15, "nccl")
    backend = "nccl" if IS_CUDA else "gloo"
    init = {
        "backend": backend,
        "init_method": f"tcp://127.0.0.1:{free_port()}",
        "rank": 0,
        "world_size": 1,
    }
    if IS_CUDA:
        torch.cuda.set_device(0)
        try:
            dist.init_process_group(**init, device_id=torch.device("cuda", 0))
        except TypeError:
            dist.init_process_group(**init)
    else:
        dist.init_process_group(**init)
    report.add("nccl.init", "INFO", f"{dist.get_backend()} world size {dist.get_world_size()}")
    try:
        from torch.distributed.device_mesh import init_device_mesh

        with subcheck(report, "nccl.ddp"):
            need(10, "ddp")
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(_mlp().to(DEV), device_ids=[0] if IS_CUDA else None)
            opt = distclip.AutoClippedOptimizer(torch.optim.AdamW, q=0.1, window=50)(
                model.parameters(), lr=LR, fused=True
            )
            _train_layout(report, "nccl.ddp", model, opt)

        with subcheck(report, "nccl.fsdp2"):
            need(10, "fsdp2")
            try:
                from torch.distributed.fsdp import fully_shard
            except ImportError:
                from torch.distributed._composable.fsdp import fully_shard  # type: ignore[no-redef]
            mesh = init_device_mesh(DEV.type, (1,))
            model = _mlp().to(DEV)
            for layer in model:
                if isinstance(layer, torch.nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            opt = distclip.AutoClippedOptimizer(torch.optim.AdamW, q=0.1, window=50)(
                model.parameters(), lr=LR, fused=True
            )
            _train_layout(report, "nccl.fsdp2", model, opt)

        with subcheck(report, "nccl.fsdp1"):
            need(10, "fsdp1")
            from torch.distributed.fsdp import FullyShardedDataParallel

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = FullyShardedDataParallel(
                    _mlp().to(DEV), device_id=DEV, use_orig_params=True
                )
            opt = distclip.AutoClippedOptimizer(torch.optim.AdamW, q=0.1, window=50)(
                model.parameters(), lr=LR, fused=True, model=model
            )
            _train_layout(report, "nccl.fsdp1", model, opt)

        with subcheck(report, "nccl.dtensor_norms"):
            need(8, "dtensor norms")
            from torch.distributed.tensor import Shard, distribute_tensor

            mesh = init_device_mesh(DEV.type, (1,))
            lines, problems = [], []
            for dtype in (torch.float64, torch.float32, torch.bfloat16):
                gen = torch.Generator().manual_seed(5)
                params, fulls = [], []
                for shape in ((64, 8), (33,), (16, 16)):
                    p = torch.nn.Parameter(
                        distribute_tensor(
                            torch.zeros(shape, dtype=dtype, device=DEV), mesh, [Shard(0)]
                        )
                    )
                    g = torch.randn(shape, generator=gen, dtype=torch.float64).to(DEV, dtype)
                    p.grad = distribute_tensor(g, mesh, [Shard(0)])
                    params.append(p)
                    fulls.append(g.double().cpu())
                for p_norm in (2.0, float("inf")):
                    with count_all_reduce() as calls:
                        got = float(distclip.grad_norm(params, p_norm))
                    flat = torch.cat([f.reshape(-1) for f in fulls])
                    ref = float(flat.abs().max()) if math.isinf(p_norm) else float(flat.norm())
                    err = abs(got - ref) / ref
                    lines.append(f"{str(dtype)[6:]} p={p_norm:g}: rel err {err:.1e}, {calls}")
                    # the norm comes back in the gradients' dtype (torch's contract):
                    # a bf16 result is rounded to bf16 (relative 2**-8), accumulated in fp32
                    limit = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 2.0**-8)
                    if err > limit:
                        problems.append(lines[-1])
            report.add("nccl.dtensor_norms", "FAIL" if problems else "PASS", "; ".join(lines))

        with subcheck(report, "nccl.check_consistency"):
            need(5, "check_consistency")
            params = small_params()
            clipper = distclip.AutoClip(params, q=0.1, window=10)
            load_grads(params, _grad_schedule(params, 1, None, torch.float32)[0])
            clipper.clip_()
            clipper.check_consistency()
            clipper.check_consistency(timeout=10)
            report.add(
                "nccl.check_consistency",
                "PASS",
                "all_gather of the int64 checksum and torch.equal on the device: no error "
                "(a sync by design; timeout= is a no-op off gloo)",
            )
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


# ===================================================================== d: compile
def _clip_fn(clipper: Any) -> tuple[torch.Tensor, ...]:
    s = clipper.clip_()
    return s.total_norm, s.threshold, s.clip_coef, s.skipped


def _twin_clippers(method: str = "autoclip", **options: Any) -> tuple[Any, Any, list, list, list]:
    options = options or {"q": 0.25, "window": 8}
    pa, pb = small_params(seed=0), small_params(seed=0)
    ca, cb = (
        distclip.make_clipper(method, pa, **options),
        distclip.make_clipper(method, pb, **options),
    )
    sched = _grad_schedule(pa, 12, 7, torch.float32)
    return ca, cb, pa, pb, sched


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return bool(torch.allclose(a, b, rtol=tol, atol=1e-7, equal_nan=True))


def child_compile(report: Report) -> None:
    import shutil

    have_cc = any(shutil.which(c) for c in ("gcc", "cc", "clang"))
    default = "inductor" if IS_CUDA and have_cc else "aot_eager"
    backend = os.environ.get("GPU_CHECK_COMPILE_BACKEND") or default
    # reduce-overhead needs inductor (Triton builds a C launcher: needs a C compiler);
    # without one, torch's own "cudagraphs" backend still shows whether capture works.
    ro = {"mode": "reduce-overhead"} if backend == "inductor" else {"backend": "cudagraphs"}
    report.add(
        "d.backend",
        "INFO",
        f"torch.compile backend {backend}; reduce-overhead as {ro}; "
        f"C compiler {'found' if have_cc else 'NOT found (Triton cannot build)'}",
    )

    # ---- manual CUDA graphs first: fast, no compilation
    with subcheck(report, "d4.cuda_graph.clip_"):
        if not IS_CUDA:
            raise SkipCheck("CUDA graphs need CUDA")
        need(10, "d4")
        cap, eag, pc, pe, sched = _twin_clippers()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for i in range(3):
                load_grads(pc, sched[i])
                cap.clip_()
        torch.cuda.current_stream().wait_stream(side)
        for i in range(3):
            load_grads(pe, sched[i])
            eag.clip_()
        graph = torch.cuda.CUDAGraph()
        load_grads(pc, sched[3])
        with torch.cuda.graph(graph):
            static = cap.clip_()
        problems = []
        for i in range(3, len(sched)):
            load_grads(pc, sched[i])
            graph.replay()
            load_grads(pe, sched[i])
            ref = eag.clip_()
            for f in ("total_norm", "threshold", "clip_coef", "skipped"):
                if not _close(getattr(static, f), getattr(ref, f)):
                    problems.append(
                        f"step {i + 1} {f}: {float(getattr(static, f))} vs {float(getattr(ref, f))}"
                    )
            if not all(_close(a.grad, b.grad) for a, b in zip(pc, pe, strict=False)):
                problems.append(f"step {i + 1}: clipped grads differ")
        if not (
            torch.equal(cap.window.num_seen, eag.window.num_seen)
            and _close(cap.window.values, eag.window.values)
        ):
            problems.append("window differs after the replays")
        report.add(
            "d4.cuda_graph.clip_",
            "FAIL" if problems else "PASS",
            "; ".join(problems[:4])
            if problems
            else f"AutoClip.clip_() captured once, {len(sched) - 3} replays (a NaN step included) "
            f"= eager; device state advances in replays, Python num_steps does not "
            f"({cap.num_steps} vs eager {eag.num_steps}: ClipStats.step, check_every and the "
            "stochastic seeds are frozen at capture)",
        )

    with subcheck(report, "d5.cuda_graph.optimizer_step"):
        if not IS_CUDA:
            raise SkipCheck("CUDA graphs need CUDA")
        need(10, "d5")
        pc, pe = small_params(seed=0), small_params(seed=0)
        sched = _grad_schedule(pc, 12, 7, torch.float32)
        cls = distclip.AutoClippedOptimizer(torch.optim.AdamW, q=0.25, window=8)
        oc = cls(pc, lr=LR, fused=True, capturable=True)
        oe = cls(pe, lr=LR, fused=True, capturable=True)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for i in range(3):
                load_grads(pc, sched[i])
                oc.step()
        torch.cuda.current_stream().wait_stream(side)
        for i in range(3):
            load_grads(pe, sched[i])
            oe.step()
        graph = torch.cuda.CUDAGraph()
        load_grads(pc, sched[3])
        with torch.cuda.graph(graph):
            oc.step()
        problems = []
        for i in range(3, len(sched)):
            load_grads(pc, sched[i])
            graph.replay()
            load_grads(pe, sched[i])
            oe.step()
            if not all(_close(a, b, 1e-6) for a, b in zip(pc, pe, strict=False)):
                problems.append(f"step {i + 1}: parameters differ")
        report.add(
            "d5.cuda_graph.optimizer_step",
            "FAIL" if problems else "PASS",
            "; ".join(problems[:4])
            if problems
            else f"AutoClippedAdamW(fused, capturable).step() captured, {len(sched) - 3} replays "
            "(NaN step included) = eager parameters",
        )

    # ---- torch.compile
    import torch._dynamo as dynamo  # binds `dynamo` only (a bare `import torch._dynamo`
    from torch._dynamo.utils import counters  # would make `torch` local to this function)

    def compiled_vs_eager(key: str, mode: str | None, mark_static: bool) -> None:
        dynamo.reset()
        counters.clear()
        messages: list[str] = []
        handler = None
        if mode == "reduce-overhead":
            import logging

            for artifacts in ({"cudagraphs": True, "perf_hints": True}, {"perf_hints": True}):
                try:
                    torch._logging.set_logs(**artifacts)  # torch >= 2.5: "cudagraphs"
                    break
                except Exception:
                    continue

            class Grab(logging.Handler):
                def emit(self, record: logging.LogRecord) -> None:
                    text = record.getMessage()
                    if "cudagraph" in text.lower():
                        messages.append(" ".join(text.split())[:200])

            handler = Grab()
            logging.getLogger("torch._inductor").addHandler(handler)
        try:
            ca, cb, pa, pb, sched = _twin_clippers()
            if mark_static:
                for t in [
                    ca.window.values,
                    ca.window.num_seen,
                    ca.num_skipped,
                    ca.num_clipped,
                    *[p.grad for p in pa],
                ]:
                    dynamo.mark_static_address(t)
            kwargs: dict[str, Any] = {"fullgraph": True, "backend": backend}
            if mode:
                kwargs = {"fullgraph": True, **ro}
            step = torch.compile(_clip_fn, **kwargs)
            problems, t0 = [], time.monotonic()
            held = None
            for i, grads in enumerate(sched):
                load_grads(pa, grads)
                load_grads(pb, grads)
                want = _clip_fn(cb)
                got_raw = step(ca)
                got = tuple(t.clone() for t in got_raw)
                if i == 2:
                    held = got_raw  # not cloned: a cudagraph output is overwritten next replay
                for name, a, b in zip(
                    ("norm", "threshold", "coef", "skipped"), got, want, strict=False
                ):
                    if not _close(a, b):
                        problems.append(f"step {i + 1} {name}: {float(a)} vs {float(b)}")
                if not all(_close(a.grad, b.grad) for a, b in zip(pa, pb, strict=False)):
                    problems.append(f"step {i + 1}: clipped grads differ")
            compile_s = time.monotonic() - t0
            if not (
                torch.equal(ca.window.num_seen, cb.window.num_seen)
                and _close(ca.window.values, cb.window.values)
            ):
                problems.append("window differs")
            extra = ""
            if mode == "reduce-overhead":
                skips = counters["inductor"].get("cudagraph_skips", 0)
                extra = (
                    f"; cudagraph skips {skips}"
                    + (f" ({messages[0]})" if messages else "")
                    + ("; CUDA graphs USED" if not skips else "; CUDA graphs NOT used")
                )
                try:
                    float(held[0] + 0) if held is not None else None
                    extra += "; an earlier step's returned stats are still readable"
                except Exception as exc:
                    extra += (
                        f"; reading step 3's uncloned stats later raises {type(exc).__name__} "
                        "(last_clip tensors are overwritten each replay: clone to keep them)"
                    )
            report.add(
                key,
                "FAIL" if problems else "PASS",
                ("; ".join(problems[:4]) + extra)
                if problems
                else f"{len(sched)} steps (NaN step included) = eager to 1e-5, "
                f"{counters['stats'].get('unique_graphs', '?')} graph(s), {compile_s:.0f}s{extra}",
            )
        finally:
            if handler is not None:
                import logging

                logging.getLogger("torch._inductor").removeHandler(handler)
                with contextlib.suppress(Exception):
                    torch._logging.set_logs()

    for key, mode, static, cuda_only, cost in (
        ("d1.compile.fullgraph", None, False, False, 60),
        ("d2.compile.reduce-overhead", "reduce-overhead", False, True, 60),
        ("d3.compile.reduce-overhead.static_state", "reduce-overhead", True, True, 60),
    ):
        with subcheck(report, key):
            if cuda_only and not IS_CUDA and not os.environ.get("GPU_CHECK_DRYRUN_ALL"):
                raise SkipCheck("reduce-overhead (CUDA graphs) needs CUDA")
            need(cost, key)
            compiled_vs_eager(key, mode, static)

    with subcheck(report, "d7.compile.optimizer_step"):
        need(60, "d7")
        dynamo.reset()
        pc, pe = small_params(seed=0), small_params(seed=0)
        sched = _grad_schedule(pc, 8, 5, torch.float32)
        cls = distclip.AutoClippedOptimizer(torch.optim.AdamW, q=0.25, window=8)
        oc, oe = cls(pc, lr=LR, fused=True), cls(pe, lr=LR, fused=True)

        def opt_step() -> None:
            oc.step()

        compiled = torch.compile(opt_step, backend=backend)
        problems = []
        for i, grads in enumerate(sched):
            load_grads(pc, grads)
            load_grads(pe, grads)
            compiled()
            oe.step()
            if not all(_close(a, b, 1e-6) for a, b in zip(pc, pe, strict=False)):
                problems.append(f"step {i + 1}: parameters differ")
            if not _close(oc.last_clip.threshold, oe.last_clip.threshold):
                problems.append(f"step {i + 1}: threshold differs")
        report.add(
            "d7.compile.optimizer_step",
            "FAIL" if problems else "PASS",
            "; ".join(problems[:4])
            if problems
            else f"torch.compile(opt.step) of AutoClippedAdamW(fused) = eager over {len(sched)} "
            "steps (NaN step included)",
        )

    # Last: a failed capture can leave the device in a bad state.
    with subcheck(report, "d6.cuda_graph.stochastic"):
        if not IS_CUDA:
            raise SkipCheck("CUDA graphs need CUDA")
        cap, _, pc, _, sched = _twin_clippers("linear_stoch_autoclip", q=0.25, window=8)
        for i in range(2):
            load_grads(pc, sched[i])
            cap.clip_()
        sync()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                cap.clip_()
            outcome = "captured (the seed of the capture step is baked into every replay)"
        except Exception as exc:
            outcome = f"capture fails: {type(exc).__name__}: {short(exc, 200)} [at {where(exc)}]"
        report.add("d6.cuda_graph.stochastic", "INFO", f"linear_stoch_autoclip: {outcome}")
        with contextlib.suppress(Exception):
            torch.cuda.synchronize()


# ===================================================================== ds: DeepSpeed
def child_deepspeed(report: Report) -> None:
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise SkipCheck("deepspeed is not installed here (pip cannot reach the internet)")
    need(40, "deepspeed")
    os.environ["DS_ACCELERATOR"] = "cuda" if IS_CUDA else "cpu"
    os.environ.update(
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        LOCAL_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
    )
    import logging

    import deepspeed

    import distclip.deepspeed as dcds
    from distclip.integrations.deepspeed._verified import _is_verified

    if not IS_CUDA:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.utils.logger.setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    deepspeed.init_distributed(dist_backend="nccl" if IS_CUDA else "gloo")
    verified = _is_verified(deepspeed.__version__)
    report.add("ds.version", "INFO", f"deepspeed {deepspeed.__version__} (verified: {verified})")

    def engine(stage: int, bf16: bool, with_distclip: bool) -> Any:
        model = _mlp()
        opt = torch.optim.AdamW(model.parameters(), lr=LR)
        config: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": 16,
            "gradient_clipping": 1.0,
            "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
        }
        if bf16:
            config["bf16"] = {"enabled": True}
        if with_distclip:
            config["distclip"] = {"method": "autoclip", "q": 0.1, "window": 50}
            return dcds.initialize(
                model=model, optimizer=opt, config=config, allow_unverified=not verified
            )[0]
        return deepspeed.initialize(model=model, optimizer=opt, config=config)[0]

    for stage, bf16 in ((2, True), (0, False), (3, True)):
        key = f"ds.zero{stage}.{'bf16' if bf16 else 'fp32'}"
        with subcheck(report, key):
            need(25, key)
            counts: dict[str, list[int]] = {}
            sites: dict[str, str] = {}
            spins: dict[str, str] = {}
            errs = []
            for label in ("deepspeed alone", "with distclip"):
                eng = engine(stage, bf16, label == "with distclip")
                dtype = torch.bfloat16 if bf16 else torch.float32
                x = torch.randn(
                    16,
                    32,
                    device=eng.device,
                    dtype=dtype,
                    generator=torch.Generator(device=eng.device).manual_seed(2),
                )
                counts[label] = []
                for i in range(6):
                    loss = eng(x * (1 + 0.2 * i)).float().pow(2).mean()
                    eng.backward(loss)
                    with SyncProbe() as probe:
                        eng.step()
                    if i >= 2:
                        counts[label].append(probe.count)
                        if probe.count and label not in sites:
                            sites[label] = probe.sites(2)
                    if i == 5:
                        loss = eng(x).float().pow(2).mean()
                        eng.backward(loss)
                        spins[label] = blocks_text(host_blocks(eng.step))
                    if label == "with distclip":
                        ds_norm = eng.get_global_grad_norm()
                        mine = float(eng.distclip.last_clip.total_norm)
                        if ds_norm is not None and math.isfinite(float(ds_norm)):
                            errs.append(abs(mine - float(ds_norm)) / max(float(ds_norm), 1e-30))
                with contextlib.suppress(Exception):
                    eng.destroy()
                del eng
                gc.collect()
            added = [
                b - a
                for a, b in zip(counts["deepspeed alone"], counts["with distclip"], strict=False)
            ]
            worst = max(errs) if errs else float("nan")
            report.add(
                key,
                "FAIL" if worst > 1e-5 else "INFO",
                f"syncs per engine.step() (steps 3..6): DeepSpeed alone "
                f"{counts['deepspeed alone']}, with distclip {counts['with distclip']} "
                f"(added {added}); distclip norm vs engine.get_global_grad_norm() max rel "
                f"err {worst:.1e}; distclip sites: {sites.get('with distclip', '-')}; "
                f"{'; '.join(f'{k}: {v}' for k, v in spins.items())}",
            )


# ============================================================================= main
SECTIONS: dict[str, tuple[str, Callable[[Report], None]]] = {
    "env": ("environment", sec_env),
    "a": ("host-device syncs per step (set_sync_debug_mode)", sec_a),
    "e": ("NaN / inf / overflow step skipped on the device", sec_e),
    "b": ("results vs a float64 CPU reference", sec_b),
    "c": ("timing (CUDA events)", sec_c),
}
CHILDREN = {
    "nccl": ("NCCL world size 1 (subprocess)", 120),
    "d": ("torch.compile and CUDA graphs (subprocess)", 200),
    "ds": ("DeepSpeed on the device (subprocess)", 120),
}


def main() -> int:
    global _DEADLINE
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", default=None)
    parser.add_argument("--deadline", type=float, default=None)
    args = parser.parse_args()
    if args.child:
        _DEADLINE = args.deadline
        if _DEADLINE is not None:
            import faulthandler

            faulthandler.dump_traceback_later(max(5.0, _DEADLINE - time.time() + 2), exit=True)
        if distclip is None:
            print(f"distclip does not import: {_IMPORT_ERROR}")
            return 1
        return child_main(args.child)

    import faulthandler

    # A hang anywhere still ends the run (with every thread's stack) before the device
    # tool's limit; the results of the sections done so far are already on disk.
    faulthandler.dump_traceback_later(BUDGET_S + 45, exit=True)
    report = Report()
    wanted = [
        s.strip() for s in os.environ.get("GPU_CHECK_SECTIONS", "env,a,e,b,c,nccl,d,ds").split(",")
    ]
    print(
        f"distclip GPU check: mode {'cuda' if IS_CUDA else 'cpu'}, budget {BUDGET_S:.0f}s, "
        f"sections {','.join(wanted)}, out {OUT}",
        flush=True,
    )
    for key in wanted:
        if key in SECTIONS:
            title, fn = SECTIONS[key]
            if key != "env" and distclip is None:
                report.add(key, "SKIP", "distclip does not import")
                continue
            run_section(report, key, title, fn)
        elif key in CHILDREN:
            title, cap = CHILDREN[key]
            print(f"\n=== {key}: {title} (t={elapsed():.0f}s of {BUDGET_S:.0f}s) ===", flush=True)
            start = time.monotonic()
            run_child(report, key, cap)
            print(f"--- {key} took {time.monotonic() - start:.1f} s", flush=True)
        elif key:
            report.add(key, "SKIP", "unknown section")
        write_summary(report, final=False)
    faulthandler.cancel_dump_traceback_later()
    return write_summary(report, final=True)


def write_summary(report: Report, final: bool) -> int:
    counts = Counter(row["status"] for row in report.rows)
    lines = [
        f"\n=== SUMMARY ({elapsed():.0f}s, mode {'cuda' if IS_CUDA else 'cpu'}) ===",
        ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
    ]
    for row in report.rows:
        lines.append(f"{row['status']:<4}  {row['key']}: {row['reason'][:260]}")
    text = "\n".join(lines)
    if final:
        print(text, flush=True)
    else:
        text = "(partial: the run is still going)\n" + text
    (OUT / "summary.txt").write_text(text + "\n")
    (OUT / "results.json").write_text(json.dumps(report.rows, indent=1))
    return 1 if counts.get("FAIL") else 0


if __name__ == "__main__":
    sys.exit(main())
