"""Functions run on every rank by ``test_ddp.py`` (through the harness).

Each builds the ``ddp`` layout of the ``DDP`` problem and a clipped optimizer from a
spec (see :func:`make_spec`), trains, and returns plain tensors and numbers for the
test to compare across ranks and against the single-process reference. Nothing here
asserts: a worker records what happened (exceptions included) and the test decides.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import distclip
from tests.support import layouts
from tests.support.problem import DDP, Problem, loss_fn
from tests.support.training import StatsRecorder, clipped_optimizer


def make_spec(
    optimizer: str = "SGD",
    optimizer_kwargs: dict[str, Any] | None = None,
    *,
    integration: str = "subclass",
    method: str = "autoclip",
    clip: dict[str, Any] | None = None,
    steps: int = 24,
    nan_steps: dict[int, tuple[int, ...]] | None = None,
    closure: bool = False,
    ddp_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A run: which optimizer, how distclip is attached, its options, the data.

    Args:
        optimizer: a class name in ``torch.optim``.
        optimizer_kwargs: its arguments (``fused``/``foreach`` allowed).
        integration: ``"subclass"`` (``AutoClippedOptimizer`` / ``ClippedOptimizer``)
            or ``"attach"`` (``distclip.attach`` on a plain optimizer).
        method: ``"autoclip"`` or ``"norm"``.
        clip: the method's options (default: AutoClip with q=0.3, window=8).
        steps: training steps.
        nan_steps: ``{step: ranks}``: those ranks (of 2) get a NaN in their first row.
        closure: pass the forward/backward to ``step()`` as a closure.
        ddp_kwargs: extra arguments of ``DistributedDataParallel``.
    """
    if clip is None:
        clip = {"q": 0.3, "window": 8} if method == "autoclip" else {"max_norm": 1.0}
    return {
        "optimizer": optimizer,
        "optimizer_kwargs": dict(optimizer_kwargs or {"lr": 0.05}),
        "integration": integration,
        "method": method,
        "clip": dict(clip),
        "steps": steps,
        "nan_steps": dict(nan_steps or {}),
        "closure": closure,
        "ddp_kwargs": dict(ddp_kwargs or {}),
    }


def problem_of(spec: dict[str, Any], world_size: int = 2) -> Problem:
    """The ``DDP`` problem with the spec's NaN inputs (each listed rank's first row)."""
    nan = tuple(
        (step, DDP.first_row(rank, world_size))
        for step, ranks in sorted(spec["nan_steps"].items())
        for rank in ranks
    )
    return DDP.replace(nan=nan)


def build_optimizer(
    spec: dict[str, Any], params: Any
) -> tuple[torch.optim.Optimizer, distclip.Clipper]:
    """The clipped optimizer of ``spec`` over ``params``, and its clipper."""
    return clipped_optimizer(
        params,
        optimizer=spec["optimizer"],
        optimizer_kwargs=spec["optimizer_kwargs"],
        method=spec["method"],
        options=spec["clip"],
        integration=spec["integration"],
    )


