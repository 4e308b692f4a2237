"""Pieces of tensors inside flat buffers (an engine's partitions), as a clipper's pieces.

An engine such as DeepSpeed keeps each rank's share of several parameters (or of
their fp32 copies) in flat buffers, cut at arbitrary offsets: a tensor, and even a
weight row, may straddle two ranks. The engine describes its layout once as
:class:`TensorFragment` s; :class:`FlatUnits` turns that into the units of a method
(whole tensors, or rows) once; each step, :class:`FlatPieces` gives a piecewise
clipper this rank's partial sums per unit, completed by one all-reduce over the ranks
sharing the buffers, and scales the pieces by the units' factors. Every rank that
shares the reduction must take part, with or without pieces.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from distclip.functional import clamp_

__all__ = ["AllReduce", "FlatPieces", "FlatUnits", "TensorFragment"]

#: Sums a 1-D tensor over the ranks that share the fragments (in place or not) and
#: returns the sum; supplied by the engine's integration, which knows the group.
AllReduce = Callable[[Tensor], Tensor]


class TensorFragment(NamedTuple):
    """A contiguous piece of one parameter tensor inside a flat buffer.

    Attributes:
        buffer: which flat buffer holds the piece (an index into the step's buffers).
        tensor: which whole tensor the piece belongs to (an index into the shapes).
        offset: where the piece starts in its flat buffer.
        numel: how many elements it has (> 0).
        start: where it starts in the flattened whole tensor.
    """

    buffer: int
    tensor: int
    offset: int
    numel: int
    start: int


class FlatUnits(NamedTuple):
    """Where the units of a set of fragments lie (made once per layout, on the device).

    Attributes:
        unit: ``"tensor"`` or ``"row"`` (see :mod:`distclip.clippers.pieces`).
        fragments: this rank's fragments.
        runs: row units: ``(buffer, offset, rows, width, first_row)`` per run of one or
            more whole or partial rows inside one fragment (``rows`` rows of ``width``
            elements from ``offset``, the first being unit ``first_row``); empty for
            tensor units.
        unit_of: the unit of each fragment (tensor units), or of each row of the
            concatenated runs (row units), int64 on the device.
        num_units: how many units the whole tensors have together.
    """

    unit: str
    fragments: list[TensorFragment]
    runs: list[tuple[int, int, int, int, int]]
    unit_of: Tensor
    num_units: int

    @classmethod
    def build(
        cls,
        unit: str,
        shapes: Sequence[Sequence[int]],
        fragments: Sequence[TensorFragment],
        device: torch.device | None = None,
    ) -> FlatUnits:
        """The units of ``fragments`` of the tensors ``shapes`` (the same list on every rank).

        A row unit is an output row of a tensor with 2 or more dimensions and the whole
        tensor otherwise. A fragment may start or end inside a row (a partition
        boundary): that partial row is a run of its own, and its partial sums are added
        to the other ranks' by the reduction.
        """
        fragments = list(fragments)
        if unit == "tensor":
            unit_of = torch.tensor([f.tensor for f in fragments], dtype=torch.long, device=device)
            return cls(unit, fragments, [], unit_of, len(shapes))
        first_rows, widths = [], []
        num_rows = 0
        for shape in shapes:
            numel = math.prod(shape)
            rows = shape[0] if len(shape) >= 2 else 1
            first_rows.append(num_rows)
            widths.append(numel // rows if rows else 0)
            num_rows += rows if numel else 0
        runs: list[tuple[int, int, int, int, int]] = []
        for frag in fragments:
            width = widths[frag.tensor]
            position, end, offset = frag.start, frag.start + frag.numel, frag.offset
            while position < end:
                row, within = divmod(position, width)
                if within:  # a partial row at the start
                    count, rows = min(width - within, end - position), 1
                elif end - position >= width:  # whole rows
                    rows = (end - position) // width
                    count = rows * width
                else:  # a partial row at the end
                    count, rows = end - position, 1
                runs.append(
                    (frag.buffer, offset, rows, count // rows, first_rows[frag.tensor] + row)
                )
                position += count
                offset += count
        rows_of = [row + k for _, _, rows, _, row in runs for k in range(rows)]
        unit_of = torch.tensor(rows_of, dtype=torch.long, device=device)
        return cls(unit, fragments, runs, unit_of, num_rows)


class FlatPieces:
    """One step's flat gradient buffers as :class:`~distclip.clippers.pieces.Pieces`.

    Args:
        units: the :class:`FlatUnits` of the buffers' layout (``None``: element units,
            no layout needed).
        grads: the flat gradient buffers (``None``: no gradient; those pieces count 0
            and are not scaled).
        weights: the flat parameter buffers, laid out as ``grads`` (for ``weights=``
            sums).
        all_reduce: sums a 1-D tensor over the ranks sharing the buffers (``None``:
            this rank holds every piece).
    """

    def __init__(
        self,
        units: FlatUnits | None,
        grads: Sequence[Tensor | None],
        weights: Sequence[Tensor] = (),
        all_reduce: AllReduce | None = None,
    ) -> None:
        self.units = units
        self.grads = list(grads)
        self.weights = list(weights)
        self.all_reduce = all_reduce
        self._views: list[tuple[int, Tensor]] | None = None

    def clamp_(self, bound: float) -> None:
        clamp_([g for g in self.grads if g is not None], bound)

    def _layout(self) -> FlatUnits:
        if self.units is None:
            raise ValueError("element pieces have no units (give FlatPieces a FlatUnits)")
        return self.units

    def _reduced(self, sums: Tensor) -> Tensor:
        return sums if self.all_reduce is None else self.all_reduce(sums).to(sums.device)

    def unit_sums(self, norm_type: float) -> Tensor:
        return self._sums(norm_type, weights=False)[0]

    def unit_sums_with_weights(self, norm_type: float) -> tuple[Tensor, Tensor]:
        sums = self._sums(norm_type, weights=True)
        return sums[0], sums[1]

    def _sums(self, norm_type: float, *, weights: bool) -> Tensor:
        """``(1 or 2, units)``: the gradients' (and the weights') sums, one reduction."""
        units = self._layout()
        if math.isinf(norm_type) or norm_type <= 0:
            raise ValueError(
                f"distclip: flat pieces sum partial power sums, so they need a norm_type "
                f"p > 0 (finite), got {norm_type!r}"
            )
        if units.unit == "row":
            return self._row_sums(units, norm_type, weights)
        return self._tensor_sums(units, norm_type, weights)

    def _tensor_sums(self, units: FlatUnits, norm_type: float, weights: bool) -> Tensor:
        present = [i for i, f in enumerate(units.fragments) if self.grads[f.buffer] is not None]
        pieces = [self._narrow(self.grads, units.fragments[i]) for i in present]
        device = pieces[0].device if pieces else units.unit_of.device
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in pieces) else torch.float32
        rows = 2 if weights else 1
        sums = torch.zeros(rows, units.num_units, device=device, dtype=dtype)
        if pieces:
            index = units.unit_of.to(device)
            if len(present) != len(units.fragments):
                index = index[torch.tensor(present, dtype=torch.long, device=device)]
            sums[0].index_add_(0, index, _piece_powsums(pieces, norm_type, dtype))
            if weights:
                held = [self._narrow(self.weights, units.fragments[i]) for i in present]
                sums[1].index_add_(0, index, _piece_powsums(held, norm_type, dtype))
        return self._reduced(sums.reshape(-1)).reshape(rows, units.num_units)

    def _row_sums(self, units: FlatUnits, norm_type: float, weights: bool) -> Tensor:
        device = self.weights[0].device if self.weights else units.unit_of.device
        buffers = self.weights or [g for g in self.grads if g is not None]
        acc = torch.float64 if any(b.dtype == torch.float64 for b in buffers) else torch.float32
        num = units.num_units
        sums = torch.zeros(2 if weights else 1, num, device=device, dtype=acc)
        grad_parts: list[Tensor] = []
        weight_parts: list[Tensor] = []
        for buffer, offset, rows, width, _ in units.runs:
            grad_buffer = self.grads[buffer]
            if grad_buffer is None:
                grad_parts.append(torch.zeros(rows, device=device, dtype=acc))
            else:
                grad = grad_buffer.narrow(0, offset, rows * width).view(rows, width)
                grad_parts.append(_row_powsum(grad, norm_type, acc))
            if weights:
                weight = self.weights[buffer].narrow(0, offset, rows * width).view(rows, width)
                weight_parts.append(_row_powsum(weight, norm_type, acc))
        if units.runs:
            index = units.unit_of.to(device)
            sums[0].index_add_(0, index, torch.cat(grad_parts).to(device))
            if weights:
                sums[1].index_add_(0, index, torch.cat(weight_parts).to(device))
        return self._reduced(sums.reshape(-1)).reshape(-1, num)

    @staticmethod
    def _narrow(buffers: Sequence[Tensor | None], fragment: TensorFragment) -> Tensor:
        buffer = buffers[fragment.buffer]
        assert buffer is not None
        return buffer.narrow(0, fragment.offset, fragment.numel)

    def scale_(self, factors: Tensor) -> None:
        units = self._layout()
        if units.unit == "row":
            for buffer, offset, rows, width, row in units.runs:
                grad_buffer = self.grads[buffer]
                if grad_buffer is None:
                    continue
                grad = grad_buffer.narrow(0, offset, rows * width).view(rows, width)
                grad.mul_(factors[row : row + rows].unsqueeze(1).to(grad.device, grad.dtype))
            return
        for fragment in units.fragments:
            if self.grads[fragment.buffer] is not None:
                piece = self._narrow(self.grads, fragment)
                piece.mul_(factors[fragment.tensor].to(piece.device, piece.dtype))


def _piece_powsums(pieces: list[Tensor], norm_type: float, dtype: torch.dtype) -> Tensor:
    """``||piece||_p ** p`` of each piece (1-D, on the first piece's device); no host copy."""
    device = pieces[0].device
    same = all(p.device == device and p.dtype == pieces[0].dtype for p in pieces)
    if same and device.type != "meta":
        norms = torch.stack(list(torch._foreach_norm(pieces, norm_type, dtype=dtype)))
    else:
        norms = torch.stack(
            [torch.linalg.vector_norm(p, norm_type, dtype=dtype).to(device) for p in pieces]
        )
    return norms.pow(norm_type)


def _row_powsum(matrix: Tensor, norm_type: float, dtype: torch.dtype) -> Tensor:
    """Each row's ``||row||_p ** p`` (1-D)."""
    norms: Tensor = torch.linalg.vector_norm(matrix, norm_type, dim=1, dtype=dtype)
    return norms.square() if norm_type == 2.0 else norms.pow(norm_type)
