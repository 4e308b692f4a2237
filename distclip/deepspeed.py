"""``distclip.deepspeed``: clip a DeepSpeed engine's gradients with distclip.

``distclip.deepspeed.initialize(...)`` wraps ``deepspeed.initialize`` (the method and
its options in the config's ``"distclip"`` section); ``distclip.deepspeed.attach(engine)``
hooks an engine built elsewhere; :func:`read_section` validates a config's section
without starting DeepSpeed. How it works and what is refused: ``docs/deepspeed.md``.
Importing this module does not import DeepSpeed: that happens when one of its
functions is called.
"""

from distclip.integrations.deepspeed import (
    DeepSpeedClipAdapter,
    DeepSpeedVersionError,
    attach,
    deepspeed_methods,
    get_adapter,
    initialize,
    read_section,
)

__all__ = [
    "DeepSpeedClipAdapter",
    "DeepSpeedVersionError",
    "attach",
    "deepspeed_methods",
    "get_adapter",
    "initialize",
    "read_section",
]
