"""A functional drop-in for ``torch.nn.utils.clip_grad_norm_`` that is layout-correct.

``distclip.clip_grad_norm_(model.parameters(), max_norm)`` returns the true global
norm and clips by it under a single process, DDP, FSDP1 (with ``model=``), FSDP2,
tensor parallel, 2-D meshes, HSDP and pipeline stages (with ``pipeline_groups=``),
where torch's own function fails or returns a shard-local norm. Each call builds a
reduction plan; a training loop that clips every step can keep one
:class:`distclip.NormClip` instead, which builds it once.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from distclip.functional import clip_coefficient, scale_, validate_norm_type
from distclip.reduction.plan import ReductionPlan

__all__ = ["clip_grad_norm_", "get_total_norm"]


def _as_list(parameters: Tensor | Iterable[Tensor]) -> list[Tensor]:
    return [parameters] if isinstance(parameters, Tensor) else list(parameters)


@torch.no_grad()
def get_total_norm(
    parameters: Tensor | Iterable[Tensor],
    norm_type: float = 2.0,
    *,
    model: torch.nn.Module | None = None,
    pipeline_groups: Any = None,
    foreach: bool | None = None,
) -> Tensor:
    """The global ``norm_type``-norm of the gradients of ``parameters`` (0-dim tensor).

    Every gradient element of the job counts once, however the gradients are laid out;
    the result is identical on every rank. One all-reduce per distinct process group.

    Args:
        parameters: parameters (or one tensor) whose ``.grad`` are measured.
        norm_type: p > 0 or ``inf`` (default 2).
        model: the FSDP1 root module when FSDP1 manages the parameters.
        pipeline_groups: process group(s) summing pipeline stages' norms.
        foreach: use the foreach kernels (``None``: where supported).
    """
    p = validate_norm_type(norm_type)
    plan = ReductionPlan.build(_as_list(parameters), model=model, pipeline_groups=pipeline_groups)
    return plan.total_norm(p, foreach=foreach)


@torch.no_grad()
def clip_grad_norm_(
    parameters: Tensor | Iterable[Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    model: torch.nn.Module | None = None,
    pipeline_groups: Any = None,
) -> Tensor:
    """Clip gradients in place to a global norm of at most ``max_norm``; return the norm.

    Same contract as ``torch.nn.utils.clip_grad_norm_`` (coefficient
    ``min(1, max_norm / (total_norm + 1e-6))``, multiplied in without a host sync),
    with the global norm of :func:`get_total_norm`.

    Raises:
        ValueError: ``max_norm`` is not a positive finite number.
        RuntimeError: the norm is NaN/inf and ``error_if_nonfinite`` (a host sync).
    """
    if (
        isinstance(max_norm, bool)
        or not isinstance(max_norm, (int, float))
        or not (0.0 < float(max_norm) < float("inf"))
    ):
        raise ValueError(f"max_norm must be a positive finite number, got {max_norm!r}")
    p = validate_norm_type(norm_type)
    plan = ReductionPlan.build(_as_list(parameters), model=model, pipeline_groups=pipeline_groups)
    total_norm = plan.total_norm(p, foreach=foreach)
    if error_if_nonfinite and not bool(torch.isfinite(total_norm)):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients is non-finite, so it cannot "
            "be clipped. To disable this error and scale the gradients by the non-finite "
            "norm anyway, set `error_if_nonfinite=False`"
        )
    coef = clip_coefficient(torch.full_like(total_norm, float(max_norm)), total_norm)
    scale_(plan.grads(), coef, foreach=foreach)
    return total_norm
