"""Seeing through the optimizer wrappers of training frameworks.

Accelerate's ``AcceleratedOptimizer`` (and its DeepSpeed variant), Lightning's
``LightningOptimizer`` and HF Trainer's optimizer all hold the real optimizer as
``.optimizer``. :func:`unwrap` follows that chain, so that
:func:`distclip.get_clipper` and :func:`distclip.attach` work on whatever object the
framework hands back. :class:`LastClipMirrors` keeps ``last_clip`` readable on the
wrappers too.
"""

from __future__ import annotations

import weakref
from typing import Any

from torch.optim import Optimizer

from distclip.clippers import ClipStats

__all__ = [
    "ENGINE_ADAPTER_ATTR",
    "LastClipMirrors",
    "describe_chain",
    "is_deepspeed_wrapper",
    "unwrap",
    "wrapper_chain",
]

#: More wrappers than this around one optimizer is a cycle, not a stack of frameworks.
_MAX_DEPTH = 8

#: Attribute of a DeepSpeed engine's optimizer that points to the engine's
#: :class:`~distclip.deepspeed.DeepSpeedClipAdapter` (set while it is attached), so
#: that :func:`distclip.get_clipper` finds the clipper from any wrapper around it.
ENGINE_ADAPTER_ATTR = "_distclip_engine"

#: Wrappers outside the ``deepspeed`` package that stand for a DeepSpeed optimizer
#: (their ``step`` does nothing: the engine steps in ``backward``).
_DEEPSPEED_STAND_INS = frozenset({("accelerate.utils.deepspeed", "DeepSpeedOptimizerWrapper")})


def wrapper_chain(optimizer: Any) -> list[Any]:
    """``[optimizer, optimizer.optimizer, ...]`` down to the object without ``.optimizer``."""
    chain = [optimizer]
    while len(chain) <= _MAX_DEPTH:
        try:
            inner = getattr(chain[-1], "optimizer", None)
        except Exception:  # a property of some framework object that cannot answer now
            inner = None
        if inner is None or any(inner is seen for seen in chain):
            break
        chain.append(inner)
    return chain


def is_deepspeed_wrapper(obj: Any) -> bool:
    """True for DeepSpeed's optimizer wrappers (ZeRO 1-3, BF16/FP16 optimizers, its engine).

    Also true for Accelerate's ``DeepSpeedOptimizerWrapper`` (what HF Trainer and
    Accelerate hand out under DeepSpeed), which stands for the engine's optimizer.
    """
    cls = type(obj)
    return (
        cls.__module__.split(".")[0] == "deepspeed"
        or (cls.__module__, cls.__name__) in _DEEPSPEED_STAND_INS
    )


def describe_chain(chain: list[Any]) -> str:
    """``"AcceleratedOptimizer -> AdamW"``: the class names along a wrapper chain."""
    return " -> ".join(type(obj).__name__ for obj in chain)


def unwrap(optimizer: Any) -> Optimizer:
    """The torch optimizer inside ``optimizer``'s wrappers (``optimizer`` itself if none).

    Raises:
        TypeError: the chain holds a DeepSpeed optimizer wrapper (DeepSpeed clips in
            its engine: use :mod:`distclip.deepspeed`), or ends in something that is not
            a ``torch.optim.Optimizer``; the message names the chain and the fix.
    """
    chain = wrapper_chain(optimizer)
    if any(is_deepspeed_wrapper(obj) for obj in chain):
        raise TypeError(
            f"distclip: {describe_chain(chain)} is a DeepSpeed optimizer; DeepSpeed computes "
            "the norm and clips inside its engine, so clip with distclip.deepspeed "
            '(a "distclip" section in the DeepSpeed config with '
            "distclip.deepspeed.initialize, or distclip.deepspeed.attach(engine); under HF "
            "Trainer or Accelerate: distclip.hf.attach(trainer) or "
            "distclip.accelerate.attach(accelerator) before training, which read that section)"
        )
    inner = chain[-1]
    if not isinstance(inner, Optimizer) or "_optimizer_step_pre_hooks" not in inner.__dict__:
        raise TypeError(
            "optimizer must be a torch.optim.Optimizer or a wrapper exposing one as "
            f".optimizer, got {describe_chain(chain)}"
        )
    return inner


class LastClipMirrors:
    """Wrappers around a clipped optimizer that get its ``last_clip`` after every step.

    A framework's wrapper (``AcceleratedOptimizer``, Lightning's optimizer, HF's
    DeepSpeed wrapper) is what user code holds, and it does not forward attribute
    reads to the optimizer inside. Each step, :meth:`publish` sets ``last_clip`` on
    every wrapper still alive (held weakly; nothing else of the wrapper is touched).
    A wrapper whose class defines ``last_clip`` itself is left alone. Not pickled:
    wrappers are registered again by whoever wraps.
    """

    def __init__(self) -> None:
        self._refs: list[weakref.ReferenceType[Any]] = []

    def add(self, wrapper: Any) -> None:
        """Mirror ``last_clip`` onto ``wrapper`` from the next :meth:`publish` on."""
        if hasattr(type(wrapper), "last_clip") or getattr(wrapper, "__dict__", None) is None:
            return
        if any(ref() is wrapper for ref in self._refs):
            return
        try:
            self._refs.append(weakref.ref(wrapper))
        except TypeError:  # not weak-referenceable
            return

    def remove(self, wrapper: Any) -> None:
        """Stop mirroring onto ``wrapper`` (its ``last_clip`` is removed)."""
        self._refs = [ref for ref in self._refs if ref() is not None and ref() is not wrapper]
        wrapper.__dict__.pop("last_clip", None)

    def publish(self, stats: ClipStats | None) -> None:
        """Set ``last_clip = stats`` on every live wrapper; forget the dead ones."""
        alive = []
        for ref in self._refs:
            wrapper = ref()
            if wrapper is not None:
                wrapper.__dict__["last_clip"] = stats
                alive.append(ref)
        self._refs = alive

    def __len__(self) -> int:
        return sum(ref() is not None for ref in self._refs)

    def __getstate__(self) -> dict[str, Any]:
        return {"_refs": []}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._refs = []