def snapshot(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Copies of the parameters and of the optimizer's whole state_dict (clipper included)."""
    return {
        "params": {name: p.detach().clone() for name, p in module.named_parameters()},
        "optimizer": copy.deepcopy(optimizer.state_dict()),
    }


class Run:
    """A DDP model, its clipped optimizer and what every step's clip recorded."""

    def __init__(self, spec: dict[str, Any], model_seed: int | None = None) -> None:
        self.spec = spec
        self.rank = dist.get_rank()
        self.prepared = layouts.build(
            problem_of(spec), "ddp", ddp_kwargs=spec["ddp_kwargs"], seed=model_seed
        )
        self.ddp = self.prepared.module
        self.module: nn.Module = self.prepared.inner
        self.optimizer, self.clipper = build_optimizer(spec, self.ddp.parameters())
        self.recorder = StatsRecorder()
        self.snapshots: dict[int, dict[str, Any]] = {}
        #: Per closure step: did ``step(closure)`` return the closure's own loss object?
        self.closure_loss_returned: list[bool] = []

    def backward(self, step: int) -> torch.Tensor:
        x, y = self.prepared.batch(step)
        self.optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(self.ddp(x), y)
        loss.backward()
        return loss

    def step(self, step: int) -> None:
        """One optimizer step on batch ``step``; a closure step if the spec says so.

        Without a closure, the caller has run :meth:`backward` first.
        """
        if not self.spec["closure"]:
            self.optimizer.step()
            return
        losses: list[torch.Tensor] = []

        def closure() -> torch.Tensor:
            losses.append(self.backward(step))
            return losses[-1]

        returned = self.optimizer.step(closure)
        self.closure_loss_returned.append(len(losses) == 1 and returned is losses[0])

    def record(self) -> None:
        self.recorder.record(self.optimizer.last_clip)  # type: ignore[attr-defined]

    def train(self, steps: range, *, snapshot_steps: tuple[int, ...] = ()) -> None:
        for step in steps:
            if not self.spec["closure"]:
                self.backward(step)
            if step in snapshot_steps:
                before = snapshot(self.module, self.optimizer)
            self.step(step)
            self.record()
            if step in snapshot_steps:
                after = snapshot(self.module, self.optimizer)
                self.snapshots[step] = {
                    "before": before,
                    "after": after,
                    "as_floats": self.optimizer.last_clip.as_floats(),  # type: ignore[attr-defined]
                }

    def result(self) -> dict[str, Any]:
        """Everything the tests compare, as picklable tensors and numbers."""
        out: dict[str, Any] = {
            "records": self.recorder.stacked(),
            "step_numbers": list(self.recorder.steps),
            "params": {n: p.detach().clone() for n, p in self.module.named_parameters()},
            "optimizer_state": snapshot(self.module, self.optimizer)["optimizer"],
            "num_steps": self.clipper.num_steps,
            "num_clipped": self.clipper.num_clipped.clone(),
            "num_skipped": self.clipper.num_skipped.clone(),
            "checksum": self.clipper.state_checksum(),
            "snapshots": self.snapshots,
            "class_name": type(self.optimizer).__name__,
            "closure_loss_returned": list(self.closure_loss_returned),
        }
        if self.spec["method"] == "autoclip":
            window = self.clipper.window  # type: ignore[attr-defined]
            out["window"] = window.chronological()
            out["window_num_seen"] = window.num_seen.clone()
        return out


def train(spec: dict[str, Any]) -> dict[str, Any]:
    """Train ``spec["steps"]`` steps; snapshot the state around every NaN step."""
    run = Run(spec)
    run.train(range(spec["steps"]), snapshot_steps=tuple(spec["nan_steps"]))
    return run.result()


def train_expecting_error(spec: dict[str, Any]) -> dict[str, Any]:
    """Train with ``nonfinite="error"``; record each ``NonFiniteNormError`` and go on.

    At a raising step the state is snapshotted before and after the failed
    ``step()`` (including the gradients, which must be left as they were); the
    rank then zeroes the gradients and continues, as a training loop that catches
    the error would. A rank that hung instead of raising fails the harness's timeout.
    """
    run = Run(spec)
    errors: list[dict[str, Any]] = []
    for step in range(spec["steps"]):
        run.backward(step)
        before = snapshot(run.module, run.optimizer)
        grads_before = [p.grad.clone() for p in run.module.parameters()]
        try:
            run.optimizer.step()
        except distclip.NonFiniteNormError as exc:
            errors.append(
                {
                    "step": step,
                    "message": str(exc),
                    "before": before,
                    "after": snapshot(run.module, run.optimizer),
                    "grads_before": grads_before,
                    "grads_after": [p.grad.clone() for p in run.module.parameters()],
                    "num_steps": run.clipper.num_steps,
                }
            )
            continue
        run.record()
    result = run.result()
    result["errors"] = errors
    return result


def consistency(spec: dict[str, Any]) -> dict[str, Any]:
    """``check_every`` on for the whole run, then the window corrupted on rank 1 only.

    ``spec["steps"]`` must be a multiple of the window size (see the corruption below).
    Returns the normal run's result plus what ``check_consistency()`` raised with an
    intact state (``None`` expected), after the corruption, and what the next
    ``step()`` raised (its automatic check runs every step with ``check_every=1``).
    """
    run = Run(spec)
    run.train(range(spec["steps"]))
    result = run.result()

    def error_of(call: Any) -> dict[str, str] | None:
        try:
            call()
        except distclip.RankDesyncError as exc:
            return {"type": type(exc).__name__, "message": str(exc)}
        return None

    result["check_intact"] = error_of(run.clipper.check_consistency)
    if run.rank == 1:
        run.clipper.window.values[0] += 1  # type: ignore[attr-defined]
    result["check_corrupted"] = error_of(run.clipper.check_consistency)
    # The next step writes its norm into slot num_seen % window, which is slot 0 after
    # a multiple of `window` steps: that would repair the corruption. Corrupt the
    # next slot too, which the step keeps.
    if run.rank == 1:
        run.clipper.window.values[1] += 1  # type: ignore[attr-defined]
    step = spec["steps"]
    run.backward(step)
    result["step_corrupted"] = error_of(run.optimizer.step)
    # Both ranks stopped at the same point: the group still works in lock-step.
    probe = torch.tensor([float(run.rank + 1)])
    dist.all_reduce(probe)
    result["probe"] = float(probe)
    return result


def checkpoint_resume(spec: dict[str, Any], stop_at: int, directory: str) -> dict[str, Any]:
    """An uninterrupted run, and one saved after ``stop_at`` steps and resumed in fresh objects.

    The resumed model starts from another seed, so only what the checkpoint holds can
    make the runs agree. Files are written with ``torch.save`` and read back with
    ``torch.load(weights_only=True)``, one per rank.
    """
    steps = spec["steps"]
    full = Run(spec)
    full.train(range(steps))

    first = Run(spec)
    first.train(range(stop_at))
    path = Path(directory) / f"rank{first.rank}.pt"
    torch.save(
        {"model": first.module.state_dict(), "optimizer": first.optimizer.state_dict()}, path
    )
    before_save = first.result()
    del first

    checkpoint = torch.load(path, weights_only=True)
    resumed = Run(spec, model_seed=12345)
    fresh_window = resumed.result().get("window")
    resumed.module.load_state_dict(checkpoint["model"])
    resumed.optimizer.load_state_dict(checkpoint["optimizer"])
    loaded = resumed.result()
    resumed.train(range(stop_at, steps))
    return {
        "full": full.result(),
        "before_save": before_save,
        "fresh_window": fresh_window,
        "loaded": loaded,
        "resumed": resumed.result(),
    }


def dcp_resume(spec: dict[str, Any], stop_at: int, directory: str) -> dict[str, Any]:
    """As :func:`checkpoint_resume`, through ``torch.distributed.checkpoint``.

    Uses ``get_state_dict`` / ``dcp.save`` / ``dcp.load`` / ``set_state_dict``; the
    fresh optimizer's ``get_state_dict`` runs DCP's state initialisation (a ``step()``
    with zero gradients) which must leave the clipper's window empty.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    steps = spec["steps"]
    full = Run(spec)
    full.train(range(steps))

    first = Run(spec)
    first.train(range(stop_at))
    model_state, optim_state = get_state_dict(first.ddp, first.optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=directory)
    before_save = first.result()
    del first, model_state, optim_state

    resumed = Run(spec, model_seed=12345)
    model_state, optim_state = get_state_dict(resumed.ddp, resumed.optimizer)
    after_init = resumed.result()
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=directory)
    set_state_dict(
        resumed.ddp,
        resumed.optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
    )
    loaded = resumed.result()
    resumed.train(range(stop_at, steps))
    return {
        "full": full.result(),
        "before_save": before_save,
        "after_init": after_init,
        "loaded": loaded,
        "resumed": resumed.result(),
    }


def reference(spec: dict[str, Any]) -> Any:
    """The slow single-process reference of ``spec`` (the full batch, plain torch)."""
    from tests.support.reference import reference_train

    return reference_train(
        problem_of(spec),
        steps=spec["steps"],
        method=spec["method"],
        options=spec["clip"],
        optimizer=spec["optimizer"],
        optimizer_kwargs=spec["optimizer_kwargs"],
    )
