"""The functional drop-ins against torch's own functions in a single process."""

from __future__ import annotations

import math

import pytest
import torch

import distclip


def _params(seed: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = [
        torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(4, 3), (3,), (0,), (2, 2)]
    ]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 5
    params[-1].grad = None  # a parameter without a gradient this step
    return params


@pytest.mark.parametrize("norm_type", [1.0, 2.0, 3.0, math.inf])
def test_get_total_norm_equals_torch(norm_type: float) -> None:
    params = _params(0)
    grads = [p.grad for p in params if p.grad is not None]
    if math.isinf(norm_type):  # torch's inf-norm has no identity for the empty tensor
        with pytest.raises(RuntimeError, match="empty tensor"):
            torch.nn.utils.get_total_norm(grads, norm_type)
        grads = [g for g in grads if g.numel() > 0]
    expected = torch.nn.utils.get_total_norm(grads, norm_type)
    torch.testing.assert_close(
        distclip.get_total_norm(params, norm_type), expected, rtol=1e-6, atol=0
    )


@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clip_grad_norm_equals_torch(max_norm: float) -> None:
    ours, theirs = _params(1), _params(1)
    norm = distclip.clip_grad_norm_(ours, max_norm)
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    torch.testing.assert_close(norm, expected, rtol=1e-6, atol=0)
    for a, b in zip(ours, theirs, strict=True):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)


def test_clip_grad_norm_errors() -> None:
    params = _params(2)
    with pytest.raises(ValueError, match="max_norm must be a positive finite number"):
        distclip.clip_grad_norm_(params, 0.0)
    params[0].grad[0, 0] = math.nan
    with pytest.raises(RuntimeError, match="non-finite"):
        distclip.clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
