"""Framework-facing core: the per-step record, wrapper chains, framework clipping, adoption."""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch

import distclip
from tests.support.internals import RECORD_FIELDS, STATE_KEY, frameworks
from tests.support.reference import SlowAutoClip


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2))


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 5, generator=gen)
    opt.zero_grad()
    (model(x).pow(2).sum() * (1 + 3 * (seed % 3))).backward()
    opt.step()


class _Wrapper:
    """Holds the real optimizer as ``.optimizer``, as Accelerate and Lightning do."""

    def __init__(self, optimizer: object) -> None:
        self.optimizer = optimizer

    def step(self) -> None:
        self.optimizer.step()  # type: ignore[attr-defined]

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()  # type: ignore[attr-defined]


# ----------------------------------------------------------------- the record
def test_record_matches_the_reference_step_by_step() -> None:
    model = _model()
    opt = distclip.AutoClippedOptimizer(torch.optim.SGD, q=0.3, window=4)(
        model.parameters(), lr=0.05
    )
    reference = SlowAutoClip(q=0.3, window=4)
    for step in range(1, 9):
        gen = torch.Generator().manual_seed(step)
        x = torch.randn(8, 5, generator=gen)
        opt.zero_grad()
        (model(x).pow(2).sum() * (1 + 3 * (step % 3))).backward()
        grads = [p.grad.detach().double().clone() for p in model.parameters()]
        norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
        threshold = reference.threshold(norm)
        opt.step()
        record = opt.last_clip.as_record()
        assert tuple(record) == RECORD_FIELDS
        assert record["step"] == step
        assert record["total_norm"] == pytest.approx(norm, rel=1e-6)
        assert record["threshold"] == pytest.approx(threshold, rel=1e-6)
        assert record["clip_coef"] == pytest.approx(min(1.0, threshold / (norm + 1e-6)), rel=1e-6)
        assert record["clipped"] is (norm > threshold)
        assert record["skipped"] is False
        floats = opt.last_clip.as_floats()
        assert floats == {key: float(value) for key, value in record.items()}


def test_record_of_a_skipped_step_and_of_a_method_that_cannot_tell() -> None:
    model = _model()
    opt = distclip.ClippedOptimizer(torch.optim.SGD, "value", clip_value=0.1)(
        model.parameters(), lr=0.05
    )
    _step(model, opt, 1)
    record = opt.last_clip.as_record()
    assert record["clipped"] is None
    assert "clipped" not in opt.last_clip.as_floats()
    opt.zero_grad()
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    opt.step()
    record = opt.last_clip.as_record()
    assert record["skipped"] is True
    assert math.isnan(record["total_norm"])
    assert record["clip_coef"] == 1.0


# ------------------------------------------------------------- wrapper chains
def test_get_clipper_and_attach_see_through_wrappers() -> None:
    model = _model()
    built = distclip.AutoClippedOptimizer(torch.optim.SGD, window=3)(model.parameters(), lr=0.1)
    assert distclip.get_clipper(_Wrapper(_Wrapper(built))) is built.clipper

    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapped = _Wrapper(plain)
    with pytest.raises(ValueError, match=r"_Wrapper -> SGD does not clip with distclip"):
        distclip.get_clipper(wrapped)
    handle = distclip.attach(wrapped, window=3)
    assert handle.optimizer is plain
    assert distclip.get_clipper(wrapped) is handle.clipper
    _step(model, wrapped, 1)  # type: ignore[arg-type]
    assert handle.clipper.num_steps == 1
    assert distclip.get_clipper(wrapped).last_stats is plain.last_clip  # type: ignore[attr-defined]


def test_attach_refuses_what_is_not_a_torch_optimizer_with_the_chain_named() -> None:
    with pytest.raises(
        TypeError, match=r"wrapper exposing one as \.optimizer, got _Wrapper -> object$"
    ):
        distclip.attach(_Wrapper(object()))
    deepspeed_like = type("DeepSpeedZeroOptimizer", (), {"__module__": "deepspeed.runtime.zero"})
    inner = deepspeed_like()
    inner.optimizer = torch.optim.SGD(_model().parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"DeepSpeed optimizer.*distclip\.deepspeed"):
        distclip.attach(_Wrapper(inner))


