#!/usr/bin/env bash
# The main job end to end on CPU: install, prepare Shakespeare (character level), train, sample, plot.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/install.sh
"$PY" data/shakespeare_char/prepare.py --force
"$PY" train.py config/train_shakespeare_char.py "$@"
"$PY" tools/sample.py --out_dir=out-shakespeare-char --prompt="ROMEO:" --max_new_tokens=300 --num_samples=1
"$PY" plots/plot_single_run.py "$(ls -t out-shakespeare-char/run_*.json | head -n 1)"
