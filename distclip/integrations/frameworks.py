"""Training frameworks that clip gradients themselves, found before distclip measures them.

HF ``transformers.Trainer`` (``TrainingArguments.max_grad_norm``, 1.0 by default) and
PyTorch Lightning (``Trainer(gradient_clip_val=...)``) clip the gradients before they
call ``optimizer.step()``. An optimizer that clips with distclip would then measure
norms already clipped to that value: its window would fill with it and every
threshold would be wrong, silently. distclip looks for such a trainer once, when the
optimizer is built or attached and at its first step, by walking the Python call
stack (no framework is imported, nothing touches the device), and refuses with
:class:`~distclip.errors.FrameworkClippingError`, naming the setting and the fix.
An integration that holds the trainer (the Lightning callback) checks it directly with
:func:`check_trainer`: the same table, the same message.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from distclip.errors import FrameworkClippingError

__all__ = [
    "FRAMEWORKS",
    "FrameworkClipping",
    "check_framework_clipping",
    "check_trainer",
    "find_trainer",
]

#: How many frames up the stack a trainer is looked for.
_MAX_DEPTH = 80


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
    frame = sys._getframe(1)
    for _ in range(_MAX_DEPTH):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if owner is not None:
            for framework, classes in candidates:
                if isinstance(owner, classes):
                    return framework, owner
        frame = frame.f_back  # type: ignore[assignment]
    return None


def _refuse_if_clipping(framework: FrameworkClipping, trainer: Any, method: str) -> None:
    value = framework.clip_value(trainer)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        return
    raise FrameworkClippingError(
        f"distclip {method}: {framework.name} clips the gradients itself before "
        f"optimizer.step() ({framework.setting.replace('...', repr(value))}), so distclip "
        "would measure norms already clipped to that value and its thresholds would be "
        f"wrong. To train with distclip, {framework.fix}."
    )


def check_trainer(
    trainer: Any, method: str, frameworks: tuple[FrameworkClipping, ...] | None = None
) -> None:
    """Refuse ``trainer`` when it is a known framework's trainer whose own clipping is on.

    For integrations that hold the trainer (a Lightning callback); code that does not
    uses :func:`check_framework_clipping`. ``frameworks`` defaults to :data:`FRAMEWORKS`;
    an object of no known framework passes.

    Raises:
        FrameworkClippingError: naming the framework, its setting and value, and the fix.
    """
    for framework in FRAMEWORKS if frameworks is None else frameworks:
        classes = framework.loaded_classes()
        if classes and isinstance(trainer, classes):
            _refuse_if_clipping(framework, trainer, method)
            return


def check_framework_clipping(method: str) -> None:
    """Refuse when a trainer on the call stack clips the gradients before distclip does.

    Raises:
        FrameworkClippingError: naming the framework, its setting and value, and the fix.
    """
    found = find_trainer()
    if found is not None:
        _refuse_if_clipping(*found, method)
