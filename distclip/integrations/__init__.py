"""Thin glue between clippers and training code; no math lives here."""

from distclip.integrations.binding import STATE_KEY, OptimizerBinding
from distclip.integrations.hooks import ClipHandle, attach, get_clipper
from distclip.integrations.optimizer import (
    AutoClippedOptimizer,
    ClippedOptimizer,
    ClippedOptimizerMixin,
)

__all__ = [
    "STATE_KEY",
    "AutoClippedOptimizer",
    "ClipHandle",
    "ClippedOptimizer",
    "ClippedOptimizerMixin",
    "OptimizerBinding",
    "attach",
    "get_clipper",
]
