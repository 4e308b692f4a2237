#!/usr/bin/env bash
# The distclip demo: AutoClip under DistributedDataParallel, 2 CPU processes (gloo).
#
#   bash launch/demo.sh                       # defaults: 1000 steps, q=0.1, window=200
#   bash launch/demo.sh --steps 3000 --q 0.2  # arguments go to launch/train_demo.py
#   NPROC=4 bash launch/demo.sh               # another number of processes
#
# Creates .venv at the repository root if it is missing and installs distclip[demo]
# into it (torch pinned by constraints.txt), then starts the demo with torchrun.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${repo_root}"

bash scripts/setup_env.sh demo

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec .venv/bin/python -m torch.distributed.run --standalone --nproc-per-node "${NPROC:-2}" \
    launch/train_demo.py "$@"
