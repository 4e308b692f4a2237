#!/usr/bin/env bash
# Create the project's virtual environment (.venv at the repository root) if it is
# missing and install distclip into it, editable, with the given extra:
#
#   bash scripts/setup_env.sh dev      # lint, type-check and test tools
#   bash scripts/setup_env.sh demo     # what launch/train_demo.py needs
#
# Versions come from constraints.txt (torch above all: an unpinned torch resolves to
# a multi-GB CUDA build). Safe to run again: pip then only checks what is installed.
# PYTHON selects the interpreter that creates the environment (default: python3).
set -euo pipefail

extra="${1:-dev}"
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${repo_root}/.venv"
python="${PYTHON:-python3}"

if [[ ! -x "${venv}/bin/python" ]]; then
    if ! "${python}" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
        echo "error: distclip needs Python >= 3.10; '${python}' is missing or older" \
            "(set PYTHON=/path/to/python3.x)" >&2
        exit 1
    fi
    echo "Creating ${venv##*/} with $("${python}" -V 2>&1) ..." >&2
    "${python}" -m venv "${venv}"
fi

echo "Installing distclip[${extra}] into .venv (pinned by constraints.txt) ..." >&2
cd "${repo_root}"
"${venv}/bin/python" -m pip install --quiet --disable-pip-version-check \
    -e ".[${extra}]" -c constraints.txt
