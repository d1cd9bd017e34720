"""
What a run achieved and what a full run would take, from its JSON run log(s).

    python tools/analyze_run.py out-shakespeare-char/run_*.json
    python tools/analyze_run.py out-llama3-1.5b-optimal/run_*.json --tokens=85B,102B --warmup=20
    python tools/analyze_run.py runA.json runB.json            # several runs: one report each, then a table

Throughput statistics (MFU, tokens/s, ms per iteration, GPU memory) leave out the first --warmup iterations after
the start and after every resume, where compilation and allocator growth inflate step times. Times to a token budget
are iterations times the mean step time: training steps only, evaluations and checkpoints excluded. Val bits per
byte, where the run logged it, compares runs across tokenizers, as the loss per token cannot. A log that is still
being written reads as well as a finished one (train.py replaces it atomically).
"""
import argparse
import json
import math
import os
import statistics
import sys

# (record key, label, scale, format)
METRICS = [("mfu", "MFU %", 100, ".2f"), ("tokens_per_sec", "tokens/s", 1, ",.0f"), ("dt_ms", "ms/iter", 1, ",.1f"),
           ("data_wait_ms", "waiting for data ms", 1, ",.2f"), ("memory_allocated_gb", "memory allocated GB", 1, ".2f"),
           ("memory_reserved_gb", "memory reserved GB", 1, ".2f")]
SUFFIXES = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


def load_run(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"run log {path} does not exist")
    try:
        with open(path) as f:
            run = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"run log {path} is not valid JSON ({e})") from None
    if not isinstance(run, dict) or "training_iterations" not in run:
        raise ValueError(f"{path} is not a run log written by train.py (no training_iterations)")
    return run


def parse_tokens(text):
    """'85B' -> 85e9; also 1.5T, 300M, 2e9."""
    t = text.strip().upper()
    scale = SUFFIXES.get(t[-1:], None)
    try:
        return float(t[:-1]) * scale if scale else float(t)
    except ValueError:
        raise ValueError(f"token budget {text!r} is not a number like 85B, 1.5T, 300M or 2e9") from None


def human(n, digits=3):
    """1.234e9 -> '1.23B'."""
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.{digits}g}{suffix}"
    return f"{n:.{digits}g}"


def duration(sec):
    if sec < 120:
        return f"{sec:.0f} s"
    if sec < 7200:
        return f"{sec / 60:.1f} min"
    if sec < 172800:
        return f"{sec / 3600:.1f} h"
    return f"{sec / 86400:.1f} d"


def tokens_per_iter(run):
    env, cfg = run.get("environment") or {}, run.get("config") or {}
    if env.get("tokens_per_iter"):
        return env["tokens_per_iter"]
    T = env.get("block_size") or cfg.get("block_size")
    if not (T and cfg.get("batch_size") and cfg.get("gradient_accumulation_steps")):
        raise ValueError("the run log gives neither environment.tokens_per_iter nor the batch size, block size and "
                         "gradient accumulation steps to compute it")
    return cfg["batch_size"] * cfg["gradient_accumulation_steps"] * T * env.get("world_size", 1)


def steady(run, warmup):
    """Training records outside the first `warmup` iterations after the start and after each resume."""
    starts = [0] + [r["iter"] for r in (run.get("environment") or {}).get("resumes", [])]
    return [r for r in run["training_iterations"] if not any(s < r["iter"] <= s + warmup for s in starts)]


def describe(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "median": statistics.median(values), "min": min(values),
            "max": max(values), "n": len(values)}


def health_flags(run):
    """Flags from the summary (written at the end) and the health records (written as they happen)."""
    flags = list((run.get("summary") or {}).get("health_flags") or [])
    for r in run.get("health") or []:
        detail = ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("iter", "kind"))
        flags.append({"iter": r.get("iter"), "kind": r.get("kind"), "message": detail})
    return flags


def best_and_last(run, key):
    """The evaluations with the lowest and the latest value of `key`, (None, None) where none logged it (bits per
    byte in logs written before train.py logged it, or on data whose tokenizer is unknown)."""
    evals = [e for e in run.get("evals") or [] if e.get(key) is not None]
    return (min(evals, key=lambda e: e[key]), evals[-1]) if evals else (None, None)


def analyze(run, warmup=10, budgets=()):
    """Everything the report prints, as a dict."""
    cfg, summary = run.get("config") or {}, run.get("summary")
    recs = run["training_iterations"]
    kept = steady(run, warmup)
    tpi = tokens_per_iter(run)
    last = recs[-1]["iter"] if recs else 0
    stats = {key: describe(r.get(key) for r in kept) for key, *_ in METRICS}
    dt = stats["dt_ms"]["mean"] / 1000 if stats["dt_ms"] else None
    max_iters = cfg.get("max_iters")
    plans = [{"label": "this run's max_iters", "tokens": max_iters * tpi}] if max_iters else []
    plans += [{"label": None, "tokens": b} for b in budgets]
    for p in plans:
        p["iters"] = math.ceil(p["tokens"] / tpi)
        p["seconds"] = p["iters"] * dt if dt else None
        p["remaining_seconds"] = max(p["iters"] - last, 0) * dt if dt else None
    best, latest = best_and_last(run, "val_loss")
    best_bpb, last_bpb = best_and_last(run, "val_bpb")
    return {
        "name": cfg.get("out_dir", "?"),
        "status": summary["status"] if summary else "running or killed (no summary yet)",
        "iter": last, "max_iters": max_iters, "tokens_per_iter": tpi, "tokens_done": last * tpi,
        "records": len(recs), "records_used": len(kept), "warmup": warmup,
        "num_params": (run.get("environment") or {}).get("num_params"),
        "stats": stats,
        "first_loss": recs[0]["loss"] if recs else None, "last_loss": recs[-1]["loss"] if recs else None,
        "best_val_loss": best["val_loss"] if best else None, "best_val_iter": best["iter"] if best else None,
        "last_val_loss": latest["val_loss"] if latest else None,
        "best_val_bpb": best_bpb["val_bpb"] if best_bpb else None,
        "best_val_bpb_iter": best_bpb["iter"] if best_bpb else None,
        "last_val_bpb": last_bpb["val_bpb"] if last_bpb else None,
        "plans": plans, "health_flags": health_flags(run),
    }


