"""Drop-ins for torch's clipping functions that are correct on every layout.

``get_total_norm``, ``clip_grads_with_norm_``, ``clip_grad_norm_`` and
``clip_grad_value_`` keep the contract of their namesakes in ``torch.nn.utils``
(positional order, defaults, accepted norm types, return type and dtype, warnings
and error messages; the deliberate differences are listed in the README), and add
distclip's layout keywords, keyword-only: ``model=`` (the FSDP1 root) and
``pipeline_groups=``. The norm is the true global one under a single process, DDP,
FSDP1, FSDP2, tensor parallel, 2-D meshes, HSDP, pipeline stages and explicit
layouts (:func:`~distclip.mark_layout`), identical on every rank.

Each call builds a reduction plan (host work only: nothing is copied from the host
to the device, nothing is read back unless ``error_if_nonfinite=True``); a training
loop that clips every step can keep one :class:`distclip.NormClip` instead.
"""

from __future__ import annotations

import functools
import types
import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from distclip._checks import is_real
from distclip.errors import NonFiniteNormError
from distclip.functional import clamp_, clip_coefficient, scale_, validate_norm_type
from distclip.reduction.layouts import is_dtensor, local_tensor, root_mesh
from distclip.reduction.plan import ReductionPlan

__all__ = [
    "clip_grad_norm_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "get_total_norm",
    "grad_norm",
]

#: What torch's clipping functions take: one tensor or an iterable of them.
TensorOrTensors = Tensor | Iterable[Tensor]


def _tensor_list(name: str, tensors: Any) -> list[Tensor]:
    """``tensors`` as a list (a single tensor becomes ``[tensor]``); typed errors otherwise."""
    if isinstance(tensors, Tensor):
        return [tensors]
    if not isinstance(tensors, Iterable):
        raise TypeError(
            f"{name} must be a tensor or an iterable of tensors, got {type(tensors).__name__}"
        )
    out = list(tensors)
    for index, item in enumerate(out):
        if item is None:
            raise TypeError(
                f"{name}[{index}] is None: pass the gradients that exist, e.g. "
                "[p.grad for p in params if p.grad is not None]"
            )
        if not isinstance(item, Tensor):
            raise TypeError(f"{name}[{index}] must be a tensor, got {type(item).__name__}")
    return out


def _check_flag(name: str, value: Any, *, allow_none: bool) -> None:
    if not (isinstance(value, bool) or (allow_none and value is None)):
        choices = "True, False or None" if allow_none else "True or False"
        raise TypeError(f"{name} must be {choices}, got {value!r}")


def _check_bound(name: str, value: Any) -> float:
    """A real number in [0, inf] (``inf``: no clipping); torch's meaning for every one."""
    if not is_real(value):
        raise TypeError(f"{name} must be a real number >= 0 (inf: no clipping), got {value!r}")
    bound = float(value)
    if not bound >= 0.0:  # also NaN
        raise ValueError(
            f"{name} must be >= 0 (0 <= {name} <= inf), got {value!r}; a negative bound would "
            "flip the gradients' signs"
        )
    return bound


def _result_dtype(tensors: list[Tensor]) -> torch.dtype:
    """The dtype torch's norm has: the gradients' dtypes promoted, made real (float32 for none)."""
    if not tensors:
        return torch.float32
    # Promote the distinct dtypes only: torch.promote_types is an aten dispatch (host
    # work, no kernel), and gradients usually share one dtype.
    dtype = functools.reduce(torch.promote_types, dict.fromkeys(t.dtype for t in tensors))
    return dtype.to_real() if dtype.is_complex else dtype


def _as_torch_result(total_norm: Tensor, measured: list[Tensor], like: list[Tensor]) -> Tensor:
    """The norm as torch returns it: the gradients' dtype; a DTensor for DTensor gradients.

    The DTensor is ``Replicate`` on every dimension of the (root) mesh of the first
    DTensor in ``like``: its local value, its ``full_tensor()`` and ``to_local()``
    are all the global norm, without communication.
    """
    total_norm = total_norm.to(_result_dtype(measured))
    first = next((t for t in like if is_dtensor(t)), None)
    if first is None:
        return total_norm
    from torch.distributed.tensor import DTensor, Replicate

    mesh = root_mesh(first.device_mesh)  # type: ignore[attr-defined]
    return DTensor.from_local(total_norm, mesh, [Replicate()] * mesh.ndim, run_check=False)


