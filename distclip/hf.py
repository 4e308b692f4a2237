"""``distclip.hf``: distclip under the Hugging Face Trainer (see :mod:`distclip.integrations.hf`).

``distclip.hf.attach(trainer, method, **options)`` before ``trainer.train()``.
Importing this module does not import ``transformers``.
"""

from distclip.integrations.hf import LOG_PREFIX, TrainerHandle, attach, log_record

__all__ = ["LOG_PREFIX", "TrainerHandle", "attach", "log_record"]
