"""Fixtures of the framework integration tests (HF Trainer, Accelerate).

A module's 2-rank group (``tests.support.harness``) is started only by the tests that
need it, and only when the frameworks are installed.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.harness import ProcessGroupHarness, running_group

#: Seconds one ``group.run`` (a few framework runs) may take.
RUN_TIMEOUT = 240.0


@pytest.fixture(scope="module")
def fw_group() -> Iterator[ProcessGroupHarness]:
    """Two gloo ranks for the framework runs, started once per test module."""
    for name in ("transformers", "accelerate", "deepspeed"):
        pytest.importorskip(name)
    yield from running_group(2, timeout=RUN_TIMEOUT, collective_timeout_s=600.0)
