"""Test-wide settings, and the process groups of the multi-process suites."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import settings

from tests.support.harness import ProcessGroupHarness, running_group

# CI runs the same examples every time (a failure there must reproduce); a developer's
# run explores new ones, and hypothesis's database replays any failure it found.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture(scope="module")
def group2() -> Iterator[ProcessGroupHarness]:
    """Two gloo ranks, started once per test module; checks they exit cleanly."""
    yield from running_group(2)


@pytest.fixture(scope="module")
def group4() -> Iterator[ProcessGroupHarness]:
    """Four gloo ranks (2x2 meshes), started once per test module; checks they exit cleanly."""
    yield from running_group(4)


@pytest.fixture
def deepspeed_never_initialized(monkeypatch: pytest.MonkeyPatch) -> Any:
    """DeepSpeed, with ``deepspeed.initialize`` replaced by a tripwire (for one test)."""
    deepspeed = pytest.importorskip("deepspeed")

    @functools.wraps(deepspeed.initialize)  # keeps the signature distclip binds against
    def tripwire(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("deepspeed.initialize ran although the configuration is invalid")

    monkeypatch.setattr(deepspeed, "initialize", tripwire)
    return deepspeed
