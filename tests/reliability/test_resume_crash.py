"""A worker SIGKILLed mid-run, torchrun restarts the job, it resumes from a DCP checkpoint.

``crash_train.py`` trains the ``RESUME`` problem's FSDP2 model on 2 gloo ranks with
``AutoClippedOptimizer(torch.optim.AdamW)`` and saves a DCP checkpoint after every
``CKPT_EVERY`` steps. It runs twice under ``torchrun --max-restarts 1``:

* uninterrupted, ``STEPS`` steps;
* with rank 1 killing itself (SIGKILL) on the first attempt just before step
  ``KILL_AT``, two steps after the checkpoint at step 8: torchrun tears the job
  down and restarts both workers, which load the latest checkpoint (restarted
  workers initialise from another seed: only the checkpoint can make them agree),
  redo steps 8 and 9 and finish.

The job is deterministic (fixed data per step, one thread, gloo on CPU, the same
world size and reduction order in both runs), so everything is compared bit for
bit: each step's global norm, threshold, clip factor and the clipper's step count,
on both ranks; the window at the load and at the end; the final full parameters.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.support.problem import RESUME

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(150)]

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
SCRIPT = HERE / "crash_train.py"
STEPS = 16
CKPT_EVERY = 4
KILL_AT = 10
KILL_RANK = 1
WINDOW = RESUME.options["window"]
#: The checkpoint the restarted job resumes from: the last one before the kill.
RESUME_STEP = KILL_AT // CKPT_EVERY * CKPT_EVERY
#: Wall-clock limit of one torchrun job (its process group is killed after it).
JOB_TIMEOUT = 60.0
#: Compared bit for bit, per step (``step``: the clipper's own step count).
FIELDS = ("total_norm", "threshold", "clip_coef", "skipped", "step")


@dataclass
class Job:
    """What one torchrun job left behind."""

    out: Path
    returncode: int
    output: str
    seconds: float

    def logs(self, rank: int) -> list[dict[str, Any]]:
        """Rank ``rank``'s per-step records, in the order they were written."""
        lines = (self.out / f"log_rank{rank}.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]

    def result(self, rank: int) -> dict[str, Any]:
        """What rank ``rank`` wrote at the end."""
        data: dict[str, Any] = json.loads((self.out / f"result_rank{rank}.json").read_text())
        return data

    def params(self) -> dict[str, torch.Tensor]:
        """The final full parameters (written by rank 0)."""
        data: dict[str, torch.Tensor] = torch.load(self.out / "params.pt", weights_only=True)
        return data


def run_job(out: Path, kill_at: int) -> Job:
    """Run ``crash_train.py`` under torchrun (2 ranks, 1 restart allowed); wait for it.

    The job runs in its own session so that a hang kills torchrun *and* its
    workers (``JOB_TIMEOUT``), not only torchrun.
    """
    out.mkdir(parents=True)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
        ),
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "1",
        "--monitor-interval",
        "0.1",
        str(SCRIPT),
        "--out",
        str(out),
        "--steps",
        str(STEPS),
        "--ckpt-every",
        str(CKPT_EVERY),
        "--kill-at",
        str(kill_at),
        "--kill-rank",
        str(KILL_RANK),
    ]
    start = time.perf_counter()
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=JOB_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"torchrun job {out.name} hung for {JOB_TIMEOUT:.0f} s:\n{output[-4000:]}")
    seconds = time.perf_counter() - start
    return Job(out, process.returncode, output, seconds)


def by_step(records: list[dict[str, Any]], attempt: int | None = None) -> dict[int, dict[str, Any]]:
    """Records keyed by training step; a later record of a step replaces an earlier one.

    ``attempt``: keep only that attempt's records (``None``: all, latest wins).
    """
    out: dict[int, dict[str, Any]] = {}
    for record in records:
        if attempt is None or record["attempt"] == attempt:
            out[record["data_step"]] = record
    return out


def numbers(records: dict[int, dict[str, Any]]) -> dict[int, tuple[float, ...]]:
    """The compared fields of each step (Python floats from float32: exact)."""
    return {step: tuple(r[name] for name in FIELDS) for step, r in sorted(records.items())}


