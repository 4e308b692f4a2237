"""One NCCL rank (world size 1): DDP and FSDP2 steps, checked and reported as JSON.

Run by ``test_cuda.py`` in a subprocess (``python nccl_worker.py OUT.json``), so that
NCCL's global state never outlives the check. Each layout: 8 AutoClip + fused AdamW
steps with a NaN at step 5, steps 2..8 under ``torch.cuda.set_sync_debug_mode("error")``
(distclip must not synchronise), the all-reduces distclip issues counted, and the norm
compared with a float64 norm of the full gradients.
"""

from __future__ import annotations

import json
import math
import os
import sys

import torch
import torch.distributed as dist

import distclip

NAN_STEP = 5


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))


def _run(layout: str) -> dict[str, object]:
    device = torch.device("cuda", 0)
    module = _model().to(device)
    if layout == "ddp":
        model: torch.nn.Module = torch.nn.parallel.DistributedDataParallel(module)
    else:
        from torch.distributed.fsdp import fully_shard

        model = fully_shard(module)
    opt = distclip.AutoClippedOptimizer(torch.optim.AdamW, q=0.5, window=4)(
        model.parameters(), lr=1e-3, fused=True
    )
    calls = {"all_reduce": 0}
    real = dist.all_reduce

    def counting(*args: object, **kwargs: object) -> object:
        calls["all_reduce"] += 1
        return real(*args, **kwargs)  # type: ignore[arg-type]

    gen = torch.Generator(device="cpu").manual_seed(1)
    errors: list[float] = []
    skipped: list[bool] = []
    reduces: list[int] = []
    for step in range(1, 9):
        x = torch.randn(8, 16, generator=gen).to(device)
        opt.zero_grad()
        loss = model(x).pow(2).sum() * (1 + step % 3)
        if step == NAN_STEP:
            loss = loss * math.nan
        loss.backward()
        full = [
            (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).double()
            for p in model.parameters()
        ]
        expected = math.sqrt(sum(float(g.pow(2).sum()) for g in full))
        dist.all_reduce = counting  # type: ignore[assignment]
        calls["all_reduce"] = 0
        try:
            torch.cuda.set_sync_debug_mode("error" if step > 1 else "default")
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
            dist.all_reduce = real
        torch.cuda.synchronize()
        reduces.append(calls["all_reduce"])
        skipped.append(bool(opt.last_clip.skipped))
        if math.isfinite(expected):
            errors.append(abs(float(opt.last_clip.total_norm) - expected) / expected)
    return {
        "max_rel_norm_error": max(errors),
        "skipped": skipped,
        "all_reduces": reduces,
        "plan_collectives": distclip.get_clipper(opt).plan.num_collectives,
    }


def main() -> None:
    out = sys.argv[1]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        results = {layout: _run(layout) for layout in ("ddp", "fsdp2")}
    finally:
        dist.destroy_process_group()
    with open(out, "w") as handle:
        json.dump(results, handle)


if __name__ == "__main__":
    main()
