"""Training frameworks that clip gradients themselves, found before distclip measures them.

HF ``transformers.Trainer`` (``TrainingArguments.max_grad_norm``, 1.0 by default) and
PyTorch Lightning (``Trainer(gradient_clip_val=...)``) clip the gradients before they
call ``optimizer.step()``. An optimizer that clips with distclip would then measure
norms already clipped to that value: its window would fill with it and every
threshold would be wrong, silently. distclip looks for such a trainer once, when the
optimizer is built or attached and at its first step, by walking the Python call
stack (no framework is imported, nothing touches the device), and refuses with
:class:`~distclip.errors.FrameworkClippingError`, naming the setting and the fix.

At the first step the same walk also finds (:func:`check_first_step`):

* a DeepSpeed engine or optimizer wrapper stepping this optimizer: DeepSpeed has
  clipped (``gradient_clipping``) and partitioned the gradients already, so the
  optimizer is refused; distclip clips DeepSpeed through its engine
  (:mod:`distclip.deepspeed`);
* an Accelerate ``AcceleratedOptimizer`` stepping it: a training loop may have called
  ``accelerator.clip_grad_norm_`` before, which leaves no trace to detect, so
  distclip warns once (rank 0) unless :func:`distclip.accelerate.attach` guards that
  accelerator (it then refuses such a call);
* the framework wrappers around the optimizer, which then mirror ``last_clip``
  (see :class:`~distclip.integrations.wrappers.LastClipMirrors`).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim import Optimizer

from distclip._checks import is_positive_real
from distclip.errors import FrameworkClippingError
from distclip.integrations.wrappers import describe_chain, is_deepspeed_wrapper, wrapper_chain
from distclip.reduction import is_distributed

__all__ = [
    "FRAMEWORKS",
    "GUARD_ATTR",
    "FrameworkClipping",
    "check_first_step",
    "check_framework_clipping",
    "check_trainer",
    "find_trainer",
    "on_rank_zero",
]

logger = logging.getLogger(__name__)

#: How many frames up the stack a trainer is looked for.
_MAX_DEPTH = 80

#: Set (to the guarding handle) on an ``AcceleratedOptimizer`` whose accelerator
#: refuses ``clip_grad_norm_`` on distclip's parameters (see
#: :func:`distclip.accelerate.attach`).
GUARD_ATTR = "_distclip_guarded"

_ACCELERATED_OPTIMIZER = ("accelerate.optimizer", "AcceleratedOptimizer")


def on_rank_zero() -> bool:
    """True outside a process group and on its rank 0 (where distclip's warnings go)."""
    return not is_distributed() or torch.distributed.get_rank() == 0


def _stack_owners(start: int) -> Iterator[Any]:
    """The ``self`` of each of the innermost frames, from ``start`` frames up the stack."""
    frame = sys._getframe(start + 1)
    for _ in range(_MAX_DEPTH):
        if frame is None:
            return
        owner = frame.f_locals.get("self")
        if owner is not None:
            yield owner
        frame = frame.f_back  # type: ignore[assignment]


@dataclass(frozen=True)
class FrameworkClipping:
    """One framework whose trainer may clip before ``optimizer.step()``.

    Attributes:
        name: the framework, as users know it.
        trainer_classes: ``(module, class name)`` of its trainer classes; a module
            not yet imported is not looked at (the framework is not in use).
        clip_value: reads the clip value from a trainer instance (``None`` or 0: off).
        setting: the setting that turns it on, as the user writes it.
        fix: how to train with distclip instead.
    """

    name: str
    trainer_classes: tuple[tuple[str, str], ...]
    clip_value: Callable[[Any], Any]
    setting: str
    fix: str

    def loaded_classes(self) -> tuple[type, ...]:
        """The trainer classes whose modules are imported already."""
        found = []
        for module_name, class_name in self.trainer_classes:
            module = sys.modules.get(module_name)
            cls = getattr(module, class_name, None) if module is not None else None
            if isinstance(cls, type):
                found.append(cls)
        return tuple(found)


def _hf_clip_value(trainer: Any) -> Any:
    args = getattr(trainer, "args", None)
    if getattr(trainer, "is_deepspeed_enabled", False):
        return None  # DeepSpeed clips inside its engine: see distclip.deepspeed
    return getattr(args, "max_grad_norm", None)


FRAMEWORKS: tuple[FrameworkClipping, ...] = (
    FrameworkClipping(
        name="transformers.Trainer",
        trainer_classes=(("transformers.trainer", "Trainer"),),
        clip_value=_hf_clip_value,
        setting="TrainingArguments(max_grad_norm=...)",
        fix=(
            "set TrainingArguments(max_grad_norm=0.0) (distclip's own max_norm= caps the "
            "threshold if you want a cap), or train with distclip's Trainer integration, "
            "which turns it off for you"
        ),
    ),
    FrameworkClipping(
        name="PyTorch Lightning",
        trainer_classes=(
            ("lightning.pytorch.trainer.trainer", "Trainer"),
            ("pytorch_lightning.trainer.trainer", "Trainer"),
        ),
        clip_value=lambda trainer: getattr(trainer, "gradient_clip_val", None),
        setting="Trainer(gradient_clip_val=...)",
        fix=(
            "leave gradient_clip_val unset (None) and let distclip clip (its max_norm= caps "
            "the threshold if you want a cap)"
        ),
    ),
)


def find_trainer(
    frameworks: tuple[FrameworkClipping, ...] | None = None,
) -> tuple[FrameworkClipping, Any] | None:
    """``(framework, trainer)`` for the innermost known trainer on the call stack, or ``None``.

    ``frameworks`` defaults to :data:`FRAMEWORKS`.
    """
    known = FRAMEWORKS if frameworks is None else frameworks
    candidates = [(fw, fw.loaded_classes()) for fw in known]
    candidates = [(fw, classes) for fw, classes in candidates if classes]
    if not candidates:
        return None
    for owner in _stack_owners(1):
        for framework, classes in candidates:
            if isinstance(owner, classes):
                return framework, owner
    return None


def check_framework_clipping(method: str) -> None:
    """Refuse when a trainer on the call stack clips the gradients before distclip does.

    Raises:
        FrameworkClippingError: naming the framework, its setting and value, and the fix.
    """
    _refuse_trainer_clipping(method, find_trainer())


def check_trainer(
    trainer: Any, method: str, frameworks: tuple[FrameworkClipping, ...] | None = None
) -> None:
    """Refuse ``trainer`` when it is a known framework's trainer whose own clipping is on.

    For integrations that hold the trainer (the Lightning callback); code that does not
    uses :func:`check_framework_clipping`: the same table, the same message.
    ``frameworks`` defaults to :data:`FRAMEWORKS`; an object of no known framework passes.

    Raises:
        FrameworkClippingError: naming the framework, its setting and value, and the fix.
    """
    for framework in FRAMEWORKS if frameworks is None else frameworks:
        classes = framework.loaded_classes()
        if classes and isinstance(trainer, classes):
            _refuse_trainer_clipping(method, (framework, trainer))
            return


def _refuse_trainer_clipping(method: str, found: tuple[FrameworkClipping, Any] | None) -> None:
    if found is None:
        return
    framework, trainer = found
    value = framework.clip_value(trainer)
    if not is_positive_real(value):
        return
    raise FrameworkClippingError(
        f"distclip {method}: {framework.name} clips the gradients itself before "
        f"optimizer.step() ({framework.setting.replace('...', repr(value))}), so distclip "
        "would measure norms already clipped to that value and its thresholds would be "
        f"wrong. To train with distclip, {framework.fix}."
    )


def _accelerated_optimizer_class() -> type | None:
    module = sys.modules.get(_ACCELERATED_OPTIMIZER[0])
    cls = getattr(module, _ACCELERATED_OPTIMIZER[1], None) if module is not None else None
    return cls if isinstance(cls, type) else None


def check_first_step(optimizer: Optimizer, method: str) -> list[Any]:
    """The checks of a clipped optimizer's first step; returns the wrappers stepping it.

    One walk up the call stack (no framework is imported, nothing touches the device).

    Returns:
        The ``torch.optim.Optimizer`` wrappers on the stack whose ``.optimizer`` chain
        leads to ``optimizer`` (``AcceleratedOptimizer``, Lightning's optimizer), for
        ``last_clip`` to be mirrored on.

    Raises:
        FrameworkClippingError: a trainer on the stack clips the gradients itself
            (see :func:`check_framework_clipping`), or a DeepSpeed engine steps this
            optimizer.
    """
    trainer = find_trainer()
    _refuse_trainer_clipping(method, trainer)
    accelerated = _accelerated_optimizer_class()
    wrappers: list[Any] = []
    unguarded: Any = None
    for owner in _stack_owners(1):
        if owner is optimizer:
            continue
        chain = wrapper_chain(owner)
        if not any(obj is optimizer for obj in chain):
            continue
        if is_deepspeed_wrapper(owner):
            raise FrameworkClippingError(
                f"distclip {method}: this optimizer is stepped by DeepSpeed "
                f"({describe_chain(chain)}). DeepSpeed has already clipped the gradients "
                "(gradient_clipping) and, under ZeRO, partitioned them, so distclip would "
                "measure the wrong norm. Pass DeepSpeed a plain torch optimizer and let "
                'distclip clip through the engine: a "distclip" section in the DeepSpeed '
                "config with distclip.deepspeed.initialize or distclip.deepspeed.attach(engine) "
                "(HF Trainer: distclip.hf.attach(trainer); Accelerate: "
                "distclip.accelerate.attach(accelerator))."
            )
        if isinstance(owner, Optimizer):
            wrappers.append(owner)
        guarded = bool(getattr(owner, "__dict__", {}).get(GUARD_ATTR))
        if accelerated is not None and isinstance(owner, accelerated) and not guarded:
            unguarded = owner
    # Under a known trainer (HF's uses Accelerate) the trainer's own setting is checked.
    if unguarded is not None and trainer is None and on_rank_zero():
        logger.warning(
            "distclip %s: this optimizer is stepped by Accelerate (%s). If the training "
            "loop calls accelerator.clip_grad_norm_(parameters, max_norm) or "
            "clip_grad_value_ before optimizer.step(), distclip measures gradients that "
            "are already clipped and its thresholds are wrong: remove that call (distclip "
            "clips in optimizer.step()). distclip.accelerate.attach(accelerator) makes such "
            "a call raise instead, and silences this warning.",
            method,
            describe_chain(wrapper_chain(unguarded)),
        )
    return wrappers
