"""The GPU check's CPU dry run passes: the script kept for a CUDA device follows the API.

``benchmarks/gpu/gpu_check.sh`` with ``GPU_CHECK_DEVICE=cpu`` runs every sub-check that
needs no CUDA (syncs through the op-probe proxy, float64 references, NCCL sections over
gloo, torch.compile on aot_eager, DeepSpeed when installed) on tiny sizes; each compares
numbers against its own reference and prints PASS / FAIL / SKIP / INFO.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.distributed

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_gpu_check_dry_run_passes_on_cpu(tmp_path: pathlib.Path) -> None:
    env = {
        **os.environ,
        "GPU_CHECK_DEVICE": "cpu",
        "PYTHON": sys.executable,
        "OUT": str(tmp_path),
        "DISTCLIP_REPO": str(ROOT),
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu" / "gpu_check.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    summary = (tmp_path / "summary.txt").read_text()
    lines = [line for line in summary.splitlines() if line.strip()]
    failed = [line for line in lines if re.match(r"FAIL\s+[\w.]+:", line)]
    assert not failed, "\n".join(failed) + "\n" + done.stdout[-4000:]
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    passed = [line for line in lines if re.match(r"PASS\s+[\w.]+:", line)]
    assert len(passed) >= 20, summary
