"""Functions run on every rank by ``test_harness.py``."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def rank_info() -> dict[str, Any]:
    """This rank's identity and settings, and the sum over ranks of ``rank + 1``."""
    total = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(total)
    return {
        "rank": dist.get_rank(),
        "world_size": dist.get_world_size(),
        "backend": str(dist.get_backend()),
        "sum": float(total),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch_threads": torch.get_num_threads(),
        "pid": os.getpid(),
    }


def raise_on(rank: int, message: str) -> int:
    """Raise ``ValueError(message)`` on ``rank`` (no collective); return the rank elsewhere."""
    if dist.get_rank() == rank:
        raise ValueError(message)
    return dist.get_rank()


def collective_on(rank: int) -> int:
    """Only ``rank`` enters an all-reduce: it waits for partners that never come."""
    if dist.get_rank() == rank:
        dist.all_reduce(torch.ones(1))
    return dist.get_rank()


def exit_on(rank: int, code: int) -> int:
    """``rank`` leaves abruptly with exit status ``code``."""
    if dist.get_rank() == rank:
        os._exit(code)
    return dist.get_rank()


def abort_once_on(rank: int, marker: str) -> int:
    """``rank`` aborts (SIGABRT, as glibc does on a corrupt heap) unless ``marker``
    exists, which it creates first: the first try crashes, a rerun passes."""
    if dist.get_rank() == rank and not os.path.exists(marker):
        with open(marker, "w"):
            pass
        os.abort()
    dist.barrier()
    return dist.get_rank()


def abort_on(rank: int) -> int:
    """``rank`` aborts every time."""
    if dist.get_rank() == rank:
        os.abort()
    return dist.get_rank()
