"""Rank functions of ``test_toy_method.py``: a toy method from its own file on DDP, FSDP2, DeepSpeed."""

from __future__ import annotations

import traceback
from typing import Any

import torch
import torch.distributed as dist

import distclip
import tests.toy_method  # registers the method in this process  # noqa: F401
from tests.deepspeed.engines import LR, build_engine, full_fp32_params, release, train_steps
from tests.support.problem import DEEPSPEED, loss_fn


def native_run(layout: str, spec: dict[str, Any]) -> dict[str, Any]:
    """``ClippedOptimizer(SGD, <toy>)`` on a DDP or FSDP2 model; the per-step stats."""
    rank = dist.get_rank()
    model: torch.nn.Module = DEEPSPEED.model(0)
    if layout == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        model = fully_shard(model)
    cls = distclip.ClippedOptimizer(torch.optim.SGD, spec["method"], **spec["options"])
    optimizer = cls(model.parameters(), lr=LR)
    records: dict[str, list[float]] = {"total_norm": [], "threshold": [], "clip_coef": []}
    for step in range(spec["steps"]):
        optimizer.zero_grad(set_to_none=True)
        x, y = DEEPSPEED.micro_batch(step, rank, 0)
        loss_fn(model(x), y).backward()
        optimizer.step()
        stats = optimizer.last_clip.as_floats()  # type: ignore[attr-defined]
        for key in records:
            records[key].append(stats[key])
    params = [
        (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().reshape(-1)
        for p in model.parameters()
    ]
    return {"records": records, "params": torch.cat(params), "method": optimizer.clipper.method}


def deepspeed_run(spec: dict[str, Any]) -> dict[str, Any]:
    """The toy method from the DeepSpeed config's ``"distclip"`` section (ZeRO as in ``spec``)."""
    try:
        engine = build_engine(spec)
        out = {
            "records": train_steps(engine, spec, range(spec["steps"])),
            "params": full_fp32_params(engine),
            "hook_point": engine.distclip.hook_point,
            "method": engine.distclip.clipper.method,
        }
        release(engine)
        return out
    except Exception:
        return {"error": traceback.format_exc()}
