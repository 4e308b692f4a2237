"""The bad input table, run through every entry point: a typed error, a clear message, no change.

The table is ``tests.support.bad_inputs``. Each option row (a method and options) runs
through every entry point that takes method options (:data:`ENTRY_POINTS`); each call
row makes one bad call on its target. Every case checks the exception type, the
message (after the entry point's own prefix: the argument or the problem, and the
valid range where there is one), and that the error came before anything changed: the
target's snapshot (an optimizer's whole ``state_dict()``, the clipper entry and its
window tensors included, its parameters, gradients and hooks; a clipper's state; a
framework object's attributes) is bit for bit what it was. The framework entry points
run where their framework is installed.

Below the table: checkpoints load with ``torch.load(weights_only=True)`` and resume
exactly, and distclip itself never unpickles arbitrary objects.
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import pathlib
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import Tensor

import distclip
from tests.support import internals
from tests.support.bad_inputs import CALLS, ENTRY_POINTS, OPTIONS, BadCall, BadOptions
from tests.support.targets import (
    TARGET_PROBLEM,
    TARGETS,
    WINDOW,
    assert_same,
    clipper_state,
    poisoned,
    snapshot,
    trained_optimizer,
)

SGD = torch.optim.SGD
#: What the DeepSpeed section's messages start with.
SECTION = "the DeepSpeed config's 'distclip' section: "


# ------------------------------------------------------------- the entry points
def _method(row: BadOptions) -> tuple[Any, ...]:
    """The method as a positional argument, or nothing for the entry's default."""
    return () if row.method is None else (row.method,)


def _section(row: BadOptions) -> Any:
    if row.section is not None:
        return row.section
    return {**({} if row.method is None else {"method": row.method}), **row.options}


def _ds_config(row: BadOptions) -> dict[str, Any]:
    return {"train_micro_batch_size_per_gpu": 2, "distclip": _section(row)}


def _ds_args(row: BadOptions, tmp_path: pathlib.Path) -> argparse.Namespace:
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(_ds_config(row)))
    return argparse.Namespace(deepspeed_config=str(path))


def _callback(row: BadOptions) -> object:
    from distclip.lightning import DistClipCallback

    return DistClipCallback(*_method(row), **row.options)


# fmt: off
#: entry point -> (target, call(target, row, tmp_path), message prefix).
ENTRIES: dict[str, tuple[str, Callable[[Any, BadOptions, pathlib.Path], object], str]] = {
    "ClippedOptimizer": ("none", lambda _, r, p: distclip.ClippedOptimizer(SGD, *_method(r), **r.options), ""),
    "AutoClippedOptimizer": ("none", lambda _, r, p: distclip.AutoClippedOptimizer(SGD, **r.options), ""),
    "attach": ("plain", lambda opt, r, p: distclip.attach(opt, *_method(r), **r.options), ""),
    "make_clipper": ("none", lambda _, r, p: distclip.make_clipper(r.method or "autoclip", TARGET_PROBLEM.model().parameters(), **r.options), ""),
    "clipper_class": ("none", lambda _, r, p: internals.clipper_class(r.method or "autoclip")(TARGET_PROBLEM.model().parameters(), **r.options), ""),
    "deepspeed.section": ("none", lambda _, r, p: internals.parse_deepspeed_section(_section(r)), SECTION),
    "deepspeed.initialize": ("none", lambda _, r, p: distclip.deepspeed.initialize(model=torch.nn.Linear(2, 1), config=_ds_config(r)), SECTION),
    "deepspeed.initialize(args)": ("none", lambda _, r, p: distclip.deepspeed.initialize(args=_ds_args(r, p), model=torch.nn.Linear(2, 1)), SECTION),
    "hf.attach": ("trainer", lambda trainer, r, p: distclip.hf.attach(trainer, *_method(r), **r.options), ""),
    "accelerate.attach": ("accelerator", lambda acc, r, p: distclip.accelerate.attach(acc, *_method(r), **r.options), ""),
    "lightning.DistClipCallback": ("none", lambda _, r, p: _callback(r), ""),
}
# fmt: on
#: The entry points that run with ``deepspeed.initialize`` replaced by a tripwire.
TRIPWIRED = ("deepspeed.initialize", "deepspeed.initialize(args)")
#: The entry points that share another's expected messages.
SAME_AS = {"clipper_class": "make_clipper", "deepspeed.initialize(args)": "deepspeed.initialize"}


