"""What the bad-input table acts on, and the snapshot that proves an error changed nothing.

A *target* is what a row's call receives: nothing, a trained optimizer (a distclip
subclass, an attached one, a plain one), a standalone clipper with a history, or a
framework object (an HF ``Trainer``, an ``Accelerator``; built by the test module).
:func:`snapshot` deep-copies everything an error must leave alone; :func:`assert_same`
(``compare.assert_bitwise_equal``) compares two snapshots bit for bit.

The state-dict mutators build the bad loads of the table: the target's own state_dict
with the clipper's entry (or the whole dict) changed, and the optimizer's own part
*poisoned* too, so that a load that went ahead before refusing the clipper's entry
would show in the snapshot.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

import distclip
from tests.support.compare import assert_bitwise_equal
from tests.support.problem import Problem

__all__ = [
    "TARGETS",
    "TARGET_PROBLEM",
    "WARMUP",
    "WINDOW",
    "assert_same",
    "clipper_load_mutated",
    "clipper_state",
    "load_from",
    "load_mutated",
    "load_whole",
    "poisoned",
    "snapshot",
    "trained_optimizer",
]

SGD = torch.optim.SGD
WINDOW = 5
WARMUP = 3

#: The model and data of the targets: a small MLP (3 -> 4 -> 1), micro-batches of 8
#: whose targets scale from step to step (norms that vary, so AutoClip clips).
TARGET_PROBLEM = Problem(
    widths=(3, 4, 1),
    data="seeded",
    batch=8,
    optimizer_kwargs={"lr": 0.05, "momentum": 0.9},
    options={"q": 0.3, "window": WINDOW},
)


def train(optimizer: torch.optim.Optimizer, model: torch.nn.Module, steps: int = 4) -> None:
    """``steps`` steps of ``TARGET_PROBLEM`` (momentum buffers, a window history)."""
    for step in range(steps):
        optimizer.zero_grad()
        x, y = TARGET_PROBLEM.micro_batch(step)
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def trained_optimizer(cls: type[torch.optim.Optimizer] | None = None) -> torch.optim.Optimizer:
    """A ClippedOptimizer (AutoClip, window 5 by default) with momentum buffers and a history."""
    model = TARGET_PROBLEM.model()
    cls = cls or distclip.AutoClippedOptimizer(SGD, **TARGET_PROBLEM.options)
    optimizer = cls(model.parameters(), **TARGET_PROBLEM.optimizer_kwargs)
    train(optimizer, model)
    return optimizer


def _trained_attached() -> torch.optim.Optimizer:
    model = TARGET_PROBLEM.model()
    optimizer = SGD(model.parameters(), **TARGET_PROBLEM.optimizer_kwargs)
    distclip.attach(optimizer, **TARGET_PROBLEM.options)
    train(optimizer, model)
    return optimizer


def _trained_plain() -> torch.optim.Optimizer:
    model = TARGET_PROBLEM.model()
    optimizer = SGD(model.parameters(), **TARGET_PROBLEM.optimizer_kwargs)
    train(optimizer, model)
    return optimizer


def _clipper_with_history(method: str, **options: Any) -> distclip.Clipper:
    model = TARGET_PROBLEM.model()
    clipper = distclip.make_clipper(method, model.parameters(), **options)
    for step in range(WARMUP + 3):
        model.zero_grad()
        x, _ = TARGET_PROBLEM.micro_batch(100 + step)
        model(x).pow(2).sum().backward()
        clipper.clip_()
    return clipper


#: The targets a row's call can act on, by name (the framework ones are the test
#: module's fixtures: ``trainer``, ``accelerator``).
TARGETS: dict[str, Callable[[], Any]] = {
    "none": lambda: None,
    "optimizer": trained_optimizer,
    "attached": _trained_attached,
    "plain": _trained_plain,
    "autoclip": lambda: _clipper_with_history("autoclip", q=0.3, window=WINDOW),
    "zclip": lambda: _clipper_with_history("zclip", warmup_steps=WARMUP),
}


# ------------------------------------------------------------------- snapshots
def _hook_counts(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    return {
        name: len(hooks)
        for name, hooks in vars(optimizer).items()
        if name.startswith("_optimizer_") and isinstance(hooks, dict)
    }


def snapshot(target: Any) -> Any:
    """Everything an error must leave alone, deep-copied (``None`` for no target).

    An optimizer: its whole state_dict (the clipper's entry and window tensors
    included), parameters, gradients, hooks, class, binding and attributes. A clipper:
    its state_dict, config, parameters and gradients. A framework object: the names
    of its attributes (an added wrapper or handle shows), and a Trainer's
    ``max_grad_norm`` and its accelerator's attributes.
    """
    if target is None:
        return None
    if isinstance(target, torch.optim.Optimizer):
        params = [p for group in target.param_groups for p in group["params"]]
        return copy.deepcopy(
            {
                "state_dict": target.state_dict(),
                "params": params,
                "grads": [p.grad for p in params],
                "hooks": _hook_counts(target),
                "class": type(target).__name__,
                "binding": id(getattr(target, "_distclip", None)),
                "attributes": sorted(vars(target)),
            }
        )
    if isinstance(target, distclip.Clipper):
        return copy.deepcopy(
            {
                "state_dict": target.state_dict(),
                "config": target.config,
                "params": list(target.params),
                "grads": [p.grad for p in target.params],
            }
        )
    state: dict[str, Any] = {"attributes": sorted(vars(target))}
    args = getattr(target, "args", None)
    if args is not None:
        state["max_grad_norm"] = args.max_grad_norm
    accelerator = getattr(target, "accelerator", None)
    if accelerator is not None:
        state["accelerator"] = sorted(vars(accelerator))
    return state


def assert_same(before: Any, after: Any, where: str = "") -> None:
    """Two snapshots are equal bit for bit (NaN equals NaN)."""
    assert_bitwise_equal(before, after, where)


# ------------------------------------------------------------ bad state builders
def clipper_state(state_dict: dict[str, Any]) -> dict[str, Any]:
    """The clipper's entry of an optimizer state_dict."""
    entry: dict[str, Any] = state_dict["param_groups"][0]["distclip"]
    return entry


