#!/usr/bin/env bash
# Install the engine's dependencies into the current Python environment.
# torch is installed first and only if missing: a GPU machine keeps the CUDA build it has, and on a CPU machine
# an already-installed CPU build is not replaced by several GB of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install "torch==2.13.0"
fi
"$PY" -m pip install -q -r requirements.txt
# the engine itself (editable), so that scripts, tools and tests import it from wherever they run
"$PY" -m pip install -q --no-deps -e .
