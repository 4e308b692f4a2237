"""The collectives distclip issues, on the device the process group's backend wants.

A gloo group reduces CPU tensors, an NCCL group CUDA tensors; the tensor to reduce is
moved there and back (a device-to-device copy, never a read by the host).
"""

from __future__ import annotations

import re
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from distclip._checks import is_positive_real
from distclip.functional import reduce_op

__all__ = [
    "all_gather_tensor",
    "all_reduce_powsum",
    "collective_device",
    "is_distributed",
    "wait_for_ranks",
]


def is_distributed() -> bool:
    """True when a default process group exists (``torch.distributed`` is initialised)."""
    return dist.is_available() and dist.is_initialized()


def collective_device(group: dist.ProcessGroup | None, like: Tensor) -> torch.device:
    """The device a collective on ``group`` must run on, for a tensor like ``like``.

    gloo reduces on the CPU; NCCL on ``like``'s own CUDA device (the gradients'),
    whatever the current device is (a rank that moved its model with
    ``.to(f"cuda:{rank}")`` without ``torch.cuda.set_device`` must not reduce on
    cuda:0), or on the current CUDA device for a CPU tensor; a group with a backend
    for ``like``'s device type (e.g. ``"cpu:gloo,cuda:nccl"``) keeps ``like``'s device.
    """
    backend = str(dist.get_backend(group)).lower()
    if ":" in backend or "," in backend:
        device_types = {part.split(":")[0] for part in backend.split(",")}
        if like.device.type in device_types:
            return like.device
    if "nccl" in backend:
        if like.device.type == "cuda":
            return like.device
        return torch.device("cuda", torch.cuda.current_device())
    if "gloo" in backend:
        return torch.device("cpu")
    return like.device


def all_reduce_powsum(powsum: Tensor, norm_type: float, group: dist.ProcessGroup | None) -> Tensor:
    """All-reduce power sums (a 0-dim or 1-D tensor) over ``group``: SUM, MAX (inf), MIN (-inf).

    Returns the reduced tensor, shaped and placed like ``powsum``. One collective.
    """
    op = getattr(dist.ReduceOp, reduce_op(norm_type).upper())  # SUM, MAX or MIN
    device = collective_device(group, powsum)
    # A copy, so the caller's tensor is never reduced in place; 1-D, as every backend takes.
    buffer = powsum.to(device, copy=True).reshape(-1)
    dist.all_reduce(buffer, op=op, group=group)
    return buffer.reshape(powsum.shape).to(powsum.device)


def all_gather_tensor(tensor: Tensor, group: dist.ProcessGroup | None = None) -> list[Tensor]:
    """All-gather a tensor of the same shape from every rank of ``group`` (a list by rank)."""
    device = collective_device(group, tensor)
    local = tensor.to(device, copy=True).contiguous()
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    return gathered


def wait_for_ranks(group: dist.ProcessGroup | None, timeout: timedelta | float) -> None:
    """A barrier that fails within ``timeout`` naming the ranks that never arrived.

    On gloo this is ``torch.distributed.monitored_barrier(wait_all_ranks=True)``, whose
    error lists every missing rank. Other backends have no monitored barrier: there
    the process group's own timeout (``init_process_group(timeout=...)``) is what
    turns a missing rank into an error, and this returns at once.

    Raises:
        ValueError: ``timeout`` is not a positive number of seconds.
        RankDesyncError: some rank did not reach the barrier within ``timeout``.
    """
    from distclip.errors import RankDesyncError

    seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else timeout
    if not is_positive_real(seconds):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if "gloo" not in str(dist.get_backend(group)):
        return
    try:
        dist.monitored_barrier(group, timeout=timedelta(seconds=seconds), wait_all_ranks=True)
    except RuntimeError as error:
        found = re.search(r"Ranks? ([\d, ]+) failed", str(error))
        missing = [int(r) for r in found.group(1).replace(",", " ").split()] if found else "?"
        raise RankDesyncError(
            f"distclip: rank(s) {missing} did not reach the consistency check within "
            f"{seconds:g} s (crashed, hung, or skipped a step?): {error}"
        ) from error
