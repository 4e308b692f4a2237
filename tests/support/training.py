"""How the suites build a clipped optimizer, record its steps, and train natively.

* :func:`clipped_optimizer`: the one factory of distclip optimizers in the tests: a
  ``torch.optim`` class by name, the method and its options, built as a distclip
  subclass (``AutoClippedOptimizer`` for ``autoclip``, the seed API; else
  ``ClippedOptimizer``) or ``attach``-ed to a plain instance, with the layout's
  keywords (``model=``, ``pipeline_groups=``);
* :func:`problem_optimizer`: the problem's own optimizer and clipping options;
* :func:`train_step`: one step of a layout on this rank's share, the clip's numbers;
* :class:`StatsRecorder`: ``last_clip``'s fields, step after step, as tensors;
* :func:`native_run`: the same distclip optimizer in one process on the concatenated
  global batches: the reference of a run whose only difference is the engine or the
  framework (DeepSpeed, HF Trainer, Accelerate).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

import distclip
from tests.support.layouts import Prepared
from tests.support.problem import Problem, loss_fn

__all__ = [
    "STATS_FIELDS",
    "StatsRecorder",
    "clipped_class",
    "clipped_optimizer",
    "flat_params",
    "native_run",
    "problem_optimizer",
    "train_step",
    "window_num_seen",
    "window_of",
]

#: The fields of ``last_clip`` every suite records, step by step.
STATS_FIELDS = ("total_norm", "threshold", "clip_coef", "skipped")


def clipped_optimizer(
    params: Any,
    *,
    optimizer: str = "SGD",
    optimizer_kwargs: dict[str, Any] | None = None,
    method: str = "autoclip",
    options: dict[str, Any] | None = None,
    integration: str = "subclass",
    layout: dict[str, Any] | None = None,
) -> tuple[torch.optim.Optimizer, distclip.Clipper]:
    """A clipped ``torch.optim.<optimizer>`` over ``params`` and its clipper.

    Args:
        params: parameters or param-group dicts.
        optimizer_kwargs: the optimizer's arguments (default ``lr=0.05``).
        method, options: the distclip method and its options.
        integration: ``"subclass"`` (a distclip optimizer class) or ``"attach"``
            (``distclip.attach`` on a plain instance).
        layout: what distclip is told about the layout (``model=``,
            ``pipeline_groups=``), to the class's constructor or to ``attach``.
    """
    base = getattr(torch.optim, optimizer)
    kwargs = dict(optimizer_kwargs or {"lr": 0.05})
    options = dict(options or {})
    layout = {k: v for k, v in (layout or {}).items() if v is not None}
    if integration == "attach":
        instance = base(params, **kwargs)
        handle = distclip.attach(instance, method=method, **options, **layout)
        return instance, handle.clipper
    if integration != "subclass":
        raise ValueError(f"integration must be 'subclass' or 'attach', got {integration!r}")
    instance = clipped_class(base, method, options)(params, **kwargs, **layout)
    return instance, distclip.get_clipper(instance)


def clipped_class(
    base: type[torch.optim.Optimizer], method: str, options: dict[str, Any]
) -> type[torch.optim.Optimizer]:
    """The distclip subclass of ``base``: ``AutoClippedOptimizer`` for autoclip (the seed
    API), ``ClippedOptimizer`` otherwise."""
    if method == "autoclip":
        return distclip.AutoClippedOptimizer(base, **options)
    return distclip.ClippedOptimizer(base, method=method, **options)


def problem_optimizer(
    problem: Problem, params: Any, *, layout: dict[str, Any] | None = None
) -> tuple[torch.optim.Optimizer, distclip.Clipper]:
    """``problem``'s optimizer and clipping (its ``optimizer``, ``method`` and options)."""
    return clipped_optimizer(
        params,
        optimizer=problem.optimizer,
        optimizer_kwargs=problem.optimizer_kwargs,
        method=problem.method,
        options=problem.options,
        layout=layout,
    )