def first_difference(
    actual: dict[int, tuple[float, ...]], expected: dict[int, tuple[float, ...]]
) -> Iterator[str]:
    """Human-readable lines for the steps that differ."""
    for step in sorted(set(actual) | set(expected)):
        if actual.get(step) != expected.get(step):
            yield f"step {step}: {actual.get(step)} != {expected.get(step)} ({FIELDS})"


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Job]:
    """The uninterrupted job and the killed-and-restarted one, run once per module."""
    root = tmp_path_factory.mktemp("crash_resume")
    out = {"uninterrupted": run_job(root / "uninterrupted", kill_at=-1)}
    out["killed"] = run_job(root / "killed", kill_at=KILL_AT)
    for name, job in out.items():
        assert job.returncode == 0, f"{name} job failed ({job.returncode}):\n{job.output[-6000:]}"
    return out


def test_crash_kill_really_happened(jobs: dict[str, Job]) -> None:
    """Rank 1 died of SIGKILL on attempt 0, torchrun restarted both ranks once."""
    killed, reference = jobs["killed"], jobs["uninterrupted"]
    marker_path = killed.out / "killed.json"
    assert marker_path.is_file(), "the killed job left no marker: the kill did not happen"
    marker = json.loads(marker_path.read_text())
    assert marker == {"rank": KILL_RANK, "step": KILL_AT, "attempt": 0, "pid": marker["pid"]}
    assert not (reference.out / "killed.json").exists()
    # torchrun logged the SIGKILL (exit code -9) of the worker that wrote the marker.
    assert "exitcode: -9" in killed.output, killed.output[-4000:]
    assert f"pid: {marker['pid']}" in killed.output, killed.output[-4000:]
    for rank in (0, 1):
        result = killed.result(rank)
        assert result["restart_count"] == 1, result
        assert result["resumed_from"] == RESUME_STEP, result
        assert result["resumed_from_checkpoint"] == f"step_{RESUME_STEP:06d}", result
        assert reference.result(rank)["restart_count"] == 0
        assert reference.result(rank)["resumed_from"] == 0
        logs = killed.logs(rank)
        # Attempt 0 stopped before step KILL_AT on both ranks (rank 0 was stuck in
        # its collective); attempt 1 redid the steps after the checkpoint.
        assert sorted(by_step(logs, attempt=0)) == list(range(KILL_AT))
        assert sorted(by_step(logs, attempt=1)) == list(range(RESUME_STEP, STEPS))
        assert {r["attempt"] for r in reference.logs(rank)} == {0}
        assert sorted(by_step(reference.logs(rank))) == list(range(STEPS))


def test_crash_resume_matches_uninterrupted_bit_for_bit(jobs: dict[str, Job]) -> None:
    """Per-step norms/thresholds, windows and final parameters equal the uninterrupted run's."""
    killed, reference = jobs["killed"], jobs["uninterrupted"]
    expected = numbers(by_step(reference.logs(0)))
    # The problem clips for real, and also among the redone and the later steps.
    coefs = [values[FIELDS.index("clip_coef")] for values in expected.values()]
    assert min(coefs) < 0.1
    assert min(coefs[RESUME_STEP:]) < 0.1

    for rank in (0, 1):
        logs = killed.logs(rank)
        # Both ranks logged the same numbers, in both runs.
        assert numbers(by_step(reference.logs(rank))) == expected, f"reference rank {rank}"
        merged = numbers(by_step(logs))
        diff = list(first_difference(merged, expected))
        assert not diff, f"rank {rank}, resumed run vs uninterrupted:\n" + "\n".join(diff)
        # The steps done twice (before the kill, after the restart) agree too.
        before = numbers(by_step(logs, attempt=0))
        after = numbers(by_step(logs, attempt=1))
        for step in range(RESUME_STEP, KILL_AT):
            assert before[step] == after[step] == expected[step], f"rank {rank} step {step}"

        # The window loaded from the checkpoint: the last WINDOW norms before it.
        result, reference_result = killed.result(rank), reference.result(rank)
        norms = [expected[s][FIELDS.index("total_norm")] for s in range(STEPS)]
        assert result["loaded_window"] == norms[RESUME_STEP - WINDOW : RESUME_STEP]
        assert result["window"] == reference_result["window"] == norms[-WINDOW:]
        assert result["num_seen"] == reference_result["num_seen"] == STEPS

    params, reference_params = killed.params(), reference.params()
    assert params.keys() == reference_params.keys()
    for name, value in reference_params.items():
        assert torch.equal(params[name], value), (
            f"final {name} differs: max abs error {(params[name] - value).abs().max():.3g}"
        )
    print(
        f"\ncrash/resume: uninterrupted job {reference.seconds:.1f} s, "
        f"killed + restarted job {killed.seconds:.1f} s"
    )
