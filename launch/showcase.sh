#!/usr/bin/env bash
# The distclip showcase: every clipping method against plain SGD on a regression with
# heavy-tailed gradient noise; single process, CPU, about a minute.
#
#   bash launch/showcase.sh                                  # writes docs/showcase/
#   bash launch/showcase.sh --methods none norm autoclip zclip --out runs/showcase
#   bash launch/showcase.sh --steps 1000 --seed 1            # arguments go to launch/showcase.py
#
# Creates .venv at the repository root if it is missing and installs distclip[showcase]
# into it (versions pinned by constraints.txt), then runs launch/showcase.py.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${repo_root}"

bash scripts/setup_env.sh showcase

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
exec .venv/bin/python launch/showcase.py "$@"
