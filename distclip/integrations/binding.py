"""What ties a clipper to one optimizer instance, shared by the subclass and the hooks.

* parameter tracking: the clipper follows the optimizer's param groups (a group
  added with ``add_param_group`` is picked up before the next step);
* the clip before the update, recorded as ``optimizer.last_clip``;
* folding the clip factor into torch's fused optimizers: they divide the gradients
  by a ``grad_scale`` tensor in their own pass (the ``GradScaler`` mechanism), so
  ``grad_scale = 1 / coef`` saves distclip's separate pass over the gradients;
* skipping a step whose global norm is NaN/inf: torch's fused optimizers take a
  ``found_inf`` tensor and skip on the device (no host sync); any other optimizer
  needs one host read of the decision per step, as ``torch.amp.GradScaler`` does;
* the clipper's state inside the optimizer's ``state_dict`` under
  ``param_groups[0]["distclip"]`` (entries of a param group survive
  ``torch.distributed.checkpoint``'s ``get_state_dict``/``set_state_dict``; top-level
  keys and per-parameter string keys do not).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from distclip.clippers import Clipper, ClipStats
from distclip.functional._compile import eager_only
from distclip.functional.scaling import scale_
from distclip.integrations.frameworks import check_first_step
from distclip.integrations.wrappers import LastClipMirrors

__all__ = [
    "STATE_KEY",
    "OptimizerBinding",
    "SkipToken",
    "adopt_stray_state",
    "binding_of",
    "evaluate_closure",
    "uses_fused_step",
]

logger = logging.getLogger(__name__)

#: Key of the clipper's state in ``state_dict()["param_groups"][0]``.
STATE_KEY = "distclip"

_DCP_STATE_DICT_MODULE = "torch.distributed.checkpoint.state_dict"


def binding_of(optimizer: Any) -> OptimizerBinding | None:
    """The :class:`OptimizerBinding` of an optimizer that clips with distclip, else ``None``.

    Looked up in the instance's own ``__dict__`` (a wrapper that forwards attribute
    reads does not count), where :func:`distclip.attach` and ``ClippedOptimizer`` keep it.
    """
    binding = getattr(optimizer, "__dict__", {}).get("_distclip")
    return binding if isinstance(binding, OptimizerBinding) else None


def evaluate_closure(closure: Any) -> Any:
    """Call ``closure`` with gradients enabled (as torch optimizers do) and return the loss."""
    with torch.enable_grad():
        return closure()


def uses_fused_step(optimizer: Optimizer) -> bool:
    """True for torch's fused optimizers, which read ``found_inf`` and skip on the device."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and all(
        bool(group.get("fused")) for group in optimizer.param_groups
    )


def _in_dcp_state_init() -> bool:
    """True inside ``torch.distributed.checkpoint``'s optimizer-state initialisation.

    DCP initialises a fresh optimizer's state by calling ``step()`` with zero
    gradients and a zero learning rate. That call is not a training step: it must
    not put a norm of 0 into the window.
    """
    module = sys.modules.get(_DCP_STATE_DICT_MODULE)
    init = getattr(module, "_init_optim_state", None) if module is not None else None
    code = getattr(init, "__code__", None)
    if code is None:
        return False
    frame = sys._getframe(1)
    for _ in range(12):
        if frame is None:
            return False
        if frame.f_code is code:
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


def adopt_stray_state(clipper: Clipper, optimizer: Optimizer) -> None:
    """Load a clipper state that a plain optimizer holds as a stray param-group entry.

    A checkpoint saved with distclip and loaded into an optimizer that distclip does
    not clip yet (a framework resuming before :func:`distclip.attach` runs) leaves the
    clipper's state in ``param_groups[0][STATE_KEY]``. It is validated, loaded into
    ``clipper`` and removed from the group; nothing changes if it does not fit.

    Raises:
        TypeError, ValueError: the entry does not fit ``clipper`` (see
            :meth:`~distclip.Clipper.validate_state_dict`).
    """
    groups = optimizer.param_groups
    entry = groups[0].get(STATE_KEY) if groups else None
    if entry is None:
        return
    clipper.load_state_dict(entry)
    del groups[0][STATE_KEY]
    logger.info(
        "distclip: adopted the clipper state found in the optimizer (step %d)", clipper.num_steps
    )


