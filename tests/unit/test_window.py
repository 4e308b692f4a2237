"""The ring buffer and its quantile against a slow list-based reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.internals import NormWindow
from tests.support.reference import SlowAutoClip

norms = st.one_of(
    st.floats(min_value=0.0, max_value=1e4, allow_nan=False, width=32),
    st.sampled_from([math.nan, math.inf, -math.inf]),
)


def _push(window: NormWindow, norm: float) -> None:
    value = torch.tensor(norm, dtype=torch.float32)
    window.push_(value, torch.isfinite(value))


@settings(max_examples=200, deadline=None)
@given(
    size=st.integers(min_value=1, max_value=12),
    q=st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]),
    sequence=st.lists(norms, min_size=1, max_size=40),
)
def test_window_quantile_matches_reference(size: int, q: float, sequence: list[float]) -> None:
    window = NormWindow(size)
    reference = SlowAutoClip(q=q, window=size)
    for norm in sequence:
        _push(window, norm)
        expected = reference.threshold(float(torch.tensor(norm, dtype=torch.float32)))
        got = float(window.quantile(q))
        if math.isinf(expected):
            assert math.isinf(got)
        else:
            assert got == pytest.approx(expected, rel=1e-6, abs=1e-6)
        assert window.chronological().tolist() == pytest.approx(reference.history, rel=1e-6)


def test_hundreds_of_steps_against_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    heavy = torch.distributions.StudentT(df=1.5).sample((600,)).abs() + 0.01
    window, reference = NormWindow(200), SlowAutoClip(q=0.1, window=200)
    for step, norm in enumerate(heavy.tolist()):
        if step % 97 == 13:
            norm = math.nan
        _push(window, norm)
        expected = reference.threshold(norm)
        assert float(window.quantile(0.1)) == pytest.approx(expected, rel=1e-6)
    del gen


def test_window_of_one_keeps_one_norm() -> None:
    window = NormWindow(1)
    for norm in (3.0, 5.0, math.nan, 2.0):
        _push(window, norm)
    assert window.chronological().tolist() == [2.0]
    assert float(window.quantile(0.1)) == 2.0


def test_rejected_norm_leaves_window_bit_identical() -> None:
    window = NormWindow(4)
    for norm in (1.0, 2.0, 3.0):
        _push(window, norm)
    before = (window.values.clone(), window.num_seen.clone())
    _push(window, math.nan)
    _push(window, math.inf)
    assert torch.equal(window.values, before[0])
    assert torch.equal(window.num_seen, before[1])


def test_reset_and_state_round_trip() -> None:
    window = NormWindow(3)
    for norm in (1.0, 4.0, 2.0, 8.0):
        _push(window, norm)
    copy = NormWindow(3)
    copy.load_state_dict(
        {
            k: (v.clone() if isinstance(v, torch.Tensor) else v)
            for k, v in window.state_dict().items()
        }
    )
    assert torch.equal(copy.values, window.values)
    assert torch.equal(copy.quantile(0.5), window.quantile(0.5))
    window.reset()
    assert window.chronological().numel() == 0
    assert math.isinf(float(window.quantile(0.5)))


@pytest.mark.parametrize(
    ("mutate", "error", "match"),
    [
        (lambda s: s.update(size=4), ValueError, "window=4"),
        (lambda s: s.update(values=torch.zeros(2)), ValueError, "shape"),
        (lambda s: s.update(values=torch.zeros(3, dtype=torch.long)), ValueError, "floating"),
        (lambda s: s.update(num_seen=torch.tensor(1.5)), ValueError, "num_seen"),
        (lambda s: s.update(num_seen=torch.tensor(-1)), ValueError, "num_seen"),
        (lambda s: s.update(values=torch.tensor([1.0, math.nan, 2.0])), ValueError, "NaN"),
    ],
)
def test_bad_window_state_is_refused_before_changing_anything(mutate, error, match) -> None:  # type: ignore[no-untyped-def]
    window = NormWindow(3)
    _push(window, 1.0)
    state = {"size": 3, "values": torch.tensor([1.0, 2.0, 3.0]), "num_seen": torch.tensor(3)}
    mutate(state)
    before = window.values.clone()
    with pytest.raises(error, match=match):
        window.load_state_dict(state)
    assert torch.equal(window.values, before)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_window_keeps_its_values_a_view_of_its_own_buffer(how: str) -> None:
    import copy
    import pickle

    window = NormWindow(3)
    for norm in (1.0, 4.0):
        _push(window, norm)
    clone = copy.deepcopy(window) if how == "deepcopy" else pickle.loads(pickle.dumps(window))
    _push(clone, 2.0)
    _push(clone, math.nan)
    assert clone.chronological().tolist() == [1.0, 4.0, 2.0]
    assert window.chronological().tolist() == [1.0, 4.0]
    assert float(clone.quantile(0.5)) == 2.0
    assert float(window.quantile(0.5)) == 2.5
