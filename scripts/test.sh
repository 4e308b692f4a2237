#!/usr/bin/env bash
# Set up .venv if needed, then lint, type-check and run the whole test suite.
#
#   bash scripts/test.sh                   # everything under tests/
#   bash scripts/test.sh tests/unit -x     # extra arguments go to pytest
#
# Exits non-zero on the first failing stage. A pytest run that collects no test at
# all (pytest's exit status 5) is reported and counts as a failure.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${repo_root}"

bash scripts/setup_env.sh dev
bin=".venv/bin"

echo "== ruff check" >&2
"${bin}/ruff" check
echo "== ruff format --check" >&2
"${bin}/ruff" format --check
echo "== mypy" >&2
"${bin}/mypy"
echo "== pytest" >&2
status=0
"${bin}/python" -m pytest "$@" || status=$?
if [[ ${status} -eq 5 ]]; then
    echo "error: pytest ran no tests (exit status 5: none collected, or all deselected)" >&2
fi
exit "${status}"
