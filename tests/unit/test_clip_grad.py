"""torch's contract for the four clipping functions, on distclip's drop-ins, in one process.

The cases are those of PyTorch's own tests of ``clip_grad_norm_``, ``clip_grad_value_``,
``get_total_norm`` and ``clip_grads_with_norm_`` (``test/test_nn.py``: the norm types,
the decomposed two-phase API, small gradients left alone, a single tensor as input,
the exhausted generator's warning, the ``error_if_nonfinite`` table), written afresh
and checked two ways: against torch itself (the oracle in one process) and against a
float64 reference. Norm types where distclip deliberately differs (``p = 0``) are
checked against the reference only.
"""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch

import distclip
from tests.support.reference import norm_of

INF, NAN = math.inf, math.nan

#: test_nn's norm types and tolerance (torch.testing's float32 defaults).
TORCH_NORM_TYPES = (0.5, 1.5, 2, 4, "inf")


def _linear(grads: tuple[torch.Tensor, torch.Tensor]) -> torch.nn.Linear:
    layer = torch.nn.Linear(10, 10)
    for p, g in zip(layer.parameters(), grads, strict=True):
        p.grad = g.clone().view_as(p)
    return layer


def _large_grads() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.arange(1.0, 101).view(10, 10), torch.ones(10).div(1000)


def _small_grads() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.rand(10, 10, generator=gen).div(10000), torch.ones(10).div(500)


def _norm(layer: torch.nn.Module, norm_type: float | str) -> float:
    return norm_of([p.grad for p in layer.parameters()], float(norm_type))


def _uniform_scale(layer: torch.nn.Module, grads: tuple[torch.Tensor, ...]) -> float:
    """The one factor every element was multiplied by (asserts that there is one)."""
    ratios = torch.cat(
        [
            (p.grad / g.view_as(p)).reshape(-1)
            for p, g in zip(layer.parameters(), grads, strict=True)
        ]
    )
    assert float(ratios.std()) == pytest.approx(0.0, abs=1e-6)
    return float(ratios[0])


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("norm_type", TORCH_NORM_TYPES)
def test_clip_grad_norm(norm_type: float | str, foreach: bool) -> None:
    """test_nn's ``test_clip_grad_norm``, on distclip and compared with torch."""
    max_norm = 2
    ours, theirs = _linear(_large_grads()), _linear(_large_grads())
    before = _norm(ours, norm_type)
    norm = distclip.clip_grad_norm_(
        ours.parameters(), max_norm, norm_type=norm_type, foreach=foreach
    )
    expected = torch.nn.utils.clip_grad_norm_(
        theirs.parameters(), max_norm, norm_type=norm_type, foreach=foreach
    )
    torch.testing.assert_close(norm, expected)
    assert float(norm) == pytest.approx(before, rel=1e-6)
    assert _norm(ours, norm_type) == pytest.approx(max_norm, rel=1e-5)
    assert _uniform_scale(ours, _large_grads()) < 1.0
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad)

    # The decomposed API: get_total_norm of the gradients, then clip_grads_with_norm_.
    ours = _linear(_large_grads())
    total = distclip.get_total_norm(
        [p.grad for p in ours.parameters()], norm_type=norm_type, foreach=foreach
    )
    torch.testing.assert_close(total, torch.nn.utils.get_total_norm(_large_grads(), norm_type))
    assert float(total) == pytest.approx(before, rel=1e-6)
    distclip.clip_grads_with_norm_(ours.parameters(), max_norm, total, foreach=foreach)
    assert _norm(ours, norm_type) == pytest.approx(max_norm, rel=1e-5)
    _uniform_scale(ours, _large_grads())

    # Small gradients are left as they are (the factor is clamped to 1).
    ours = _linear(_small_grads())
    before = _norm(ours, norm_type)
    norm = distclip.clip_grad_norm_(
        ours.parameters(), max_norm, norm_type=norm_type, foreach=foreach
    )
    assert float(norm) == pytest.approx(before, rel=1e-6)
    assert _norm(ours, norm_type) == before
    assert _uniform_scale(ours, _small_grads()) == 1.0

    # A single tensor is accepted as well as a list of one.
    p1, p2 = torch.randn(10, 10), torch.randn(10, 10)
    p1.grad = torch.arange(1.0, 101).view(10, 10)
    p2.grad = p1.grad.clone()
    distclip.clip_grad_norm_(p1, max_norm, norm_type=norm_type, foreach=foreach)
    distclip.clip_grad_norm_([p2], max_norm, norm_type=norm_type, foreach=foreach)
    assert torch.equal(p1.grad, p2.grad)

    # An exhausted generator: one warning, torch's text, pointing at the caller.
    params = ours.parameters()
    for _ in params:
        pass
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        distclip.clip_grad_norm_(params, max_norm, norm_type=norm_type, foreach=foreach)
    assert [str(w.message) for w in caught] == [
        "`parameters` is an empty generator, no gradient clipping will occur."
    ]
    assert caught[0].filename == __file__


