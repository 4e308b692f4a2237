"""AutoClip and fixed-norm clipping: the coefficient read off a plain SGD update."""

from __future__ import annotations

import math

import pytest
import torch

import distclip
from tests.support.reference import EPS, SlowAutoClip, norm_of


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(5, 3), (3,), (4, 2, 2)]]


def _heavy_tailed_grads(
    params: list[torch.nn.Parameter], steps: int, seed: int = 1
) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        scale = float(torch.distributions.StudentT(1.5).sample().abs()) + 0.05
        out.append([torch.randn(p.shape, generator=gen) * scale for p in params])
    return out


def _applied_coefficient(
    before: list[torch.Tensor], after: list[torch.Tensor], grads: list[torch.Tensor], lr: float
) -> float:
    """SGD (no momentum): after = before - lr * c * g, so c = (before - after) / (lr * g)."""
    num = torch.cat([(b - a).reshape(-1) for b, a in zip(before, after, strict=True)]).double()
    den = torch.cat([g.reshape(-1) for g in grads]).double() * lr
    return float(num @ den / (den @ den))


@pytest.mark.parametrize(
    ("q", "window", "max_norm", "min_norm"),
    [
        (0.1, 200, None, None),
        (0.5, 7, None, None),
        (0.9, 20, 2.0, None),
        (0.0, 1, None, 1.0),
        (1.0, 30, None, None),
    ],
)
def test_applied_coefficient_equals_reference(
    q: float, window: int, max_norm: float | None, min_norm: float | None
) -> None:
    torch.manual_seed(0)
    params = _params()
    opt = distclip.AutoClippedOptimizer(
        torch.optim.SGD, q=q, window=window, max_norm=max_norm, min_norm=min_norm
    )(params, lr=0.1)
    reference = SlowAutoClip(q=q, window=window, max_norm=max_norm, min_norm=min_norm)
    num_clipped = 0
    for grads in _heavy_tailed_grads(params, 300):
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        before = [p.detach().clone() for p in params]
        opt.step()
        norm = norm_of(grads)
        tau, coef = reference.coefficient(norm)
        got = opt.last_clip
        assert float(got.total_norm) == pytest.approx(norm, rel=1e-6)
        assert float(got.threshold) == pytest.approx(tau, rel=1e-6)
        assert float(got.clip_coef) == pytest.approx(coef, rel=1e-6)
        assert _applied_coefficient(
            before, [p.detach() for p in params], grads, 0.1
        ) == pytest.approx(coef, rel=1e-5)
        num_clipped += norm > tau
    assert int(opt.clipper.num_clipped) == num_clipped
    if q < 1.0 and window > 1:
        assert num_clipped > 0  # the test exercised clipping


def test_fixed_norm_method() -> None:
    params = _params()
    opt = distclip.ClippedOptimizer(torch.optim.SGD, method="norm", max_norm=1.5)(params, lr=0.1)
    for grads in _heavy_tailed_grads(params, 50):
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        before = [p.detach().clone() for p in params]
        opt.step()
        coef = min(1.0, 1.5 / (norm_of(grads) + EPS))
        assert _applied_coefficient(
            before, [p.detach() for p in params], grads, 0.1
        ) == pytest.approx(coef, rel=1e-5)
        assert float(opt.last_clip.threshold) == 1.5


