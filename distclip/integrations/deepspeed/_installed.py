"""A hook in place on a DeepSpeed engine: whether it still is, and how to undo it."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from distclip.clippers import ClipStats

__all__ = ["InstalledHook", "Observer"]

#: Takes DeepSpeed's pre-clip global norm of a step, returns the clip's stats.
Observer = Callable[[Tensor], ClipStats]


class InstalledHook:
    """A hook in place: :meth:`intact` says whether it still is, :meth:`remove` undoes it."""

    def __init__(self, intact: Callable[[], bool], remove: Callable[[], None]) -> None:
        self._intact = intact
        self._remove = remove

    def intact(self) -> bool:
        """True while the hook is in place (nothing replaced the hooked object or method)."""
        return self._intact()

    def remove(self) -> None:
        """Undo the hook (DeepSpeed clips by its own configured value again)."""
        self._remove()