def _in_json(row: BadOptions) -> bool:
    """Whether a JSON file can hold the row's section, and it is refused when read back.

    Not with NaN, inf or a tensor; nor where an integral float is the error (a
    ``TypeError``): DeepSpeed's config reader (hjson) reads ``200.0`` as ``200``.
    """
    try:
        json.dumps(_section(row), allow_nan=False)
    except (TypeError, ValueError):
        return False
    integral = any(isinstance(v, float) and v.is_integer() for v in row.options.values())
    return not (integral and row.error is TypeError)


def _read_from_json(pattern: str) -> str:
    """``pattern`` for a value read back from a JSON file: ``1.0`` may come back as ``1``."""
    return re.sub(r"(\d)\\\.0\b", r"\1(?:\\.0)?", pattern)


def _option_cases() -> list[Any]:
    ids = [row.id for row in OPTIONS]
    assert len(ids) == len(set(ids)), "row ids must be unique"
    return [
        pytest.param(row, entry, id=f"{row.id}@{entry}")
        for row in OPTIONS
        for entry in ENTRIES
        if row.applies_to(SAME_AS.get(entry, entry))
        and (entry != "deepspeed.initialize(args)" or _in_json(row))
    ]


# -------------------------------------------------------- framework targets
@pytest.fixture(scope="module")
def frameworks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """An HF Trainer (a plain optimizer, not trained) and an ``Accelerator`` on the CPU,
    made once for the module in one clean framework state."""
    for name in ("transformers", "accelerate"):
        pytest.importorskip(name)
    from accelerate import Accelerator
    from transformers import Trainer, TrainingArguments

    from tests.support.frameworks import IndexedData, TinyNet, framework_run

    with framework_run():
        args = TrainingArguments(
            output_dir=str(tmp_path_factory.mktemp("trainer")), use_cpu=True, report_to=[]
        )
        trainer = Trainer(model=TinyNet(), args=args, train_dataset=IndexedData())
        yield {"trainer": trainer, "accelerator": Accelerator(cpu=True)}


@pytest.fixture
def trainer(frameworks: dict[str, Any]) -> Any:
    return frameworks["trainer"]


@pytest.fixture
def accelerator(frameworks: dict[str, Any]) -> Any:
    return frameworks["accelerator"]


def _target(kind: str, request: pytest.FixtureRequest) -> Any:
    """A fresh target of the table, or the framework object of a fixture."""
    if kind in TARGETS:
        return TARGETS[kind]()
    return request.getfixturevalue(kind)


# ------------------------------------------------------------------ the table
def test_the_table_covers_every_entry_point() -> None:
    assert len(OPTIONS) >= 30
    assert len(CALLS) >= 30
    assert {SAME_AS.get(entry, entry) for entry in ENTRIES} == set(ENTRY_POINTS)
    for entry in ENTRY_POINTS:
        assert sum(row.applies_to(entry) for row in OPTIONS) >= 30, entry
    assert {row.target for row in CALLS} == set(TARGETS)
    assert {row.error for row in (*OPTIONS, *CALLS)} == {TypeError, ValueError}


