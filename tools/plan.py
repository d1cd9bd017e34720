"""Will it fit, how fast, how long: per-GPU memory of a train.py config in every mode, and its throughput and time.

    python tools/plan.py config/full_llama3_1.5b_optimal.py --gpus=8 --gpu=H100
    python tools/plan.py config/full_llama3_2.2b_chinchilla.py --gpus=8 --gpu=H100 --use_zero1=True --batch_size=4
    python tools/plan.py config/full_qwen3_1.8b_optimal.py --gpus=8 --gpu=B200 --tokens=85B --mfu=0.45 --json

Takes train.py's config file and --key=value settings, plus:
  --gpus=N            ranks of the job (default 1)
  --gpu=NAME          a GPU of the peak table (A100-40GB, A100, H100, H100 PCIe, H200, B200, ...): its memory and peak
  --gpu_memory_gb=X   or the memory per GPU directly (GB of 1e9 bytes)
  --margin=F          memory kept free when finding the largest batch (default 0.1)
  --mfu=F             the MFU to assume for throughput (default 0.45), or
  --from_run=LOG      the mean MFU of a run log (its summary's mean_mfu)
  --tokens=N          a token budget (85B, 44e9, ...), or
  --chinchilla        20 tokens per parameter (the Chinchilla rule, as tools/scaling_law.py --chinchilla), or
  --chinchilla=fit    the tokens for which this model is compute-optimal under tools/scaling_law.py's loss fit
  --json              print the same as JSON
  --measure           also run two real steps of the config in this process (its device: CPU, or one GPU) and
                      print the estimate against what they allocate (one process: DDP's layout on one rank)
  --summary           print one markdown row (the config's memory per GPU, the largest batch of every mode,
                      tokens/s and time), as docs/benchmarks.md tabulates the seed recipes
Nothing is allocated and no GPU is needed: the model is built on the meta device, and its activations are traced on
fake tensors (engine/plan.py says what is counted and what is not).
"""
import argparse
import json
import sys

import torch

from engine.config import ConfigError, parse_args
from engine.plan import GB, MODES, config_mode, estimate, keep_global_batch, largest_batch
from engine.runlog import PEAK_FLOPS, lookup_peak_flops
from model import GPT
from tools.bench import data_vocab
from tools.scaling_law import TOKENS_PER_PARAM, optimal_tokens
from train import model_config

# memory per GPU as torch.cuda reports it (total_memory), GB of 1e9 bytes; matched like the peak table, most
# specific first
GPU_MEMORY = [("A100-SXM4-40GB", 42.4), ("A100-40GB", 42.4), ("A100", 85.1), ("H100 NVL", 100.0),
              ("H100", 85.0), ("H200", 150.0), ("B200", 191.5), ("L40S", 48.3), ("L4", 24.1)]


def gpu_memory(name):
    for key, gb in GPU_MEMORY:
        if key.lower() in name.lower():
            return gb * GB
    return None


def parse_tokens(text):
    """85B, 1.5T, 300M, 44e9 -> a number of tokens."""
    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}
    t = text.strip().upper()
    try:
        return float(t[:-1]) * scale[t[-1]] if t[-1] in scale else float(t)
    except (ValueError, IndexError):
        raise SystemExit(f"plan.py: --tokens={text!r} is not a token count (e.g. 85B, 1.5T, 44e9)") from None


def fmt_gb(b):
    return f"{b / GB:,.1f}"


def plan(cfg, gpus, memory, peak, mfu, tokens, margin=0.1):
    """Everything the tool prints, as one dict. tokens: a count, or a function of the parameter count."""
    with torch.device("meta"):
        model = GPT(model_config(cfg, data_vocab(cfg), "sdpa"))
    if callable(tokens):
        tokens = tokens(model.num_params())
    T = cfg.block_size or model.config.block_size
    dtype = "float32" if cfg.dtype == "float32" else "float16" if cfg.dtype == "float16" else "bfloat16"
    global_rows = cfg.batch_size * cfg.gradient_accumulation_steps  # rows per optimizer step, whole job
    rows = []
    for mode in MODES:
        if mode == "fsdp" and cfg.optimizer == "muon":
            continue  # refused by the engine: Muon needs whole matrices
        for ac in (False, True):
            est = estimate(cfg, model, gpus, T, dtype, mode=mode, activation_checkpointing=ac)
            row = {"mode": mode, "activation_checkpointing": ac, "total_bytes": est["total"], "parts": est["parts"],
                   "chosen": mode == config_mode(cfg) and ac == cfg.activation_checkpointing}
            if memory:
                best = largest_batch(cfg, model, gpus, T, dtype, memory, margin, mode=mode,
                                     activation_checkpointing=ac)
                row["fits"] = est["total"] <= memory
                row["largest_batch"] = best
                # the largest batch that fits and keeps the config's rows per optimizer step: batch_size x
                # gradient_accumulation_steps (the job's micro-batches, a multiple of the GPUs)
                row["batch_size"], row["gradient_accumulation_steps"] = keep_global_batch(global_rows, best, gpus)
            rows.append(row)
    fpt = model.flops_per_token(T)
    out = {"config": {"batch_size": cfg.batch_size, "block_size": T, "gradient_accumulation_steps":
                      cfg.gradient_accumulation_steps, "optimizer": cfg.optimizer, "dtype": dtype,
                      "loss_chunk_size": model.config.loss_chunk_size},
           "gpus": gpus, "memory_per_gpu_bytes": memory, "margin": margin, "params": model.num_params(),
           "flops_per_token": fpt, "modes": rows}
    if peak and mfu:
        tps = mfu * peak / fpt  # per GPU
        out.update(peak_flops=peak, mfu=mfu, tokens_per_sec_per_gpu=tps, tokens_per_sec=tps * gpus)
        if tokens:
            secs = tokens / (tps * gpus)
            out.update(tokens=tokens, hours=secs / 3600, gpu_hours=secs * gpus / 3600)
    return out


