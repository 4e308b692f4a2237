"""Value clipping (torch-clip's coordinate-wise clipping): every element clamped on its own."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from distclip.clippers.config import ClipConfig, check_positive_finite
from distclip.clippers.kinds import PiecewiseClipper, Units
from distclip.clippers.pieces import Pieces
from distclip.clippers.registry import register_method

__all__ = ["ValueClip", "ValueConfig"]


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


@register_method("value", config=ValueConfig, class_prefix="ValueClipped")
@register_method("coordinate_wise", config=ValueConfig, class_prefix="CoordinateWiseClipped")
class ValueClip(PiecewiseClipper):
    r"""Value clipping: :math:`g \leftarrow \operatorname{clamp}(g, -v, v)` element by element.

    Registered as ``value`` and as ``coordinate_wise`` (torch-clip's name). The clamp
    is local: it needs no communication, on any piece of the gradients (a flat ZeRO
    partition included). The global norm is still reduced (one scalar) for
    ``last_clip.total_norm`` and for skipping NaN/inf steps on every rank alike. The
    clamp is two foreach kernels with the bound as a number, so it is applied on a
    skipped step too (an inf becomes the bound, a NaN stays NaN); the update of a
    skipped step is not applied either way. ``last_clip.clip_coef`` is 1 (no single
    factor describes an element-wise clamp) and ``num_clipped`` is not counted (it
    would need another reduction).
    """

    unit: ClassVar[str] = "element"
    counts_clipped: ClassVar[bool] = False
    default_method: ClassVar[str | None] = "value"
    config: ValueConfig

    def level(self) -> float:
        return self.config.clip_value

    def clip_units_(self, pieces: Pieces, finite: Tensor) -> Units:
        pieces.clamp_(self.config.clip_value)
        return Units(None, None)
