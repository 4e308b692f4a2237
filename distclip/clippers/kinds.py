"""The two kinds of clipper, and the one way into each from an engine.

* A **global-factor** clipper (:class:`GlobalFactorClipper`: norm, autoclip, zclip, the
  stochastic family) multiplies every gradient by one factor decided from the global
  norm. Its method implements :meth:`GlobalFactorClipper.decide` (or just
  :meth:`GlobalFactorClipper.threshold`): the one place where ``(threshold, coef,
  clipped)`` are decided and the method's state is updated. Natively
  :meth:`~GlobalFactorClipper.clip_` reduces the norm through the plan; an engine that
  computed the norm itself (DeepSpeed) calls :meth:`~GlobalFactorClipper.observe_` and
  applies ``stats.engine_threshold``.
* A **piecewise** clipper (:class:`PiecewiseClipper`: value, layer-wise, AGC) clips
  pieces of the gradients, each by its own unit's norm: an element, a tensor, a row.
  Its method implements :meth:`PiecewiseClipper.clip_units_` on
  :class:`~distclip.clippers.pieces.Pieces`: local tensors plus the reduction that
  makes their units' norms global. Natively the pieces come from the reduction plan
  (:class:`~distclip.clippers.pieces.PlanPieces`); an engine opens the step with its
  own norm (:meth:`~PiecewiseClipper.begin_pieces_`) and then hands over its pieces
  (:meth:`~PiecewiseClipper.clip_pieces_`, e.g.
  :class:`~distclip.clippers.flat_pieces.FlatPieces` of DeepSpeed's partitions), any
  number of times in the step. The global norm alone cannot drive it
  (:meth:`~PiecewiseClipper.observe_` refuses).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from distclip.clippers.base import Clipper
from distclip.clippers.pieces import Pieces, PlanPieces
from distclip.clippers.stats import ClipStats
from distclip.functional import clip_coefficient, scale_
from distclip.reduction import ReductionPlan

__all__ = ["Decision", "GlobalFactorClipper", "PiecewiseClipper", "Units"]


class Decision(NamedTuple):
    """What a global-factor method decided for one step (0-dim tensors).

    Attributes:
        threshold: this step's threshold (``inf``: nothing bounds the gradients).
        coef: the factor every gradient is multiplied by, in [0, 1]; 1 on a skipped step.
        clipped: bool, true when the factor changes the gradients (false when skipped).
        engine_threshold: what an engine clipping by ``min(1, t / (n + eps))`` must use
            as ``t`` to apply ``coef`` (``threshold`` itself for a threshold rule);
            ``None`` when no engine asked for it.
    """

    threshold: Tensor
    coef: Tensor
    clipped: Tensor
    engine_threshold: Tensor | None = None


class GlobalFactorClipper(Clipper):
    """A clipper whose rule is one factor for all gradients, decided from the global norm."""

    kind: ClassVar[str] = "global"

    def threshold(self, total_norm: Tensor, finite: Tensor) -> Tensor:
        """This step's threshold (0-dim, on ``total_norm``'s device); updates the state.

        Called once per step with the global norm and whether it is finite (a method
        must leave its state unchanged when it is not). Implement this for a method
        whose factor is ``min(1, threshold / (n + eps))``, or :meth:`decide` for any
        other rule.
        """
        raise NotImplementedError(f"{type(self).__name__} implements neither threshold nor decide")

    def decide(self, total_norm: Tensor, finite: Tensor, *, engine: bool = False) -> Decision:
        """This step's :class:`Decision` from the global norm; updates the state (once a step).

        ``engine`` is true when an engine will apply the factor (:meth:`observe_`): a
        rule whose factor is not ``min(1, threshold / (n + eps))`` must then fill
        ``engine_threshold`` (it may leave it ``None`` otherwise).
        """
        threshold = self.threshold(total_norm, finite)
        coef, clipped = self.factor(threshold, total_norm, finite)
        return Decision(threshold, coef, clipped, threshold)

    def factor(
        self, threshold: Tensor, total_norm: Tensor, finite: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``(coef, clipped)`` of the rule ``min(1, threshold / (total_norm + eps))``.

        On a skipped step (``finite`` false) the factor is 1 and ``clipped`` false.
        """
        coef = clip_coefficient(threshold, total_norm, self.config.eps)
        return torch.where(finite, coef, self._one), (total_norm > threshold) & finite

    def _step(self, total_norm: Tensor, *, engine: bool) -> ClipStats:
        finite, skipped = self._begin(total_norm)
        decision = self.decide(total_norm, finite, engine=engine)
        return self._finish_step(
            total_norm,
            decision.threshold,
            decision.coef,
            skipped,
            clipped=decision.clipped,
            engine_threshold=decision.engine_threshold if engine else None,
        )

    def clip_(self, *, defer_scale: bool = False) -> ClipStats:
        """Clip the gradients in place by this step's factor; return what was seen.

        The global norm comes from the plan (one collective per process group). With
        ``defer_scale=True`` the gradients are left as they are for the caller to
        multiply by ``stats.clip_coef`` (a fused optimizer divides by ``1 / coef`` as
        its ``grad_scale``, saving a pass over the gradients).

        The returned ``skipped`` is true when the global norm is NaN/inf: the gradients
        are left untouched and the state is not updated; the caller must not apply
        this step's update (the optimizer integrations do that for you).

        Raises:
            NonFiniteNormError: the norm is NaN/inf and ``nonfinite="error"`` (on
                every rank alike, before anything is modified).
        """
        # torch.no_grad as a context, not a decorator: a frame that names no torch global
        # is skipped by torch.compile, which then compiles its callees one by one
        # instead of the whole clip as one graph.
        with torch.no_grad():
            plan = self.plan
            total_norm = plan.total_norm(self.config.norm_type, foreach=self.config.foreach)
            stats = self._step(total_norm, engine=False)
            if not defer_scale:
                scale_(plan.grads(), stats.clip_coef, foreach=self.config.foreach)
        return stats

    @torch.no_grad()
    def observe_(self, total_norm: Tensor) -> ClipStats:
        """Take a global norm an engine computed itself; return the step's stats.

        The norm updates the state exactly as in :meth:`clip_` (NaN/inf ignored,
        counters, consistency checks); no gradient is touched. The engine clips by
        ``min(1, t / (n + eps))`` with ``t = stats.engine_threshold``.

        Raises:
            NonFiniteNormError: as in :meth:`clip_`.
        """
        return self._step(self._engine_norm(total_norm), engine=True)