def _raise_if_nonfinite(total_norm: Tensor, norm_type: float, error_if_nonfinite: bool) -> None:
    """torch's ``error_if_nonfinite`` check (a host read, only when asked for)."""
    if error_if_nonfinite and not bool(torch.isfinite(total_norm)):
        raise NonFiniteNormError(
            f"The total norm of order {norm_type} for gradients from `parameters` is "
            "non-finite, so it cannot be clipped. To disable this error and scale the "
            "gradients by the non-finite norm anyway, set `error_if_nonfinite=False`"
        )


def _global_norm(
    tensors: list[Tensor],
    norm_type: Any,
    error_if_nonfinite: bool,
    foreach: bool | None,
    model: torch.nn.Module | None,
    pipeline_groups: Any,
    of: str,
) -> tuple[ReductionPlan, Tensor]:
    """The plan over ``tensors`` and the global norm (in the accumulation dtype).

    Nothing to measure and nothing to reduce gives torch's ``tensor(0.)``.
    """
    p = validate_norm_type(norm_type)
    _check_flag("error_if_nonfinite", error_if_nonfinite, allow_none=False)
    _check_flag("foreach", foreach, allow_none=True)
    plan = ReductionPlan.build(tensors, model=model, pipeline_groups=pipeline_groups, of=of)
    if not tensors and plan.num_collectives == 0:
        return plan, torch.tensor(0.0)
    total_norm = plan.total_norm(p, foreach=foreach)
    _raise_if_nonfinite(total_norm, p, error_if_nonfinite)
    return plan, total_norm


@torch.no_grad()
def get_total_norm(
    tensors: TensorOrTensors,
    norm_type: float | str = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    model: torch.nn.Module | None = None,
    pipeline_groups: Any = None,
) -> Tensor:
    """The global ``norm_type``-norm of ``tensors`` (the gradients), as torch's namesake.

    ``tensors`` are measured as given: pass the gradients, e.g.
    ``[p.grad for p in params if p.grad is not None]``. Every element of the job
    counts once, however it is laid out; the result is identical on every rank.

    A tensor's layout is read from itself (a DTensor; an explicit
    :func:`~distclip.mark_layout` on it) or, with ``model=``, from the parameter of
    ``model`` whose ``.grad`` it is (FSDP1's flat shards, tied copies, explicit
    layouts); with ``model=``, every process group ``model``'s gradients are reduced
    over is joined even by a rank that passes none of them. Without ``model=``,
    every rank must pass tensors of the same layouts (as for torch's DTensor norm).

    Args:
        tensors: a tensor or an iterable of tensors to measure.
        norm_type: any p (``0``: the number of non-zero elements; negative p;
            ``inf`` / ``-inf``: the largest / smallest ``|x|``), also as a string.
        error_if_nonfinite: raise if the norm is NaN or +-inf (a host read).
        foreach: use the foreach kernels (``None``: where the device has them;
            ``True`` on a device without them is an error).
        model: the model whose parameters own the gradients (needed for FSDP1).
        pipeline_groups: process group(s) summing the pipeline stages' norms.

    Returns:
        A 0-dim tensor in the gradients' dtype (promoted; float32 for none), on the
        first tensor's device; for DTensor gradients a ``Replicate`` DTensor whose
        ``full_tensor()`` is the global norm. ``tensor(0.)`` for no tensors at all.

    Raises:
        TypeError: ``tensors`` holds something that is not a tensor, or an integer
            tensor; a wrong type of ``norm_type``, ``error_if_nonfinite`` or ``foreach``.
        ValueError: a NaN ``norm_type``; FSDP1 gradients without ``model=``.
        NonFiniteNormError: (a ``RuntimeError``) the norm is not finite and
            ``error_if_nonfinite``.
    """
    items = _tensor_list("tensors", tensors)
    for index, item in enumerate(items):
        if not (item.is_floating_point() or item.is_complex()):
            raise TypeError(
                f"tensors[{index}] has dtype {item.dtype}: a norm needs floating point or "
                "complex tensors (as torch's); convert it, e.g. t.float()"
            )
    _, total_norm = _global_norm(
        items, norm_type, error_if_nonfinite, foreach, model, pipeline_groups, "value"
    )
    return _as_torch_result(total_norm, items, items)


@torch.no_grad()
def grad_norm(
    parameters: TensorOrTensors,
    norm_type: float | str = 2.0,
    *,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    model: torch.nn.Module | None = None,
    pipeline_groups: Any = None,
) -> Tensor:
    """The global norm of the gradients of ``parameters`` (their ``.grad``); changes nothing.

    What :func:`clip_grad_norm_` measures before it clips (``get_total_norm`` of
    distclip 0.1 meant this; since 0.2 ``get_total_norm`` measures the tensors it
    is given, as torch's does). Parameters without a gradient count as zero; the
    returned norm is as :func:`get_total_norm` returns it.
    """
    params = _tensor_list("parameters", parameters)
    plan, total_norm = _global_norm(
        params, norm_type, error_if_nonfinite, foreach, model, pipeline_groups, "grad"
    )
    return _as_torch_result(total_norm, plan.grads(), params)


