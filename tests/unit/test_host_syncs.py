"""Host-device synchronisations per step, counted as ``aten._local_scalar_dense`` calls.

``.item()``, ``float(t)``, ``bool(t)`` and Python branches on a tensor all go through
that op; on a GPU each one stalls the host until the device catches up.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import distclip


class SyncCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _model_and_grads(nan: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    if nan:
        next(model.parameters()).grad[0, 0] = math.nan
    return model


def _syncs(fn: Any) -> int:
    with SyncCounter() as counter:
        fn()
    return counter.count


@pytest.mark.parametrize("method", sorted(distclip.available_methods()))
@pytest.mark.parametrize("nan", [False, True])
def test_clip_has_no_sync(method: str, nan: bool) -> None:
    model = _model_and_grads(nan)
    clipper = distclip.make_clipper(method, model.parameters())
    for _ in range(3):
        assert _syncs(clipper.clip_) == 0


@pytest.mark.parametrize(
    ("opt_cls", "kwargs"),
    [
        (torch.optim.AdamW, {"lr": 1e-3, "fused": True}),
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "fused": True}),
        (torch.optim.SGD, {"lr": 0.1, "fused": True}),
        (torch.optim.Adam, {"lr": 1e-3, "fused": True}),
    ],
)
@pytest.mark.parametrize("nan", [False, True])
def test_fused_optimizer_step_with_skip_has_no_sync(
    opt_cls: type[torch.optim.Optimizer], kwargs: dict[str, Any], nan: bool
) -> None:
    model = _model_and_grads()
    opt = distclip.AutoClippedOptimizer(opt_cls, q=0.5, window=10)(model.parameters(), **kwargs)
    opt.step()  # lazily created optimizer state outside the count
    before = [p.detach().clone() for p in model.parameters()]
    if nan:
        next(model.parameters()).grad[0, 0] = math.nan
    assert _syncs(opt.step) == 0
    assert bool(opt.last_clip.skipped) is nan
    changed = any(
        not torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before, strict=True)
    )
    assert changed is not nan


def test_non_fused_optimizer_pays_exactly_one_sync_for_the_skip_decision() -> None:
    model = _model_and_grads()
    plain = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    plain.step()
    baseline = _syncs(plain.step)
    opt = distclip.AutoClippedOptimizer(torch.optim.SGD, q=0.5, window=10)(
        model.parameters(), lr=0.1, momentum=0.9
    )
    opt.step()
    assert _syncs(opt.step) == baseline + 1


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("opt_cls", [torch.optim.AdamW, torch.optim.SGD])
def test_fused_step_folds_the_clip_into_the_optimizer_pass(
    opt_cls: type[torch.optim.Optimizer],
) -> None:
    """From the second step, a fused optimizer applies the factor as grad_scale: no extra pass."""
    model = _model_and_grads()
    opt = distclip.AutoClippedOptimizer(opt_cls, q=0.1, window=10)(
        model.parameters(), lr=1e-3, fused=True
    )
    opt.step()  # the first step scales separately while the optimizer state is created
    grads = [p.grad.clone() for p in model.parameters()]
    with OpCounter() as counter:
        opt.step()
    assert "_foreach_mul_" not in counter.ops
    assert "grad_scale" not in opt.__dict__  # restored after the step
    coef = float(opt.last_clip.clip_coef)
    assert coef < 1.0
    for p, g in zip(model.parameters(), grads, strict=True):  # the kernel leaves clipped grads
        torch.testing.assert_close(p.grad, g * coef, rtol=1e-6, atol=1e-7)
