"""The collectives distclip issues, on the device the process group's backend wants.

A gloo group reduces CPU tensors, an NCCL group CUDA tensors; the tensor to reduce is
moved there and back (a device-to-device copy, never a read by the host).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "all_gather_tensor",
    "all_reduce_powsum",
    "collective_device",
    "is_distributed",
]


def is_distributed() -> bool:
    """True when a default process group exists (``torch.distributed`` is initialised)."""
    return dist.is_available() and dist.is_initialized()


def collective_device(group: dist.ProcessGroup | None, like: Tensor) -> torch.device:
    """The device a collective on ``group`` must run on, for a tensor like ``like``.

    gloo reduces on the CPU, NCCL on the current CUDA device; a group with a backend
    for ``like``'s device type (e.g. ``"cpu:gloo,cuda:nccl"``) keeps ``like``'s device.
    """
    backend = str(dist.get_backend(group)).lower()
    if ":" in backend or "," in backend:
        device_types = {part.split(":")[0] for part in backend.split(",")}
        if like.device.type in device_types:
            return like.device
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    if "gloo" in backend:
        return torch.device("cpu")
    return like.device


def all_reduce_powsum(powsum: Tensor, norm_type: float, group: dist.ProcessGroup | None) -> Tensor:
    """All-reduce power sums (a 0-dim or 1-D tensor) over ``group``: SUM, or MAX for inf.

    Returns the reduced tensor, shaped and placed like ``powsum``. One collective.
    """
    op = dist.ReduceOp.MAX if math.isinf(norm_type) else dist.ReduceOp.SUM
    device = collective_device(group, powsum)
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
