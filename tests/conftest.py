"""Test-wide settings."""

from __future__ import annotations

import os

from hypothesis import settings

# CI runs the same examples every time (a failure there must reproduce); a developer's
# run explores new ones, and hypothesis's database replays any failure it found.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
