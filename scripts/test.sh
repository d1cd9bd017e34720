#!/usr/bin/env bash
# The test suite: install, then pytest (CPU; GPU tests skip cleanly without CUDA) and ruff.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/install.sh
"$PY" -m pytest -q "$@"
"$PY" -m ruff check .
