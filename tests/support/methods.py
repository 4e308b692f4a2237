"""The clipping methods as the tests see them: their kinds, and options under which each clips.

The kinds say how a method's rule acts, by name (aliases included), so that a suite can
choose its checks without reaching distclip's classes:

* ``global``: one factor ``min(1, tau / (n + eps))`` from the global norm (norm,
  autoclip, zclip): what DeepSpeed's own norm can drive;
* ``stochastic``: a global factor ``level / n`` taken or declined by a per-step draw;
* ``elementwise``: each element clamped to ``[-clip_value, clip_value]``;
* ``per_unit``: a factor per tensor (layer_wise) or per row (agc).

``test_every_method_has_a_kind`` keeps this table equal to ``available_methods()``.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "CLIPPING_OPTIONS",
    "KINDS",
    "LINEAR_STOCHASTIC",
    "WINDOWED",
    "kind_of",
]

#: Every registered method name (aliases included) and its kind.
KINDS: dict[str, str] = {
    "norm": "global",
    "autoclip": "global",
    "auto_clip": "global",
    "zclip": "global",
    "linear_stoch_norm": "stochastic",
    "quadratic_stoch_norm": "stochastic",
    "linear_stoch_autoclip": "stochastic",
    "quadratic_stoch_autoclip": "stochastic",
    "value": "elementwise",
    "coordinate_wise": "elementwise",
    "layer_wise": "per_unit",
    "agc": "per_unit",
}

#: The stochastic methods whose acceptance is ``beta ** (level / n)`` (linear).
LINEAR_STOCHASTIC = ("linear_stoch_norm", "linear_stoch_autoclip")

#: The methods that keep AutoClip's window of past norms.
WINDOWED = ("autoclip", "auto_clip", "linear_stoch_autoclip", "quadratic_stoch_autoclip")

#: Options under which every method clips something on gradients of unit scale (so a
#: count of a step's ops or host transfers covers the clipping path of each method).
CLIPPING_OPTIONS: dict[str, dict[str, Any]] = {
    "norm": {"max_norm": 0.5},
    "value": {"clip_value": 0.05},
    "coordinate_wise": {"clip_value": 0.05},
    "autoclip": {"q": 0.5, "window": 10},
    "auto_clip": {"q": 0.5, "window": 10},
    "linear_stoch_norm": {"max_norm": 0.5},
    "quadratic_stoch_norm": {"max_norm": 0.5},
    "linear_stoch_autoclip": {"q": 0.5, "window": 10},
    "quadratic_stoch_autoclip": {"q": 0.5, "window": 10},
    "layer_wise": {"max_norm": 0.1},
    "zclip": {"warmup_steps": 2},
    "agc": {"clip_factor": 0.01},
}


def kind_of(method: str) -> str:
    """The kind of ``method`` (see the module docstring)."""
    return KINDS[method]
