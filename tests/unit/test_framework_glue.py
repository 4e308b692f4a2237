"""The first-step walk up the stack and the wrapper glue, with stand-ins for the frameworks.

The real frameworks are exercised in ``tests/integrations``; here each rule is pinned
in one process, fast: ``last_clip`` mirrored onto the wrappers stepping an optimizer,
a DeepSpeed engine around a distclip optimizer refused, the once-only warning under
an unguarded Accelerate optimizer, ``get_clipper`` through a DeepSpeed engine's marker,
and the ``torch.nn.Module`` passed as parameters. (A resumed clipper's first step:
``test_wrappers_frameworks.py``.)
"""

from __future__ import annotations

import copy
import gc
import logging
import pickle
import sys
import types
from typing import Any

import pytest
import torch

import distclip
from tests.support.internals import frameworks, wrappers


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))


def _backward(model: torch.nn.Module, seed: int) -> None:
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(seed))
    model.zero_grad()
    (model(x).pow(2).sum() * (1 + seed % 3)).backward()


class _OptimizerWrapper(torch.optim.Optimizer):
    """Like Accelerate's AcceleratedOptimizer: an Optimizer subclass that never calls
    ``Optimizer.__init__`` and steps the optimizer it holds as ``.optimizer``."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        return self.optimizer.step(closure)


def _stand_in(module: str, name: str, base: type = _OptimizerWrapper) -> type:
    return type(name, (base,), {"__module__": module})


# ------------------------------------------------------------------ mirrors
def test_last_clip_is_mirrored_onto_the_wrappers_that_step_the_optimizer() -> None:
    model = _model()
    inner = distclip.AutoClippedOptimizer(torch.optim.SGD, window=3)(model.parameters(), lr=0.1)
    outer = _OptimizerWrapper(_OptimizerWrapper(inner))
    for seed in range(3):
        _backward(model, seed)
        outer.step()
        assert outer.last_clip is inner.last_clip  # type: ignore[attr-defined]
        assert outer.optimizer.last_clip is inner.last_clip  # type: ignore[attr-defined]
        assert inner.last_clip.step == seed + 1
    # A wrapper that does not step the optimizer (never on the stack) is not touched.
    bystander = _OptimizerWrapper(inner)
    _backward(model, 5)
    inner.step()
    assert "last_clip" not in bystander.__dict__


def test_mirrors_hold_wrappers_weakly_skip_class_attributes_and_are_not_pickled() -> None:
    model = _model()
    optimizer = distclip.AutoClippedOptimizer(torch.optim.SGD, window=3)(model.parameters(), lr=0.1)
    mirrors = wrappers.LastClipMirrors()
    kept, dropped = _OptimizerWrapper(optimizer), _OptimizerWrapper(optimizer)
    fixed = type("Fixed", (_OptimizerWrapper,), {"last_clip": "mine"})(optimizer)
    for wrapper in (kept, dropped, fixed, kept):
        mirrors.add(wrapper)
    assert len(mirrors) == 2
    del dropped
    gc.collect()
    _backward(model, 1)
    optimizer.step()
    mirrors.publish(optimizer.last_clip)
    assert kept.last_clip is optimizer.last_clip  # type: ignore[attr-defined]
    assert fixed.last_clip == "mine"
    assert len(mirrors) == 1
    assert len(pickle.loads(pickle.dumps(mirrors))) == 0
    # An optimizer whose binding mirrors a wrapper (found at its first step) still
    # pickles and copies; the copies mirror nothing until wrapped again.
    fresh = distclip.AutoClippedOptimizer(torch.optim.SGD, window=3)(model.parameters(), lr=0.1)
    outer = _OptimizerWrapper(fresh)
    outer.step()
    assert len(fresh._distclip.mirrors) == 1  # type: ignore[attr-defined]
    assert len(pickle.loads(pickle.dumps(fresh))._distclip.mirrors) == 0
    assert len(copy.deepcopy(fresh)._distclip.mirrors) == 0  # type: ignore[attr-defined]
    mirrors.remove(kept)
    assert "last_clip" not in kept.__dict__


# ------------------------------------------------------------------ DeepSpeed
def test_a_distclip_optimizer_stepped_by_deepspeed_is_refused_before_any_change() -> None:
    model = _model()
    optimizer = distclip.AutoClippedOptimizer(torch.optim.SGD, window=3)(model.parameters(), lr=0.1)
    engine = _stand_in("deepspeed.runtime.engine", "DeepSpeedEngine", object)()
    engine.optimizer = _stand_in("deepspeed.runtime.zero.stage_1_and_2", "ZeroOptimizer")(optimizer)
    before = [p.detach().clone() for p in model.parameters()]
    _backward(model, 0)
    with pytest.raises(
        distclip.FrameworkClippingError,
        match=r"stepped by DeepSpeed \(ZeroOptimizer -> AutoClippedSGD\)",
    ):
        engine.optimizer.step()
    assert optimizer.clipper.num_steps == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_attach_refuses_accelerates_deepspeed_wrapper_and_get_clipper_finds_the_engine() -> None:
    model = _model()
    torch_optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    hf_wrapper = _stand_in("accelerate.utils.deepspeed", "DeepSpeedOptimizerWrapper")(
        torch_optimizer
    )
    with pytest.raises(
        TypeError, match=r"DeepSpeedOptimizerWrapper -> SGD is a DeepSpeed optimizer"
    ):
        distclip.attach(hf_wrapper)
    assert "_distclip" not in torch_optimizer.__dict__
    clipper = distclip.make_clipper("autoclip", model.parameters())
    adapter = types.SimpleNamespace(clipper=clipper)
    torch_optimizer.__dict__[wrappers.ENGINE_ADAPTER_ATTR] = adapter  # what the engine adapter sets
    engine = types.SimpleNamespace(optimizer=hf_wrapper)
    assert distclip.get_clipper(hf_wrapper) is clipper
    assert distclip.get_clipper(engine) is clipper


# ------------------------------------------------------------------ Accelerate
@pytest.fixture
def accelerated_optimizer_class(monkeypatch: pytest.MonkeyPatch) -> type:
    """A stand-in for ``accelerate.optimizer.AcceleratedOptimizer``, known to the check."""
    module = types.ModuleType("accelerate.optimizer")
    cls = _stand_in("accelerate.optimizer", "AcceleratedOptimizer")
    module.AcceleratedOptimizer = cls  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "accelerate.optimizer", module)
    return cls


def test_an_unguarded_accelerate_optimizer_gets_one_warning(
    accelerated_optimizer_class: type, caplog: pytest.LogCaptureFixture
) -> None:
    model = _model()
    optimizer = distclip.AutoClippedOptimizer(torch.optim.SGD, window=3)(model.parameters(), lr=0.1)
    wrapper = accelerated_optimizer_class(optimizer)
    with caplog.at_level(logging.WARNING, logger="distclip"):
        for seed in range(3):
            _backward(model, seed)
            wrapper.step()
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("distclip")]
    assert len(messages) == 1
    assert "stepped by Accelerate (AcceleratedOptimizer -> AutoClippedSGD)" in messages[0]
    caplog.clear()
    guarded = distclip.AutoClippedOptimizer(torch.optim.SGD, window=3)(model.parameters(), lr=0.1)
    wrapper = accelerated_optimizer_class(guarded)
    wrapper.__dict__[frameworks.GUARD_ATTR] = True  # what distclip.accelerate.attach sets
    with caplog.at_level(logging.WARNING, logger="distclip"):
        _backward(model, 1)
        wrapper.step()
    assert [r for r in caplog.records if r.name.startswith("distclip")] == []
    assert wrapper.last_clip is guarded.last_clip


# ------------------------------------------------------------------ misc
def test_a_module_given_as_parameters_is_explained() -> None:
    cls = distclip.AutoClippedOptimizer(torch.optim.AdamW)
    with pytest.raises(
        TypeError, match=r"got a torch\.nn\.Module \(Sequential\) as its parameters"
    ):
        cls(_model(), lr=0.1)
