"""The rest of torch's contract, single process: types, dtypes, errors, the clippers.

What a user porting torch code meets first: ``get_total_norm(grads)`` measures the
gradients (0.1 read their ``.grad`` and returned 0), positional ``error_if_nonfinite``,
norm types as strings, the returned dtype, typed errors, and the same norm types and
errors through every clipper entry point.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import distclip
from tests.support import internals
from tests.support.internals import parse_deepspeed_section
from tests.support.reference import norm_of

EVERY_NORM_TYPE = [2.0, 1, "3", 0.5, 0, -1.0, "-2.5", "inf", "-inf", math.inf, -math.inf]


def _model(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3)).to(dtype)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 4
    return model


def _grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("norm_type", EVERY_NORM_TYPE)
def test_get_total_norm_measures_the_gradients_it_is_given(norm_type: Any) -> None:
    model = _model()
    grads = _grads(model)
    norm = distclip.get_total_norm(grads, norm_type)
    assert float(norm) == pytest.approx(norm_of(grads, float(norm_type)), rel=1e-5)
    assert float(distclip.grad_norm(model.parameters(), norm_type)) == float(norm)
    if float(norm_type) != 0:
        torch.testing.assert_close(norm, torch.nn.utils.get_total_norm(grads, norm_type))
    # Parameters are measured as tensors too (their values), as torch does.
    params = list(model.parameters())
    assert float(distclip.get_total_norm(params, norm_type)) == pytest.approx(
        norm_of([p.detach() for p in params], float(norm_type)), rel=1e-5
    )


def test_positional_arguments_in_torch_order() -> None:
    grads = _grads(_model())
    grads[0][0, 0] = math.inf
    with pytest.raises(RuntimeError, match=r"The total norm of order 2\.0 for gradients"):
        distclip.get_total_norm(grads, 2.0, True, None)
    with pytest.raises(distclip.NonFiniteNormError):
        distclip.get_total_norm(grads, 2, True)
    assert math.isinf(float(distclip.get_total_norm(grads, 2.0, False, False)))


@pytest.mark.parametrize(
    ("dtypes", "expected"),
    [
        ([torch.float16], torch.float16),
        ([torch.bfloat16], torch.bfloat16),
        ([torch.float16, torch.float32], torch.float32),
        ([torch.bfloat16, torch.float16], torch.float32),
        ([torch.float64, torch.float32], torch.float64),
    ],
)
def test_returned_dtype_follows_the_gradients(
    dtypes: list[torch.dtype], expected: torch.dtype
) -> None:
    grads = [torch.full((50,), 300.0, dtype=d) for d in dtypes]
    ours = distclip.get_total_norm(grads)
    theirs = torch.nn.utils.get_total_norm(grads)
    assert ours.dtype == theirs.dtype == expected
    # Accumulated in float32 before the cast: 300 * sqrt(100) even where fp16's sum overflows.
    assert float(ours) == pytest.approx(norm_of(grads), rel=1e-2)
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    assert distclip.clip_grad_norm_(params, 1.0).dtype == expected


def test_complex_norm_is_real_and_integer_tensors_are_refused() -> None:
    """A complex gradient's norm is real, as torch's; integer tensors are refused, as by torch."""
    complex_grads = [torch.tensor([3 + 4j, 0j])]
    ours = distclip.get_total_norm(complex_grads)
    torch.testing.assert_close(ours, torch.nn.utils.get_total_norm(complex_grads))
    assert ours.dtype == torch.float32
    with pytest.raises(TypeError, match=r"tensors\[0\] has dtype torch\.int64: a norm needs"):
        distclip.get_total_norm([torch.tensor([3, 4])])


def test_nothing_to_measure() -> None:
    empty = distclip.get_total_norm([])
    assert torch.equal(empty, torch.tensor(0.0))
    assert float(distclip.get_total_norm([], "-inf")) == 0.0  # torch's early answer
    param = torch.nn.Parameter(torch.ones(3))  # no gradient
    norm = distclip.clip_grad_norm_([param], 1.0)
    assert norm.dtype == torch.float32
    assert float(norm) == 0.0
    assert float(distclip.clip_grad_norm_([param], 1.0, "-inf")) == math.inf  # min of nothing


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda g, p: distclip.get_total_norm([*g, None]), TypeError, r"tensors\[4\] is None"),
        (lambda g, p: distclip.get_total_norm([1.0]), TypeError, r"tensors\[0\] must be a tensor"),
        (lambda g, p: distclip.get_total_norm(3.0), TypeError, "tensors must be a tensor or"),
        (lambda g, p: distclip.get_total_norm(g, "fro"), ValueError, "norm_type must be"),
        (lambda g, p: distclip.get_total_norm(g, math.nan), ValueError, "NaN is not a norm"),
        (lambda g, p: distclip.get_total_norm(g, True), TypeError, "norm_type must be"),
        (lambda g, p: distclip.get_total_norm(g, 2, 1), TypeError, "error_if_nonfinite must be"),
        (lambda g, p: distclip.get_total_norm(g, 2, False, 1), TypeError, "foreach must be"),
        (lambda g, p: distclip.clip_grad_norm_(p, -1.0), ValueError, r"max_norm must be >= 0"),
        (lambda g, p: distclip.clip_grad_norm_(p, math.nan), ValueError, "max_norm must be"),
        (lambda g, p: distclip.clip_grad_norm_(p, "1"), TypeError, "max_norm must be a real"),
        (lambda g, p: distclip.clip_grad_value_(p, -0.5), ValueError, "clip_value must be >= 0"),
        (lambda g, p: distclip.clip_grad_value_(p, None), TypeError, "clip_value must be"),
        (
            lambda g, p: distclip.clip_grads_with_norm_(p, 1.0, 3.0),
            TypeError,
            "total_norm must be a tensor",
        ),
    ],
)
def test_bad_input_is_a_typed_error_before_anything_changes(
    call: Callable[[list[torch.Tensor], list[torch.Tensor]], Any], error: type, match: str
) -> None:
    model = _model()
    params = list(model.parameters())
    before = [g.clone() for g in _grads(model)]
    with pytest.raises(error, match=match):
        call(_grads(model), params)
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p.grad, b)


def test_foreach_true_on_a_device_without_foreach_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="foreach=True was passed, but can't use the foreach"):
        internals.use_foreach(torch.device("meta"), True)
    assert internals.use_foreach(torch.device("cpu"), None) is True
    assert internals.use_foreach(torch.device("meta"), False) is False


def test_bounds_at_the_edges_of_their_range() -> None:
    """``max_norm=inf`` measures only; ``max_norm=0`` and ``clip_value=0`` zero the gradients."""
    model = _model()
    before = [g.clone() for g in _grads(model)]
    distclip.clip_grad_norm_(model.parameters(), math.inf)
    assert all(torch.equal(g, b) for g, b in zip(_grads(model), before, strict=True))
    distclip.clip_grad_value_(model.parameters(), math.inf)
    assert all(torch.equal(g, b) for g, b in zip(_grads(model), before, strict=True))
    distclip.clip_grad_value_(model.parameters(), 0)
    assert all(float(g.abs().max()) == 0.0 for g in _grads(model))


def test_clip_grads_with_norm_takes_torchs_norm() -> None:
    ours, theirs = _model(1), _model(1)
    total = torch.nn.utils.get_total_norm(_grads(theirs), 3.0)
    distclip.clip_grads_with_norm_(ours.parameters(), 0.5, total)
    torch.nn.utils.clip_grads_with_norm_(theirs.parameters(), 0.5, total)
    for a, b in zip(_grads(ours), _grads(theirs), strict=True):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------ clippers share it
@pytest.mark.parametrize("norm_type", EVERY_NORM_TYPE)
def test_every_clipper_entry_point_takes_every_norm_type(norm_type: Any) -> None:
    model = _model(2)
    expected = distclip.get_total_norm(_grads(model), norm_type)
    p = float(norm_type)
    clippers = [
        distclip.NormClip(model.parameters(), max_norm=1e30, norm_type=norm_type),
        distclip.make_clipper("autoclip", model.parameters(), norm_type=norm_type),
        distclip.attach(torch.optim.SGD(model.parameters(), lr=0.0), norm_type=norm_type).clipper,
        distclip.ClippedOptimizer(torch.optim.SGD, method="layer_wise", norm_type=norm_type)(
            model.parameters(), lr=0.0
        ).clipper,
    ]
    for clipper in clippers:
        assert clipper.config.norm_type == p
        torch.testing.assert_close(clipper.total_norm(), expected.float())
    stats = clippers[0].clip_()
    torch.testing.assert_close(stats.total_norm, expected.float())


_BAD_NORM_TYPES = [
    ("fro", ValueError),
    (math.nan, ValueError),
    (None, TypeError),
    (True, TypeError),
]


@pytest.mark.parametrize(("bad", "error"), _BAD_NORM_TYPES)
def test_every_entry_point_refuses_a_bad_norm_type_alike(bad: Any, error: type) -> None:
    """One validation, one message: functional, clippers, factories, attach, DeepSpeed config."""
    model = _model()
    with pytest.raises(error) as reference:
        distclip.get_total_norm(_grads(model), bad)
    message = str(reference.value)
    assert message.startswith("norm_type must be")
    calls: list[Callable[[], Any]] = [
        lambda: distclip.clip_grad_norm_(model.parameters(), 1.0, bad),
        lambda: distclip.grad_norm(model.parameters(), bad),
        lambda: distclip.NormClip(model.parameters(), norm_type=bad),
        lambda: distclip.make_clipper("zclip", model.parameters(), norm_type=bad),
        lambda: distclip.ClippedOptimizer(torch.optim.SGD, norm_type=bad),
        lambda: distclip.AutoClippedOptimizer(torch.optim.SGD, norm_type=bad),
        lambda: distclip.attach(torch.optim.SGD(model.parameters(), lr=0.1), norm_type=bad),
    ]
    for call in calls:
        with pytest.raises(error) as caught:
            call()
        assert str(caught.value) == message
    with pytest.raises(error) as caught:
        parse_deepspeed_section({"method": "norm", "norm_type": bad})
    assert str(caught.value).endswith(message)


def test_deepspeed_config_reads_norm_types_as_torch_does() -> None:
    """JSON has no inf: ``"inf"`` is read, and refused because DeepSpeed's norm is L2."""
    assert parse_deepspeed_section({"method": "norm", "norm_type": "2"}).config.norm_type == 2.0
    with pytest.raises(ValueError, match=r"norm_type must be 2 under DeepSpeed .* got inf"):
        parse_deepspeed_section({"method": "norm", "norm_type": "inf"})