@pytest.mark.parametrize("foreach", [False, True])
def test_clip_grad_value(foreach: bool) -> None:
    """test_nn's ``test_clip_grad_value``: bounds, a missing gradient, a single tensor."""
    clip_value = 2.5
    grad_w, grad_b = torch.arange(-50.0, 50).view(10, 10).div(5), torch.ones(10).mul(2)
    for grads in ([grad_w, grad_b], [grad_w, None]):
        ours, theirs = torch.nn.Linear(10, 10), torch.nn.Linear(10, 10)
        for layer in (ours, theirs):
            for p, g in zip(layer.parameters(), grads, strict=True):
                p.grad = None if g is None else g.clone().view_as(p)
        distclip.clip_grad_value_(ours.parameters(), clip_value, foreach=foreach)
        torch.nn.utils.clip_grad_value_(theirs.parameters(), clip_value, foreach=foreach)
        for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
            assert (a.grad is None) is (b.grad is None)
            if a.grad is not None:
                assert float(a.grad.max()) <= clip_value
                assert float(a.grad.min()) >= -clip_value
                assert torch.equal(a.grad, b.grad)
    p1, p2 = torch.randn(10, 10), torch.randn(10, 10)
    p1.grad = torch.arange(-50.0, 50).view(10, 10).div(5)
    p2.grad = p1.grad.clone()
    distclip.clip_grad_value_(p1, clip_value, foreach=foreach)
    distclip.clip_grad_value_([p2], clip_value, foreach=foreach)
    assert torch.equal(p1.grad, p2.grad)


# test_nn's error_if_nonfinite table, one row per case: (only one element is set?, a
# parameter with gradient 1 first?, gradient scalars, norm types whose total is
# non-finite, norm types whose total is finite).
_POS = [0.1, 1, 2, 3.5, INF]
_NEG = [-0.1, -1, -2, -3.5]
_ALL = [*_POS, *_NEG, 0]
NONFINITE_CASES = [
    (False, False, [INF, -INF], [*_POS, *_NEG], [0]),
    (False, True, [INF, -INF], _POS, [*_NEG, 0]),
    (True, False, [INF, -INF], _POS, [*_NEG, 0]),
    (True, True, [INF, -INF], _POS, [*_NEG, 0]),
    (False, False, [NAN], [*_POS, *_NEG], [0]),
    (False, True, [NAN], [*_POS, *_NEG], [0]),
    (True, False, [NAN], [*_POS, *_NEG], [0]),
    (True, True, [NAN], [*_POS, *_NEG], [0]),
    (False, False, [2e22, -2e22], [], _ALL),
    (False, True, [2e22, -2e22], [], _ALL),
    (True, False, [2e22, -2e22], [], _ALL),
    (True, True, [2e22, -2e22], [], _ALL),
    (False, False, [2e200, -2e200], [3.5, 2, -2, -3.5], [INF, 1, 0.1, 0, -1, -0.1]),
    (False, True, [2e200, -2e200], [3.5, 2], [*_NEG, INF, 1, 0.1, 0]),
    (True, False, [2e200, -2e200], [3.5, 2], [*_NEG, INF, 1, 0.1, 0]),
    (True, True, [2e200, -2e200], [3.5, 2], [*_NEG, INF, 1, 0.1, 0]),
]


def _nonfinite_params(scalar: float, one_elem: bool, prefix: bool) -> list[torch.Tensor]:
    param = torch.ones(10, dtype=torch.float64, requires_grad=True)
    (param[1] if one_elem else param).mul(scalar).sum().backward()
    if not prefix:
        return [param]
    first = torch.ones(1, dtype=torch.float64, requires_grad=True)
    first.mul(1).sum().backward()
    return [first, param]


def _case_id(case: tuple[object, ...]) -> str:
    one_elem, prefix, scalars = case[:3]
    return f"{'one' if one_elem else 'all'}{'-prefix' if prefix else ''}-{scalars[0]}"


@pytest.mark.parametrize(
    ("one_elem", "prefix", "scalars", "nonfinite", "finite"),
    NONFINITE_CASES,
    ids=[_case_id(c) for c in NONFINITE_CASES],
)
def test_clip_grad_norm_error_if_nonfinite(
    one_elem: bool, prefix: bool, scalars: list[float], nonfinite: list[float], finite: list[float]
) -> None:
    """test_nn's ``test_clip_grad_norm_error_if_nonfinite``, plus the norm itself.

    Raises exactly when the total is non-finite and ``error_if_nonfinite``, with torch's
    message, before any gradient changes; the norm equals the float64 reference and,
    except for ``p = 0`` (see the README), torch's.
    """
    for error_if_nonfinite, (norm_type, scalar) in itertools.product(
        [False, True], [*itertools.product(nonfinite, scalars), *itertools.product(finite, scalars)]
    ):
        is_nonfinite = norm_type in nonfinite
        params = _nonfinite_params(scalar, one_elem, prefix)
        before = [p.grad.clone() for p in params]
        reference = norm_of(before, norm_type)
        assert math.isfinite(reference) is not is_nonfinite, (norm_type, scalar)
        if is_nonfinite and error_if_nonfinite:
            with pytest.raises(
                RuntimeError, match=f"The total norm of order {float(norm_type)} for gradients"
            ):
                distclip.clip_grad_norm_(params, 1, norm_type=norm_type, error_if_nonfinite=True)
            for p, b in zip(params, before, strict=True):
                torch.testing.assert_close(p.grad, b, equal_nan=True, rtol=0, atol=0)
            continue
        norm = distclip.get_total_norm(before, norm_type, error_if_nonfinite)
        torch.testing.assert_close(norm.item(), reference, rtol=1e-12, atol=0, equal_nan=True)
        if norm_type != 0:
            torch.testing.assert_close(
                norm, torch.nn.utils.get_total_norm(before, norm_type), equal_nan=True
            )
        distclip.clip_grad_norm_(
            params, 1, norm_type=norm_type, error_if_nonfinite=error_if_nonfinite
        )
