"""Fixtures of the DeepSpeed tests: one 2-rank process group per test module.

Reuses the multi-process harness of ``tests/distributed`` (imported by name: the
workers get this process's ``sys.path``). The group is started only by the tests that
need it, and only when DeepSpeed is installed.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent
for _path in (str(_HERE.parent / "distributed"), str(_HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from harness import ProcessGroupHarness  # noqa: E402

#: Seconds one ``group.run`` of many DeepSpeed configurations may take.
DS_TIMEOUT = 600.0


@pytest.fixture(scope="module")
def ds_group() -> Iterator[ProcessGroupHarness]:
    """Two gloo ranks for DeepSpeed, started once per test module; checks they exit cleanly."""
    pytest.importorskip("deepspeed")
    group = ProcessGroupHarness(world_size=2, timeout=DS_TIMEOUT, collective_timeout_s=900.0)
    try:
        group.start()
        yield group
    finally:
        was_healthy = group.running
        exitcodes = group.close()
    if was_healthy:
        assert exitcodes == [0, 0], f"workers did not exit cleanly: exit codes {exitcodes}"
