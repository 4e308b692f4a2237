"""On a CUDA device: no synchronisation, numerics against float64, NCCL, graphs.

Skipped without CUDA (CI has no GPU). Each check compares numbers: a CUDA run against
a float64 CPU reference, CUDA draws against CPU draws, a CUDA-graph replay against
eager steps, and sync-debug mode ``"error"`` turns any host synchronisation inside a
step into a failure.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import distclip
from distclip.functional import step_uniform
from tests.support.methods import CLIPPING_OPTIONS
from tests.support.reference import SlowAutoClip

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda", 0)


def _model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(64, 64) for _ in range(20)]
    return torch.nn.Sequential(*layers).to(CUDA, dtype)


def _fill(model: torch.nn.Module, step: int, nan: bool = False) -> list[torch.Tensor]:
    """Fresh gradients on the device (made on the CPU, copied before any count)."""
    gen = torch.Generator().manual_seed(step)
    grads = []
    for p in model.parameters():
        g = torch.randn(p.shape, generator=gen) * (1.0 + step % 3)
        p.grad = g.to(CUDA, p.dtype)
        grads.append(g)
    if nan:
        next(model.parameters()).grad[0, 0] = math.nan  # type: ignore[index]
    torch.cuda.synchronize()
    return grads


def _no_sync(fn: Any) -> Any:
    torch.cuda.set_sync_debug_mode("error")
    try:
        return fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("how", ["class", "clip_"])
@pytest.mark.parametrize("method", sorted(CLIPPING_OPTIONS))
def test_steps_after_the_first_never_synchronise(method: str, how: str) -> None:
    model = _model()
    options = CLIPPING_OPTIONS[method]
    if how == "class":
        cls = distclip.ClippedOptimizer(torch.optim.AdamW, method, **options)
        step = cls(model.parameters(), lr=1e-3, fused=True).step
    else:
        step = distclip.make_clipper(method, model.parameters(), **options).clip_
    _fill(model, 0)
    step()
    for index in range(1, 8):
        _fill(model, index, nan=index == 4)
        _no_sync(step)
    torch.cuda.synchronize()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autoclip_on_the_device_equals_a_float64_reference(dtype: torch.dtype) -> None:
    model = _model(dtype)
    opt = distclip.AutoClippedOptimizer(torch.optim.AdamW, q=0.3, window=5)(
        model.parameters(), lr=1e-3, fused=True
    )
    reference = SlowAutoClip(q=0.3, window=5)
    tol = 1e-5  # the same (dtype-rounded) gradients, norms accumulated in float32 either way
    for step in range(12):
        _fill(model, step, nan=step == 6)
        exact = [p.grad.double().cpu() for p in model.parameters()]  # type: ignore[union-attr]
        norm = math.sqrt(sum(float(g.pow(2).sum()) for g in exact))
        threshold, coef = reference.coefficient(norm)
        opt.step()
        stats = opt.last_clip
        assert bool(stats.skipped) is (not math.isfinite(norm))
        if math.isfinite(norm):
            assert float(stats.total_norm) == pytest.approx(norm, rel=tol)
            assert float(stats.threshold) == pytest.approx(threshold, rel=tol)
            assert float(stats.clip_coef) == pytest.approx(coef, rel=tol)


def test_draws_are_the_same_on_the_gpu_and_the_cpu() -> None:
    for seed in (0, 7, 2**40):
        steps = torch.arange(2000)
        cpu = torch.stack([step_uniform(seed, s, torch.device("cpu")) for s in steps])
        gpu = torch.stack([step_uniform(seed, s.to(CUDA), CUDA) for s in steps])
        assert torch.equal(cpu, gpu.cpu())


def test_collectives_follow_the_gradients_device_not_the_current_one() -> None:
    from tests.support.internals import collectives

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    torch.cuda.set_device(0)
    like = torch.zeros((), device="cuda:1")
    store = torch.distributed.HashStore()
    torch.distributed.init_process_group("nccl", store=store, rank=0, world_size=1)
    try:
        assert collectives.collective_device(None, like) == torch.device("cuda", 1)
    finally:
        torch.distributed.destroy_process_group()


def test_clip_replays_in_a_cuda_graph_like_eager_steps() -> None:
    eager_model, graph_model = _model(), _model()
    eager = distclip.make_clipper("autoclip", eager_model.parameters(), q=0.5, window=6)
    graphed = distclip.make_clipper("autoclip", graph_model.parameters(), q=0.5, window=6)
    # Static gradients: the graph reads and writes the same tensors on every replay.
    _fill(graph_model, 0)
    static = [p.grad for p in graph_model.parameters()]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for step in range(3):  # warm-up outside the graph, as CUDA graphs require
            grads = _fill(eager_model, step)
            for s, g in zip(static, grads, strict=True):
                s.copy_(g.to(CUDA))  # type: ignore[union-attr]
            eager.clip_()
            graphed.clip_()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        stats = graphed.clip_()
    for step in range(3, 15):
        grads = _fill(eager_model, step)
        for s, g in zip(static, grads, strict=True):
            s.copy_(g.to(CUDA))  # type: ignore[union-attr]
        expected = eager.clip_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(stats.threshold, expected.threshold)
        assert torch.equal(stats.clip_coef, expected.clip_coef)
        for p, q in zip(graph_model.parameters(), eager_model.parameters(), strict=True):
            assert torch.equal(p.grad, q.grad)


def test_nccl_world_size_one_ddp_and_fsdp2(tmp_path: Path) -> None:
    out = tmp_path / "nccl.json"
    worker = Path(__file__).with_name("nccl_worker.py")
    root = Path(__file__).resolve().parents[2]
    with socket.socket() as probe_socket:
        probe_socket.bind(("127.0.0.1", 0))
        port = probe_socket.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    command = [sys.executable, str(worker), str(out)]
    subprocess.run(command, check=True, timeout=300, cwd=root, env=env)
    results = json.loads(out.read_text())
    for layout, result in results.items():
        assert result["max_rel_norm_error"] < 1e-5, layout
        assert result["skipped"] == [step == 5 for step in range(1, 9)], layout
        assert result["all_reduces"] == [result["plan_collectives"]] * 8, layout
    assert results["ddp"]["plan_collectives"] == 0
    assert results["fsdp2"]["plan_collectives"] == 1