class Units(NamedTuple):
    """What :meth:`PiecewiseClipper.clip_units_` reports of one call.

    Attributes:
        smallest: the smallest factor applied (0-dim; ``None``: no unit, or a clamp).
        clipped: bool, true when some unit was scaled (``None``: the method does not say).
    """

    smallest: Tensor | None
    clipped: Tensor | None


@dataclass
class _OpenStep:
    """A piecewise step between :meth:`PiecewiseClipper.begin_pieces_` and its pieces."""

    finite: Tensor
    coef: Tensor
    clipped: Tensor
    clipped_before: Tensor


class PiecewiseClipper(Clipper):
    """A clipper that clips each unit of the gradients (an element, a tensor, a row) by itself."""

    kind: ClassVar[str] = "piecewise"
    #: The unit each factor applies to: ``"element"``, ``"tensor"`` or ``"row"`` (an
    #: output row of a weight with 2 or more dimensions, the whole tensor otherwise).
    unit: ClassVar[str] = "tensor"
    #: Whether ``num_clipped`` counts the steps where some unit was scaled.
    counts_clipped: ClassVar[bool] = True

    def level(self) -> float:
        """The number reported as ``stats.threshold`` (the method's bound)."""
        raise NotImplementedError

    def level_like(self, like: Tensor) -> Tensor:
        """:meth:`level` as a 0-dim tensor of ``like``'s dtype and device, made once per
        (device, dtype) rather than once per step: the reported threshold, and a divisor
        for the methods whose factor is ``level / norm``. Never written to."""
        levels: dict[tuple[torch.device, torch.dtype], Tensor]
        levels = self.__dict__.setdefault("_levels", {})
        key = (like.device, like.dtype)
        level = levels.get(key)
        if level is None:
            level = torch.full((), self.level(), dtype=like.dtype, device=like.device)
            levels[key] = level
        return level

    def clip_units_(self, pieces: Pieces, finite: Tensor) -> Units:
        """Clip ``pieces`` in place, each unit by its own rule; the method's math.

        ``finite`` is false on a skipped step: the factors must then be 1. Every rank
        that shares the pieces' reduction calls this, with or without pieces.
        """
        raise NotImplementedError

    def _check_plan(self, plan: ReductionPlan) -> None:
        PlanPieces.check(plan, self.unit, self.method)

    def clip_(self, *, defer_scale: bool = False) -> ClipStats:
        """Clip the gradients in place, unit by unit; return what was seen.

        The pieces are the local gradients of the plan; the global norm comes from the
        plan too (for tensor units, from the same reduced per-tensor norms). A NaN/inf
        norm is a skipped step, as for every method. ``defer_scale`` has no effect:
        there is no single factor to defer.
        """
        with torch.no_grad():  # a context, not a decorator: see GlobalFactorClipper.clip_
            pieces = PlanPieces(self.plan, self.unit, foreach=self.config.foreach)
            total_norm = pieces.total_norm(self.config.norm_type)
            finite, skipped = self._begin(total_norm)
            units = self.clip_units_(pieces, finite)
            return self._finish_step(
                total_norm,
                self.level_like(total_norm),
                self._one if units.smallest is None else units.smallest.to(total_norm.dtype),
                skipped,
                clipped=units.clipped if self.counts_clipped else None,
            )

    def observe_(self, total_norm: Tensor) -> ClipStats:
        """Refused: the global norm alone cannot drive a piecewise method.

        Raises:
            NotImplementedError: always; an engine opens the step with
                :meth:`begin_pieces_` and hands its pieces to :meth:`clip_pieces_`.
        """
        raise NotImplementedError(
            f"distclip: method {self.method!r} needs per-tensor or per-element gradients, "
            "not only the global norm, so it cannot be driven by an engine's own norm; an "
            "engine opens the step with begin_pieces_(norm) and hands its gradients to "
            "clip_pieces_(pieces)"
        )

    @torch.no_grad()
    def begin_pieces_(self, total_norm: Tensor) -> ClipStats:
        """Open a step with a global norm an engine computed; the pieces come afterwards.

        The norm updates the counters as in :meth:`clip_` (``num_skipped``, the
        consistency checks); ``clip_coef`` starts at 1 and ``clipped`` false, and each
        :meth:`clip_pieces_` of this step lowers / raises them in place (the returned
        stats' tensors are the ones it updates). No host read, except with
        ``nonfinite="error"``.

        Raises:
            NonFiniteNormError: the norm is NaN/inf and ``nonfinite="error"``.
        """
        total_norm = self._engine_norm(total_norm)
        finite, skipped = self._begin(total_norm)
        step = _OpenStep(
            finite=finite,
            coef=torch.ones_like(total_norm),
            clipped=torch.zeros((), dtype=torch.bool, device=finite.device),
            clipped_before=self.num_clipped.clone(),
        )
        self._open = step
        return self._finish_step(
            total_norm,
            self.level_like(total_norm),
            step.coef,
            skipped,
            clipped=step.clipped if self.counts_clipped else None,
        )

    @torch.no_grad()
    def clip_pieces_(self, pieces: Pieces) -> None:
        """Clip ``pieces`` within the step :meth:`begin_pieces_` opened; complete its stats.

        Raises:
            RuntimeError: no step was opened.
        """
        step: _OpenStep | None = getattr(self, "_open", None)
        if step is None:
            raise RuntimeError(
                f"distclip {self.method}: clip_pieces_ needs the step's global norm first "
                "(begin_pieces_)"
            )
        units = self.clip_units_(pieces, step.finite)
        if units.smallest is not None:
            smallest = units.smallest.to(step.coef.device, step.coef.dtype)
            step.coef.copy_(torch.minimum(step.coef, smallest))
        if units.clipped is not None and self.counts_clipped:
            step.clipped |= units.clipped.to(step.clipped.device)
            counted = (step.finite & step.clipped).to(self.num_clipped.device, torch.long)
            self.num_clipped.copy_(step.clipped_before + counted)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_open", None)  # belongs to the step in progress
        state.pop("_levels", None)  # made again on the devices where it is used
        return state
