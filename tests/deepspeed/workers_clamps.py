"""The element-wise clamps (``value``, ``coordinate_wise``) on every rank (``test_ds_clamps.py``).

Each run watches the optimizer that updates the fp32 master weights with an
:class:`InnerStepProbe` (torch's global optimizer step hooks), so that the test can
check by hand what the clamp did inside DeepSpeed's step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from tests.deepspeed.engines import LR, fp16_allowed, run_each, train_steps


class InnerStepProbe:
    """Watches every ``step()`` of the optimizers that update the fp32 master weights.

    Through torch's *global* step hooks, which run before the optimizer's own pre-hooks
    (distclip's clamp) and after its post-hooks: each call sees the gradients before the
    clamp and, afterwards, the clamped gradients and the updated parameters. Per
    optimizer step it keeps: the calls, the elements and how many exceed ``bound``, the
    sum of squares of the gradients before the clamp (this rank's elements), and the
    largest deviation of the gradients from ``clamp(g, -bound, bound)`` and of the
    parameters from SGD's ``p - lr * clamp(g)``, computed here by hand.
    """

    def __init__(self, optimizers: list[Any], bound: float, lr: float) -> None:
        self.optimizers = optimizers
        self.bound = bound
        self.lr = lr
        self.steps: list[dict[str, float]] = []
        self._before: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._handles: list[Any] = []

    def __enter__(self) -> InnerStepProbe:
        from torch.optim.optimizer import (
            register_optimizer_step_post_hook,
            register_optimizer_step_pre_hook,
        )

        self._handles = [
            register_optimizer_step_pre_hook(self._pre),
            register_optimizer_step_post_hook(self._post),
        ]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()

    def new_step(self) -> None:
        self.steps.append(
            {
                "calls": 0,
                "elements": 0,
                "clamped": 0,
                "sumsq": 0.0,
                "grad_error": 0.0,
                "update_error": 0.0,
            }
        )

    def _watched(self, optimizer: Any) -> bool:
        return any(optimizer is watched for watched in self.optimizers)

    def _params(self, optimizer: Any) -> list[torch.Tensor]:
        return [
            p for group in optimizer.param_groups for p in group["params"] if p.grad is not None
        ]

    def _pre(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if not self._watched(optimizer):
            return
        self._before = [
            (p, p.detach().clone(), p.grad.detach().clone()) for p in self._params(optimizer)
        ]

    def _post(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if not self._watched(optimizer):
            return
        step = self.steps[-1]
        step["calls"] += 1
        for param, before, grad in self._before:
            clamped = grad.clamp(-self.bound, self.bound)
            expected = before.add(clamped, alpha=-self.lr)
            step["elements"] += grad.numel()
            step["clamped"] += int((grad.abs() > self.bound).sum())
            step["sumsq"] += float(grad.double().square().sum())
            if param.grad is not None:
                step["grad_error"] = max(
                    step["grad_error"], float((param.grad - clamped).abs().max())
                )
            step["update_error"] = max(
                step["update_error"], float((param.detach() - expected).abs().max())
            )
        self._before = []


def _train(engine: Any, spec: dict[str, Any], result: dict[str, Any]) -> None:
    adapter = engine.distclip
    wrapper = engine.optimizer
    inner = [wrapper] if adapter.wrapper is None else [wrapper.optimizer]
    result["inner_class"] = type(inner[0]).__name__
    records: dict[str, list[Any]] = {}
    with InnerStepProbe(inner, spec["options"]["clip_value"], LR) as probe:
        for step in range(spec["steps"]):
            probe.new_step()
            for key, values in train_steps(engine, spec, range(step, step + 1)).items():
                records.setdefault(key, []).extend(values)
    sumsq = torch.tensor([s["sumsq"] for s in probe.steps], dtype=torch.float64)
    if adapter.wrapper not in (None, "FP16_UnfusedOptimizer", "FP16_Optimizer"):
        dist.all_reduce(sumsq)  # ZeRO partitions: each rank holds its own elements
    for entry, total in zip(probe.steps, sumsq.sqrt().tolist(), strict=True):
        entry["grad_norm"] = total
    result["probe"] = probe.steps
    result["records"] = records


def run_elementwise(specs: list[dict[str, Any]], fp16: bool = False) -> list[dict[str, Any]]:
    """Train every spec with an :class:`InnerStepProbe` on the inner optimizer.

    Per spec also: ``probe`` (per step, see the probe) with ``grad_norm``, the global
    norm of the gradients the inner steps saw before the clamp (summed over the ranks
    where the wrapper partitions them), and which optimizer was watched.
    """
    if fp16:
        with fp16_allowed():
            return run_each(specs, _train)
    return run_each(specs, _train)