@pytest.mark.parametrize(("row", "entry"), _option_cases())
def test_bad_options_are_refused_by_every_entry_point(
    row: BadOptions, entry: str, request: pytest.FixtureRequest, tmp_path: pathlib.Path
) -> None:
    kind, call, prefix = ENTRIES[entry]
    if entry == "lightning.DistClipCallback":
        pytest.importorskip("pytorch_lightning")
    if entry in TRIPWIRED:
        request.getfixturevalue("deepspeed_never_initialized")
    target = _target(kind, request)
    before = snapshot(target)
    error, pattern = row.expected(SAME_AS.get(entry, entry))
    with pytest.raises(error) as info:
        call(target, row, tmp_path)
    message = str(info.value)
    if entry == "deepspeed.initialize(args)":
        pattern = _read_from_json(pattern)
    if row.prefixed:
        pattern = re.escape(prefix) + pattern
    assert re.match(pattern, message), f"{entry}: {message!r}"
    assert_same(before, snapshot(target), row.id)


def _call_cases(table: list[BadCall]) -> list[Any]:
    ids = [row.id for row in table]
    assert len(ids) == len(set(ids)), "row ids must be unique"
    return [pytest.param(row, id=row.id) for row in table]


@pytest.mark.parametrize("row", _call_cases(CALLS))
def test_bad_input_is_refused_before_anything_changes(row: BadCall) -> None:
    target = TARGETS[row.target]()
    before = snapshot(target)
    with pytest.raises(row.error, match=row.match):
        row.call(target)
    assert_same(before, snapshot(target), row.id)


