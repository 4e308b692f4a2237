"""``distclip.accelerate``: distclip under Hugging Face Accelerate.

``distclip.accelerate.attach(accelerator, method, **options)`` before
``accelerator.prepare`` (see :mod:`distclip.integrations.accelerate`). Importing this
module does not import ``accelerate``.
"""

from distclip.integrations.accelerate import (
    DEFAULT_METHOD,
    AccelerateHandle,
    attach,
    layout_model,
)

__all__ = ["DEFAULT_METHOD", "AccelerateHandle", "attach", "layout_model"]