def report(a):
    lines = [f"== {a['name']}: {a['status']}, iteration {a['iter']}"
             + (f" of {a['max_iters']}" if a["max_iters"] else "")
             + f", {human(a['tokens_done'])} tokens ({human(a['tokens_per_iter'])} per iteration)"]
    if a["num_params"]:
        lines.append(f"model: {human(a['num_params'])} parameters")
    if a["last_loss"] is not None:
        lines.append(f"train loss: {a['first_loss']:.4f} at the first record, {a['last_loss']:.4f} at the last")
    if a["best_val_loss"] is not None:
        lines.append(f"val loss: best {a['best_val_loss']:.4f} at iteration {a['best_val_iter']}, "
                     f"last {a['last_val_loss']:.4f}")
    if a["best_val_bpb"] is not None:
        lines.append(f"val bits per byte: best {a['best_val_bpb']:.4f} at iteration {a['best_val_bpb_iter']}, "
                     f"last {a['last_val_bpb']:.4f}")
    lines.append(f"throughput over {a['records_used']} of {a['records']} logged iterations "
                 f"(first {a['warmup']} after start and resumes skipped):")
    lines.append(f"  {'':<20}{'mean':>12}{'median':>12}{'min':>12}{'max':>12}")
    for key, label, scale, fmt in METRICS:
        s = a["stats"][key]
        if s is None:
            lines.append(f"  {label:<20}{'not logged':>12}")
            continue
        lines.append(f"  {label:<20}" + "".join(f"{s[k] * scale:>12{fmt}}" for k in ("mean", "median", "min", "max")))
    for p in a["plans"]:
        head = f"to {human(p['tokens'])} tokens{' (' + p['label'] + ')' if p['label'] else ''}: {p['iters']:,} " \
               "iterations"
        if p["seconds"] is None:
            lines.append(f"{head} (no step times logged yet)")
            continue
        left = f", {duration(p['remaining_seconds'])} left" if 0 < p["remaining_seconds"] < p["seconds"] else ""
        lines.append(f"{head}, {duration(p['seconds'])} of training steps{left}")
    if a["health_flags"]:
        lines.append(f"health flags ({len(a['health_flags'])}):")
        lines += [f"  iter {f['iter']}: {f['kind']}: {f['message']}" for f in a["health_flags"]]
    else:
        lines.append("health flags: none")
    return "\n".join(lines)


def table(analyses):
    """One row per run, side by side."""
    def cell(s, key, scale=1, fmt=",.1f"):
        return "-" if s[key] is None else f"{s[key]['mean'] * scale:{fmt}}"

    head = ["run", "status", "iter", "params", "loss", "best val", "best val bpb", "ms/iter", "tok/s", "MFU %",
            "peak MFU %", "peak mem GB"]
    head += [f"to {human(p['tokens'])}" for p in analyses[0]["plans"] if p["label"] is None]
    rows = []
    for a in analyses:
        s = a["stats"]
        row = [a["name"], a["status"].split()[0], f"{a['iter']}/{a['max_iters']}",
               human(a["num_params"]) if a["num_params"] else "-",
               f"{a['last_loss']:.4f}" if a["last_loss"] is not None else "-",
               f"{a['best_val_loss']:.4f}" if a["best_val_loss"] is not None else "-",
               f"{a['best_val_bpb']:.4f}" if a["best_val_bpb"] is not None else "-",
               cell(s, "dt_ms"), cell(s, "tokens_per_sec", fmt=",.0f"), cell(s, "mfu", 100),
               f"{s['mfu']['max'] * 100:.1f}" if s["mfu"] else "-",
               f"{s['memory_reserved_gb']['max']:.1f}" if s["memory_reserved_gb"] else "-"]
        row += [duration(p["seconds"]) if p["seconds"] else "-" for p in a["plans"] if p["label"] is None]
        rows.append(row)
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    fmt = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run_*.json logs written by train.py")
    parser.add_argument("--warmup", type=int, default=10,
                        help="iterations after the start and after each resume left out of throughput (default 10)")
    parser.add_argument("--tokens", default="",
                        help="comma-separated token budgets to time, e.g. 85B,102B (the run's own max_iters always)")
    args = parser.parse_args(argv)
    if args.warmup < 0:
        parser.error("--warmup must not be negative")
    try:
        budgets = [parse_tokens(t) for t in args.tokens.split(",") if t.strip()]
        analyses = [analyze(load_run(p), args.warmup, budgets) for p in args.runs]
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    names = [a["name"] for a in analyses]
    for a, path in zip(analyses, args.runs):
        if names.count(a["name"]) > 1:
            a["name"] = path
    print("\n\n".join(report(a) for a in analyses))
    if len(analyses) > 1:
        print("\n" + table(analyses))


if __name__ == "__main__":
    sys.exit(main())
