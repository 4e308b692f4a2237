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

from tests.support.harness import ProcessGroupHarness, running_group  # noqa: E402

#: Seconds one ``group.run`` of many DeepSpeed configurations may take.
DS_TIMEOUT = 600.0


@pytest.fixture(scope="module")
def ds_group() -> Iterator[ProcessGroupHarness]:
    """Two gloo ranks for DeepSpeed, started once per test module; checks they exit cleanly."""
    pytest.importorskip("deepspeed")
    yield from running_group(2, timeout=DS_TIMEOUT, collective_timeout_s=900.0)
