"""The harness itself: results by rank, errors with tracebacks, deadlines, clean exit."""

from __future__ import annotations

import pathlib
import signal
import time

import pytest
import torch

from tests.distributed import workers_ddp, workers_harness
from tests.distributed.workers_ddp import make_spec
from tests.support.harness import (
    GroupTimeoutError,
    ProcessGroupHarness,
    WorkerCrashError,
    WorkerError,
)

pytestmark = pytest.mark.distributed


def test_results_by_rank(group2: ProcessGroupHarness) -> None:
    """Each rank answers in its slot; a collective spans both; workers use one thread."""
    infos = group2.run(workers_harness.rank_info)
    assert [info["rank"] for info in infos] == [0, 1]
    assert [info["world_size"] for info in infos] == [2, 2]
    assert [info["backend"] for info in infos] == ["gloo", "gloo"]
    assert [info["sum"] for info in infos] == [3.0, 3.0]
    assert [info["omp_num_threads"] for info in infos] == ["1", "1"]
    assert [info["torch_threads"] for info in infos] == [1, 1]
    assert [info["pid"] for info in infos] == group2.pids


def test_worker_exception_is_raised_here(group2: ProcessGroupHarness) -> None:
    """An exception on one rank comes back with its traceback; the group stays usable."""
    pids = group2.pids
    with pytest.raises(WorkerError, match="boom on rank 1") as info:
        group2.run(workers_harness.raise_on, 1, "boom on rank 1")
    (error,) = info.value.errors
    assert error.rank == 1
    assert error.type_name == "builtins.ValueError"
    assert "workers_harness.py" in error.traceback
    assert group2.running
    assert group2.pids == pids
    assert [r["sum"] for r in group2.run(workers_harness.rank_info)] == [3.0, 3.0]


def test_refuses_functions_workers_cannot_import(group2: ProcessGroupHarness) -> None:
    def local() -> None:  # pragma: no cover - never runs
        pass

    with pytest.raises(ValueError, match="module-level function"):
        group2.run(local)


def test_clean_exit_after_ddp_training(group2: ProcessGroupHarness) -> None:
    """Workers that trained DDP with a clipped optimizer leave with status 0 (no SIGABRT).

    Closes the module's group (a later test starts a fresh one).
    """
    spec = make_spec("AdamW", {"lr": 1e-2, "fused": True}, steps=12)
    results = group2.run(workers_ddp.train, spec)
    assert group2.close() == [0, 0]
    assert group2.exitcodes == [0, 0]
    assert not group2.running
    ref = workers_ddp.reference(spec)
    for result in results:
        torch.testing.assert_close(
            result["records"]["threshold"].double(),
            torch.tensor(ref.threshold, dtype=torch.float64),
            rtol=1e-6,
            atol=0.0,
        )
        torch.testing.assert_close(result["params"], ref.params, rtol=1e-5, atol=1e-5)


def test_hung_collective_fails_fast_and_group_restarts(group2: ProcessGroupHarness) -> None:
    """A collective only rank 0 enters times out after the run's deadline (not CI's),
    the group is killed, and the next run starts a fresh one."""
    infos = group2.run(workers_harness.rank_info)
    starts, pids = group2.starts, group2.pids
    started = time.monotonic()
    with pytest.raises(GroupTimeoutError, match=r"rank\(s\) \[0\] did not answer"):
        group2.run(workers_harness.collective_on, 0, timeout=2.0)
    assert time.monotonic() - started < 30.0
    assert group2.broken
    # Both workers were killed: rank 0 stuck in the all-reduce, rank 1 idle.
    assert group2.exitcodes == [-9, -9]
    assert [info["pid"] for info in infos] == pids
    infos = group2.run(workers_harness.rank_info)
    assert [info["sum"] for info in infos] == [3.0, 3.0]
    assert group2.starts == starts + 1
    assert group2.running
    assert set(group2.pids).isdisjoint(pids)


def test_dead_worker_is_reported(group2: ProcessGroupHarness) -> None:
    """A rank that exits abruptly fails the call at once (not at the deadline) with its
    exit status; the group is marked broken (the next run would start a fresh one)."""
    group2.run(workers_harness.rank_info)
    started = time.monotonic()
    with pytest.raises(WorkerError, match=r"rank 1 died \(exit code 7\)"):
        group2.run(workers_harness.exit_on, 1, 7, timeout=600.0)
    assert time.monotonic() - started < 60.0
    assert group2.broken
    assert group2.exitcodes == [-9, 7]


def test_native_crash_is_rerun_once_on_a_fresh_group(
    group2: ProcessGroupHarness, tmp_path: pathlib.Path
) -> None:
    """A rank killed by SIGABRT (what glibc does on a corrupt heap) has the call rerun
    on a fresh group, with a warning that names the crash; the rerun's result is what
    the test sees."""
    group2.run(workers_harness.rank_info)
    starts, reports = group2.starts, len(group2.crash_reports)
    with pytest.warns(RuntimeWarning, match=r"rank 1 died .*killed by SIGABRT.*rerunning"):
        ranks = group2.run(workers_harness.abort_once_on, 1, str(tmp_path / "crashed"))
    assert ranks == [0, 1]
    assert group2.starts == starts + 1
    assert len(group2.crash_reports) == reports + 1
    assert group2.running


def test_native_crash_twice_fails(group2: ProcessGroupHarness) -> None:
    """A call that crashes again on the rerun fails with the crash (never passes)."""
    with (
        pytest.warns(RuntimeWarning, match="rerunning"),
        pytest.raises(WorkerCrashError, match=r"rank 0 died .*SIGABRT") as info,
    ):
        group2.run(workers_harness.abort_on, 0)
    assert info.value.signal == signal.SIGABRT
    assert group2.broken
