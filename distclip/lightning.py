"""``distclip.lightning``: clipping and logging under PyTorch Lightning (see :mod:`distclip.integrations.lightning`).

``from distclip.lightning import DistClipCallback`` gives a ``Callback`` of the
installed Lightning (``lightning.pytorch`` or ``pytorch_lightning``)::

    trainer = Trainer(callbacks=[DistClipCallback("autoclip", q=0.1, window=200)])

Importing this module does not import Lightning: reading ``DistClipCallback`` does.
``callback_class("pytorch_lightning")`` picks the package when both are installed.
"""

from typing import Any

from distclip.integrations.lightning import (
    LIGHTNING_PACKAGES,
    LightningClipping,
    callback_class,
    import_lightning,
)

__all__ = [
    "LIGHTNING_PACKAGES",
    "DistClipCallback",  # noqa: F822 (made on first access, see __getattr__)
    "LightningClipping",
    "callback_class",
    "import_lightning",
]


def __getattr__(name: str) -> Any:
    """``DistClipCallback``: the callback class, made for the installed Lightning on first access."""
    if name == "DistClipCallback":
        return callback_class()
    raise AttributeError(f"module 'distclip.lightning' has no attribute {name!r}")
