"""PyTorch Lightning: a callback that clips with distclip and logs the per-step record.

``DistClipCallback`` (from :mod:`distclip.lightning`) is a real ``Callback`` of the
installed Lightning, ``lightning.pytorch`` or ``pytorch_lightning`` (the one already
imported wins; otherwise the first that imports, in that order)::

    trainer = Trainer(callbacks=[DistClipCallback("autoclip", q=0.1, window=200)])

What it does, and when (the order is Lightning's ``Trainer._run``):

* ``setup`` (before anything is built): refuses ``Trainer(gradient_clip_val=...)``
  with :class:`~distclip.FrameworkClippingError`, naming the setting and the fix;
  Lightning would clip before distclip measures. Under the DeepSpeed strategy
  the same value would become DeepSpeed's ``gradient_clipping``, which distclip
  replaces: refused too, so that no setting is silently ignored.
* ``on_fit_start`` (after the strategy built the optimizers and the DeepSpeed engine,
  *before* Lightning restores a ``ckpt_path=`` checkpoint): attaches the clipper, so
  the checkpoint's clipper state is loaded by the usual hooks. On the optimizers
  (:func:`distclip.attach`; single device, DDP, ``ModelParallelStrategy``/FSDP2, and
  FSDP1 with the FSDP root as ``model=``) the state travels in the optimizer's state
  dict; on a DeepSpeed engine (:func:`distclip.deepspeed.attach`) in DeepSpeed's
  checkpoint ``client_state``. An optimizer that already clips with distclip (built
  with :func:`distclip.ClippedOptimizer`) is used as it is when the callback was given
  no method and no options.
* ``on_train_batch_end``: after each optimizer step, ``self.log`` of the record's
  tensors (``distclip/total_norm``, ``threshold``, ``clip_coef``, ``clipped``,
  ``skipped``) with ``on_step=True``: Lightning copies them to the host only when it
  writes its logs (``Trainer(log_every_n_steps=...)``), and they reach every logger.
  With ``metrics_path=`` global rank 0 also writes JSON lines
  (:class:`~distclip.MetricsWriter`) at the same interval.

Lightning's FSDP1 strategy (``FSDPStrategy``) refuses CPU, so the FSDP1 case is not
exercised by distclip's tests; the other strategies are (see the README).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

from distclip.clippers import Clipper, ClipStats, resolve_method, validate_options
from distclip.integrations.frameworks import check_trainer
from distclip.integrations.hooks import attach, get_clipper
from distclip.integrations.metrics import MetricsWriter
from distclip.integrations.optimizer import ClippedOptimizerMixin
from distclip.integrations.wrappers import wrapper_chain

__all__ = [
    "LIGHTNING_PACKAGES",
    "LightningClipping",
    "callback_class",
    "import_lightning",
]

logger = logging.getLogger(__name__)

#: Lightning's trainer package under its two names, in the order they are tried.
LIGHTNING_PACKAGES = ("lightning.pytorch", "pytorch_lightning")

_CALLBACK_CLASSES: dict[str, type] = {}

#: The logged keys (prefixed) and the record field each one holds.
_LOGGED = ("total_norm", "threshold", "clip_coef", "clipped", "skipped")


def import_lightning(package: str | None = None) -> ModuleType:
    """Lightning's trainer package: ``package``, or the installed one (see the module docstring).

    Raises:
        ValueError: ``package`` is not one of :data:`LIGHTNING_PACKAGES`.
        ImportError: Lightning is not installed.
    """
    if package is not None and package not in LIGHTNING_PACKAGES:
        raise ValueError(f"package must be one of {LIGHTNING_PACKAGES} or None, got {package!r}")
    names = (package,) if package is not None else LIGHTNING_PACKAGES
    for name in names:
        if name in sys.modules:
            return sys.modules[name]
    errors = []
    for name in names:
        try:
            return importlib.import_module(name)
        except ImportError as err:
            errors.append(f"{name}: {err}")
    raise ImportError(
        "distclip.lightning needs PyTorch Lightning (pip install 'distclip[lightning]', or "
        f"the lightning package); tried {'; '.join(errors)}"
    )


class _Source:
    """One clipper the callback watches: where its stats come from, what to undo."""

    def __init__(
        self,
        clipper: Clipper,
        last_clip: Callable[[], ClipStats | None],
        remove: Callable[[], None] | None,
    ) -> None:
        self.clipper = clipper
        self.last_clip = last_clip
        self.remove = remove
        self.last_step = clipper.num_steps
        self.writer: MetricsWriter | None = None


class LightningClipping:
    """What ``DistClipCallback`` does; mixed into a subclass of Lightning's ``Callback``.

    Args:
        method: a distclip method name (see :func:`distclip.available_methods`).
            ``None`` (default): the optimizer's own distclip clipper if it has one and no
            options are given, otherwise ``"autoclip"``; under DeepSpeed the
            ``"distclip"`` section of the DeepSpeed config (``autoclip`` without one).
        log: log the per-step record with ``self.log`` (``on_step=True``).
        prefix: prefix of the logged names (``"distclip/"``): ``distclip/threshold``;
            with several optimizers, ``distclip/<index>/threshold``.
        metrics_path: also write JSON lines here (global rank 0, at
            ``Trainer(log_every_n_steps=...)``; appended to when resuming with
            ``ckpt_path=``); one optimizer only.
        **options: the method's options, as for :func:`distclip.ClippedOptimizer`.

    Raises:
        TypeError, ValueError: an unknown method or option, an option out of range, or
            an argument of the wrong type; at construction, before training starts.
    """

    def __init__(
        self,
        method: str | None = None,
        *,
        log: bool = True,
        prefix: str = "distclip/",
        metrics_path: str | os.PathLike[str] | None = None,
        **options: Any,
    ) -> None:
        if method is not None or options:
            name = method or "autoclip"
            validate_options(resolve_method(name).name, options)  # fail early
        if not isinstance(log, bool):
            raise TypeError(f"log must be a bool, got {type(log).__name__}")
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        if metrics_path is not None and not isinstance(metrics_path, (str, os.PathLike)):
            raise TypeError(
                f"metrics_path must be a str, os.PathLike or None, got {type(metrics_path).__name__}"
            )
        self.method = method
        self.options = dict(options)
        self.log_record = log
        self.prefix = prefix
        self.metrics_path = metrics_path
        self._sources: list[_Source] = []

    # ------------------------------------------------------------------ access
    @property
    def clippers(self) -> list[Clipper]:
        """The clippers in use, one per optimizer (one for a DeepSpeed engine)."""
        return [source.clipper for source in self._sources]

    @property
    def clipper(self) -> Clipper:
        """The one clipper in use.

        Raises:
            RuntimeError: before ``fit`` started, or with several optimizers (use
                :attr:`clippers`).
        """
        if len(self._sources) != 1:
            raise RuntimeError(
                f"the callback has {len(self._sources)} clippers (one per optimizer, once fit "
                "has started); use .clippers"
            )
        return self._sources[0].clipper

    def _name(self) -> str:
        return self.method or "autoclip"

    # ------------------------------------------------------------------- hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Refuse Lightning's own gradient clipping before anything is built."""
        if stage != "fit":
            return
        check_trainer(trainer, self._name())
        pl = _package_of(trainer)
        module_hook = getattr(type(pl_module), "configure_gradient_clipping", None)
        if module_hook is not pl.LightningModule.configure_gradient_clipping and (
            trainer.is_global_zero
        ):
            logger.warning(
                "distclip: %s overrides configure_gradient_clipping; if it clips the "
                "gradients, distclip measures the clipped ones and its thresholds follow them",
                type(pl_module).__name__,
            )

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Attach the clipper(s): after the strategy set up, before a checkpoint is restored."""
        self._detach()
        pl = _package_of(trainer)
        strategy = trainer.strategy
        if isinstance(strategy, pl.strategies.DeepSpeedStrategy):
            self._sources = [self._attach_engine(strategy.deepspeed_engine)]
        else:
            model = _fsdp1_root(strategy.model)
            self._sources = [self._attach_optimizer(opt, model) for opt in trainer.optimizers]
        if not self._sources:
            raise ValueError(
                "distclip's callback found no optimizer to clip: return one from "
                "LightningModule.configure_optimizers"
            )
        if self.metrics_path is not None and len(self._sources) > 1:
            raise ValueError(
                f"metrics_path= writes one clipper's record; this module has "
                f"{len(self._sources)} optimizers (log them with log=True instead)"
            )

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Log the record of an optimizer step that just ran (none while accumulating)."""
        several = len(self._sources) > 1
        for index, source in enumerate(self._sources):
            stats = source.last_clip()
            if stats is None or stats.step == source.last_step:
                continue
            source.last_step = stats.step
            if self.log_record:
                prefix = f"{self.prefix}{index}/" if several else self.prefix
                pl_module.log_dict(
                    _loggable(stats, prefix),
                    on_step=True,
                    on_epoch=False,
                    prog_bar=False,
                    logger=True,
                    batch_size=1,
                )
            if self.metrics_path is not None:
                if source.writer is None:  # opened now: ckpt_path is known once fit runs
                    source.writer = MetricsWriter(
                        self.metrics_path,
                        every=max(1, int(trainer.log_every_n_steps)),
                        rank=int(trainer.global_rank),
                        append=trainer.ckpt_path is not None,
                    )
                source.writer.write(stats)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        """Close the metrics file (the clipper stays attached: checkpoints still carry it)."""
        for source in self._sources:
            if source.writer is not None:
                source.writer.close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Close the metrics file; the lines written so far stay."""
        self.on_fit_end(trainer, pl_module)

    # ---------------------------------------------------------------- attaching
    def _attach_optimizer(self, optimizer: Any, model: torch.nn.Module | None) -> _Source:
        try:
            clipper = get_clipper(optimizer)
        except ValueError:
            pass
        else:
            if self.method is not None or self.options:
                raise ValueError(
                    f"the optimizer from configure_optimizers already clips with distclip "
                    f"({clipper.method}); give DistClipCallback no method and no options to "
                    "log its clipper, or return a plain optimizer for the callback to clip"
                )
            return _Source(clipper, lambda: clipper.last_clip, None)
        handle = attach(optimizer, self._name(), model=model, **self.options)
        attached = handle.clipper
        return _Source(attached, lambda: attached.last_clip, handle.remove)

    def _attach_engine(self, engine: Any) -> _Source:
        import distclip.deepspeed as ds_clip

        for obj in wrapper_chain(getattr(engine, "optimizer", None)):
            if isinstance(obj, ClippedOptimizerMixin):
                raise ValueError(
                    f"under Lightning's DeepSpeed strategy, configure_optimizers returned a "
                    f"{type(obj).__name__}, which clips each rank's ZeRO partition by its own "
                    "norm; return the plain optimizer and let the callback clip through "
                    "distclip.deepspeed (DeepSpeed's global norm)"
                )
        existing = getattr(engine, "__dict__", {}).get("distclip")
        if existing is not None and self.method is None and not self.options:
            adapter = ds_clip.get_adapter(engine)
            return _Source(adapter.clipper, lambda: adapter.last_clip, None)
        adapter = ds_clip.attach(engine, self.method, **self.options)
        return _Source(adapter.clipper, lambda: adapter.last_clip, adapter.remove)

    def _detach(self) -> None:
        """Undo an earlier fit's attachments (a Trainer fitted again)."""
        for source in self._sources:
            if source.writer is not None:
                source.writer.close()
            if source.remove is not None:
                source.remove()
        self._sources = []

    def __reduce__(self) -> tuple[Any, ...]:
        kwargs = {"log": self.log_record, "prefix": self.prefix, "metrics_path": self.metrics_path}
        package = _package_name(type(self))
        return (_rebuild, (package, self.method, kwargs, self.options))

    def __repr__(self) -> str:
        options = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"DistClipCallback(method={self.method!r}{options})"


