"""What one clipping step observed, as device tensors (and floats on request)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["ClipStats"]


@dataclass(frozen=True)
class ClipStats:
    """The result of one clipping step; every field is a 0-dim tensor on the device.

    Attributes:
        total_norm: the global gradient norm before clipping.
        threshold: this step's clipping threshold (``inf`` when nothing bounds it).
        clip_coef: the factor the gradients were multiplied by, in [0, 1]
            (1 on a skipped step: the gradients are left as they were).
        skipped: bool; true when the norm was NaN/inf and the update was skipped.
        step: how many clipping steps the clipper has taken, this one included.
        engine_threshold: only from :meth:`~distclip.Clipper.observe_`: the number an
            engine that clips by ``min(1, t / (n + eps))`` must use as ``t`` to apply
            ``clip_coef`` (``threshold`` itself, except for the stochastic methods,
            whose draw decides: ``level * (n + eps) / n`` or ``inf``).

    Reading the tensors does not synchronise; :meth:`as_floats` does.
    """

    total_norm: Tensor
    threshold: Tensor
    clip_coef: Tensor
    skipped: Tensor
    step: int
    engine_threshold: Tensor | None = None

    def as_floats(self) -> dict[str, float]:
        """Plain Python numbers for logging: ``total_norm``, ``threshold``, ``clip_coef``,
        ``skipped`` (1.0 or 0.0) and ``step``.

        This copies the values to the host, so it waits for the device: call it where
        a synchronisation is acceptable (a logging interval), not every step on a GPU.
        """
        return {
            "total_norm": float(self.total_norm),
            "threshold": float(self.threshold),
            "clip_coef": float(self.clip_coef),
            "skipped": float(self.skipped),
            "step": float(self.step),
        }
