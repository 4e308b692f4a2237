"""The debug check that every rank's clipper state is the same, bit for bit."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from distclip.clippers.params import bit_checksum
from distclip.errors import RankDesyncError
from distclip.reduction import all_gather_tensor, is_distributed, wait_for_ranks

if TYPE_CHECKING:
    from distclip.clippers.base import Clipper

__all__ = ["check_consistency", "state_checksum"]


def state_checksum(clipper: Clipper) -> Tensor:
    """1-D int64 tensor fingerprinting the whole state, bit for bit (no sync)."""
    device = clipper.num_clipped.device
    parts = [
        torch.full((), clipper.num_steps, dtype=torch.long, device=device),
        clipper.num_skipped,
        clipper.num_clipped,
        *(bit_checksum(t).to(device) for t in clipper.state.tensors()),
    ]
    return torch.stack(parts)


def check_consistency(
    clipper: Clipper, group: Any = None, *, timeout: timedelta | float | None = None
) -> None:
    """Debug: raise if any rank's state differs from rank 0's (one all-gather, a sync).

    Does nothing without an initialised process group. With ``timeout`` (seconds
    or a ``timedelta``), every rank first waits at a barrier that, on gloo, fails
    after ``timeout`` naming the ranks that never arrived (see
    :func:`distclip.reduction.wait_for_ranks`); without it a missing rank is
    reported by the process group's own timeout.

    Raises:
        RankDesyncError: naming the ranks whose state differs from rank 0's, or
            the ranks that did not arrive within ``timeout``.
    """
    if not is_distributed():
        return
    if timeout is not None:
        wait_for_ranks(group, timeout)
    gathered = all_gather_tensor(clipper.state_checksum(), group)
    reference = gathered[0]
    bad = [rank for rank, checksum in enumerate(gathered) if not torch.equal(checksum, reference)]
    if bad:
        raise RankDesyncError(
            f"distclip {clipper.method}: the clipper state on rank(s) {bad} differs from "
            f"rank 0's at step {clipper.num_steps}. Every rank must compute the same global "
            "norm: are some gradients neither replicated (DDP) nor in a layout distclip "
            "reduces (FSDP1 with model=, FSDP2/DTensor, pipeline stages with "
            "pipeline_groups=)? Under DeepSpeed (ZeRO partitions) an optimizer cannot "
            'clip by itself: clip in the engine with distclip.deepspeed (a "distclip" '
            "section in the DeepSpeed config, or distclip.deepspeed.attach(engine))."
        )
