"""distclip under the Hugging Face ``transformers.Trainer``: ``distclip.hf.attach(trainer)``.

One call between building the Trainer and ``train()``::

    trainer = Trainer(model=model, args=args, train_dataset=data)
    distclip.hf.attach(trainer, "autoclip", q=0.1, window=200)
    trainer.train()  # or trainer.train(resume_from_checkpoint=...)

What it changes, on this Trainer only (``handle.remove()`` undoes all):

* ``TrainingArguments.max_grad_norm`` (1.0 by default) is set to 0.0, with one
  warning on rank 0 saying so: the Trainer would otherwise clip the gradients before
  distclip measures them. The Trainer still logs ``grad_norm``, the pre-clip norm.
  Under DeepSpeed it is left alone: it only fills the config's ``gradient_clipping``,
  which distclip's engine adapter replaces.
* the Trainer's accelerator gets :func:`distclip.accelerate.attach`: the optimizer the
  Trainer builds is clipped with ``method`` and the options when it is a plain one
  (``autoclip`` with its defaults when none are given; the FSDP1 root is supplied
  when Accelerate wraps with FSDP1), a distclip optimizer class
  (``optimizer_cls_and_kwargs``) keeps its clipper, and under DeepSpeed
  (``TrainingArguments(deepspeed=...)``) the engine is clipped with the config's
  ``"distclip"`` section (or ``method`` and the options). The clipper is in place
  before the Trainer loads ``resume_from_checkpoint`` (optimizer state or DeepSpeed
  checkpoint), so a resumed run's window and thresholds equal the uninterrupted run's.
* ``trainer.log`` adds this step's :meth:`~distclip.ClipStats.as_floats` (without
  ``step``) under ``distclip/`` to every training log (those with ``"loss"``): they reach
  ``state.log_history``, TensorBoard and every other ``report_to`` logger. They are read
  to the host at the logging interval only (``logging_steps``), and are the values of
  the last optimizer step before the log.

Without this call, a distclip optimizer class alone also works (set
``max_grad_norm=0.0``: otherwise distclip refuses with
:class:`~distclip.FrameworkClippingError`), but the DeepSpeed section is not read and
nothing reaches the Trainer's logs. This module never imports ``transformers``.
"""

from __future__ import annotations

import functools
import logging
import sys
from typing import Any

from distclip._checks import is_positive_real
from distclip.clippers import Clipper, ClipStats
from distclip.errors import FrameworkClippingError
from distclip.integrations.accelerate import AccelerateHandle
from distclip.integrations.accelerate import attach as attach_accelerator
from distclip.integrations.frameworks import on_rank_zero
from distclip.integrations.hooks import get_clipper
from distclip.integrations.optimizer import ClippedOptimizerMixin

__all__ = ["LOG_PREFIX", "TrainerHandle", "attach", "log_record"]

logger = logging.getLogger(__name__)

#: Prefix of distclip's keys in the Trainer's logs (``distclip/threshold``, ...).
LOG_PREFIX = "distclip/"

_HANDLE_ATTR = "_distclip_hf"


def _trainer_class() -> type | None:
    module = sys.modules.get("transformers.trainer")
    cls = getattr(module, "Trainer", None) if module is not None else None
    return cls if isinstance(cls, type) else None


def log_record(stats: ClipStats) -> dict[str, float]:
    """``stats`` as the Trainer's log entries: ``{"distclip/threshold": ..., ...}`` (no step).

    One copy to the host (:meth:`~distclip.ClipStats.as_floats`).
    """
    return {LOG_PREFIX + key: value for key, value in stats.as_floats().items() if key != "step"}


