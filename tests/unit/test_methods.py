"""Every method's update, read off a plain SGD step, against a slow reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import distclip
from tests.support import internals
from tests.support.reference import (
    EPS,
    SlowAutoClip,
    SlowZClip,
    agc_reference,
    layer_wise_coefficients,
    norm_of,
    stochastic_coefficient,
)

LR = 0.1


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    # float64: the update read off an SGD step then shows the coefficient to ~1e-15.
    return [
        torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64))
        for s in [(6, 4), (6,), (3, 2, 2), (1,)]
    ]


def _grads(params: list[torch.nn.Parameter], steps: int, seed: int = 1) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        scale = abs(float(rng.standard_t(1.5))) + 0.05  # heavy-tailed gradient scale
        out.append([torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale for p in params])
    return out


def _run(method: str, steps: int = 200, **options):  # type: ignore[no-untyped-def]
    """Yield (grads, applied update / -lr, last_clip) for every step of a plain SGD."""
    params = _params()
    opt = distclip.ClippedOptimizer(torch.optim.SGD, method=method, **options)(params, lr=LR)
    for grads in _grads(params, steps):
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        before = [p.detach().clone() for p in params]
        opt.step()
        applied = [(b - p.detach()) / LR for b, p in zip(before, params, strict=True)]
        yield params, before, grads, applied, opt


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a.double(), b.double(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", ["value", "coordinate_wise"])
def test_value_clipping(method: str) -> None:
    clamped = 0
    for _, _, grads, applied, opt in _run(method, clip_value=0.7):
        for g, a in zip(grads, applied, strict=True):
            _close(a, g.clamp(-0.7, 0.7))
        clamped += any(bool((g.abs() > 0.7).any()) for g in grads)
        assert float(opt.last_clip.threshold) == pytest.approx(0.7)
    assert clamped > 50


def test_layer_wise() -> None:
    clipped = 0
    for _, _, grads, applied, opt in _run("layer_wise", max_norm=1.2):
        coefs = layer_wise_coefficients(grads, 1.2)
        for g, a, c in zip(grads, applied, coefs, strict=True):
            _close(a, g * c)
        assert float(opt.last_clip.clip_coef) == pytest.approx(min(coefs), rel=1e-5)
        assert float(opt.last_clip.total_norm) == pytest.approx(norm_of(grads), rel=1e-5)
        clipped += min(coefs) < 1
    assert int(opt.clipper.num_clipped) == clipped > 20


@pytest.mark.parametrize("method", ["linear_stoch_norm", "quadratic_stoch_norm"])
def test_stochastic_norm_with_beta_one_is_deterministic_clipping(method: str) -> None:
    for _, _, grads, applied, _ in _run(method, max_norm=1.5, beta=1.0):
        # beta = 1: every draw u < 1 accepts, so the rule clips whenever n >= lam.
        coef = stochastic_coefficient(norm_of(grads), 1.5, beta=1.0, power=1, u=0.0)
        for g, a in zip(grads, applied, strict=True):
            _close(a, g * coef)


@pytest.mark.parametrize(
    ("method", "power"), [("linear_stoch_norm", 1), ("quadratic_stoch_norm", 2)]
)
def test_stochastic_norm_clips_with_the_formula_probability(method: str, power: int) -> None:
    lam, beta = 1.5, 0.3
    probabilities, outcomes = [], []
    for _, _, grads, applied, _ in _run(method, steps=800, max_norm=lam, beta=beta, seed=7):
        n = norm_of(grads)
        was_clipped = not torch.allclose(applied[0], grads[0], rtol=1e-9, atol=1e-12)
        if was_clipped:  # c is exactly lam / n, never anything else
            for g, a in zip(grads, applied, strict=True):
                _close(a, g * (lam / n))
        if n >= lam:
            probabilities.append(beta ** ((lam / n) ** power))
            outcomes.append(was_clipped)
        else:
            assert not was_clipped
    expected = float(np.sum(probabilities))
    std = math.sqrt(float(np.sum([p * (1 - p) for p in probabilities])))
    assert len(outcomes) > 200
    assert abs(sum(outcomes) - expected) < 4 * std, (sum(outcomes), expected, std)


@pytest.mark.parametrize("method", ["linear_stoch_norm", "linear_stoch_autoclip"])
def test_stochastic_runs_are_reproducible_from_seed(method: str) -> None:
    def thresholds_and_coefs(seed: int) -> list[float]:
        return [
            float(o.last_clip.clip_coef) for *_, o in _run(method, steps=60, seed=seed, beta=0.5)
        ]

    assert thresholds_and_coefs(3) == thresholds_and_coefs(3)
    assert thresholds_and_coefs(3) != thresholds_and_coefs(4)


@pytest.mark.parametrize("method", ["linear_stoch_autoclip", "quadratic_stoch_autoclip"])
def test_stochastic_autoclip_with_beta_one_uses_the_window_quantile(method: str) -> None:
    reference = SlowAutoClip(q=0.3, window=20, max_norm=4.0)
    for _, _, grads, applied, opt in _run(method, q=0.3, window=20, max_norm=4.0, beta=1.0):
        n = norm_of(grads)
        tau = reference.threshold(n)
        assert float(opt.last_clip.threshold) == pytest.approx(tau, rel=1e-5)
        coef = stochastic_coefficient(n, tau, beta=1.0, power=1, u=0.0)
        for g, a in zip(grads, applied, strict=True):
            _close(a, g * coef)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"mode": "mean", "warmup_steps": 10},
        {"alpha": 0.9, "z_thresh": 1.5, "warmup_steps": 5, "max_norm": 3.0},
    ],
)
def test_zclip_matches_reference(options: dict[str, object]) -> None:
    reference = SlowZClip(**options)  # type: ignore[arg-type]
    clipped = 0
    for step, (_, _, grads, applied, opt) in enumerate(_run("zclip", steps=300, **options)):
        n = norm_of(grads)
        tau = reference.threshold(n)
        got = float(opt.last_clip.threshold)
        assert got == pytest.approx(tau, rel=1e-4) or (math.isinf(got) and math.isinf(tau)), step
        coef = min(1.0, tau / (n + EPS))
        for g, a in zip(grads, applied, strict=True):
            _close(a, g * coef)
        clipped += coef < 1
    assert clipped > 5
    assert float(opt.clipper.mean) == pytest.approx(reference.mean, rel=1e-4)


def test_zclip_ignores_nonfinite_norms() -> None:
    params = _params()
    opt = distclip.ClippedOptimizer(torch.optim.SGD, method="zclip", warmup_steps=5)(params, lr=LR)
    reference = SlowZClip(warmup_steps=5)
    for step, grads in enumerate(_grads(params, 40)):
        if step in (3, 20):
            grads[0] = grads[0].clone()
            grads[0][0, 0] = math.nan
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        tau = reference.threshold(norm_of(grads) if step not in (3, 20) else math.nan)
        got = float(opt.last_clip.threshold)
        assert got == pytest.approx(tau, rel=1e-4) or (math.isinf(got) and math.isinf(tau))
    assert math.isfinite(float(opt.clipper.mean))


@pytest.mark.parametrize(("clip_factor", "eps"), [(0.01, 1e-3), (0.5, 1e-3), (0.05, 1.0)])
def test_agc_matches_reference(clip_factor: float, eps: float) -> None:
    for _, before, grads, applied, _ in _run("agc", steps=40, clip_factor=clip_factor, eps=eps):
        for g, w, a in zip(grads, before, applied, strict=True):
            _close(a, agc_reference(g, w, clip_factor, eps))


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("value", {"clip_value": 0.5}),
        ("layer_wise", {"max_norm": 1.0}),
        ("linear_stoch_norm", {"max_norm": 1.0, "seed": 5}),
        ("quadratic_stoch_autoclip", {"q": 0.2, "window": 7, "seed": 5}),
        ("zclip", {"warmup_steps": 4}),
        ("agc", {"clip_factor": 0.02}),
    ],
)
def test_state_round_trip_resumes_exactly(method: str, options: dict[str, object]) -> None:
    params = _params()
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    cls = distclip.ClippedOptimizer(torch.optim.SGD, method=method, **options)
    opt = cls(params, lr=LR)
    grads = _grads(params, 30)
    for step_grads in grads[:12]:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        opt.step()
    saved = opt.state_dict()
    restored = cls(twins, lr=LR)
    for p, t in zip(params, twins, strict=True):
        t.data.copy_(p.data)
    restored.load_state_dict(saved)
    for step_grads in grads[12:]:
        for p, t, g in zip(params, twins, step_grads, strict=True):
            p.grad, t.grad = g.clone(), g.clone()
        opt.step()
        restored.step()
        assert torch.equal(opt.last_clip.threshold, restored.last_clip.threshold)
        assert torch.equal(opt.last_clip.clip_coef, restored.last_clip.clip_coef)
    for p, t in zip(params, twins, strict=True):
        assert torch.equal(p, t)


def test_every_method_has_a_class_named_after_it() -> None:
    for method in distclip.available_methods():
        cls = distclip.ClippedOptimizer(torch.optim.SGD, method=method)
        assert issubclass(cls, torch.optim.SGD)
        assert cls.__name__.endswith("SGD")


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("norm", {"max_norm": 1.5}),
        ("autoclip", {"q": 0.3, "window": 9, "max_norm": 6.0}),
        ("linear_stoch_norm", {"max_norm": 1.0, "seed": 2}),
        ("quadratic_stoch_autoclip", {"q": 0.4, "window": 5, "seed": 2}),
        ("zclip", {"warmup_steps": 5}),
    ],
)
def test_external_norm_drives_the_same_rule(method: str, options: dict[str, object]) -> None:
    """observe_(n), as an engine with its own norm uses it, reproduces the native factors."""
    fed = distclip.make_clipper(method, _params(), **options)
    for step, (_, _, grads, _, opt) in enumerate(_run(method, steps=60, **options)):
        n = torch.tensor(norm_of(grads), dtype=torch.float64)
        stats = fed.observe_(n)
        assert stats.engine_threshold is not None
        engine_coef = min(1.0, float(stats.engine_threshold) / (float(n) + 1e-6))
        assert float(stats.threshold) == pytest.approx(float(opt.last_clip.threshold), rel=1e-9)
        assert engine_coef == pytest.approx(float(opt.last_clip.clip_coef), rel=1e-9), step
    assert torch.equal(fed.num_clipped, opt.clipper.num_clipped)
    for mine, theirs in zip(
        internals.state_tensors(fed), internals.state_tensors(opt.clipper), strict=True
    ):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=0)


@pytest.mark.parametrize("method", ["value", "coordinate_wise", "layer_wise", "agc"])
def test_external_norm_is_refused_where_the_rule_needs_more(method: str) -> None:
    clipper = distclip.make_clipper(method, _params())
    with pytest.raises(NotImplementedError, match=f"method '{method}' needs per-tensor"):
        clipper.observe_(torch.tensor(1.0))
