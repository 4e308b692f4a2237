"""The drop-ins on CUDA: test_nn's multi-device case and no host synchronisation.

Skipped without a CUDA device (marked ``gpu``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

import distclip

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _devices() -> tuple[str, str]:
    """Two CUDA devices when there are, else one and the CPU (gradients on two devices)."""
    return ("cuda:0", "cuda:1") if torch.cuda.device_count() >= 2 else ("cuda:0", "cpu")


@pytest.mark.parametrize("foreach", [False, True])
def test_clip_grad_norm_multi_device(foreach: bool) -> None:
    """test_nn's ``test_clip_grad_norm_multi_device``: layers on two devices, as on one."""
    first, second = _devices()
    model = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Linear(10, 10))
    model[0].to(first)
    model[1].to(second)
    reference = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Linear(10, 10)).to(first)
    for norm_type in (2.0, math.inf):
        for p in [*model.parameters(), *reference.parameters()]:
            p.grad = torch.ones_like(p)
        norm = distclip.clip_grad_norm_(
            model.parameters(), 0.5, norm_type=norm_type, foreach=foreach
        )
        expected = torch.nn.utils.clip_grad_norm_(
            reference.parameters(), 0.5, norm_type=norm_type, foreach=foreach
        )
        torch.testing.assert_close(norm, expected)
        for p, q in zip(model.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(p.grad.to(first), q.grad)


@pytest.mark.parametrize("norm_type", [2.0, "inf", "-inf", 0, -1.5])
def test_repeated_drop_in_calls_never_synchronise(norm_type: Any) -> None:
    """After the first call, no call waits for the device (CUDA's sync debug mode raises)."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8)).cuda()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    grads = [p.grad for p in model.parameters()]
    norm = distclip.get_total_norm(grads, norm_type)
    calls: list[Callable[[], Any]] = [
        lambda: distclip.get_total_norm(grads, norm_type),
        lambda: distclip.clip_grad_norm_(model.parameters(), 0.1, norm_type),
        lambda: distclip.clip_grads_with_norm_(model.parameters(), 0.1, norm),
        lambda: distclip.clip_grad_value_(model.parameters(), 0.1),
        lambda: distclip.grad_norm(model.parameters(), norm_type),
    ]
    for call in calls:
        call()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