def report(p, out=print):
    c = p["config"]
    out(f"# {p['params'] / 1e9:.3f}B parameters, batch {c['batch_size']} x {c['block_size']} per GPU, "
        f"{c['gradient_accumulation_steps']} micro-steps per optimizer step in the job, {c['optimizer']}, "
        f"{c['dtype']}, loss_chunk_size {c['loss_chunk_size']}, {p['gpus']} GPU(s)"
        + (f" of {fmt_gb(p['memory_per_gpu_bytes'])} GB" if p["memory_per_gpu_bytes"] else ""))
    names = ["params", "grads", "optimizer", "fsdp_gathered", "activations", "recompute", "loss",
             "batches", "allowance"]
    out("| mode | act. ckpt | " + " | ".join(names) + " | total GB | fits | largest batch | "
        "batch x accumulation at the config's rows per step |")
    out("|---" * (len(names) + 6) + "|")
    for r in p["modes"]:
        cells = [fmt_gb(r["parts"][n]) if n in r["parts"] else "-" for n in names]
        mark = " (config)" if r["chosen"] else ""
        fits = ("yes" if r["fits"] else "no") if "fits" in r else "-"
        out(f"| {r['mode']}{mark} | {'on' if r['activation_checkpointing'] else 'off'} | " + " | ".join(cells)
            + f" | {fmt_gb(r['total_bytes'])} | {fits} | {r.get('largest_batch', '-')} | "
              + (f"{r['batch_size']} x {r['gradient_accumulation_steps']} |" if r.get("batch_size") else "- |"))
    out(f"\nFLOPs per token {p['flops_per_token'] / 1e9:.2f} G (PaLM: 6N + 12 L H Q T, as MFU counts them)")
    if "tokens_per_sec" in p:
        out(f"at MFU {p['mfu']:.2f} of {p['peak_flops'] / 1e12:.0f} TFLOP/s: {p['tokens_per_sec_per_gpu']:,.0f} "
            f"tokens/s per GPU, {p['tokens_per_sec']:,.0f} in all")
    if "tokens" in p:
        out(f"{p['tokens'] / 1e9:,.1f}B tokens: {p['hours']:,.1f} hours on {p['gpus']} GPU(s), "
            f"{p['gpu_hours']:,.0f} GPU-hours")
    out("total: the step's peak, not the sum of the columns (the gradients and the loss's tensors do not peak with "
        "the activations; engine/plan.py). Estimates: the parameters, gradients and optimizer state are exact; "
        "activations are traced, the loss and FSDP's buffers counted from shapes; kernels' scratch, compile's and "
        "NCCL's pools are not counted.")


SUMMARY_HEADER = ("| config | GPU | mode, batch | GB per GPU | fits | largest batch ddp / zero1 / fsdp | ... with "
                  "act. ckpt | tokens/s per GPU | tokens | hours | GPU-hours |")


def summary_row(p, name, gpu):
    """One markdown row of a plan (SUMMARY_HEADER's columns)."""
    chosen = next(r for r in p["modes"] if r["chosen"])
    largest = {(r["mode"], r["activation_checkpointing"]): r.get("largest_batch", "-") for r in p["modes"]}
    cells = lambda ac: " / ".join(str(largest.get((m, ac), "-")) for m in MODES)  # noqa: E731
    num = lambda k, f: format(p[k], f) if k in p else "-"  # noqa: E731
    return (f"| {name} | {p['gpus']} x {gpu} | {chosen['mode']}, {p['config']['batch_size']} x "
            f"{p['config']['block_size']} | {fmt_gb(chosen['total_bytes'])} | "
            f"{('yes' if chosen['fits'] else 'no') if 'fits' in chosen else '-'} | {cells(False)} | {cells(True)} | "
            f"{num('tokens_per_sec_per_gpu', ',.0f')} | "
            + (f"{p['tokens'] / 1e9:,.1f}B" if "tokens" in p else "-")
            + f" | {num('hours', ',.1f')} | {num('gpu_hours', ',.0f')} |")


