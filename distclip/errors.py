"""Errors distclip raises beyond ``ValueError`` / ``TypeError`` for bad arguments."""

from __future__ import annotations

__all__ = ["NonFiniteNormError", "RankDesyncError"]


class NonFiniteNormError(RuntimeError):
    """The global gradient norm is NaN or inf and ``nonfinite="error"`` was asked for.

    Raised on every rank alike: the norm comes from the same reduction everywhere.
    """


class RankDesyncError(RuntimeError):
    """The clipper's state differs between ranks (found by the debug consistency check)."""
