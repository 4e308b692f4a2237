"""DeepSpeed runs of the ``DEEPSPEED`` problem: the spec, the engine, the steps, the reference.

A run is a plain, picklable ``spec`` dict (:func:`make_spec`): DeepSpeed's
configuration with a ``"distclip"`` section, and the schedule. Rank ``r`` trains
micro-batch ``m`` of optimizer step ``s`` on ``DEEPSPEED.micro_batch(s, r, m)``.
DeepSpeed divides each micro-batch's mean loss by the accumulation steps and averages
the gradients over the ranks, which is the gradient of the mean loss over the
concatenation of every rank's micro-batch ``m``, divided by the accumulation steps,
summed over ``m``: what :func:`reference_train` computes in one process.

The worker modules (``workers_*.py``, one per family of checks) build engines with
:func:`build_engine` and step them with :func:`train_steps`, many configurations per
call in the suite's one long-lived process group: DeepSpeed's import and its first
ZeRO engine are the expensive part, later engines take milliseconds. Nothing here
asserts.
"""

from __future__ import annotations

import contextlib
import gc
import math
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

import distclip
from tests.support.deepspeed_env import init_deepspeed_distributed
from tests.support.problem import DEEPSPEED, loss_fn
from tests.support.training import native_run

WORLD_SIZE = 2
LR = DEEPSPEED.optimizer_kwargs["lr"]


def make_spec(
    name: str,
    *,
    stage: int = 0,
    bf16: bool = False,
    fp16: bool = False,
    gas: int = 1,
    offload: bool = False,
    bf16_optimizer: bool = False,
    clip: dict[str, Any] | None = None,
    steps: int = DEEPSPEED.steps,
    nan_step: int | None = None,
    gradient_clipping: float = 1.0,
    integration: str = "initialize",
) -> dict[str, Any]:
    """A run: DeepSpeed's configuration, the ``"distclip"`` section, and the schedule.

    Args:
        clip: the ``"distclip"`` section (default: the problem's AutoClip, q=0.3,
            window=4: a short window, so that it wraps within a run).
        bf16_optimizer: ZeRO 1 + bf16 + fp32 gradient accumulation, which is what gets
            DeepSpeed's ``BF16_Optimizer``.
        fp16: DeepSpeed's fp16 with dynamic loss scaling (on CPU only with the
            accelerator's fp16 check forced, see :func:`fp16_allowed`).
        nan_step: the optimizer step whose loss rank 0 multiplies by NaN.
        integration: ``"initialize"`` (distclip.deepspeed.initialize) or ``"attach"``
            (deepspeed.initialize, then distclip.deepspeed.attach reading the section).
    """
    section = dict(clip if clip is not None else {"method": "autoclip", **DEEPSPEED.options})
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": DEEPSPEED.batch,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": gradient_clipping,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "distclip": section,
    }
    if stage > 0 or bf16_optimizer:
        config["zero_optimization"] = {"stage": 1 if bf16_optimizer else stage}
    if offload:
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        config["zero_force_ds_cpu_optimizer"] = False
    if bf16 or bf16_optimizer:
        config["bf16"] = {"enabled": True}
    if bf16_optimizer:
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    if fp16:
        # Dynamic loss scaling that grows every 2 clean steps: overflows and growth
        # steps (where ZeRO 3 reports its norm divided by the new scale) both happen.
        config["fp16"] = {
            "enabled": True,
            "initial_scale_power": 12,
            "loss_scale_window": 2,
            "hysteresis": 1,
            "min_loss_scale": 1,
        }
    return {
        "name": name,
        "ds_config": config,
        "method": section.get("method", "autoclip"),
        "options": {k: v for k, v in section.items() if k != "method"},
        "bf16": bf16 or bf16_optimizer,
        "fp16": fp16,
        "gas": gas,
        "steps": steps,
        "nan_step": nan_step,
        "integration": integration,
    }


# ------------------------------------------------------------- in the workers
def release(engine: Any) -> None:
    """Destroy an engine (where DeepSpeed can) and collect its garbage."""
    destroy = getattr(engine, "destroy", None)
    if callable(destroy):
        with contextlib.suppress(Exception):
            destroy()
    gc.collect()


def full_fp32_params(engine: Any) -> torch.Tensor:
    """Every parameter's fp32 master copy (ZeRO partitions gathered), flattened."""
    from deepspeed.utils import safe_get_full_fp32_param

    pieces = []
    optimizer = engine.optimizer
    masters = None
    if hasattr(optimizer, "fp32_groups") and type(optimizer).__name__.endswith(
        "FP16_UnfusedOptimizer"
    ):
        masters = [q for group in optimizer.fp32_groups for q in group]
    for index, param in enumerate(engine.module.parameters()):
        full = None
        if engine.zero_optimization() or engine.bfloat16_enabled():
            full = safe_get_full_fp32_param(param) if masters is None else masters[index]
        if full is None:
            full = param
        pieces.append(full.detach().float().clone().reshape(-1))
    return torch.cat(pieces)


