"""``distclip.deepspeed``: the DeepSpeed engine adapter (see :mod:`distclip.integrations.deepspeed`).

``distclip.deepspeed.initialize(...)`` wraps ``deepspeed.initialize``;
``distclip.deepspeed.attach(engine)`` hooks an engine built elsewhere. Importing this
module does not import DeepSpeed: that happens when one of its functions is called.
"""

from distclip.integrations.deepspeed import (
    DEFAULT_METHOD,
    ENGINE_HOOK,
    SECTION_KEY,
    STATE_KEY,
    SUPPORTED_WRAPPERS,
    VERIFIED_VERSIONS,
    ClipSection,
    DeepSpeedClipAdapter,
    DeepSpeedVersionError,
    attach,
    deepspeed_methods,
    get_adapter,
    initialize,
    parse_section,
    read_section,
)

__all__ = [
    "DEFAULT_METHOD",
    "ENGINE_HOOK",
    "SECTION_KEY",
    "STATE_KEY",
    "SUPPORTED_WRAPPERS",
    "VERIFIED_VERSIONS",
    "ClipSection",
    "DeepSpeedClipAdapter",
    "DeepSpeedVersionError",
    "attach",
    "deepspeed_methods",
    "get_adapter",
    "initialize",
    "parse_section",
    "read_section",
]