def test_state_dict_without_clipper_state_keeps_the_window(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A plain optimizer's state_dict loads the optimizer's part and keeps the window."""
    opt = trained_optimizer()
    plain = SGD(TARGET_PROBLEM.model().parameters(), lr=0.5)
    before = opt.clipper.window.values.clone()  # type: ignore[attr-defined]
    opt.load_state_dict(plain.state_dict())
    assert opt.param_groups[0]["lr"] == 0.5
    assert torch.equal(opt.clipper.window.values, before)  # type: ignore[attr-defined]
    assert "has no clipper state" in caplog.text


def test_attach_that_fails_leaves_no_hook_behind() -> None:
    """A refused attach registers nothing: the optimizer still steps unclipped."""
    opt = TARGETS["plain"]()
    with pytest.raises(ValueError, match="window must be an integer >= 1"):
        distclip.attach(opt, window=0)
    assert not hasattr(opt, "_distclip")
    handle = distclip.attach(opt, window=WINDOW)  # a later, valid attach works
    handle.remove()


# ------------------------------------------------------------------ checkpoints
_ALLOWED_LEAVES = (Tensor, int, float, str, bool, type(None))


def _leaves(value: Any) -> Iterator[Any]:
    if isinstance(value, dict):
        for key, item in value.items():
            assert isinstance(key, str), f"non-string key {key!r}"
            yield from _leaves(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _leaves(item)
    else:
        yield value


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("autoclip", {"q": 0.3, "window": 4, "max_norm": 50.0}),
        ("zclip", {"warmup_steps": 3}),
        ("quadratic_stoch_autoclip", {"q": 0.5, "window": 3, "seed": 7}),
        ("norm", {"max_norm": 0.5}),
    ],
)
@pytest.mark.parametrize("via", ["class", "attach"])
def test_checkpoint_loads_with_weights_only_and_resumes_exactly(
    tmp_path: pathlib.Path, method: str, options: dict[str, Any], via: str
) -> None:
    def build(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        model = TARGET_PROBLEM.model(seed)
        if via == "class":
            cls = distclip.ClippedOptimizer(SGD, method=method, **options)
            return model, cls(model.parameters(), lr=0.05, momentum=0.9)
        opt = SGD(model.parameters(), lr=0.05, momentum=0.9)
        distclip.attach(opt, method=method, **options)
        return model, opt

    gen = torch.Generator().manual_seed(3)
    batches = [torch.randn(8, 3, generator=gen) * (20.0 if i % 5 == 4 else 1.0) for i in range(14)]

    def step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: Tensor) -> Tensor:
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()
        stats = distclip.get_clipper(opt).last_stats
        assert stats is not None
        return stats.threshold.clone()

    model, opt = build(0)
    for x in batches[:7]:
        step(model, opt, x)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)

    saved = opt.state_dict()
    for leaf in _leaves(clipper_state(saved)):
        assert isinstance(leaf, _ALLOWED_LEAVES), f"{type(leaf).__name__} in the clipper state"

    checkpoint = torch.load(path, weights_only=True)
    resumed_model, resumed = build(1)  # other initial weights: all must come from the file
    resumed_model.load_state_dict(checkpoint["model"])
    resumed.load_state_dict(checkpoint["optimizer"])
    assert_same(copy.deepcopy(saved), copy.deepcopy(resumed.state_dict()), "resumed")
    for x in batches[7:]:
        assert torch.equal(step(model, opt, x), step(resumed_model, resumed, x))
    for mine, theirs in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(mine, theirs)
    assert_same(copy.deepcopy(opt.state_dict()), copy.deepcopy(resumed.state_dict()), "end")


def test_window_state_of_another_float_precision_is_cast_not_refused() -> None:
    """As torch's optimizers cast floating-point state to the parameter's dtype."""
    clipper = TARGETS["autoclip"]()
    state = copy.deepcopy(clipper.state_dict())
    values = state["state"]["window"]["values"]
    state["state"]["window"]["values"] = values.to(torch.float64)
    clipper.load_state_dict(state)
    assert clipper.window.values.dtype == torch.float32
    assert torch.equal(clipper.window.values, values)
    too_large = torch.full((WINDOW,), 1e300, dtype=torch.float64)  # inf in float32
    state["state"]["window"]["values"] = too_large
    with pytest.raises(ValueError, match=r"NaN or inf among its valid entries \(in torch\.float32"):
        clipper.load_state_dict(state)
    assert torch.equal(clipper.window.values, values)


def _torch_load_calls(tree: ast.AST) -> Iterator[ast.Call]:
    """Calls of ``torch.load`` / ``torch.serialization.load``, under any imported alias."""
    aliases = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization")
        for alias in node.names
        if alias.name == "load"
    }
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        if name in ("torch.load", "torch.serialization.load") or name in aliases:
            yield node


def test_distclip_never_unpickles_arbitrary_objects() -> None:
    """distclip reads no checkpoint file itself; any torch.load must pass weights_only=True."""
    package = pathlib.Path(distclip.__file__).parent
    unsafe = []
    for source in sorted(package.rglob("*.py")):
        text = source.read_text(encoding="utf-8")
        assert "import pickle" not in text, source
        assert "from pickle" not in text, source
        for call in _torch_load_calls(ast.parse(text)):
            safe = any(
                kw.arg == "weights_only"
                and isinstance(kw.value, ast.Constant)
                and kw.value.value is True
                for kw in call.keywords
            )
            if not safe:
                unsafe.append(f"{source.relative_to(package)}:{call.lineno}")
    assert not unsafe, f"torch.load without weights_only=True at {unsafe}"


def test_the_snapshot_sees_a_load_that_went_ahead() -> None:
    """The table's 'nothing changed' check is not vacuous: a load that happens shows."""
    opt = trained_optimizer()
    before = snapshot(opt)
    state_dict = copy.deepcopy(opt.state_dict())
    clipper_state(state_dict)["state"]["window"]["values"][0] += 1.0  # only the window differs
    opt.load_state_dict(state_dict)
    with pytest.raises(AssertionError, match=r"\['window'\]\['values'\]: tensor bits differ"):
        assert_same(before, snapshot(opt))
    opt.load_state_dict(poisoned(copy.deepcopy(opt.state_dict())))  # only the optimizer's part
    with pytest.raises(AssertionError, match=r"\['momentum_buffer'\]: tensor bits differ"):
        assert_same(before, snapshot(opt))
