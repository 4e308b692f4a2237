"""The only layer that imports ``torch.distributed`` and knows gradient layouts."""

from distclip.reduction.clip_grad import clip_grad_norm_, get_total_norm
from distclip.reduction.collectives import (
    all_gather_tensor,
    all_reduce_powsum,
    collective_device,
    is_distributed,
    wait_for_ranks,
)
from distclip.reduction.layouts import Placement, is_dtensor, local_tensor, mark_shared
from distclip.reduction.plan import GradGroup, ReductionPlan

__all__ = [
    "GradGroup",
    "Placement",
    "ReductionPlan",
    "all_gather_tensor",
    "all_reduce_powsum",
    "clip_grad_norm_",
    "collective_device",
    "get_total_norm",
    "is_distributed",
    "is_dtensor",
    "local_tensor",
    "mark_shared",
    "wait_for_ranks",
]