# -------------------------------------------------------- framework clipping
@pytest.fixture
def fake_trainer_module(monkeypatch: pytest.MonkeyPatch) -> type:
    """A module standing in for a framework's trainer module, known to the detector."""
    module = types.ModuleType("fake_framework.trainer")

    class Trainer:
        def __init__(self, clip: float | None) -> None:
            self.clip = clip

        def build(self, params: object) -> torch.optim.Optimizer:
            cls = distclip.AutoClippedOptimizer(torch.optim.SGD, window=3)
            return cls(params, lr=0.1)

        def train(self, model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
            _step(model, opt, 1)

        def attach(self, opt: torch.optim.Optimizer) -> None:
            distclip.attach(opt)

    module.Trainer = Trainer  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_framework.trainer", module)
    fake = frameworks.FrameworkClipping(
        name="FakeFramework",
        trainer_classes=(("fake_framework.trainer", "Trainer"),),
        clip_value=lambda trainer: trainer.clip,
        setting="Trainer(clip=...)",
        fix="pass clip=None",
    )
    monkeypatch.setattr(frameworks, "FRAMEWORKS", (fake,))
    return Trainer


def test_framework_clipping_is_refused_at_construction(fake_trainer_module: type) -> None:
    model = _model()
    with pytest.raises(
        distclip.FrameworkClippingError,
        match=r"FakeFramework clips .*\(Trainer\(clip=1\.0\)\).*pass clip=None",
    ):
        fake_trainer_module(1.0).build(model.parameters())
    opt = fake_trainer_module(None).build(model.parameters())
    assert isinstance(opt, torch.optim.SGD)
    opt = fake_trainer_module(0.0).build(model.parameters())
    assert distclip.get_clipper(opt).num_steps == 0


def test_framework_clipping_is_refused_at_the_first_step(fake_trainer_module: type) -> None:
    model = _model()
    opt = distclip.AutoClippedOptimizer(torch.optim.SGD, window=3)(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(distclip.FrameworkClippingError, match="FakeFramework"):
        fake_trainer_module(2.5).train(model, opt)
    assert opt.clipper.num_steps == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(distclip.FrameworkClippingError):
        fake_trainer_module(2.5).attach(plain)
    assert "_distclip" not in plain.__dict__
    fake_trainer_module(None).attach(plain)
    assert distclip.get_clipper(plain).num_steps == 0


def test_a_trainer_held_by_an_integration_is_checked_directly(fake_trainer_module: type) -> None:
    with pytest.raises(
        distclip.FrameworkClippingError,
        match=r"^distclip zclip: FakeFramework clips .*\(Trainer\(clip=0\.5\)\).*pass clip=None\.$",
    ):
        frameworks.check_trainer(fake_trainer_module(0.5), "zclip")
    frameworks.check_trainer(fake_trainer_module(None), "zclip")
    frameworks.check_trainer(fake_trainer_module(0.0), "zclip")
    frameworks.check_trainer(object(), "zclip")  # no known framework's trainer


def test_framework_clipping_is_refused_at_a_resumed_clippers_first_step(
    fake_trainer_module: type,
) -> None:
    model = _model()
    cls = distclip.AutoClippedOptimizer(torch.optim.SGD, window=3)
    first = cls(model.parameters(), lr=0.1)
    _step(model, first, 0)
    resumed = cls(model.parameters(), lr=0.1)
    resumed.load_state_dict(first.state_dict())
    assert resumed.clipper.num_steps == 1
    with pytest.raises(distclip.FrameworkClippingError, match="FakeFramework"):
        fake_trainer_module(2.5).train(model, resumed)
    assert resumed.clipper.num_steps == 1


# ------------------------------------------------------------------ adoption
def test_attach_adopts_a_clipper_state_loaded_into_the_plain_optimizer() -> None:
    model, resumed_model = _model(), _model()
    cls = distclip.AutoClippedOptimizer(torch.optim.SGD, q=0.4, window=5)
    opt = cls(model.parameters(), lr=0.05)
    for seed in range(6):
        _step(model, opt, seed)
    saved = opt.state_dict()
    resumed_model.load_state_dict(model.state_dict())
    plain = torch.optim.SGD(resumed_model.parameters(), lr=0.05)
    plain.load_state_dict(saved)  # as a framework resuming before attach runs
    assert STATE_KEY in plain.param_groups[0]
    handle = distclip.attach(plain, q=0.4, window=5)
    assert STATE_KEY not in plain.param_groups[0]
    assert torch.equal(handle.clipper.window.chronological(), opt.clipper.window.chronological())
    for seed in range(6, 12):
        _step(model, opt, seed)
        _step(resumed_model, plain, seed)
        assert torch.equal(plain.last_clip.threshold, opt.last_clip.threshold)  # type: ignore[attr-defined]
    for a, b in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_stray_state_of_another_method_is_refused_and_nothing_attached() -> None:
    model = _model()
    opt = distclip.ClippedOptimizer(torch.optim.SGD, "zclip")(model.parameters(), lr=0.05)
    _step(model, opt, 0)
    plain = torch.optim.SGD(model.parameters(), lr=0.05)
    plain.load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="saved by method 'zclip'"):
        distclip.attach(plain, "autoclip")
    assert "_distclip" not in plain.__dict__
    assert STATE_KEY in plain.param_groups[0]
