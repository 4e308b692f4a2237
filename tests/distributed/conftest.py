"""Fixtures of the multi-process tests: one process group per test module."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# The harness and the worker modules are imported by name in the spawned workers,
# which get this process's sys.path: make this directory importable whatever
# pytest's import mode.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from harness import ProcessGroupHarness  # noqa: E402


@pytest.fixture(scope="module")
def group2() -> Iterator[ProcessGroupHarness]:
    """Two gloo ranks, started once per test module; checks they exit cleanly."""
    group = ProcessGroupHarness(world_size=2)
    try:
        group.start()
        yield group
    finally:
        was_healthy = group.running
        exitcodes = group.close()
    if was_healthy:
        assert exitcodes == [0, 0], f"workers did not exit cleanly: exit codes {exitcodes}"


@pytest.fixture(scope="module")
def group4() -> Iterator[ProcessGroupHarness]:
    """Four gloo ranks (2x2 meshes), started once per test module; checks they exit cleanly."""
    group = ProcessGroupHarness(world_size=4)
    try:
        group.start()
        yield group
    finally:
        was_healthy = group.running
        exitcodes = group.close()
    if was_healthy:
        assert exitcodes == [0, 0, 0, 0], f"workers did not exit cleanly: exit codes {exitcodes}"
