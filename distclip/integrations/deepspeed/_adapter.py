"""The adapter object: one clipper driven by one DeepSpeed engine's own norm."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any

from torch import Tensor

from distclip.clippers import Clipper, ClipStats, PiecewiseClipper
from distclip.integrations.deepspeed._config import SECTION_KEY, ClipSection
from distclip.integrations.deepspeed._installed import InstalledHook
from distclip.integrations.wrappers import ENGINE_ADAPTER_ATTR, LastClipMirrors

__all__ = ["STATE_KEY", "DeepSpeedClipAdapter"]

logger = logging.getLogger(__name__)

#: Key of the clipper's state in DeepSpeed's checkpoint ``client_state``.
STATE_KEY = SECTION_KEY


class DeepSpeedClipAdapter:
    """distclip on one DeepSpeed engine; reachable as ``engine.distclip``.

    Made by :func:`distclip.deepspeed.initialize` or :func:`distclip.deepspeed.attach`,
    not directly. Each optimizer step, DeepSpeed's own pre-clip global norm goes to
    :attr:`clipper` (its window, counters and checks), and DeepSpeed clips by the
    threshold that comes back. For the element-wise clamps (``value``,
    ``coordinate_wise``) and the per-tensor / per-row methods (``layer_wise``, ``agc``)
    DeepSpeed does not clip by norm: the torch optimizer that updates the fp32 master
    weights clips their gradients in a step pre-hook (ZeRO 0 fp32, ``layer_wise`` /
    ``agc``: ``engine.clip_fp32_gradients``).

    Attributes:
        clipper: the :class:`~distclip.Clipper` (options, state, ``check_consistency``).
        last_clip: the :class:`~distclip.ClipStats` of the last optimizer step
            (``None`` before the first), as ``optimizer.last_clip`` of the optimizer
            wrappers: ``total_norm`` is DeepSpeed's pre-clip norm (in the clipper's
            dtype), ``threshold`` what DeepSpeed clipped by (the clamp bound
            ``clip_value`` for the element-wise clamps, whose ``clip_coef`` is 1;
            ``max_norm`` / ``clip_factor`` for ``layer_wise`` / ``agc``, whose
            ``clip_coef`` is the smallest per-tensor / per-row factor of all ranks). On a
            step DeepSpeed skipped (fp32/bf16 NaN or inf) it reports the skip; an fp16
            loss-scale overflow leaves it unchanged (the step is not counted, as with
            ``GradScaler``).
        wrapper: the DeepSpeed optimizer wrapper's class name, or ``None`` for ZeRO 0
            in fp32 (no wrapper: the engine's own clip is replaced).
        hook_point: where the method acts: the threshold enters DeepSpeed at
            ``"<wrapper>.clip_grad"`` or ``"engine.clip_fp32_gradients"``; the clamp is
            a step pre-hook at ``"<wrapper>.optimizer.step"`` or
            ``"engine.optimizer.step"``; ``layer_wise`` / ``agc`` act at
            ``"<wrapper>.optimizer.step"`` or ``"engine.clip_fp32_gradients"``.
        section: the validated configuration the clipper was built from.
        mirrors: wrappers around the engine's optimizer (HF Trainer's and Accelerate's
            ``DeepSpeedOptimizerWrapper``) that get ``last_clip`` after every step.

    While attached, the engine's optimizer carries a pointer to the adapter, so that
    :func:`distclip.get_clipper` finds :attr:`clipper` from any wrapper around it.
    """

    def __init__(
        self,
        engine: Any,
        clipper: Clipper,
        section: ClipSection,
        *,
        wrapper: str | None,
        hook_point: str,
    ) -> None:
        self.engine = engine
        self.clipper = clipper
        self.section = section
        self.wrapper = wrapper
        self.hook_point = hook_point
        self.last_clip: ClipStats | None = None
        self._undo: list[Callable[[], None]] = []
        self._hook: InstalledHook | None = None
        self._hooked_optimizer: Any = None
        self._reinstall: Callable[[], InstalledHook] | None = None
        self.mirrors = LastClipMirrors()

    def _set_hook(self, install: Callable[[], InstalledHook]) -> None:
        """Install the step hook with ``install`` (kept to re-install it if it gets lost)."""
        self._reinstall = install
        self._hook = install()
        self._unmark()
        self._hooked_optimizer = self.engine.optimizer
        self._hooked_optimizer.__dict__[ENGINE_ADAPTER_ATTR] = self

    def _unmark(self) -> None:
        hooked = self._hooked_optimizer
        if hooked is not None and hooked.__dict__.get(ENGINE_ADAPTER_ATTR) is self:
            del hooked.__dict__[ENGINE_ADAPTER_ATTR]

    @property
    def hooked(self) -> bool:
        """True while distclip's hook is in place on the engine's current optimizer."""
        return (
            self._hook is not None
            and self._hook.intact()
            and self.engine.optimizer is self._hooked_optimizer
        )

    def _ensure_hooked(self) -> None:
        """Re-install the hook if something (a checkpoint load) replaced what it hooked."""
        if self.hooked or self._reinstall is None:
            return
        logger.info("distclip: re-installing the DeepSpeed hook (%s)", self.hook_point)
        if self._hook is not None:
            self._hook.remove()
        self._set_hook(self._reinstall)

    @property
    def method(self) -> str:
        """The clipping method's name, as configured."""
        return self.section.method

    def observe(self, total_norm: Tensor) -> ClipStats:
        """Feed DeepSpeed's norm of this step to the clipper; record and return the stats.

        For the element-wise clamps and ``layer_wise`` / ``agc`` the norm only feeds the
        counters and ``last_clip`` (the clip itself is applied in the inner optimizer's
        step pre-hook, or at ZeRO 0 fp32 in ``engine.clip_fp32_gradients``, which also
        completes ``last_clip.clip_coef``).
        """
        if isinstance(self.clipper, PiecewiseClipper):  # its pieces come in the inner step
            stats = self.clipper.begin_pieces_(total_norm)
        else:
            stats = self.clipper.observe_(total_norm)
        self.last_clip = stats
        self.mirrors.publish(stats)
        return stats

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The clipper's checkpoint (what ``save_checkpoint`` puts in ``client_state``)."""
        return self.clipper.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the clipper from :meth:`state_dict`; validated first, nothing changes on error."""
        self.clipper.load_state_dict(state_dict)

    def _wrap_checkpointing(self) -> None:
        """Make the engine's save/load_checkpoint carry the clipper's state in client_state."""
        engine = self.engine
        adapter = self
        save = engine.save_checkpoint
        load = engine.load_checkpoint
        save_signature = inspect.signature(save)
        load_signature = inspect.signature(load)

        @functools.wraps(save)
        def save_checkpoint(*args: Any, **kwargs: Any) -> Any:
            bound = save_signature.bind(*args, **kwargs)
            client_state = dict(bound.arguments.get("client_state") or {})
            if STATE_KEY in client_state:
                raise ValueError(
                    f"client_state key {STATE_KEY!r} is reserved: distclip saves its "
                    "clipper's state there"
                )
            client_state[STATE_KEY] = adapter.state_dict()
            bound.arguments["client_state"] = client_state
            return save(*bound.args, **bound.kwargs)

        @functools.wraps(load)
        def load_checkpoint(*args: Any, **kwargs: Any) -> Any:
            bound = load_signature.bind(*args, **kwargs)
            result = load(*args, **kwargs)
            load_path, client_state = result
            adapter._ensure_hooked()
            if load_path is None:
                return result
            entry = client_state.pop(STATE_KEY, None) if isinstance(client_state, dict) else None
            if bound.arguments.get("load_module_only", False):
                return load_path, client_state
            if entry is None:
                logger.warning(
                    "distclip: the DeepSpeed checkpoint %s has no clipper state (saved "
                    "without distclip?); the clipper keeps its current state",
                    load_path,
                )
            else:
                adapter.load_state_dict(entry)
            return load_path, client_state

        engine.save_checkpoint = save_checkpoint
        engine.load_checkpoint = load_checkpoint

        def undo() -> None:
            for name, wrapped in (
                ("save_checkpoint", save_checkpoint),
                ("load_checkpoint", load_checkpoint),
            ):
                if engine.__dict__.get(name) is wrapped:
                    del engine.__dict__[name]

        self._undo.append(undo)

    # ----------------------------------------------------------------- detach
    def remove(self) -> None:
        """Detach: DeepSpeed clips by its own configured value again from the next step."""
        while self._undo:
            self._undo.pop()()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._unmark()
        self._reinstall = None
        if self.engine.__dict__.get("distclip") is self:
            del self.engine.__dict__["distclip"]

    def __repr__(self) -> str:
        return (
            f"DeepSpeedClipAdapter(method={self.method!r}, hook_point={self.hook_point!r}, "
            f"clipper={self.clipper!r})"
        )