def poisoned(state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` with the optimizer's own part changed too (see the module docstring)."""
    for group in state_dict["param_groups"]:
        group["lr"] = 123.0
    for state in state_dict["state"].values():
        for key, value in state.items():
            if isinstance(value, Tensor) and value.is_floating_point():
                state[key] = value * 2 + 1
    return state_dict


def load_mutated(mutate: Callable[[dict[str, Any]], object]) -> Callable[[Any], object]:
    """A row call: ``target.load_state_dict`` of its own state_dict with the clipper entry mutated."""

    def call(target: Any) -> object:
        state_dict = copy.deepcopy(target.state_dict())
        mutate(clipper_state(state_dict))
        return target.load_state_dict(poisoned(state_dict))

    return call


def load_whole(mutate: Callable[[dict[str, Any]], object]) -> Callable[[Any], object]:
    """A row call: ``target.load_state_dict`` of its own state_dict mutated as a whole."""

    def call(target: Any) -> object:
        state_dict = poisoned(copy.deepcopy(target.state_dict()))
        mutate(state_dict)
        return target.load_state_dict(state_dict)

    return call


def load_from(source: Callable[[], torch.optim.Optimizer]) -> Callable[[Any], object]:
    """A row call: ``target.load_state_dict`` of another optimizer's state_dict."""
    return lambda target: target.load_state_dict(poisoned(source().state_dict()))


def clipper_load_mutated(mutate: Callable[[dict[str, Any]], object]) -> Callable[[Any], object]:
    """A row call: ``clipper.load_state_dict`` of its own state_dict, mutated."""

    def call(clipper: Any) -> object:
        state_dict = copy.deepcopy(clipper.state_dict())
        mutate(state_dict)
        return clipper.load_state_dict(state_dict)

    return call


def consumed() -> Iterator[Tensor]:
    """A parameter generator already consumed (``model.parameters()`` passed twice)."""
    params = (p for p in TARGET_PROBLEM.model().parameters())
    list(params)
    return params


def cpu_and_meta() -> list[Tensor]:
    """A CPU parameter and one on the meta device (no data)."""
    return [
        torch.nn.Parameter(torch.zeros(3)),
        torch.nn.Parameter(torch.zeros(2, 3, device="meta")),
    ]


def frozen() -> list[Tensor]:
    """Tensors that do not require grad."""
    return [torch.zeros(2, 3), torch.zeros(3)]
