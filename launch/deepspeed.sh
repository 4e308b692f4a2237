#!/usr/bin/env bash
# distclip + DeepSpeed: AutoClip driven by DeepSpeed's own gradient norm, 2 CPU processes.
#
#   bash launch/deepspeed.sh                          # torchrun, launch/ds_config.json
#   bash launch/deepspeed.sh --steps 1000 --bf16      # arguments go to launch/deepspeed_train.py
#   bash launch/deepspeed.sh --zero-stage 3
#   LAUNCHER=deepspeed bash launch/deepspeed.sh       # the `deepspeed` launcher instead
#   NPROC=4 bash launch/deepspeed.sh                  # another number of processes
#
# Creates .venv at the repository root if it is missing and installs distclip[deepspeed]
# into it (torch and deepspeed pinned by constraints.txt), then starts the example.
# By hand, either launcher works the same way:
#
#   DS_ACCELERATOR=cpu .venv/bin/torchrun --standalone --nproc-per-node 2 launch/deepspeed_train.py
#   DS_ACCELERATOR=cpu .venv/bin/deepspeed --num_gpus 2 launch/deepspeed_train.py
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${repo_root}"

bash scripts/setup_env.sh deepspeed

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
nproc="${NPROC:-2}"
if [[ "${LAUNCHER:-torchrun}" == "deepspeed" ]]; then
    exec .venv/bin/deepspeed --num_gpus "${nproc}" launch/deepspeed_train.py "$@"
fi
exec .venv/bin/python -m torch.distributed.run --standalone --nproc-per-node "${nproc}" \
    launch/deepspeed_train.py "$@"
