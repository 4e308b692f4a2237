"""Fixtures of the framework integration tests (HF Trainer, Accelerate).

Reuses the multi-process harness of ``tests/distributed`` (imported by name: the
workers get this process's ``sys.path``). A module's 2-rank group is started only by
the tests that need it, and only when the frameworks are installed.
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

#: Seconds one ``group.run`` (a few framework runs) may take.
RUN_TIMEOUT = 240.0


@pytest.fixture(scope="module")
def fw_group() -> Iterator[ProcessGroupHarness]:
    """Two gloo ranks for the framework runs, started once per test module."""
    for name in ("transformers", "accelerate", "deepspeed"):
        pytest.importorskip(name)
    yield from running_group(2, timeout=RUN_TIMEOUT, collective_timeout_s=600.0)
