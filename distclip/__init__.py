"""distclip: gradient clipping that stays correct when training is distributed.

Every clipper computes the true global gradient norm across all ranks and shards and
keeps a history (AutoClip's window) that is identical on every rank.

Entry points:

* :func:`AutoClippedOptimizer` / :func:`ClippedOptimizer`: an optimizer class with
  clipping built in (a real subclass of the base class);
* :func:`attach`: clipping hooked onto an optimizer instance that already exists;
* :class:`AutoClip`, :class:`NormClip`, :func:`make_clipper`: a standalone clipper
  to call between ``backward()`` and ``step()``;
* :func:`get_total_norm`, :func:`clip_grads_with_norm_`, :func:`clip_grad_norm_`,
  :func:`clip_grad_value_`: layout-correct drop-ins for torch's functions of the same
  names (and :func:`grad_norm`: the global norm of parameters' gradients);
* :func:`mark_shared`, :func:`mark_layout`: what distclip is told about gradients it
  cannot classify by itself (a tied copy; an explicit sharding);
* :func:`register_method` with :class:`GlobalFactorClipper` or :class:`PiecewiseClipper`,
  a :class:`ClipConfig` and (for state) a :class:`MethodState`: a method of one's own,
  usable by every entry point;
* :class:`MetricsWriter`, :func:`read_metrics`: the per-step record as JSON lines,
  drawn by ``python -m distclip.plot``;
* ``distclip.deepspeed``, ``distclip.hf``, ``distclip.accelerate``,
  ``distclip.lightning``: DeepSpeed engines, the Hugging Face Trainer, Accelerate
  and PyTorch Lightning (imported on first access; none of them imports its
  framework).
"""

import importlib as _importlib
from types import ModuleType as _ModuleType

from distclip._version import __version__
from distclip.clippers import (
    AutoClip,
    ClipConfig,
    Clipper,
    ClipStats,
    Decision,
    GlobalFactorClipper,
    MethodState,
    NormClip,
    Pieces,
    PiecewiseClipper,
    Units,
    available_methods,
    make_clipper,
    register_method,
)
from distclip.errors import FrameworkClippingError, NonFiniteNormError, RankDesyncError
from distclip.integrations import AutoClippedOptimizer, ClippedOptimizer, attach, get_clipper
from distclip.integrations.metrics import METRICS_FIELDS, MetricsWriter, read_metrics
from distclip.reduction import (
    Layout,
    clip_grad_norm_,
    clip_grad_value_,
    clip_grads_with_norm_,
    get_total_norm,
    grad_norm,
    mark_layout,
    mark_shared,
)

__all__ = [
    "METRICS_FIELDS",
    "AutoClip",
    "AutoClippedOptimizer",
    "ClipConfig",
    "ClipStats",
    "ClippedOptimizer",
    "Clipper",
    "Decision",
    "FrameworkClippingError",
    "GlobalFactorClipper",
    "Layout",
    "MethodState",
    "MetricsWriter",
    "NonFiniteNormError",
    "NormClip",
    "Pieces",
    "PiecewiseClipper",
    "RankDesyncError",
    "Units",
    "__version__",
    "attach",
    "available_methods",
    "clip_grad_norm_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "get_clipper",
    "get_total_norm",
    "grad_norm",
    "make_clipper",
    "mark_layout",
    "mark_shared",
    "read_metrics",
    "register_method",
]


#: The integration modules, imported on first access as ``distclip.<name>``.
_INTEGRATIONS = ("deepspeed", "hf", "accelerate", "lightning")


def __getattr__(name: str) -> _ModuleType:
    """``distclip.deepspeed`` / ``.hf`` / ``.accelerate`` / ``.lightning``, on first access.

    None of them imports its framework (DeepSpeed, transformers, accelerate, Lightning).
    """
    if name in _INTEGRATIONS:
        return _importlib.import_module(f"distclip.{name}")
    raise AttributeError(f"module 'distclip' has no attribute {name!r}")
