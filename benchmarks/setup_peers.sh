#!/usr/bin/env bash
# Create benchmarks/.venv (separate from the project's .venv) with distclip and the
# peer clipping libraries the benchmark compares against:
#
#   bash benchmarks/setup_peers.sh
#   benchmarks/.venv/bin/python benchmarks/bench_step.py
#
# torch stays pinned by constraints.txt (an unpinned torch resolves to a multi-GB
# CUDA build). A peer that fails to install is reported and skipped; the benchmark
# then lists it as "not installable" with the import error.
# PYTHON selects the interpreter that creates the environment (default: python3).
set -uo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${repo_root}/benchmarks/.venv"
python="${PYTHON:-python3}"
cd "${repo_root}"

if [[ ! -x "${venv}/bin/python" ]]; then
    echo "Creating benchmarks/.venv with $("${python}" -V 2>&1) ..." >&2
    "${python}" -m venv "${venv}" || exit 1
fi
pip=("${venv}/bin/python" -m pip install --quiet --disable-pip-version-check)

echo "Installing distclip (editable, pinned by constraints.txt) ..." >&2
"${pip[@]}" -e . -c constraints.txt || exit 1

# Each peer is installed on its own, with torch pinned alongside, so one failure
# does not block the others.
peers=(
    "gradientnorm-autoclipper==1.0.0 pytorch_optimizer==3.0.*"
    "autoclip==0.2.1"
    "zclip==1.0.0"
)
failed=0
for spec in "${peers[@]}"; do
    echo "Installing ${spec} ..." >&2
    # shellcheck disable=SC2086  # spec holds several requirements on purpose
    if ! "${pip[@]}" ${spec} "torch==2.13.0" -c constraints.txt; then
        echo "warning: could not install: ${spec}" >&2
        failed=1
    fi
done
if [[ ${failed} -ne 0 ]]; then
    echo "warning: some peers are missing; bench_step.py reports them as not installable" >&2
fi
exit 0
