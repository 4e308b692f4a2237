"""``distclip.deepspeed`` exports what a user calls or catches, and nothing else."""

from __future__ import annotations

import distclip.deepspeed
import distclip.integrations.deepspeed as internal

#: What a user calls (or holds, or catches); the rest stays in the internal package.
PUBLIC = [
    "DeepSpeedClipAdapter",
    "DeepSpeedVersionError",
    "attach",
    "deepspeed_methods",
    "get_adapter",
    "initialize",
    "read_section",
]


def test_public_names_are_the_internal_objects() -> None:
    assert sorted(distclip.deepspeed.__all__) == PUBLIC
    names = sorted(n for n in vars(distclip.deepspeed) if not n.startswith("_"))
    assert names == PUBLIC  # no constant or helper reachable besides them
    for name in PUBLIC:
        assert name in internal.__all__
        assert getattr(distclip.deepspeed, name) is getattr(internal, name)
