"""ZeRO 0 in fp32 (no optimizer wrapper): distclip's ``engine.clip_fp32_gradients``.

Without a wrapper the engine clips with ``deepspeed.runtime.utils.clip_grad_norm_``,
which reads the clip value before the norm exists. distclip replaces the engine's
``clip_fp32_gradients`` (on the instance) by the same norm computation, with the
clipper between the norm and the scaling. Why: ``docs/deepspeed.md``.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import torch
from torch import Tensor

from distclip.clippers import PiecewiseClipper
from distclip.functional import scale_
from distclip.integrations.binding import OptimizerBinding
from distclip.integrations.deepspeed._inner_step import InnerStepHook, clamp_apply, element_clamp
from distclip.integrations.deepspeed._installed import InstalledHook, Observer
from distclip.integrations.deepspeed._partitions import whole_tensor_clip

__all__ = ["install_engine_hook"]


def _deepspeed_fp32_norm(engine: Any, params: list[Tensor]) -> Tensor:
    """The global L2 norm exactly as ``deepspeed.runtime.utils.clip_grad_norm_`` takes it.

    Per-parameter fp32 norms, the model-parallel sum (with an ``mpu``), then the one
    data-parallel all-reduce DeepSpeed uses (it averages, for MoE experts).
    """
    dist = importlib.import_module("deepspeed.comm")
    groups = importlib.import_module("deepspeed.utils.groups")
    accelerator = importlib.import_module("deepspeed.accelerator").get_accelerator()
    is_model_parallel_parameter = importlib.import_module(
        "deepspeed.runtime.utils"
    ).is_model_parallel_parameter
    mpu = engine.mpu
    norms = [
        p.grad.detach().float().norm(2)  # type: ignore[union-attr]
        for p in params
        if mpu is None or mpu.get_model_parallel_rank() == 0 or is_model_parallel_parameter(p)
    ]
    if norms:
        total = torch.stack(norms).pow(2.0).sum().float()
    else:
        total = torch.zeros(1, dtype=torch.float32)
    total = total.to(accelerator.current_device_name())
    if mpu is not None:
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=mpu.get_model_parallel_group())
    total = total.pow(1.0 / 2.0)
    group = groups._get_data_parallel_group()
    total = total * 1.0 / float(dist.get_world_size(group=group))
    dist.all_reduce(total, group=group)
    return total.to(params[0].device)


def install_engine_hook(
    engine: Any,
    observe: Observer,
    binding: OptimizerBinding,
    piecewise: PiecewiseClipper | None = None,
) -> InstalledHook:
    """Hook a ZeRO-0 fp32 engine (no wrapper); for an element-wise clamp, its optimizer too.

    The norm and the skip decision stay in ``clip_fp32_gradients``; a norm-driven method
    scales there, ``layer_wise`` / ``agc`` clip the whole tensors there (every rank
    holds DeepSpeed's averaged gradients: no collective), the element-wise clamp
    happens in ``engine.optimizer``'s step pre-hook (on a skipped step the binding has
    hidden the gradients, or set ``found_inf``).
    """
    clamp = whole = None
    if piecewise is not None and piecewise.unit == "element":
        clamp = clamp_apply(element_clamp(piecewise))
    elif piecewise is not None:
        whole = whole_tensor_clip(piecewise)
    optimizer = engine.optimizer
    original_clipping = engine._config.gradient_clipping

    def clip_fp32_gradients() -> Tensor | None:
        binding.recover_stale(optimizer)  # the last optimizer step raised before its end
        params = [p for p in engine.module.parameters() if p.grad is not None]
        if not params:
            return None
        total = _deepspeed_fp32_norm(engine, params)
        stats = observe(total)
        engine._global_grad_norm = total
        if whole is not None:
            whole(params)
        elif clamp is None:
            grads: list[Tensor] = [p.grad for p in params]  # type: ignore[misc]
            scale_(grads, stats.clip_coef, foreach=binding.clipper.config.foreach)
        binding.arm_step(optimizer, stats)
        return total

    def disarm(opt: Any, args: Any, kwargs: Any) -> None:
        binding.end_step(opt)

    clamp_hook = None
    if clamp is not None:
        clamp_hook = InnerStepHook([optimizer], clamp, lambda: binding.armed)
    post_hook = optimizer.register_step_post_hook(disarm)
    engine.clip_fp32_gradients = clip_fp32_gradients
    if not original_clipping > 0.0:
        # The engine clips only when gradient_clipping() > 0; nothing else reads it
        # after initialize.
        engine._config.gradient_clipping = math.inf

    def remove() -> None:
        post_hook.remove()
        if clamp_hook is not None:
            clamp_hook.remove()
        engine.__dict__.pop("clip_fp32_gradients", None)
        engine._config.gradient_clipping = original_clipping

    def intact() -> bool:
        return (
            engine.__dict__.get("clip_fp32_gradients") is clip_fp32_gradients
            and engine.optimizer is optimizer
            and engine._config.gradient_clipping > 0.0
        )

    return InstalledHook(intact, remove)
