"""The training problem shared by the DeepSpeed workers and the single-process reference.

A small MLP regressed onto targets whose scale changes from step to step (so the
gradient norms move around and AutoClip clips on some steps and not on others).
Rank ``r`` trains micro-batch ``m`` of optimizer step ``s`` on ``micro_batch(s, r, m)``.
DeepSpeed divides each micro-batch's mean loss by the accumulation steps and averages
the gradients over the ranks, which is the gradient of the mean loss over the
concatenation of every rank's micro-batch ``m``, divided by the accumulation steps,
summed over ``m``: what :func:`reference_train` computes in one process.

A run is described by a plain, picklable ``spec`` dict (see :func:`make_spec`). Nothing
here imports DeepSpeed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

import distclip

IN_FEATURES = 8
HIDDEN = 16
MICRO_BATCH = 4
WORLD_SIZE = 2
MODEL_SEED = 0
LR = 0.1
#: AutoClip's options in most specs: a short window, so that it wraps within a run.
AUTOCLIP = {"method": "autoclip", "q": 0.3, "window": 4}


def make_model(seed: int = MODEL_SEED) -> nn.Module:
    """The MLP, initialised from ``seed`` (the global RNG is left as it was)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(IN_FEATURES, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 1))


def micro_batch(step: int, rank: int, micro: int) -> tuple[Tensor, Tensor]:
    """Rank ``rank``'s micro-batch ``micro`` of optimizer step ``step``."""
    generator = torch.Generator().manual_seed(1000 * step + 10 * rank + micro)
    x = torch.randn(MICRO_BATCH, IN_FEATURES, generator=generator)
    y = torch.randn(MICRO_BATCH, 1, generator=generator) * (1 + (step * 7 + micro) % 5)
    return x, y


def loss_fn(prediction: Tensor, target: Tensor) -> Tensor:
    return nn.functional.mse_loss(prediction.float(), target)


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
    steps: int = 8,
    nan_step: int | None = None,
    gradient_clipping: float = 1.0,
    integration: str = "initialize",
) -> dict[str, Any]:
    """A run: DeepSpeed's configuration, the ``"distclip"`` section, and the schedule.

    Args:
        bf16_optimizer: ZeRO 1 + bf16 + fp32 gradient accumulation, which is what gets
            DeepSpeed's ``BF16_Optimizer``.
        fp16: DeepSpeed's fp16 with dynamic loss scaling (on CPU only with the
            accelerator's fp16 check forced, see ``ds_workers.run_fp16``).
        nan_step: the optimizer step whose loss rank 0 multiplies by NaN.
        integration: ``"initialize"`` (distclip.deepspeed.initialize) or ``"attach"``
            (deepspeed.initialize, then distclip.deepspeed.attach reading the section).
    """
    section = dict(AUTOCLIP if clip is None else clip)
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
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


def reference_train(
    spec: dict[str, Any], inspect: Callable[[nn.Module], None] | None = None
) -> dict[str, Any]:
    """The native run: ``ClippedOptimizer(SGD)`` in one process on every rank's data.

    Returns per-step lists of the clip's ``total_norm``, ``threshold``, ``clip_coef``
    and ``skipped`` (floats) and the final parameters (a flat float32 tensor).
    ``inspect`` sees the model after each step's backward, before the clip.
    """
    model = make_model()
    optimizer_cls = distclip.ClippedOptimizer(torch.optim.SGD, spec["method"], **spec["options"])
    optimizer = optimizer_cls(model.parameters(), lr=LR)
    records: dict[str, list[float]] = {
        "total_norm": [],
        "threshold": [],
        "clip_coef": [],
        "skipped": [],
    }
    gas = spec["gas"]
    for step in range(spec["steps"]):
        optimizer.zero_grad(set_to_none=True)
        for micro in range(gas):
            batches = [micro_batch(step, rank, micro) for rank in range(WORLD_SIZE)]
            x = torch.cat([b[0] for b in batches])
            y = torch.cat([b[1] for b in batches])
            loss = loss_fn(model(x), y) / gas
            if step == spec["nan_step"]:
                loss = loss * math.nan
            loss.backward()
        if inspect is not None:
            inspect(model)
        optimizer.step()
        stats = optimizer.last_clip
        for key, value in stats.as_floats().items():
            if key in records:
                records[key].append(value)
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return {"records": records, "params": params}


def own_norm_thresholds(spec: dict[str, Any], norms: list[float]) -> list[float]:
    """The thresholds a fresh clipper gives when fed ``norms`` (DeepSpeed's, as float64).

    The same dtype path as the engine's: each norm is a float64 tensor cast by
    ``Clipper.observe_`` to the clipper's float32 state.
    """
    clipper = distclip.make_clipper(spec["method"], [torch.zeros(1)], **spec["options"])
    return [
        float(clipper.observe_(torch.tensor(norm, dtype=torch.float64)).threshold) for norm in norms
    ]


def unit_clip_counts(model: nn.Module, method: str, options: dict[str, Any]) -> tuple[int, int]:
    """``(units this step's layer_wise / agc would clip, units)`` of ``model``'s gradients.

    By hand, from the unclipped gradients: layer_wise's units are the tensors
    (``||g|| > max_norm``), AGC's the output rows of weights and the whole vectors
    (``||G_u|| > clip_factor * max(||W_u||, 1e-3)``).
    """
    clipped = units = 0
    for param in model.parameters():
        grad, weight = param.grad, param.detach()
        assert grad is not None
        if method == "layer_wise":
            clipped += int(float(grad.norm()) > options["max_norm"])
            units += 1
            continue
        if grad.dim() >= 2:
            grad_norm = grad.flatten(1).norm(dim=1)
            weight_norm = weight.flatten(1).norm(dim=1)
        else:
            grad_norm, weight_norm = grad.norm().reshape(1), weight.norm().reshape(1)
        clipped += int((grad_norm > options["clip_factor"] * weight_norm.clamp(min=1e-3)).sum())
        units += grad_norm.numel()
    return clipped, units
