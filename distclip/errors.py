"""Errors distclip raises beyond ``ValueError`` / ``TypeError`` for bad arguments."""

from __future__ import annotations

__all__ = ["FrameworkClippingError", "NonFiniteNormError", "RankDesyncError"]


class NonFiniteNormError(RuntimeError):
    """The global gradient norm is NaN or inf and ``nonfinite="error"`` was asked for.

    Raised on every rank alike: the norm comes from the same reduction everywhere.
    """


class RankDesyncError(RuntimeError):
    """The clipper's state differs between ranks (found by the debug consistency check)."""


class FrameworkClippingError(ValueError):
    """A training framework clips the gradients before distclip measures them.

    Raised when the optimizer is built or attached, or at its first step, with the
    framework's setting and the fix in the message (for example HF
    ``TrainingArguments(max_grad_norm=0.0)``).
    """
