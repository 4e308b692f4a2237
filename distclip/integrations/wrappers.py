"""Seeing through the optimizer wrappers of training frameworks.

Accelerate's ``AcceleratedOptimizer`` (and its DeepSpeed variant), Lightning's
``LightningOptimizer`` and HF Trainer's optimizer all hold the real optimizer as
``.optimizer``. :func:`unwrap` follows that chain, so that
:func:`distclip.get_clipper` and :func:`distclip.attach` work on whatever object the
framework hands back.
"""

from __future__ import annotations

from typing import Any

from torch.optim import Optimizer

__all__ = ["describe_chain", "is_deepspeed_wrapper", "unwrap", "wrapper_chain"]

#: More wrappers than this around one optimizer is a cycle, not a stack of frameworks.
_MAX_DEPTH = 8


def wrapper_chain(optimizer: Any) -> list[Any]:
    """``[optimizer, optimizer.optimizer, ...]`` down to the object without ``.optimizer``."""
    chain = [optimizer]
    while len(chain) <= _MAX_DEPTH:
        inner = getattr(chain[-1], "optimizer", None)
        if inner is None or any(inner is seen for seen in chain):
            break
        chain.append(inner)
    return chain


def is_deepspeed_wrapper(obj: Any) -> bool:
    """True for DeepSpeed's optimizer wrappers (ZeRO 1-3, BF16/FP16 optimizers)."""
    return type(obj).__module__.split(".")[0] == "deepspeed"


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
            "distclip.deepspeed.initialize, or distclip.deepspeed.attach(engine))"
        )
    inner = chain[-1]
    if not isinstance(inner, Optimizer) or "_optimizer_step_pre_hooks" not in inner.__dict__:
        raise TypeError(
            "optimizer must be a torch.optim.Optimizer or a wrapper exposing one as "
            f".optimizer, got {describe_chain(chain)}"
        )
    return inner
