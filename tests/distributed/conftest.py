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

from harness import ProcessGroupHarness, running_group  # noqa: E402


@pytest.fixture(scope="module")
def group2() -> Iterator[ProcessGroupHarness]:
    """Two gloo ranks, started once per test module; checks they exit cleanly."""
    yield from running_group(2)


@pytest.fixture(scope="module")
def group4() -> Iterator[ProcessGroupHarness]:
    """Four gloo ranks (2x2 meshes), started once per test module; checks they exit cleanly."""
    yield from running_group(4)
