#!/usr/bin/env bash
# Every GPU measurement docs/benchmarks.md lists as owed, in one run on one H100/H200 (about 9 minutes: each step has
# its own time limit, and they add up to 540 s). Prints a table of the steps and writes it, with each step's command
# and output, to one markdown file.
#
#   bash scripts/gpu_check.sh                  # on the GPU machine; writes gpu_check_<time>.md
#   bash scripts/gpu_check.sh --out=FILE       # ... to FILE
#   bash scripts/gpu_check.sh --dry-run        # anywhere: print the steps' commands, run nothing
#
# A step that fails or runs out of time is marked so and the next one runs: one missing figure does not cost the
# others. The figures go into docs/benchmarks.md by hand, each with its command, the machine and the date.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DRY=0
OUT="gpu_check_$(date -u +%Y%m%d_%H%M%S).md"
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    --out=*) OUT="${arg#--out=}" ;;
    *) echo "gpu_check.sh: unknown argument $arg (use --dry-run or --out=FILE)" >&2; exit 2 ;;
  esac
done

# name | seconds allowed | command
STEPS=(
  "versions|15|$PY -c \"import torch, sys; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))\""
  "gpu tests|75|$PY -m pytest -q -m gpu tests"
  "gpt2 124M backends x compile|135|$PY tools/bench.py --preset=gpt2 --block_size=1024 --batch_size=16 --warmup=3 --iters=5 --repeats=3 --compare attention_backend=manual,sdpa compile=False,True"
  "gpt2 124M CUDA graphs|60|$PY tools/bench.py --preset=gpt2 --block_size=1024 --batch_size=16 --compile=True --warmup=3 --iters=5 --repeats=3 --compare use_cuda_graphs=False,True"
  "llama3 1.5B batch finder|60|$PY tools/find_batch_size.py config/full_llama3_1.5b_optimal.py --gradient_accumulation_steps=1"
  "llama3 1.5B step|60|$PY tools/bench.py config/full_llama3_1.5b_optimal.py --batch_size=8 --gradient_accumulation_steps=1 --warmup=2 --iters=3 --repeats=3"
  "memory plan vs measured|45|$PY tools/plan.py --preset=gpt2 --block_size=1024 --batch_size=16 --measure; $PY tools/plan.py config/full_llama3_1.5b_optimal.py --batch_size=8 --gradient_accumulation_steps=1 --compile=False --measure"
  "qwen3 loss memory|45|$PY tools/bench_loss_memory.py"
  "gpt2 124M adamw vs muon|45|$PY tools/bench.py --preset=gpt2 --block_size=1024 --batch_size=16 --warmup=3 --iters=5 --repeats=3 --compare optimizer=adamw,muon"
)

if [ "$DRY" = 1 ]; then
  for step in "${STEPS[@]}"; do
    IFS='|' read -r name limit cmd <<< "$step"
    printf '# %s (at most %ss)\n%s\n' "$name" "$limit" "$cmd"
  done
  exit 0
fi

LOGS=$(mktemp -d)
rows=()
{
  echo "# gpu_check.sh, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo
} > "$OUT"
i=0
for step in "${STEPS[@]}"; do
  IFS='|' read -r name limit cmd <<< "$step"
  i=$((i + 1))
  echo "== $name (at most ${limit}s): $cmd" >&2
  t0=$(date +%s)
  timeout --signal=TERM --kill-after=10 "$limit" bash -c "$cmd" > "$LOGS/$i.log" 2>&1
  rc=$?
  took=$(( $(date +%s) - t0 ))
  case $rc in
    0) status=ok ;;
    124|137) status="timed out" ;;
    *) status="failed (exit $rc)" ;;
  esac
  tail -n 25 "$LOGS/$i.log" >&2
  rows+=("| $name | $status | ${took} s |")
  {
    echo "## $name: $status in ${took} s"
    echo
    echo '```'
    echo "$cmd"
    echo
    tail -n 60 "$LOGS/$i.log"
    echo '```'
    echo
  } >> "$OUT"
done

table=$(printf '| step | status | time |\n|---|---|---|\n'; printf '%s\n' "${rows[@]}")
{ echo "## Summary"; echo; echo "$table"; } >> "$OUT"
echo
echo "$table"
echo
echo "written to $OUT"
