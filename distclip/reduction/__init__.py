"""The only layer that imports ``torch.distributed`` and knows gradient layouts."""

from distclip.reduction.collectives import (
    all_gather_tensor,
    all_reduce_powsum,
    collective_device,
    is_distributed,
)
from distclip.reduction.plan import GradGroup, Layout, ReductionPlan

__all__ = [
    "GradGroup",
    "Layout",
    "ReductionPlan",
    "all_gather_tensor",
    "all_reduce_powsum",
    "collective_device",
    "is_distributed",
]
