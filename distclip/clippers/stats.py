"""What one clipping step observed, as device tensors (and plain numbers on request)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["RECORD_FIELDS", "ClipStats"]

#: The keys of :meth:`ClipStats.as_record`, in order (the per-step logging schema).
RECORD_FIELDS = ("step", "total_norm", "threshold", "clip_coef", "clipped", "skipped")


@dataclass(frozen=True)
class ClipStats:
    """The result of one clipping step; every tensor field is 0-dim and on the device.

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
        clipped: bool, the same on every rank; true when the method changed the
            gradients this step (a finite norm above the threshold, a tensor or unit
            scaled); ``None`` for the methods that cannot tell without another
            reduction (``value``, ``coordinate_wise``, ``agc``).

    Reading the tensors does not synchronise; :meth:`as_record` and :meth:`as_floats` do.
    """

    total_norm: Tensor
    threshold: Tensor
    clip_coef: Tensor
    skipped: Tensor
    step: int
    engine_threshold: Tensor | None = None
    clipped: Tensor | None = None

    def as_record(self) -> dict[str, int | float | bool | None]:
        """The step as plain Python values, keyed by :data:`RECORD_FIELDS`.

        ``step`` is an int, ``total_norm``, ``threshold`` and ``clip_coef`` floats
        (``threshold`` may be ``inf``), ``clipped`` a bool or ``None`` (see the class
        docstring), ``skipped`` a bool. One copy to the host for all of them, so it
        waits for the device: call it at a logging interval, not every step on a GPU.
        """
        tensors = [self.total_norm, self.threshold, self.clip_coef, self.skipped]
        if self.clipped is not None:
            tensors.append(self.clipped)
        device = self.total_norm.device
        values = torch.stack([t.to(device, torch.float64) for t in tensors]).tolist()
        return {
            "step": self.step,
            "total_norm": values[0],
            "threshold": values[1],
            "clip_coef": values[2],
            "clipped": bool(values[4]) if self.clipped is not None else None,
            "skipped": bool(values[3]),
        }

    def as_floats(self) -> dict[str, float]:
        """:meth:`as_record` as floats, for loggers that take only numbers.

        ``clipped`` and ``skipped`` become 1.0 or 0.0; ``clipped`` is left out where
        the method cannot tell. One copy to the host, as :meth:`as_record`.
        """
        return {key: float(value) for key, value in self.as_record().items() if value is not None}
