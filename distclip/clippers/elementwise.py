"""Clipping that needs no global threshold: value (coordinate-wise) and layer-wise."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from distclip.clippers.base import Clipper
from distclip.clippers.config import ClipConfig, check_positive_finite
from distclip.clippers.stats import ClipStats
from distclip.functional import clamp_, powsum_to_norm, scale_each_
from distclip.reduction import ReductionPlan, local_tensor

__all__ = [
    "AllReduce",
    "CoordinateWiseClip",
    "LayerWiseClip",
    "LayerWiseConfig",
    "TensorFragment",
    "ValueClip",
    "ValueConfig",
]

#: Sums a 1-D tensor over the ranks that share the fragments (in place or not) and
#: returns the sum; supplied by the integration that knows the process group.
AllReduce = Callable[[Tensor], Tensor]


class TensorFragment(NamedTuple):
    """A contiguous piece of one parameter tensor inside a flat buffer (a ZeRO partition).

    Attributes:
        buffer: which flat buffer holds the piece (an index into the buffers given to
            ``clip_fragments_``).
        tensor: which whole tensor the piece belongs to (an index into the shapes
            given to ``fragment_plan``).
        offset: where the piece starts in its flat buffer.
        numel: how many elements it has (> 0).
        start: where it starts in the flattened whole tensor.
    """

    buffer: int
    tensor: int
    offset: int
    numel: int
    start: int


@dataclass
class _FragmentStep:
    """A step observed from an engine whose gradients are clipped afterwards, piece by piece."""

    finite: Tensor
    coef: Tensor
    base_clipped: Tensor
    clipped: Tensor


def _piece_powsums(
    pieces: list[Tensor], norm_type: float, dtype: torch.dtype, foreach: bool | None
) -> Tensor:
    """``||piece||_p ** p`` of each piece (1-D, on the first piece's device); no host copy."""
    device = pieces[0].device
    same = all(p.device == device and p.dtype == pieces[0].dtype for p in pieces)
    if same and foreach is not False and device.type != "meta":
        norms = torch.stack(list(torch._foreach_norm(pieces, norm_type, dtype=dtype)))
    else:
        norms = torch.stack(
            [torch.linalg.vector_norm(p, norm_type, dtype=dtype).to(device) for p in pieces]
        )
    return norms.pow(norm_type)


def observe_for_fragments(
    clipper: Clipper, total_norm: Tensor, threshold: float, *, counts_clipped: bool
) -> ClipStats:
    """Record a step whose norm an engine computed; its gradients come later, in fragments.

    Shared by :meth:`LayerWiseClip.observe_fragments_` and ``AGC.observe_fragments_``:
    the norm updates the counters as in :meth:`Clipper.clip_` (``num_skipped``, the
    consistency checks); ``clip_coef`` starts at 1 and ``num_clipped`` at its value
    before the step, and each later ``clip_fragments_`` of this step lowers / raises
    them in place (the returned stats' tensors are those it updates; ``clipped`` only
    with ``counts_clipped``). No host read,
    except with ``nonfinite="error"``.
    """
    total_norm = total_norm.detach().to(clipper.plan.device, clipper.plan.dtype).reshape(())
    finite = clipper._finite_or_raise(total_norm)
    skipped = torch.logical_not(finite)
    clipper._count(skipped, None)
    level = torch.full_like(total_norm, threshold)
    step = _FragmentStep(
        finite=finite,
        coef=torch.ones_like(total_norm),
        base_clipped=clipper.num_clipped.clone(),
        clipped=torch.zeros((), dtype=torch.bool, device=finite.device),
    )
    stats = clipper._finish_step(
        total_norm, level, step.coef, skipped, clipped=step.clipped if counts_clipped else None
    )
    clipper._fragment_step = step  # type: ignore[attr-defined]
    return stats


def fragment_step(clipper: Clipper) -> _FragmentStep:
    """The step :func:`observe_for_fragments` opened; raise if there is none."""
    step = getattr(clipper, "_fragment_step", None)
    if step is None:
        raise RuntimeError(
            f"distclip {clipper.method}: clip_fragments_ needs the step's global norm first "
            "(observe_fragments_)"
        )
    return step  # type: ignore[no-any-return]


def record_fragments(
    clipper: Clipper, step: _FragmentStep, smallest: Tensor, clipped: Tensor | None
) -> None:
    """Lower the step's ``clip_coef`` to ``smallest``; count ``clipped`` once per step."""
    step.coef.copy_(torch.minimum(step.coef, smallest.to(step.coef.device, step.coef.dtype)))
    if clipped is not None:
        step.clipped |= clipped.to(step.clipped.device)
        counted = (step.finite & step.clipped).to(clipper.num_clipped.device, torch.long)
        clipper.num_clipped.copy_(step.base_clipped.to(clipper.num_clipped.device) + counted)


@dataclass(frozen=True)
class ValueConfig(ClipConfig):
    """Options of value clipping (plus the common ones of :class:`ClipConfig`).

    Attributes:
        clip_value: every gradient element is clamped to ``[-clip_value, clip_value]``;
            a positive finite number (default 1.0).
    """

    clip_value: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set("clip_value", check_positive_finite("clip_value", self.clip_value))


class ValueClip(Clipper):
    r"""Value clipping: :math:`g \leftarrow \operatorname{clamp}(g, -v, v)` element by element.

    The clamp is local: it needs no communication. The global norm is still reduced
    (one scalar) for ``last_clip.total_norm`` and for skipping NaN/inf steps on every
    rank alike. The clamp is two foreach kernels with the bound as a number, so it is
    applied on a skipped step too (an inf becomes the bound, a NaN stays NaN); the
    update of a skipped step is not applied either way. ``last_clip.clip_coef`` is 1
    (no single factor describes an element-wise clamp) and ``num_clipped`` is not
    counted (it would need another reduction).
    """

    method = "value"
    supports_external_norm = False
    class_prefix = "ValueClipped"
    config_cls = ValueConfig
    config: ValueConfig

    def _apply(
        self, plan: ReductionPlan, total_norm: Tensor, finite: Tensor, measured: Any
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        self.clamp_(plan.grads())
        threshold = torch.full_like(total_norm, self.config.clip_value)
        return threshold, self._one, None

    @torch.no_grad()
    def observe_clamp_(self, total_norm: Tensor) -> ClipStats:
        """Record a step whose norm an engine computed and whose clamp the caller applies.

        For engines that compute the pre-clip global norm themselves (DeepSpeed): the
        norm updates the counters exactly as in :meth:`clip_` (``num_skipped`` for a
        NaN/inf norm, the consistency checks), but no gradient is touched; the caller
        clamps with :meth:`clamp_` and does not clip by the norm. The stats are those
        of :meth:`clip_`: ``threshold`` is ``clip_value``, ``clip_coef`` 1. No host
        read, except with ``nonfinite="error"``.

        Raises:
            NonFiniteNormError: as in :meth:`clip_`.
        """
        total_norm = total_norm.detach().to(self.plan.device, self.plan.dtype).reshape(())
        finite = self._finite_or_raise(total_norm)
        skipped = torch.logical_not(finite)
        self._count(skipped, None)
        threshold = torch.full_like(total_norm, self.config.clip_value)
        return self._finish_step(total_norm, threshold, torch.ones_like(total_norm), skipped)

    @torch.no_grad()
    def clamp_(self, grads: Iterable[Tensor]) -> None:
        """Clamp every element of ``grads`` to ``[-clip_value, clip_value]``, in place.

        Element by element, so exact on any piece of the gradients (a flat ZeRO
        partition included); no communication, no host read. Two foreach kernels per
        (device, dtype) group where the device has them, one clamp per tensor otherwise.
        """
        clamp_(list(grads), self.config.clip_value, foreach=self.config.foreach)


class CoordinateWiseClip(ValueClip):
    """Coordinate-wise clipping (the torch-clip name of value clipping); see :class:`ValueClip`."""

    method = "coordinate_wise"
    class_prefix = "CoordinateWiseClipped"


@dataclass(frozen=True)
class LayerWiseConfig(ClipConfig):
    """Options of layer-wise clipping (plus the common ones of :class:`ClipConfig`).

    Attributes:
        max_norm: the bound on each parameter tensor's gradient norm (default 1.0).
    """

    max_norm: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set("max_norm", check_positive_finite("max_norm", self.max_norm))


class LayerWiseClip(Clipper):
    r"""Layer-wise clipping: each tensor :math:`i` by :math:`c_i = \min(1, \lambda / (\|g_i\| + \epsilon))`.

    :math:`\|g_i\|` is the tensor's norm over all its shards: one all-reduce of the
    vector of per-tensor power sums per process group (not one per tensor). The
    global norm is derived from the same vector. ``last_clip.clip_coef`` is the
    smallest :math:`c_i`; ``num_clipped`` counts steps where any tensor was clipped.
    """

    method = "layer_wise"
    supports_external_norm = False
    class_prefix = "LayerWiseClipped"
    config_cls = LayerWiseConfig
    config: LayerWiseConfig

    def _measure(self, plan: ReductionPlan) -> tuple[Tensor, Any]:
        norm_type = self.config.norm_type
        powsums = plan.per_tensor_powsums(norm_type, foreach=self.config.foreach)
        return plan.total_from_powsums(powsums, norm_type), powsums

    def _apply(
        self, plan: ReductionPlan, total_norm: Tensor, finite: Tensor, measured: Any
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        norms = powsum_to_norm(measured, self.config.norm_type)
        threshold = torch.full_like(total_norm, self.config.max_norm)
        coefs = (threshold / (norms + self.config.eps)).clamp(max=1.0)
        coefs = torch.where(finite, coefs, 1.0)
        factors = coefs.unbind(0)
        present = [i for i, param in enumerate(plan.params) if param.grad is not None]
        scale_each_(
            [local_tensor(plan.params[i].grad) for i in present],  # type: ignore[arg-type]
            [factors[i] for i in present],
            foreach=self.config.foreach,
        )
        smallest = coefs.amin() if coefs.numel() else torch.ones_like(total_norm)
        return threshold, smallest, (coefs < 1.0).any()

    # ------------------------------------------------ engines with flat partitions
    @torch.no_grad()
    def observe_fragments_(self, total_norm: Tensor) -> ClipStats:
        """Record a step whose global norm an engine computed (DeepSpeed).

        The gradients are clipped afterwards by :meth:`clip_fragments_`, wherever the
        engine keeps them. ``threshold`` is ``max_norm``; ``clip_coef`` (the smallest
        :math:`c_i`) and ``num_clipped`` are completed in place by
        :meth:`clip_fragments_`. A NaN/inf ``total_norm`` counts as a skipped step and
        leaves the gradients unscaled. No host read, except with ``nonfinite="error"``.

        Raises:
            NonFiniteNormError: as in :meth:`clip_`.
        """
        return observe_for_fragments(self, total_norm, self.config.max_norm, counts_clipped=True)

    def fragment_plan(
        self,
        shapes: Sequence[Sequence[int]],
        fragments: Sequence[TensorFragment],
        device: torch.device | None = None,
    ) -> tuple[Tensor, int]:
        """What :meth:`clip_fragments_` needs of a layout: computed once, reused each step.

        Args:
            shapes: the shape of every whole tensor the fragments belong to (the same
                list on every rank that shares the reduction).
            fragments: this rank's pieces of those tensors.
            device: where the gradients will be (the index is made there once, so the
                steps copy nothing from the host).

        Returns:
            ``(units, num_units)``: the tensor index of each fragment (int64) and
            ``len(shapes)``.
        """
        units = torch.tensor([f.tensor for f in fragments], dtype=torch.long, device=device)
        return units, len(shapes)

    @torch.no_grad()
    def clip_fragments_(
        self,
        plan: tuple[Tensor, int],
        fragments: Sequence[TensorFragment],
        grads: Sequence[Tensor | None],
        all_reduce: AllReduce | None = None,
    ) -> None:
        r"""Scale each piece of each tensor by :math:`c_i = \min(1, \lambda / (\|g_i\| + \epsilon))`.

        :math:`\|g_i\|` is the norm of tensor ``i`` over all its pieces on all ranks:
        this rank's per-tensor power sums, summed over the ranks by ``all_reduce``
        (``None``: this rank holds every piece), one call for the whole vector. Every
        rank that shares the reduction must call this, with or without pieces.

        Args:
            plan: :meth:`fragment_plan` of ``fragments``.
            fragments: this rank's pieces, in the order ``plan`` was made from.
            grads: the flat gradient buffers the fragments index (``None``: no
                gradient; those pieces are neither counted nor scaled).
            all_reduce: sums a 1-D tensor over the ranks (``None``: no reduction).

        Raises:
            ValueError: ``norm_type`` is not a finite p > 0 (``all_reduce`` sums).
            RuntimeError: no step was opened by :meth:`observe_fragments_`.
        """
        step = fragment_step(self)
        norm_type = self.config.norm_type
        if not 0.0 < norm_type < math.inf:
            raise ValueError(
                "distclip layer_wise: clip_fragments_ needs a finite norm_type p > 0 (its "
                f"all_reduce sums power sums), got {norm_type}"
            )
        units, num_units = plan
        present = [i for i, f in enumerate(fragments) if grads[f.buffer] is not None]
        pieces = [
            grads[fragments[i].buffer].narrow(0, fragments[i].offset, fragments[i].numel)  # type: ignore[union-attr]
            for i in present
        ]
        device = pieces[0].device if pieces else step.finite.device
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in pieces) else torch.float32
        powsums = torch.zeros(num_units, device=device, dtype=dtype)
        if pieces:
            local = _piece_powsums(pieces, norm_type, dtype, self.config.foreach)
            index = units.to(device)
            if len(present) != len(fragments):
                index = index[torch.tensor(present, dtype=torch.long, device=device)]
            powsums.index_add_(0, index, local)
        if all_reduce is not None:
            powsums = all_reduce(powsums).to(device)
        norms = powsum_to_norm(powsums, norm_type)
        coefs = (self.config.max_norm / (norms + self.config.eps)).clamp(max=1.0)
        coefs = torch.where(step.finite.to(device), coefs, torch.ones_like(coefs))
        for i, piece in zip(present, pieces, strict=True):
            piece.mul_(coefs[fragments[i].tensor].to(piece.dtype))
        if num_units:
            record_fragments(self, step, coefs.amin(), (coefs < 1.0).any())
