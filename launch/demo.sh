#!/usr/bin/env bash
# The distclip demo: AutoClip under DistributedDataParallel, 2 CPU processes (gloo).
#
#   bash launch/demo.sh                       # defaults: 1000 steps, q=0.1, window=200
#   bash launch/demo.sh --steps 3000 --q 0.2  # arguments go to launch/train_demo.py
#   NPROC=4 bash launch/demo.sh               # another number of processes
#   DEMO_DIR=/tmp/demo bash launch/demo.sh    # write the outputs there
#
# Creates .venv at the repository root if it is missing and installs distclip[demo]
# into it (torch pinned by constraints.txt), then starts the demo with torchrun. At the
# end it writes, under runs/demo/ in the directory it was started from (or DEMO_DIR):
# metrics.jsonl (the per-step record, one JSON object per step) and clipping.png (its
# plot, drawn by python -m distclip.plot), and prints where they are.
set -euo pipefail

run_dir="${DEMO_DIR:-${PWD}/runs/demo}"
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${repo_root}"

bash scripts/setup_env.sh demo

mkdir -p "${run_dir}"
run_dir="$(cd "${run_dir}" && pwd)"
metrics="${run_dir}/metrics.jsonl"
plot="${run_dir}/clipping.png"
rm -f "${metrics}" "${plot}"

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
.venv/bin/python -m torch.distributed.run --standalone --nproc-per-node "${NPROC:-2}" \
    launch/train_demo.py "$@" --metrics "${metrics}"

if [[ ! -s "${metrics}" ]]; then
    exit 0  # nothing trained (--help)
fi
.venv/bin/python -m distclip.plot "${metrics}" -o "${plot}" --title "distclip demo" >/dev/null
echo
echo "metrics (JSON lines): ${metrics}"
echo "plot:                 ${plot}"