def test_nonfinite_error_is_one_class_with_torchs_wording() -> None:
    model = _model()
    _grads(model)[0][0, 0] = math.nan
    clipper = distclip.NormClip(model.parameters(), nonfinite="error", norm_type="inf")
    with pytest.raises(distclip.NonFiniteNormError, match=r"^The total norm of order inf for"):
        clipper.clip_()
    with pytest.raises(distclip.NonFiniteNormError, match=r"^The total norm of order inf for"):
        distclip.clip_grad_norm_(model.parameters(), 1.0, "inf", True)


# -------------------------------------------------- repeated calls: no host traffic
class _HostTraffic(TorchDispatchMode):
    """Counts host reads (``_local_scalar_dense``) and tensors made from host data."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.lift_fresh.default):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("norm_type", [2.0, "inf", "-inf", 0])
def test_repeated_calls_copy_nothing_from_or_to_the_host(norm_type: Any) -> None:
    model = _model()
    calls: list[Callable[[], Any]] = [
        lambda: distclip.get_total_norm(_grads(model), norm_type),
        lambda: distclip.grad_norm(model.parameters(), norm_type),
        lambda: distclip.clip_grad_norm_(model.parameters(), 0.1, norm_type),
        lambda: distclip.clip_grad_value_(model.parameters(), 0.1),
    ]
    norm = distclip.get_total_norm(_grads(model), norm_type)
    calls.append(lambda: distclip.clip_grads_with_norm_(model.parameters(), 0.1, norm))
    for call in calls:
        call()
        with _HostTraffic() as traffic:
            call()
        assert traffic.count == 0


def test_mark_layout_needs_process_groups() -> None:
    """Single process: a group of the wrong type, or no process group at all, is refused."""
    param = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(TypeError, match=r"sharded_over must be a torch\.distributed ProcessGroup"):
        distclip.mark_layout(param, sharded_over=[object()])
    with pytest.raises(TypeError, match=r"replicated_over must be a torch\.distributed"):
        distclip.mark_layout(param, replicated_over="dp")
    with pytest.raises(RuntimeError, match=r"needs torch\.distributed to be initialised"):
        distclip.mark_layout(param)
    assert internals.get_layout(param) is None
