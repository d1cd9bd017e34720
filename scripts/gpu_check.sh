#!/usr/bin/env bash
# The GPU checks issue 21 asks for, in its order, in one run on one H100/H200 within 9 minutes (each step has its own
# time limit, and they add up to 540 s). Prints a table of the steps and writes it, with each step's command and
# output, to one markdown file.
#
#   bash scripts/gpu_check.sh                  # on the GPU machine; writes gpu_check_<time>.md
#   bash scripts/gpu_check.sh --out=FILE       # ... to FILE
#   bash scripts/gpu_check.sh --dry-run        # anywhere: print the steps' commands, run nothing
#
# The data files are not in git: step 0 writes synthetic token bins (scripts/make_synthetic_data.py: GPT-2's and
# LLaMA-3's vocabulary sizes) under $GPU_CHECK_DIR (default /tmp/gpu_check), with the runs' output folders.
# A step that fails or runs out of time is marked so and the next one runs: one missing figure does not cost the
# others. Lines dynamo logs about graph breaks and recompiles (TORCH_LOGS, set for the loop's runs) are collected
# under their step. The figures go into docs/benchmarks.md by hand, each with its command, the machine and the date.
# Left out for time (each is one command in docs/benchmarks.md's owed list): the GPT-2 backend x compile table,
# memory plan vs measured, AdamW vs Muon, the batch finder (under compile it compiles afresh per batch size tried).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # tools/ and scripts/ import the engine; nothing is installed
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
WORK=${GPU_CHECK_DIR:-/tmp/gpu_check}
DATA=$WORK/data
RUNS=$WORK/runs
# the loop's CUDA paths: a few steps of a tiny LLaMA-3 (the 128K vocabulary) on the synthetic bins
TINY="config/smoke.py --preset=tiny_llama3 --dataset=$DATA/llama3 --device=cuda --eval_iters=2 --log_interval=5"
LOOP="TORCH_LOGS=graph_breaks,recompiles $PY train.py $TINY --max_iters=20 --eval_interval=20"
GPT2="--preset=gpt2 --block_size=1024 --batch_size=16 --compile=True"

# name | seconds allowed | command
STEPS=(
  "synthetic data|15|$PY scripts/make_synthetic_data.py $DATA"
  "versions|15|$PY -c \"import torch, sys; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))\""
  "sdpa flash probe|20|$PY tools/sdpa_probe.py"
  "gpu tests|100|$PY -m pytest -q -m gpu tests"
  "loop: compile|40|$LOOP --dtype=bfloat16 --compile=True --out_dir=$RUNS/compile"
  "loop: CUDA graphs|40|$LOOP --dtype=bfloat16 --use_cuda_graphs=True --out_dir=$RUNS/cuda_graphs"
  "loop: fp16 + GradScaler|25|$LOOP --dtype=float16 --out_dir=$RUNS/fp16"
  "llama3 1.5B loss chunk 0 vs 1024|110|$PY tools/bench.py config/full_llama3_1.5b_optimal.py --batch_size=8 --gradient_accumulation_steps=1 --warmup=2 --iters=3 --repeats=3 --compare loss_chunk_size=0,1024"
  "gpt2 124M compile vs CUDA graphs|60|$PY tools/bench.py $GPT2 --warmup=3 --iters=5 --repeats=3 --compare use_cuda_graphs=False,True"
  "loop vs bench tokens/s|60|$PY scripts/loop_vs_bench.py $GPT2 --dataset=$DATA/gpt2 --iters=40 --out_dir=$RUNS/loop"
  "FSDP step (torchrun, 1 GPU)|30|$PY -m torch.distributed.run --standalone --nproc_per_node=1 train.py $TINY --dtype=bfloat16 --use_fsdp=True --max_iters=2 --eval_interval=2 --out_dir=$RUNS/fsdp"
  "qwen3 loss memory|25|$PY tools/bench_loss_memory.py"
)

if [ "$DRY" = 1 ]; then
  for step in "${STEPS[@]}"; do
    IFS='|' read -r name limit cmd <<< "$step"
    printf '# %s (at most %ss)\n%s\n' "$name" "$limit" "$cmd"
  done
  exit 0
fi

rm -rf "$RUNS"  # train.py would resume from, or refuse, an earlier run's folder
mkdir -p "$RUNS"
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
  dynamo=$(grep -E '\[__(graph_breaks|recompiles)\]' "$LOGS/$i.log")
  breaks=$(grep -c 'Graph break' <<< "$dynamo")  # one such line a break ("Graph Break Reason" follows it)
  recompiles=$(grep -c 'Recompiling function' <<< "$dynamo")
  rows+=("| $name | $status | ${took} s | $breaks | $recompiles |")
  {
    echo "## $name: $status in ${took} s"
    echo
    echo '```'
    echo "$cmd"
    echo
    tail -n 60 "$LOGS/$i.log"
    echo '```'
    echo
    if [ -n "$dynamo" ]; then
      echo "dynamo's lines on them ($breaks graph breaks, $recompiles recompiles):"
      echo
      echo '```'
      head -n 40 <<< "$dynamo"
      echo '```'
      echo
    fi
  } >> "$OUT"
done

table=$(printf '| step | status | time | graph breaks | recompiles |\n|---|---|---|---|---|\n'; printf '%s\n' "${rows[@]}")
{ echo "## Summary"; echo; echo "$table"; } >> "$OUT"
echo
echo "$table"
echo
echo "written to $OUT"