class TrainerHandle:
    """What :func:`attach` did to one Trainer; :meth:`remove` undoes it.

    Attributes:
        trainer: the ``transformers.Trainer``.
        accelerate: the :class:`~distclip.accelerate.AccelerateHandle` of its accelerator.
        max_grad_norm: the Trainer's ``max_grad_norm`` before :func:`attach` (``None``
            when it was left alone).
    """

    def __init__(self, trainer: Any, accelerate: AccelerateHandle) -> None:
        self.trainer = trainer
        self.accelerate = accelerate
        self.max_grad_norm: float | None = None
        self._log: Any = None

    @property
    def clipper(self) -> Clipper | None:
        """The clipper of the Trainer's optimizer (``None`` before ``train()`` builds it)."""
        try:
            return get_clipper(self.trainer.optimizer)
        except ValueError:
            return None

    def _turn_off_max_grad_norm(self) -> None:
        args = self.trainer.args
        value = getattr(args, "max_grad_norm", None)
        if not is_positive_real(value):
            return
        self.max_grad_norm = float(value)
        args.max_grad_norm = 0.0
        if on_rank_zero():
            logger.warning(
                "distclip.hf: TrainingArguments.max_grad_norm=%s is turned off (0.0) for this "
                "Trainer: the Trainer would clip the gradients before distclip measures them. "
                "distclip clips in optimizer.step(); its max_norm= option caps the threshold "
                "if you want a bound.",
                value,
            )

    def _wrap_log(self) -> None:
        trainer = self.trainer
        original = trainer.log

        @functools.wraps(original)
        def log(logs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            if isinstance(logs, dict) and "loss" in logs:
                clipper = self.clipper
                stats = clipper.last_clip if clipper is not None else None
                if stats is not None:
                    logs.update(log_record(stats))
            return original(logs, *args, **kwargs)

        trainer.log = log
        self._log = log

    def remove(self) -> None:
        """Undo :func:`attach`: ``max_grad_norm``, ``log`` and the accelerator's changes."""
        trainer = self.trainer
        if self._log is not None and trainer.__dict__.get("log") is self._log:
            del trainer.__dict__["log"]
        self._log = None
        if self.max_grad_norm is not None:
            trainer.args.max_grad_norm = self.max_grad_norm
            self.max_grad_norm = None
        self.accelerate.remove()
        if trainer.__dict__.get(_HANDLE_ATTR) is self:
            del trainer.__dict__[_HANDLE_ATTR]


def _given_clipped_optimizer(trainer: Any) -> str | None:
    """The name of the distclip optimizer (class) the Trainer was given, if any."""
    given = getattr(trainer, "optimizer_cls_and_kwargs", None)
    cls = given[0] if isinstance(given, tuple) and given else None
    if isinstance(cls, type) and issubclass(cls, ClippedOptimizerMixin):
        return cls.__name__
    optimizer = getattr(trainer, "optimizer", None)
    if isinstance(optimizer, ClippedOptimizerMixin):
        return type(optimizer).__name__
    return None


def _check_given_optimizer(trainer: Any, method: str | None, options: dict[str, Any]) -> None:
    """Refuse, before anything changes, what the Trainer's own optimizer rules out."""
    given = _given_clipped_optimizer(trainer)
    if given is None:
        return
    if getattr(trainer, "is_deepspeed_enabled", False):
        raise FrameworkClippingError(
            "distclip.hf: the Trainer's optimizer clips with distclip, but under DeepSpeed the "
            "engine computes the norm and clips (and partitions the gradients) before the "
            "optimizer steps. Give the Trainer a plain optimizer: distclip clips the engine "
            'with the DeepSpeed config\'s "distclip" section, or the method passed to '
            "distclip.hf.attach."
        )
    if method is not None or options:
        raise ValueError(
            f"distclip.hf: the Trainer's optimizer ({given}) already clips with distclip; "
            "call distclip.hf.attach(trainer) without a method and options to keep it, or "
            "give the Trainer a plain optimizer class"
        )


def attach(
    trainer: Any,
    method: str | None = None,
    *,
    log: bool = True,
    allow_unverified: bool = False,
    **options: Any,
) -> TrainerHandle:
    """Train ``trainer`` with distclip (see the module docstring); call it before ``train()``.

    Args:
        trainer: a ``transformers.Trainer`` (or subclass), not yet trained.
        method: the distclip method for a plain optimizer (default ``autoclip``); under
            DeepSpeed, the engine's method (default: the config's ``"distclip"`` section).
        log: add the clip's per-step record to the Trainer's logs.
        allow_unverified: under DeepSpeed, see :func:`distclip.deepspeed.attach`.
        **options: the method's options, as for :func:`distclip.ClippedOptimizer`.

    Returns:
        A :class:`TrainerHandle`; ``handle.remove()`` undoes everything.

    Raises:
        TypeError: ``trainer`` is not a ``transformers.Trainer``; a bad method or option
            (see :func:`distclip.accelerate.attach`).
        ValueError: already attached; an unknown method or an option out of range; a
            method or options for a Trainer whose optimizer (class) already clips.
        FrameworkClippingError: under DeepSpeed, the Trainer's optimizer (class)
            already clips with distclip.
    """
    cls = _trainer_class()
    if cls is None or not isinstance(trainer, cls):
        raise TypeError(f"trainer must be a transformers.Trainer, got {type(trainer).__name__}")
    if isinstance(trainer.__dict__.get(_HANDLE_ATTR), TrainerHandle):
        raise ValueError(
            "distclip.hf.attach was already called on this Trainer; call handle.remove() "
            "first to attach again with other options"
        )
    deepspeed = bool(getattr(trainer, "is_deepspeed_enabled", False))
    _check_given_optimizer(trainer, method, options)
    accelerator: Any = getattr(trainer, "accelerator", None)
    accelerate = attach_accelerator(
        accelerator, method, allow_unverified=allow_unverified, **options
    )
    handle = TrainerHandle(trainer, accelerate)
    if not deepspeed:
        handle._turn_off_max_grad_norm()
    if log:
        handle._wrap_log()
    trainer.__dict__[_HANDLE_ATTR] = handle
    return handle