@dataclass
class SkipToken:
    """What :meth:`OptimizerBinding.arm_skip` changed, so that it can be undone."""

    run_base: bool = True
    set_found_inf: bool = False
    had_found_inf: bool = False
    previous_found_inf: Any = None
    set_grad_scale: bool = False
    had_grad_scale: bool = False
    previous_grad_scale: Any = None
    hidden_grads: list[tuple[Tensor, Tensor]] = field(default_factory=list)


class OptimizerBinding:
    """A clipper bound to an optimizer: the per-step glue, without any math."""

    def __init__(self, clipper: Clipper, optimizer: Optimizer) -> None:
        self.clipper = clipper
        self.signature = self._signature(optimizer)
        self._state_ready = False
        self._framework_checked = False
        self._folded_coef: Tensor | None = None
        self._pending_load: dict[str, Any] | None = None
        self._armed: SkipToken | None = None
        #: A ``GradScaler``'s ``grad_scale`` that :meth:`before_step` divided out.
        self._unscaled_from: Tensor | None = None
        #: Framework wrappers around the optimizer that get ``last_clip`` too.
        self.mirrors = LastClipMirrors()

    @staticmethod
    def _signature(optimizer: Optimizer) -> tuple[int, ...]:
        return tuple(len(group["params"]) for group in optimizer.param_groups)

    def refresh_params(self, optimizer: Optimizer) -> None:
        """Follow the optimizer's param groups (cheap check; replan only on a change)."""
        signature = self._signature(optimizer)
        if signature != self.signature:
            self.clipper.set_params(optimizer.param_groups)
            self.signature = signature
            self._state_ready = False

    def _optimizer_state_ready(self, optimizer: Optimizer) -> bool:
        """True once every parameter with a gradient has optimizer state, or an update ran.

        A fused optimizer's first step allocates its state before the kernel reads
        ``found_inf``; torch's fused SGD allocates momentum with ``empty_like`` and
        only the (skipped) kernel would have written it. Until the state exists (or a
        real update has created all there is), a skip is therefore decided on the
        host. Cached: checked until it holds.
        """
        if not self._state_ready:
            state = optimizer.state
            self._state_ready = all(
                bool(state.get(p))
                for group in optimizer.param_groups
                for p in group["params"]
                if p.grad is not None
            )
        return self._state_ready

    # Dynamo drops attribute writes on a torch.optim.Optimizer made in a traced frame
    # (torch 2.13): the methods that set last_clip, found_inf or grad_scale on the
    # optimizer run eagerly under torch.compile; clip_ itself is still compiled.
    @eager_only(recursive=False)
    def before_step(self, optimizer: Optimizer) -> ClipStats | None:
        """Clip before the update and record ``optimizer.last_clip`` (and on its mirrors).

        The first call also runs :func:`~distclip.integrations.frameworks.check_first_step`
        (framework clipping, DeepSpeed around the optimizer) and registers the
        framework wrappers found stepping the optimizer as mirrors of ``last_clip``.
        Returns ``None`` (and clips nothing) for the state-initialisation step of
        ``torch.distributed.checkpoint``.
        """
        if _in_dcp_state_init():
            return None
        if not self._framework_checked:  # the first step of this binding (resumed or not)
            for wrapper in check_first_step(optimizer, self.clipper.method):
                self.mirrors.add(wrapper)
            self._framework_checked = True
        self.refresh_params(optimizer)
        self._unscale_amp_grads(optimizer)
        # A fused optimizer applies a global-factor clip in its own pass (grad_scale).
        fold = (
            self.clipper.kind == "global"
            and uses_fused_step(optimizer)
            and self._optimizer_state_ready(optimizer)
        )
        stats = self.clipper.clip_(defer_scale=fold)
        self._folded_coef = stats.clip_coef if fold else None
        optimizer.last_clip = stats  # type: ignore[attr-defined]
        self.mirrors.publish(stats)
        return stats

    @eager_only()
    def _unscale_amp_grads(self, optimizer: Optimizer) -> None:
        """Divide out a ``GradScaler``'s scale that is still in the gradients.

        ``GradScaler.step`` on a fused torch optimizer whose gradients were not
        ``unscale_``-d sets ``optimizer.grad_scale`` and leaves the unscaling to the
        fused kernel; the gradients distclip sees are then ``scale`` times too large,
        and their norm must not enter the window. Unscale them here (one pass, what
        ``scaler.unscale_(optimizer)`` would have done) and hide ``grad_scale`` from
        the kernel for this step; :meth:`disarm_skip` puts it back. Calling
        ``scaler.unscale_(optimizer)`` before ``scaler.step`` (torch's advice for
        clipping) avoids this: ``grad_scale`` is then ``None``.
        """
        scale = optimizer.__dict__.get("grad_scale")
        if not isinstance(scale, Tensor):
            return
        grads = self.clipper.plan.grads()
        if grads:
            inv_scale = scale.detach().to(torch.float32).reciprocal()
            scale_(grads, inv_scale, foreach=self.clipper.config.foreach)
        self._unscaled_from = scale
        optimizer.grad_scale = None  # type: ignore[attr-defined]

    @eager_only()
    def arm_skip(self, optimizer: Optimizer, stats: ClipStats, *, can_bypass: bool) -> SkipToken:
        """Prepare the optimizer so that a NaN/inf step changes nothing.

        Fused torch optimizers get ``optimizer.found_inf`` (combined with one a
        ``GradScaler`` may have set) and skip on the device: no host sync (from their
        second step: see :meth:`_optimizer_state_ready`). Otherwise
        the decision is read on the host once; on a skipped step the caller does not
        run the update (``can_bypass``) or, where it cannot avoid calling it (a step
        pre-hook), every gradient is hidden (set to ``None``) so the optimizer
        updates nothing, and put back by :meth:`disarm_skip`.
        """
        token = SkipToken()
        if uses_fused_step(optimizer) and self._optimizer_state_ready(optimizer):
            token.set_found_inf = True
            token.had_found_inf = "found_inf" in optimizer.__dict__
            previous = optimizer.__dict__.get("found_inf")
            token.previous_found_inf = previous
            flag = stats.skipped.to(torch.float32)
            if isinstance(previous, Tensor):
                flag = torch.maximum(flag.to(previous.device), previous.to(torch.float32))
            optimizer.found_inf = flag  # type: ignore[attr-defined]
            folded, self._folded_coef = self._folded_coef, None
            if folded is not None:
                # The fused kernel divides every gradient by grad_scale: 1 / coef
                # multiplies it by coef (after any GradScaler scale, which it divides).
                token.set_grad_scale = True
                token.had_grad_scale = "grad_scale" in optimizer.__dict__
                previous_scale = optimizer.__dict__.get("grad_scale")
                token.previous_grad_scale = previous_scale
                scale = folded.to(torch.float32).reciprocal()
                if isinstance(previous_scale, Tensor):
                    scale = previous_scale.to(torch.float32) * scale.to(previous_scale.device)
                optimizer.grad_scale = scale  # type: ignore[attr-defined]
            return token
        if self._folded_coef is not None:  # cannot happen: folding implies fused
            raise RuntimeError("distclip: a deferred clip factor reached a non-fused step")
        if self.clipper.config.nonfinite == "error" or not bool(stats.skipped):
            if uses_fused_step(optimizer):
                # This update runs for real, so it creates whatever state the fused
                # optimizer keeps (none, for SGD without momentum): from the next
                # step on, skips and the clip factor go through the device.
                self._state_ready = True
            return token
        if can_bypass:
            token.run_base = False
            return token
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    token.hidden_grads.append((param, param.grad))
                    param.grad = None
        return token

    @property
    def armed(self) -> bool:
        """True between :meth:`arm_step` and :meth:`end_step` (inside a hooked step)."""
        return self._armed is not None

    def arm_step(self, optimizer: Optimizer, stats: ClipStats) -> None:
        """:meth:`arm_skip` for a step that runs anyway (a step pre-hook); held until
        :meth:`end_step`. A step that raised before its end is recovered first."""
        self.recover_stale(optimizer)
        self._armed = self.arm_skip(optimizer, stats, can_bypass=False)

    def end_step(self, optimizer: Optimizer) -> None:
        """Undo :meth:`arm_step` after the optimizer's update (a step post-hook)."""
        if self._armed is not None:
            token, self._armed = self._armed, None
            self.disarm_skip(optimizer, token)

    def recover_stale(self, optimizer: Optimizer) -> None:
        """Undo what a step that raised before its end left armed (``found_inf``,
        ``grad_scale``), and drop the gradients it hid: they belong to that failed
        (NaN/inf) step, and the gradients the new step computed since are the live ones.
        Putting the hidden ones back would overwrite the new step's gradients."""
        if self._armed is not None:
            token, self._armed = self._armed, None
            token.hidden_grads.clear()
            self.disarm_skip(optimizer, token)

    @eager_only()
    def disarm_skip(self, optimizer: Optimizer, token: SkipToken) -> None:
        """Undo :meth:`arm_skip`: restore ``found_inf`` and the hidden gradients."""
        if token.set_found_inf:
            if token.had_found_inf:
                optimizer.found_inf = token.previous_found_inf  # type: ignore[attr-defined]
            else:
                optimizer.__dict__.pop("found_inf", None)
        if token.set_grad_scale:
            if token.had_grad_scale:
                optimizer.grad_scale = token.previous_grad_scale  # type: ignore[attr-defined]
            else:
                optimizer.__dict__.pop("grad_scale", None)
        for param, grad in token.hidden_grads:
            param.grad = grad
        token.hidden_grads.clear()
        if self._unscaled_from is not None:
            optimizer.grad_scale = self._unscaled_from  # type: ignore[attr-defined]
            self._unscaled_from = None

    # ------------------------------------------------------------ checkpoints
    def add_state(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Put the clipper's state into a fresh ``optimizer.state_dict()`` result."""
        groups = state_dict.get("param_groups")
        if groups:
            groups[0] = {**groups[0], STATE_KEY: self.clipper.state_dict()}
        return state_dict

    def take_state(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Validate and remove the clipper's entry from a state_dict about to be loaded.

        Returns the state_dict without the entry (the caller's dict is not modified);
        the entry waits for :meth:`apply_taken_state`. Raises before anything is
        loaded if the entry does not fit this clipper.
        """
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        if not (isinstance(groups, list) and groups and isinstance(groups[0], dict)):
            return state_dict  # malformed: let the optimizer's own load report it
        entry = groups[0].get(STATE_KEY)
        if entry is None:
            logger.warning(
                "distclip: the optimizer state_dict being loaded has no clipper state "
                "(saved without distclip?); the clipper keeps its current state"
            )
            self._pending_load = None
            return state_dict
        self.clipper.validate_state_dict(entry)
        first = {k: v for k, v in groups[0].items() if k != STATE_KEY}
        self._pending_load = entry
        return {**state_dict, "param_groups": [first, *groups[1:]]}

    def apply_taken_state(self) -> None:
        """Load the entry taken by :meth:`take_state` (after the optimizer loaded)."""
        if self._pending_load is not None:
            self.clipper.load_state_dict(self._pending_load)
            self._pending_load = None
