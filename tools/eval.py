"""
Downstream evaluation of one of our checkpoints or a local transformers model: HellaSwag, ARC, PIQA, Winogrande and
LAMBADA scored by log-likelihood as lm-evaluation-harness scores them, and their CORE-style mean (docs/evals.md).

    python tools/eval.py --out_dir=out-shakespeare-char --tasks=hellaswag,arc_easy --data_dir=evals
    python tools/eval.py --checkpoint=out-x/ckpt_0000600 --data_dir=evals --max_examples=500 --json=evals.json
    python tools/eval.py --init_from=path/to/hf_model --tasks=piqa,winogrande      # the hub, through `datasets`
    torchrun --standalone --nproc_per_node=8 tools/eval.py --out_dir=out-x --data_dir=evals

--data_dir holds <task>.jsonl files (our schema, or the hub's own fields); without it each task's split comes from
the Hugging Face hub. The tokenizer is the one the run trained with, or the transformers directory's own, as in
tools/sample.py; --tokenizer overrides it. Prints a markdown table and the CORE figure; --json writes them.
"""
import argparse
import json
import os
import sys
import time
from contextlib import nullcontext

import torch

from engine.checkpoint import CheckpointError
from engine.data.bins import DataError
from engine.data.tokenizers import resolve_tokenizer
from engine.distributed import cleanup, init_distributed
from engine.evals import TASKS, check_task, evaluate_tasks, load_task
from tools import sample
from train import auto_dtype


def load_model(args):
    """(model, the config its run recorded or None, description): the checkpoint --checkpoint names, else as
    tools/sample.py finds it (--init_from, or the newest checkpoint in --out_dir)."""
    return sample.checkpoint_model(args.checkpoint) if args.checkpoint else sample.load_model(args)


def table(results):
    rows = ["| task | n | acc | acc_norm | centered |", "|---|---:|---:|---:|---:|"]
    for name, r in results.items():
        if name != "core":
            norm = f"{r['acc_norm']:.4f}" if "acc_norm" in r else "-"
            rows.append(f"| {name} | {r['n']} | {r['acc']:.4f} | {norm} | {r['centered']:.4f} |")
    return "\n".join(rows) + f"\n\ncore: {results['core']:.4f}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--out_dir", default="out", help="our run's folder: its newest checkpoint is evaluated")
    src.add_argument("--checkpoint", help="one checkpoint folder (ckpt_<iter>) of our runs")
    src.add_argument("--init_from", help="a local transformers checkpoint directory")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of {', '.join(TASKS)}")
    p.add_argument("--data_dir", help="folder with <task>.jsonl for each task (default: the hub, via datasets)")
    p.add_argument("--max_examples", type=int, help="evaluate a seeded subset of this many items per task")
    p.add_argument("--seed", type=int, default=0, help="seed of the --max_examples subset")
    p.add_argument("--batch_size", type=int, default=16, help="sequences per forward")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="autocast dtype (auto: as train.py's, bfloat16 where the device computes it natively)")
    p.add_argument("--tokenizer", help="gpt2 | llama2 | llama3 | qwen3 | hf:<dir> | a dataset name or folder")
    p.add_argument("--tokenizer_path", help="your own tokenizer file, or a folder holding it, for --tokenizer")
    p.add_argument("--json", help="write the results to this file")
    args = p.parse_args(argv)
    if args.batch_size < 1 or (args.max_examples is not None and args.max_examples < 1):
        p.error("--batch_size and --max_examples must be at least 1")
    if args.checkpoint and not os.path.isdir(args.checkpoint):
        p.error(f"--checkpoint={args.checkpoint} is not a directory")
    if args.init_from and not os.path.isdir(args.init_from):
        p.error(f"--init_from={args.init_from} is not a directory")
    if args.json and not os.path.isdir(os.path.dirname(args.json) or "."):
        p.error(f"--json={args.json}: its folder does not exist")
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    sources = {name: None for name in names}
    try:
        for name in names:
            check_task(name)
            if args.data_dir:
                sources[name] = os.path.join(args.data_dir, f"{name}.jsonl")
                if not os.path.isfile(sources[name]):
                    p.error(f"{sources[name]} does not exist (--data_dir holds a <task>.jsonl for each task)")
        tasks = {name: load_task(name, sources[name], args.max_examples, args.seed) for name in names}
    except ValueError as e:  # unknown task, bad row (DataError names the file and line)
        p.error(str(e))
    if not tasks:
        p.error("--tasks names no task")

    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    dev_type = torch.device(device).type
    d = init_distributed(dev_type)
    if d.world_size > 1 and dev_type == "cuda":
        device = f"cuda:{d.local_rank}"
    dtype = args.dtype if args.dtype != "auto" else auto_dtype(dev_type)[0]
    ctx = nullcontext() if dtype == "float32" else torch.autocast(dev_type, dtype=getattr(torch, dtype))
    try:
        model, saved, where = load_model(args)
        r = resolve_tokenizer(args.tokenizer, args.tokenizer_path, hf_dir=args.init_from, saved=saved)
    except (CheckpointError, DataError, ValueError, OSError, KeyError) as e:
        p.error(str(e))
    if r.tok.vocab_size > model.config.vocab_size:
        p.error(f"the tokenizer {r.name} has {r.tok.vocab_size} ids, more than the model's vocab_size "
                f"{model.config.vocab_size}: pass the tokenizer it was trained with (--tokenizer)")
    log = print if d.master else lambda *a, **k: None
    log(f"{where}: {model.num_params() / 1e6:.2f}M parameters, tokenizer {r.tok.name} (from {r.source}), "
        f"{d.world_size} rank(s), {dtype}", file=sys.stderr)

    t0 = time.time()
    results = evaluate_tasks(model.to(device), r.tok, tasks, device, ctx, args.batch_size)
    log(f"{sum(len(v) for v in tasks.values())} items in {time.time() - t0:.1f} s", file=sys.stderr)
    log(table(results))
    if args.json and d.master:
        doc = {"model": where, "tokenizer": r.tok.name, "dtype": dtype,
               "sources": {k: v or "hub " + " ".join(filter(None, TASKS[k].hub)) for k, v in sources.items()},
               "max_examples": args.max_examples, "seed": args.seed, "results": results}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    cleanup(d)


if __name__ == "__main__":
    main()
