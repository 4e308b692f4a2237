"""The DeepSpeed suite's process group: two gloo ranks, started once for the whole package.

Every engine test module of ``tests/deepspeed`` runs its configurations in the same
long-lived group (DeepSpeed's import and its first ZeRO engine in each rank are the
expensive part). It is started by the first test that needs it, only when DeepSpeed is
installed, and its workers must exit cleanly after the package's last test.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.harness import ProcessGroupHarness, running_group

#: Seconds one ``group.run`` of many DeepSpeed configurations may take.
DS_TIMEOUT = 600.0


@pytest.fixture(scope="package")
def ds_group() -> Iterator[ProcessGroupHarness]:
    """Two gloo ranks for DeepSpeed, shared by the package; checks they exit cleanly."""
    pytest.importorskip("deepspeed")
    yield from running_group(2, timeout=DS_TIMEOUT, collective_timeout_s=900.0)
