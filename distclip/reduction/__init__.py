"""The only layer that imports ``torch.distributed`` and knows gradient layouts."""

from distclip.reduction.clip_grad import (
    clip_grad_norm_,
    clip_grad_value_,
    clip_grads_with_norm_,
    get_total_norm,
    grad_norm,
)
from distclip.reduction.collectives import (
    all_gather_tensor,
    all_reduce_powsum,
    collective_device,
    is_distributed,
    wait_for_ranks,
)
from distclip.reduction.layouts import Placement, is_dtensor, local_tensor
from distclip.reduction.marks import Layout, get_layout, mark_layout, mark_shared
from distclip.reduction.plan import GradGroup, ReductionPlan

__all__ = [
    "GradGroup",
    "Layout",
    "Placement",
    "ReductionPlan",
    "all_gather_tensor",
    "all_reduce_powsum",
    "clip_grad_norm_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "collective_device",
    "get_layout",
    "get_total_norm",
    "grad_norm",
    "is_distributed",
    "is_dtensor",
    "local_tensor",
    "mark_layout",
    "mark_shared",
    "wait_for_ranks",
]
