"""``torch.compile``: what compiles as one graph, what does not, and why.

The findings are written up in ``benchmarks/README.md`` ("torch.compile"); these tests
pin them down so that a change is seen:

* a standalone ``clip_()`` (AutoClip, fixed norm) compiles with ``fullgraph=True`` and
  gives eager's norms, thresholds, coefficients, gradients and window (to 1e-6) over
  30 steps with a NaN step, with one recompile at most (``num_steps`` becomes dynamic);
* a clipper Dynamo reaches through a module global is recompiled every step
  (Dynamo specializes integers read from globals: ``num_steps``);
* the stochastic methods break the graph at their seeded draw;
* a clipped optimizer's ``step()`` is 1 graph (fused: the clip) or 2 (foreach: the
  clip and the update) and gives eager's results.

Compiling is slow on a CPU: a tiny model, the ``eager`` backend where only Dynamo's
behaviour matters, ``inductor`` where the numbers are compared to eager's.
"""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch._dynamo

# Imported by the checkpoint tests too: loaded, it makes OptimizerBinding's
# _in_dcp_state_init call sys._getframe, which Dynamo cannot trace (a graph break in
# before_step). Import it here so that the counts do not depend on the test order.
import torch.distributed.checkpoint.state_dict
from torch import Tensor
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import distclip

STEPS = 30
NAN_STEP = 7
TOL = {"rtol": 1e-6, "atol": 1e-6}