def train_step(prepared: Prepared, optimizer: torch.optim.Optimizer, step: int) -> dict[str, float]:
    """One forward/backward/clipped step on this rank's share; the clip's numbers as floats."""
    optimizer.zero_grad(set_to_none=True)
    prepared.backward(step)
    optimizer.step()
    stats = distclip.get_clipper(optimizer).last_stats  # is ``optimizer.last_clip``
    if stats is None:
        raise RuntimeError("the optimizer step recorded no clip statistics")
    return stats.as_floats()


def window_of(optimizer: torch.optim.Optimizer) -> Tensor:
    """The window's norms, oldest first (a copy)."""
    return distclip.get_clipper(optimizer).window.chronological()  # type: ignore[attr-defined,no-any-return]


def window_num_seen(optimizer: torch.optim.Optimizer) -> int:
    """How many norms the window has accepted so far."""
    return int(distclip.get_clipper(optimizer).window.num_seen)  # type: ignore[attr-defined]


class StatsRecorder:
    """``last_clip``'s :data:`STATS_FIELDS` (cloned 0-dim tensors) and ``step``, per step."""

    def __init__(self) -> None:
        self.values: dict[str, list[Tensor]] = {name: [] for name in STATS_FIELDS}
        self.steps: list[int] = []

    def record(self, stats: Any) -> None:
        """Append one step's :class:`~distclip.ClipStats`."""
        for name in STATS_FIELDS:
            self.values[name].append(getattr(stats, name).detach().clone())
        self.steps.append(stats.step)

    def stacked(self) -> dict[str, Tensor]:
        """Each field's values as one 1-D tensor (empty before the first step)."""
        return {
            name: torch.stack(values) if values else torch.empty(0)
            for name, values in self.values.items()
        }


def flat_params(module: nn.Module) -> Tensor:
    """Every parameter of ``module``, flattened and concatenated (a float32 copy)."""
    return torch.cat([p.detach().float().reshape(-1).clone() for p in module.parameters()])


def native_run(
    problem: Problem,
    batches: Sequence[Sequence[tuple[Tensor, Tensor]]],
    *,
    method: str,
    options: dict[str, Any],
    lr: float,
    nan_step: int | None = None,
    inspect: Callable[[nn.Module], None] | None = None,
    model: nn.Module | None = None,
) -> dict[str, Any]:
    """``ClippedOptimizer(SGD)`` in this process, one optimizer step per entry of ``batches``.

    Each step's micro-batches (the concatenation of every rank's) are accumulated, each
    loss divided by their number (what DeepSpeed and the frameworks average to); at
    ``nan_step`` the loss is multiplied by NaN. ``inspect`` sees the model after each
    backward, before the clip. Returns per-step lists of :data:`STATS_FIELDS` (floats),
    the final parameters (flat float32) and the window (oldest first) if there is one.
    """
    model = problem.model() if model is None else model
    optimizer_cls = distclip.ClippedOptimizer(torch.optim.SGD, method, **options)
    optimizer = optimizer_cls(model.parameters(), lr=lr)
    records: dict[str, list[float]] = {name: [] for name in STATS_FIELDS}
    for step, micro_batches in enumerate(batches):
        optimizer.zero_grad(set_to_none=True)
        for x, y in micro_batches:
            loss = loss_fn(model(x), y) / len(micro_batches)
            if step == nan_step:
                loss = loss * math.nan
            loss.backward()
        if inspect is not None:
            inspect(model)
        optimizer.step()
        floats = optimizer.last_clip.as_floats()  # type: ignore[attr-defined]
        for name in STATS_FIELDS:
            records[name].append(floats[name])
    clipper = distclip.get_clipper(optimizer)
    window = getattr(clipper, "window", None)
    return {
        "records": records,
        "params": flat_params(model),
        "window": None if window is None else window.chronological().tolist(),
    }