def test_matches_torch_clip_grad_norm() -> None:
    params = _params()
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    clipper = distclip.NormClip(params, max_norm=0.7)
    for grads in _heavy_tailed_grads(params, 20):
        for p, t, g in zip(params, twins, grads, strict=True):
            p.grad, t.grad = g.clone(), g.clone()
        stats = clipper.clip_()
        torch_norm = torch.nn.utils.clip_grad_norm_(twins, 0.7)
        torch.testing.assert_close(stats.total_norm, torch_norm, rtol=1e-6, atol=0)
        for p, t in zip(params, twins, strict=True):
            torch.testing.assert_close(p.grad, t.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("p", [1.0, 3.0, math.inf])
def test_other_norm_types(p: float) -> None:
    params = _params()
    opt = distclip.AutoClippedOptimizer(torch.optim.SGD, q=0.3, window=10, norm_type=p)(
        params, lr=0.1
    )
    reference = SlowAutoClip(q=0.3, window=10)
    for grads in _heavy_tailed_grads(params, 40):
        for param, g in zip(params, grads, strict=True):
            param.grad = g.clone()
        opt.step()
        tau, coef = reference.coefficient(norm_of(grads, p))
        assert float(opt.last_clip.threshold) == pytest.approx(tau, rel=1e-5)
        assert float(opt.last_clip.clip_coef) == pytest.approx(coef, rel=1e-5)


def test_nonfinite_step_is_skipped_and_never_enters_the_window() -> None:
    params = _params()
    opt = distclip.AutoClippedOptimizer(torch.optim.SGD, q=0.5, window=5)(
        params, lr=0.1, momentum=0.9
    )
    reference = SlowAutoClip(q=0.5, window=5)
    for step, grads in enumerate(_heavy_tailed_grads(params, 30)):
        if step in (4, 17):
            grads[1] = grads[1].clone()
            grads[1][0] = math.nan if step == 4 else math.inf
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        before = [p.detach().clone() for p in params]
        momentum = [opt.state[p].get("momentum_buffer") for p in params]
        momentum = [m.clone() if m is not None else None for m in momentum]
        opt.step()
        tau, _ = reference.coefficient(norm_of(grads))
        if step in (4, 17):
            assert bool(opt.last_clip.skipped)
            for p, b in zip(params, before, strict=True):
                assert torch.equal(p.detach(), b)
            for p, m in zip(params, momentum, strict=True):
                got = opt.state[p].get("momentum_buffer")
                assert (got is None and m is None) or torch.equal(got, m)
        else:
            assert not bool(opt.last_clip.skipped)
            assert float(opt.last_clip.threshold) == pytest.approx(tau, rel=1e-6)
    assert int(opt.clipper.num_skipped) == 2
    assert opt.clipper.window.chronological().tolist() == pytest.approx(reference.history, rel=1e-6)


def test_nonfinite_error_mode_raises_before_changing_anything() -> None:
    params = _params()
    opt = distclip.AutoClippedOptimizer(torch.optim.SGD, q=0.5, window=5, nonfinite="error")(
        params, lr=0.1
    )
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    window = opt.clipper.window.values.clone()
    params[0].grad[0, 0] = math.nan
    grads = [p.grad.clone() for p in params]
    values = [p.detach().clone() for p in params]
    with pytest.raises(distclip.NonFiniteNormError, match="nonfinite='skip'"):
        opt.step()
    assert torch.equal(opt.clipper.window.values, window)
    for p, g, v in zip(params, grads, values, strict=True):
        assert torch.equal(p.grad.nan_to_num(), g.nan_to_num())
        assert torch.equal(p.detach(), v)


def test_reset_clears_the_window() -> None:
    params = _params()
    opt = distclip.AutoClippedOptimizer(torch.optim.SGD, q=0.5, window=4)(params, lr=0.1)
    for grads in _heavy_tailed_grads(params, 6):
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
    opt.reset()
    assert opt.clipper.window.chronological().numel() == 0
    assert opt.clipper.num_steps == 0
    reference = SlowAutoClip(q=0.5, window=4)
    for grads in _heavy_tailed_grads(params, 6, seed=9):
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        assert float(opt.last_clip.threshold) == pytest.approx(
            reference.threshold(norm_of(grads)), rel=1e-6
        )


def test_seed_floor_is_explicit() -> None:
    params = _params()
    default = distclip.AutoClip(params, q=0.5, window=3)
    floored = distclip.AutoClip(params, q=0.5, window=3, min_norm=1.0)
    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    assert float(default.clip_().threshold) < 1.0
    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    assert float(floored.clip_().threshold) == 1.0