#: Graph-break reasons: a call Dynamo leaves to eager (torch's fused kernel, an
#: ``eager_only`` function), and a call of a function Dynamo cannot trace
#: (``torch.compiler.disable`` itself, ``sys._getframe``).
_DISABLED_CALL = "Skip calling `torch.compiler.disable()`d function"
_SKIPPED_CALL = "Attempted to call function marked as skipped"


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    """Every test starts without compiled frames or graph-break counters."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    counters.clear()


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))


def _grad_sets(model: torch.nn.Module, steps: int = STEPS) -> list[list[Tensor]]:
    """Gradients whose norm varies (so AutoClip clips some steps), NaN at ``NAN_STEP``."""
    gen = torch.Generator().manual_seed(1)
    sets = []
    for step in range(steps):
        scale = 1.0 + step % 5
        grads = [torch.randn(p.shape, generator=gen) * scale for p in model.parameters()]
        if step == NAN_STEP:
            grads[0][0, 0] = math.nan
        sets.append(grads)
    return sets


def _set_grads(model: torch.nn.Module, grads: list[Tensor]) -> None:
    for p, g in zip(model.parameters(), grads, strict=True):
        p.grad = g.clone()


def _clip_step(clipper: distclip.Clipper) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    stats = clipper.clip_()
    return stats.total_norm, stats.threshold, stats.clip_coef, stats.skipped


def _break_reasons() -> set[str]:
    """The distinct graph-break reasons Dynamo counted (first line of each message)."""
    return {key.strip().splitlines()[0] for key in counters["graph_break"]}


def _explain(fn: Callable[..., Any], *args: Any) -> tuple[int, set[str]]:
    """Graphs Dynamo makes of one call of ``fn`` (graph breaks + 1) and the break reasons."""
    explained = torch._dynamo.explain(fn)(*args)
    return explained.graph_count, _break_reasons()


# ------------------------------------------------------------- standalone clipper
@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("autoclip", {"q": 0.25, "window": 8}),
        ("norm", {"max_norm": 5.0}),
        # The draw is integer ops on a device step counter: no graph break.
        ("linear_stoch_norm", {"max_norm": 5.0, "beta": 0.5, "seed": 3}),
        ("quadratic_stoch_autoclip", {"q": 0.25, "window": 8, "beta": 0.8, "seed": 3}),
    ],
)
def test_clip_compiles_fullgraph_and_matches_eager(method: str, options: dict[str, Any]) -> None:
    eager_model, compiled_model = _model(), _model()
    eager = distclip.make_clipper(method, eager_model.parameters(), **options)
    compiled = distclip.make_clipper(method, compiled_model.parameters(), **options)
    counter = CompileCounterWithBackend("inductor")
    step = torch.compile(_clip_step, fullgraph=True, backend=counter)
    clipped_steps = 0
    for grads in _grad_sets(eager_model):
        _set_grads(eager_model, grads)
        _set_grads(compiled_model, grads)
        expected = _clip_step(eager)
        got = step(compiled)
        for want, have in zip(expected, got, strict=True):
            torch.testing.assert_close(have, want, equal_nan=True, **TOL)
        for p_eager, p_compiled in zip(
            eager_model.parameters(), compiled_model.parameters(), strict=True
        ):
            torch.testing.assert_close(p_compiled.grad, p_eager.grad, equal_nan=True, **TOL)
        clipped_steps += int(expected[2] < 1.0)
    assert clipped_steps > 0  # the comparison covered clipping steps
    assert bool(compiled.last_stats.skipped) is False
    assert compiled.num_steps == eager.num_steps == STEPS
    assert int(compiled.num_skipped) == int(eager.num_skipped) == 1
    assert int(compiled.num_clipped) == int(eager.num_clipped)
    if method == "autoclip":
        assert torch.equal(compiled.window.num_seen, eager.window.num_seen)
        torch.testing.assert_close(compiled.window.values, eager.window.values, **TOL)
        torch.testing.assert_close(compiled.window.quantile(0.25), eager.window.quantile(0.25))
    # One graph for step 1 (num_steps == 0 is a constant), one with num_steps dynamic.
    assert counter.frame_count <= 2


_GLOBAL_CLIPPER: distclip.Clipper | None = None


def _clip_global_clipper() -> Tensor:
    assert _GLOBAL_CLIPPER is not None
    return _GLOBAL_CLIPPER.clip_().threshold


def test_clipper_reached_through_a_global_is_recompiled_every_step() -> None:
    """Dynamo specializes integers read from globals: ``num_steps`` changes every step.

    With ``fullgraph=True`` this raises once ``torch._dynamo.config.recompile_limit``
    (8) is reached; without it the frame falls back to eager. Pass the clipper as an
    argument or close over it (then ``num_steps`` becomes dynamic after one recompile).
    """
    global _GLOBAL_CLIPPER
    model = _model()
    _GLOBAL_CLIPPER = distclip.make_clipper("autoclip", model.parameters(), window=8)
    try:
        counter = CompileCounterWithBackend("eager")
        step = torch.compile(_clip_global_clipper, fullgraph=True, backend=counter)
        for grads in _grad_sets(model, steps=3):
            _set_grads(model, grads)
            step()
        assert counter.frame_count == 3
        # The workaround: mark num_steps dynamic by its source name.
        torch._dynamo.reset()
        counter = CompileCounterWithBackend("eager")
        step = torch.compile(_clip_global_clipper, fullgraph=True, backend=counter)
        with torch.compiler.config.patch(dynamic_sources=r".*\.num_steps$"):
            for grads in _grad_sets(model, steps=3):
                _set_grads(model, grads)
                step()
        assert counter.frame_count == 1
    finally:
        _GLOBAL_CLIPPER = None


# ---------------------------------------------------------- the clipped optimizer
_OPTIMIZERS = {
    "fused": {"fused": True},
    "foreach": {"foreach": True},
}


def _clipped_adamw(model: torch.nn.Module, kind: str, api: str) -> torch.optim.Optimizer:
    options = {"lr": 1e-2, **_OPTIMIZERS[kind]}
    if api == "class":
        cls = distclip.AutoClippedOptimizer(torch.optim.AdamW, q=0.25, window=8)
        return cls(model.parameters(), **options)
    optimizer = torch.optim.AdamW(model.parameters(), **options)
    distclip.attach(optimizer, method="autoclip", q=0.25, window=8)
    return optimizer


# Graphs of one steady-state step (graph breaks + 1) and the graph-break reasons that
# must be among those counted; see benchmarks/README.md ("torch.compile").
_EXPECTED_STEP_GRAPHS = {
    # The whole clip (clip_ is compiled as one frame); the fused update runs eagerly.
    ("fused", "class"): (1, {_DISABLED_CALL}),
    ("fused", "attach"): (1, {_DISABLED_CALL}),
    # The clip, then the foreach update; between them arm_skip runs eagerly and reads
    # the skip decision to the host (the one read a non-fused optimizer needs).
    ("foreach", "class"): (2, {_DISABLED_CALL}),
    ("foreach", "attach"): (2, {_DISABLED_CALL}),
}


@pytest.mark.parametrize(("kind", "api"), sorted(_EXPECTED_STEP_GRAPHS))
def test_clipped_optimizer_step_graph_count(kind: str, api: str) -> None:
    model = _model()
    _set_grads(model, _grad_sets(model, steps=1)[0])
    optimizer = _clipped_adamw(model, kind, api)
    optimizer.step()
    optimizer.step()  # steady state: optimizer state exists, a fused step folds the clip

    def step() -> None:
        optimizer.step()

    graphs, reasons = _explain(step)
    expected_graphs, expected_reasons = _EXPECTED_STEP_GRAPHS[kind, api]
    assert graphs == expected_graphs
    assert expected_reasons <= reasons


@pytest.mark.parametrize("api", ["class", "attach"])
@pytest.mark.parametrize("kind", ["fused", "foreach"])
def test_compiled_optimizer_step_matches_eager(kind: str, api: str) -> None:
    eager_model, compiled_model = _model(), _model()
    eager = _clipped_adamw(eager_model, kind, api)
    compiled = _clipped_adamw(compiled_model, kind, api)

    def step() -> None:
        compiled.step()

    compiled_step = torch.compile(step, backend="eager")
    for grads in _grad_sets(eager_model):
        _set_grads(eager_model, grads)
        _set_grads(compiled_model, grads)
        eager.step()
        compiled.last_clip = None  # type: ignore[attr-defined]
        compiled_step()
        want, have = eager.last_clip, compiled.last_clip  # type: ignore[attr-defined]
        assert have is not None
        assert have.step == want.step
        for name in ("total_norm", "threshold", "clip_coef", "skipped"):
            torch.testing.assert_close(
                getattr(have, name), getattr(want, name), equal_nan=True, **TOL
            )
        for p_eager, p_compiled in zip(
            eager_model.parameters(), compiled_model.parameters(), strict=True
        ):
            torch.testing.assert_close(p_compiled, p_eager, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(p_compiled.grad, p_eager.grad, equal_nan=True, **TOL)


def test_eager_clipping_does_not_import_dynamo() -> None:
    """``eager_only`` costs eager users nothing: no ``torch._dynamo`` import (about 2 s).

    (Constructing any torch optimizer imports it anyway, in torch 2.13.)
    """
    code = (
        "import sys, torch, distclip\n"
        "m = torch.nn.Linear(4, 4)\n"
        "for p in m.parameters(): p.grad = torch.randn_like(p)\n"
        "for method in ('linear_stoch_autoclip', 'autoclip'):\n"
        "    distclip.make_clipper(method, m.parameters()).clip_()\n"
        "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