def build_engine(spec: dict[str, Any], *, model_seed: int = 0, config: Any = None) -> Any:
    """A DeepSpeed engine for ``spec`` with distclip attached (SGD, lr ``LR``)."""
    deepspeed = init_deepspeed_distributed()
    model = DEEPSPEED.model(model_seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    ds_config = spec["ds_config"] if config is None else config
    if spec["integration"] == "attach":
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        distclip.deepspeed.attach(engine)
    else:
        engine, *_ = distclip.deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config
        )
    return engine


def input_dtype(spec: dict[str, Any]) -> torch.dtype:
    """The dtype of the engine's inputs (its parameters')."""
    if spec.get("fp16"):
        return torch.float16
    return torch.bfloat16 if spec["bf16"] else torch.float32


def train_steps(engine: Any, spec: dict[str, Any], steps: range) -> dict[str, list[Any]]:
    """Run optimizer steps ``steps``; record DeepSpeed's norm and distclip's stats per step."""
    import torch.distributed as dist

    rank = dist.get_rank()
    dtype = input_dtype(spec)
    records: dict[str, list[Any]] = {
        "engine_norm": [],
        "total_norm": [],
        "threshold": [],
        "clip_coef": [],
        "skipped": [],
        "num_steps": [],
        "overflow": [],
        "loss_scale": [],
    }
    for step in steps:
        for micro in range(spec["gas"]):
            x, y = DEEPSPEED.micro_batch(step, rank, micro)
            loss = loss_fn(engine(x.to(dtype)).float(), y)
            if step == spec["nan_step"] and rank == 0:
                loss = loss * math.nan
            engine.backward(loss)
            engine.step()
        stats = engine.distclip.last_clip
        norm = engine.get_global_grad_norm()
        records["engine_norm"].append(None if norm is None else float(norm))
        for key, value in stats.as_floats().items():
            if key in records:
                records[key].append(value)
        records["num_steps"].append(engine.distclip.clipper.num_steps)
        records["overflow"].append(bool(getattr(engine.optimizer, "overflow", False)))
        records["loss_scale"].append(float(getattr(engine.optimizer, "loss_scale", 1.0) or 1.0))
    return records


def run_each(
    specs: list[dict[str, Any]], body: Callable[[Any, dict[str, Any], dict[str, Any]], None]
) -> list[dict[str, Any]]:
    """Build an engine per spec, let ``body(engine, spec, result)`` train it and record.

    Every result also holds the adapter's ``wrapper`` and ``hook_point``, the final fp32
    parameters and the clipper's state checksum; a spec that raised holds its
    traceback as ``error`` instead (the others still run).
    """
    results = []
    for spec in specs:
        result: dict[str, Any] = {"name": spec["name"]}
        try:
            engine = build_engine(spec)
            adapter = engine.distclip
            result["wrapper"] = adapter.wrapper
            result["hook_point"] = adapter.hook_point
            body(engine, spec, result)
            result["params"] = full_fp32_params(engine)
            result["checksum"] = adapter.clipper.state_checksum()
            release(engine)
        except Exception:
            result["error"] = traceback.format_exc()
        results.append(result)
    return results


@contextlib.contextmanager
def fp16_allowed() -> Iterator[None]:
    """DeepSpeed's fp16 allowed on the CPU accelerator, for the duration of the block.

    DeepSpeed refuses fp16 on a CPU without AVX-512 fp16 kernels; torch computes fp16
    on the CPU anyway (slowly), which is all these small runs need. The check is
    restored afterwards.
    """
    init_deepspeed_distributed()
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    saved = accelerator.__dict__.get("is_fp16_supported")
    accelerator.is_fp16_supported = lambda: True
    try:
        yield
    finally:
        if saved is None:
            accelerator.__dict__.pop("is_fp16_supported", None)
        else:
            accelerator.is_fp16_supported = saved


def outcome(fn: Callable[[], Any]) -> str:
    """``"ok"``, or what ``fn()`` raised as ``"<type>: <message>"``."""
    try:
        fn()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "ok"


# --------------------------------------------------------- in the pytest process
def reference_train(
    spec: dict[str, Any], inspect: Callable[[nn.Module], None] | None = None
) -> dict[str, Any]:
    """The native run: ``ClippedOptimizer(SGD)`` in one process on every rank's data.

    Returns per-step lists of the clip's ``total_norm``, ``threshold``, ``clip_coef``
    and ``skipped`` (floats) and the final parameters (a flat float32 tensor).
    ``inspect`` sees the model after each step's backward, before the clip.
    """
    batches = [
        [DEEPSPEED.global_micro_batch(step, micro, WORLD_SIZE) for micro in range(spec["gas"])]
        for step in range(spec["steps"])
    ]
    return native_run(
        DEEPSPEED,
        batches,
        method=spec["method"],
        options=spec["options"],
        lr=LR,
        nan_step=spec["nan_step"],
        inspect=inspect,
    )


def own_norm_thresholds(spec: dict[str, Any], norms: list[float]) -> list[float]:
    """The thresholds a fresh clipper gives when fed ``norms`` (DeepSpeed's, as float64).

    The same dtype path as the engine's: each norm is a float64 tensor cast by
    ``Clipper.observe_`` to the clipper's float32 state.
    """
    clipper = distclip.make_clipper(spec["method"], [torch.zeros(1)], **spec["options"])
    return [
        float(clipper.observe_(torch.tensor(norm, dtype=torch.float64)).threshold) for norm in norms
    ]
