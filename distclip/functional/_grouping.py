"""Group tensors by (device, dtype) for the foreach kernels."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils._foreach_utils import (
    _device_has_foreach_support,
    _group_tensors_by_device_and_dtype,
)

__all__ = ["group_by_device_and_dtype", "group_indices_by_device_and_dtype", "use_foreach"]


def group_by_device_and_dtype(tensors: Sequence[Tensor]) -> list[tuple[torch.device, list[Tensor]]]:
    """``[(device, tensors on it with one dtype), ...]``, as torch's clipping groups them."""
    if not tensors:
        return []
    grouped = _group_tensors_by_device_and_dtype([list(tensors)])  # type: ignore[list-item]
    return [
        (device, [t for t in lists[0] if t is not None])
        for (device, _), (lists, _) in grouped.items()  # type: ignore[misc]
    ]


def use_foreach(device: torch.device, foreach: bool | None) -> bool:
    """Whether to use the foreach kernels on ``device`` (``None``: where supported).

    Raises:
        RuntimeError: ``foreach=True`` on a device without foreach kernels (as torch's
            clipping functions do: an explicit request is never silently ignored).
    """
    supported = _device_has_foreach_support(device)
    if foreach and not supported:
        raise RuntimeError(
            f"foreach=True was passed, but can't use the foreach API on {device.type} tensors"
        )
    return supported if foreach is None else foreach


def group_indices_by_device_and_dtype(
    tensors: Sequence[Tensor],
) -> list[tuple[torch.device, list[Tensor], list[int]]]:
    """Like :func:`group_by_device_and_dtype`, with each tensor's index in ``tensors``."""
    if not tensors:
        return []
    grouped = _group_tensors_by_device_and_dtype([list(tensors)], with_indices=True)  # type: ignore[list-item]
    return [
        (device, [t for t in lists[0] if t is not None], list(indices))
        for (device, _), (lists, indices) in grouped.items()  # type: ignore[misc]
    ]