def _loggable(stats: ClipStats, prefix: str) -> dict[str, torch.Tensor]:
    """The record's tensors as float32 0-dim tensors (no host read)."""
    values = {
        "total_norm": stats.total_norm,
        "threshold": stats.threshold,
        "clip_coef": stats.clip_coef,
        "clipped": stats.clipped,
        "skipped": stats.skipped,
    }
    return {
        f"{prefix}{key}": value.detach().to(torch.float32)
        for key, value in values.items()
        if value is not None
    }


def _fsdp1_root(model: Any) -> torch.nn.Module | None:
    """The strategy's model when it is an FSDP1 root (distclip needs it as ``model=``)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return model if isinstance(model, FullyShardedDataParallel) else None


def _package_name(cls: type) -> str:
    for base in cls.__mro__:
        module = base.__module__
        for name in LIGHTNING_PACKAGES:
            if module == name or module.startswith(name + "."):
                return name
    raise TypeError(f"{cls.__name__} does not derive from a Lightning class")


def _package_of(trainer: Any) -> ModuleType:
    """The Lightning package ``trainer`` comes from."""
    return import_lightning(_package_name(type(trainer)))


def callback_class(package: str | None = None) -> type:
    """``DistClipCallback`` for ``package`` (the installed Lightning by default); cached.

    A subclass of :class:`LightningClipping` and of that package's ``Callback``.

    Raises:
        ValueError, ImportError: as :func:`import_lightning`.
    """
    pl = import_lightning(package)
    name = pl.__name__
    cls = _CALLBACK_CLASSES.get(name)
    if cls is None:
        cls = type(
            "DistClipCallback",
            (LightningClipping, pl.Callback),
            {
                "__module__": "distclip.lightning",
                "__qualname__": "DistClipCallback",
                "__doc__": LightningClipping.__doc__,
            },
        )
        _CALLBACK_CLASSES[name] = cls
    return cls


def _rebuild(
    package: str, method: str | None, kwargs: dict[str, Any], options: dict[str, Any]
) -> Any:
    return callback_class(package)(method, **kwargs, **options)