def measure(cfg, out=print):
    """The estimate for one process on cfg's device against two real steps there: the parameters' and optimizer
    state's bytes, and the step's peak (CUDA: torch.cuda.max_memory_allocated above what was allocated before the
    step, plus the resident bytes; CPU: every tensor torch allocates, counted by tools/bench.py's TensorMemory)."""
    from engine import distributed as D
    from tools.bench import Run, peak_bytes

    if cfg.use_zero1 or cfg.use_fsdp:
        raise SystemExit("plan.py: --measure runs one process; ZeRO-1's and FSDP's per-rank bytes are checked on 2 "
                         "ranks by tests/test_distributed.py")
    run = Run(cfg)
    run.step()  # the optimizer state exists from here on
    peak = peak_bytes(run)
    if peak is None:
        raise SystemExit("plan.py: --measure on CPU needs compile=False (TensorMemory cannot see inside compiled "
                         "graphs)")
    batch = run.x.untyped_storage().nbytes()  # made before the step, as the loop's batches are
    est = estimate(cfg, run.model, 1, run.T, run.dtype, device_type=run.dev_type)
    predicted = est["total"] - est["parts"].get("allowance", 0)  # the context and allocator slack are not tensors
    m = {"device": str(run.device), "dtype": run.dtype, "batch_size": run.B, "block_size": run.T,
         "params_predicted": est["parts"]["params"], "params_measured": D.local_bytes(run.owner.parameters()),
         "optimizer_predicted": est["parts"]["optimizer"],
         "optimizer_measured": D.optimizer_state_bytes(run.optimizer),
         "peak_predicted": predicted, "peak_measured": peak + batch}
    if out:
        out(f"\n# measured: two steps on {m['device']} in {m['dtype']}, batch {m['batch_size']} x {m['block_size']}")
        out("| bytes | predicted GB | measured GB | predicted / measured |")
        out("|---|---|---|---|")
        for k in ("params", "optimizer", "peak"):
            a, b = m[f"{k}_predicted"], m[f"{k}_measured"]
            out(f"| {k} | {a / GB:,.3f} | {b / GB:,.3f} | {a / b:.3f} |")
        out("(peak: the allowance for the CUDA context left out, since the allocator's count never includes it)")
    return m


def main(argv=None, out=print):
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--gpu")
    p.add_argument("--gpu_memory_gb", type=float)
    p.add_argument("--margin", type=float, default=0.1)
    p.add_argument("--mfu", type=float)
    p.add_argument("--from_run")
    p.add_argument("--tokens")
    p.add_argument("--chinchilla", nargs="?", const="20n", choices=("20n", "fit"))
    p.add_argument("--json", action="store_true")
    p.add_argument("--summary", action="store_true")
    p.add_argument("--measure", action="store_true")
    p.add_argument("-h", "--help", action="store_true")
    args, rest = p.parse_known_args(argv)
    if args.help:
        out(__doc__.strip())
        return None
    if args.gpus < 1:
        raise SystemExit("plan.py: --gpus must be at least 1")
    try:
        cfg = parse_args(rest)
    except ConfigError as e:
        raise SystemExit(f"plan.py: {e}") from None
    memory = args.gpu_memory_gb * GB if args.gpu_memory_gb else None
    peak = None
    if args.gpu:
        peak = lookup_peak_flops(args.gpu)
        memory = memory or gpu_memory(args.gpu)
        if peak is None or memory is None:
            known = ", ".join(k for k, _ in PEAK_FLOPS)
            raise SystemExit(f"plan.py: unknown GPU {args.gpu!r}; use one of {known}, or give --gpu_memory_gb "
                             "(and --peak_flops through the config for throughput)")
    peak = cfg.peak_flops or peak
    mfu = args.mfu
    if args.from_run:
        with open(args.from_run) as f:
            mfu = json.load(f).get("summary", {}).get("mean_mfu")
        if not mfu:
            raise SystemExit(f"plan.py: {args.from_run} records no MFU (a CPU run without --peak_flops?)")
    mfu = mfu or 0.45
    tokens = parse_tokens(args.tokens) if args.tokens else None
    if args.chinchilla:
        tokens = (lambda n: TOKENS_PER_PARAM * n) if args.chinchilla == "20n" else optimal_tokens
    res = plan(cfg, args.gpus, memory, peak, mfu, tokens, args.margin)
    lines = []
    if args.measure:
        res["measured"] = measure(cfg, out=lines.append)
    if args.json:
        out(json.dumps(res, indent=1))
    elif args.summary:
        out(summary_row(res, rest[0] if rest else "(flags only)", args.gpu or f"{args.gpu_memory_gb} GB"))
    else:
        report(res, out)
        for line in lines:
            out(line)
    return res


if __name__ == "__main__":
    main()
