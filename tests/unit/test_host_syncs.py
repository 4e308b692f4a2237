"""What a step asks of the host: reads of device values and tensors built from host data.

Counted with ``tests/support/op_probe.py``: ``aten._local_scalar_dense`` (``.item()``,
``float(t)``, ``bool(t)``, a Python branch on a tensor), ``Tensor.tolist`` /
``Tensor.numpy`` (host reads), and ``aten.lift_fresh`` (``torch.tensor([...])``: on a
GPU a blocking host-to-device copy). After the first step, a step of every method and
entry point does none of them (a non-fused optimizer pays the one documented read of
the skip decision). The number of aten ops per step does not grow with the number of
tensors, and AutoClip + fused AdamW stays within 2.5x the ops of torch's
``clip_grad_norm_`` + fused AdamW.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

import distclip
from tests.support.methods import CLIPPING_OPTIONS
from tests.support.op_probe import StepCounts, probe


def _model(num_layers: int = 2, width: int = 8) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*(torch.nn.Linear(width, width) for _ in range(num_layers)))


def _fill(model: torch.nn.Module, step: int, nan: bool = False) -> None:
    """Fresh gradient tensors, as a backward after ``zero_grad()`` makes them."""
    gen = torch.Generator().manual_seed(step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * (1.0 + step % 3)
    if nan:
        next(model.parameters()).grad[0, 0] = math.nan  # type: ignore[index]


def _steps(model: torch.nn.Module, step: Callable[[], Any], nan_at: int = 3) -> list[StepCounts]:
    """Counts of steps 2..4 (the first builds what is built once); a NaN at ``nan_at``."""
    _fill(model, 0)
    step()
    counts = []
    for index in range(1, 4):
        _fill(model, index, nan=index == nan_at)
        counts.append(probe(step))
    return counts


def _entry(method: str, how: str, model: torch.nn.Module) -> Callable[[], Any]:
    options = CLIPPING_OPTIONS[method]
    if how == "class":
        cls = distclip.ClippedOptimizer(torch.optim.AdamW, method, **options)
        return cls(model.parameters(), lr=1e-3, fused=True).step
    if how == "attach":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        distclip.attach(opt, method, **options)
        return opt.step
    return distclip.make_clipper(method, model.parameters(), **options).clip_


@pytest.mark.parametrize("how", ["class", "attach", "clip_"])
@pytest.mark.parametrize("method", sorted(distclip.available_methods()))
def test_no_host_transfer_after_the_first_step(method: str, how: str) -> None:
    model = _model()
    for counts in _steps(model, _entry(method, how, model)):
        assert counts.host_reads == 0, counts.names
        assert counts.host_data == 0, counts.names


@pytest.mark.parametrize(
    "call",
    [
        lambda ps: distclip.get_total_norm([p.grad for p in ps]),
        lambda ps: distclip.clip_grad_norm_(ps, 0.5),
    ],
    ids=["get_total_norm", "clip_grad_norm_"],
)
def test_functional_drop_ins_called_again_and_again_transfer_nothing(call: Any) -> None:
    model = _model()
    params = list(model.parameters())
    for counts in _steps(model, lambda: call(params), nan_at=0):
        assert counts.host_reads == 0
        assert counts.host_data == 0


@pytest.mark.parametrize(
    "call",
    [
        lambda ps: distclip.get_total_norm([p.grad for p in ps]),
        lambda ps: distclip.clip_grad_norm_(ps, 0.5),
    ],
    ids=["get_total_norm", "clip_grad_norm_"],
)
def test_functional_drop_ins_dispatch_no_per_tensor_op(call: Any) -> None:
    """8 tensors and 80 cost the same dispatches: one foreach norm per (device, dtype)
    group, one dtype promotion per distinct dtype (torch.promote_types dispatches)."""
    few, many = _model(num_layers=4), _model(num_layers=40)
    few_params, many_params = list(few.parameters()), list(many.parameters())
    small = _steps(few, lambda: call(few_params), nan_at=0)
    large = _steps(many, lambda: call(many_params), nan_at=0)
    for a, b in zip(small, large, strict=True):
        assert (a.ops, a.views) == (b.ops, b.views), (a.names - b.names, b.names - a.names)


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
def test_fused_optimizer_step_with_skip_transfers_nothing(
    opt_cls: type[torch.optim.Optimizer], kwargs: dict[str, Any], nan: bool
) -> None:
    model = _model()
    opt = distclip.AutoClippedOptimizer(opt_cls, q=0.5, window=10)(model.parameters(), **kwargs)
    _fill(model, 0)
    opt.step()  # lazily created optimizer state outside the count
    before = [p.detach().clone() for p in model.parameters()]
    _fill(model, 1, nan=nan)
    counts = probe(opt.step)
    assert counts.host_reads == 0
    assert counts.host_data == 0
    assert bool(opt.last_clip.skipped) is nan
    changed = any(
        not torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before, strict=True)
    )
    assert changed is not nan


def test_non_fused_optimizer_pays_exactly_one_read_for_the_skip_decision() -> None:
    model = _model()
    plain = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _fill(model, 0)
    plain.step()
    baseline = probe(plain.step)
    opt = distclip.AutoClippedOptimizer(torch.optim.SGD, q=0.5, window=10)(
        model.parameters(), lr=0.1, momentum=0.9
    )
    opt.step()
    counts = probe(opt.step)
    assert counts.host_reads == baseline.host_reads + 1
    assert counts.host_data == baseline.host_data


@pytest.mark.parametrize("how", ["class", "clip_"])
@pytest.mark.parametrize("method", sorted(distclip.available_methods()))
def test_ops_per_step_do_not_grow_with_the_number_of_tensors(method: str, how: str) -> None:
    few, many = _model(num_layers=4), _model(num_layers=40)
    small = _steps(few, _entry(method, how, few))
    large = _steps(many, _entry(method, how, many))
    for a, b in zip(small, large, strict=True):
        assert (a.ops, a.views) == (b.ops, b.views), (a.names - b.names, b.names - a.names)


def test_autoclip_with_fused_adamw_stays_within_two_and_a_half_times_torch() -> None:
    model = _model(num_layers=100)  # 200 tensors
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)

    def torch_step() -> None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()

    torch_counts = _steps(model, torch_step, nan_at=0)[-1]
    autoclip = _steps(model, _entry("autoclip", "class", model), nan_at=0)[-1]
    assert torch_counts.ops + torch_counts.views == 12  # what the ratio is taken against
    assert autoclip.ops + autoclip.views <= 2.5 * (torch_counts.ops + torch_counts.views)


class _OpNames:
    def __init__(self, step: Callable[[], Any]) -> None:
        self.counts = probe(step)


@pytest.mark.parametrize("opt_cls", [torch.optim.AdamW, torch.optim.SGD])
def test_fused_step_folds_the_clip_into_the_optimizer_pass(
    opt_cls: type[torch.optim.Optimizer],
) -> None:
    """From the second step, a fused optimizer applies the factor as grad_scale: no extra pass."""
    model = _model()
    opt = distclip.AutoClippedOptimizer(opt_cls, q=0.1, window=10)(
        model.parameters(), lr=1e-3, fused=True
    )
    _fill(model, 0)
    opt.step()  # the first step scales separately while the optimizer state is created
    _fill(model, 1)
    grads = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]
    counts = probe(opt.step)
    assert "_foreach_mul_" not in counts.names
    assert "grad_scale" not in opt.__dict__  # restored after the step
    coef = float(opt.last_clip.clip_coef)
    assert coef < 1.0
    for p, g in zip(model.parameters(), grads, strict=True):  # the kernel leaves clipped grads
        torch.testing.assert_close(p.grad, g * coef, rtol=1e-6, atol=1e-7)
