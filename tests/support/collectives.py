"""Counting the collectives a step issues, and reading a returned norm as torch code sees it."""

from __future__ import annotations

import contextlib
import functools
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from tests.support import internals

__all__ = ["C10D_COLLECTIVES", "count_collectives", "describe_norm", "same_all_reduce", "value_of"]

#: ``torch.distributed`` collectives counted around a ``step()``.
C10D_COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "reduce_scatter_tensor",
    "reduce",
    "broadcast",
    "barrier",
    "all_to_all_single",
    "send",
    "recv",
)


def same_all_reduce() -> bool:
    """distclip's ``dist.all_reduce`` is the ``torch.distributed`` attribute counted here."""
    return (
        internals.collectives.dist is dist and dist.all_reduce is dist.distributed_c10d.all_reduce
    )


@contextlib.contextmanager
def count_collectives() -> Iterator[Counter[str]]:
    """Count ``torch.distributed`` collectives called inside the block, two ways.

    Each function of :data:`C10D_COLLECTIVES` is replaced by a counting wrapper on
    the ``torch.distributed`` module (distclip calls ``dist.all_reduce`` through it),
    and ``CommDebugMode`` counts the c10d ops that reach the dispatcher (functional
    collectives of DTensor included): ``debug_all_reduce`` and ``debug_total``.
    """
    from torch.distributed.tensor.debug import CommDebugMode

    counts: Counter[str] = Counter()
    originals = {name: getattr(dist, name) for name in C10D_COLLECTIVES}

    def counting(name: str, fn: Any) -> Any:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            counts[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    for name, fn in originals.items():
        setattr(dist, name, counting(name, fn))
    debug = CommDebugMode()
    try:
        with debug:
            yield counts
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    by_op = {str(op): n for op, n in debug.get_comm_counts().items()}
    counts["debug_all_reduce"] = sum(n for op, n in by_op.items() if "allreduce" in op)
    counts["debug_total"] = sum(by_op.values())


def value_of(norm: torch.Tensor) -> float:
    """A norm as a float; a DTensor norm through ``full_tensor()`` (local for Replicate)."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def describe_norm(norm: torch.Tensor) -> dict[str, Any]:
    """What torch code would see of a returned norm: its value, type, placements, dtype."""
    placements = getattr(norm, "placements", None)
    return {
        "value": value_of(norm),
        "dtensor": placements is not None,
        "placements": None if placements is None else [type(p).__name__ for p in placements],
        "local": float(getattr(norm, "_local_tensor", norm)),
        "dtype": str(norm.dtype),
    }