@torch.no_grad()
def clip_grads_with_norm_(
    parameters: TensorOrTensors,
    max_norm: float,
    total_norm: Tensor,
    foreach: bool | None = None,
) -> None:
    """Scale the gradients of ``parameters`` by ``min(1, max_norm / (total_norm + 1e-6))``.

    torch's second phase: ``total_norm`` comes from :func:`get_total_norm` (or
    torch's; a DTensor norm is read with ``full_tensor()``, which for torch's
    ``Partial`` norm is a collective every rank must join). Only local shards are
    touched: no communication of distclip's own, no host read.

    Raises:
        TypeError: ``total_norm`` is not a tensor; ``max_norm`` is not a number.
        ValueError: ``max_norm`` is negative or NaN.
    """
    params = _tensor_list("parameters", parameters)
    bound = _check_bound("max_norm", max_norm)
    _check_flag("foreach", foreach, allow_none=True)
    if not isinstance(total_norm, Tensor):
        raise TypeError(
            f"total_norm must be a tensor (what get_total_norm returns), got {total_norm!r}"
        )
    if is_dtensor(total_norm):
        total_norm = total_norm.full_tensor()  # type: ignore[attr-defined]
    grads = [local_tensor(p.grad) for p in params if p.grad is not None]
    coef = clip_coefficient(torch.full_like(total_norm, bound), total_norm)
    scale_(grads, coef, foreach=foreach)


@torch.no_grad()
def clip_grad_norm_(
    parameters: TensorOrTensors,
    max_norm: float,
    norm_type: float | str = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    model: torch.nn.Module | None = None,
    pipeline_groups: Any = None,
) -> Tensor:
    """Clip the gradients in place to a global norm of at most ``max_norm``; return the norm.

    torch's contract (:func:`grad_norm` of ``parameters``, then the coefficient
    ``min(1, max_norm / (total_norm + 1e-6))`` multiplied in without a host sync),
    with the global norm on every layout. The coefficient is taken from the norm as
    accumulated (float32 or float64), before the cast to the gradients' dtype.

    Warns:
        UserWarning: ``parameters`` is an empty generator (nothing is clipped); FSDP1
            (``model=``) and this rank holds no gradient (the norm is then float32).

    Raises:
        TypeError, ValueError: as :func:`get_total_norm`; ``max_norm`` negative/NaN.
        NonFiniteNormError: the norm is not finite and ``error_if_nonfinite``
            (before any gradient is modified).
    """
    is_generator = isinstance(parameters, types.GeneratorType)
    params = _tensor_list("parameters", parameters)
    if is_generator and not params:
        warnings.warn(
            "`parameters` is an empty generator, no gradient clipping will occur.",
            stacklevel=3,
        )
    bound = _check_bound("max_norm", max_norm)
    plan, total_norm = _global_norm(
        params, norm_type, error_if_nonfinite, foreach, model, pipeline_groups, "grad"
    )
    grads = plan.grads()
    coef = clip_coefficient(torch.full_like(total_norm, bound), total_norm)
    scale_(grads, coef, foreach=foreach)
    if not grads and any(g.kind == "fsdp1" for g in plan.groups):
        warnings.warn(
            f"Called distclip.clip_grad_norm_() on rank {dist.get_rank()} with no gradients "
            "-- returning the total norm in the default dtype torch.float32",
            stacklevel=3,
        )
    return _as_torch_result(total_norm, grads, params)


@torch.no_grad()
def clip_grad_value_(
    parameters: TensorOrTensors,
    clip_value: float,
    foreach: bool | None = None,
) -> None:
    """Clamp every gradient element of ``parameters`` into ``[-clip_value, clip_value]``.

    torch's contract. Element by element, so exact on every layout without any
    communication (each rank clamps its own shards).

    Raises:
        TypeError: ``clip_value`` is not a number; ``parameters`` holds a non-tensor.
        ValueError: ``clip_value`` is negative or NaN.
    """
    params = _tensor_list("parameters", parameters)
    bound = _check_bound("clip_value", clip_value)
    _check_flag("foreach", foreach, allow_none=True)
    clamp_([local_tensor(p.grad) for p in params if p.grad is not None], bound, foreach=foreach)
