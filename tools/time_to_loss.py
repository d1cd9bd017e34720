"""Wall time to a target val loss: train.py runs of several settings, side by side, medians over repeats.

    python tools/time_to_loss.py --target=1.70 --repeats=3 \
        "adamw=config/train_shakespeare_char.py" \
        "muon=config/train_shakespeare_char.py --optimizer=muon --learning_rate=3e-3"

Each contestant is `name=train.py arguments`. Every repeat runs each contestant once, as its own train.py process,
in alternating order (A B, then B A, ...), since whatever runs first on a shared machine is measurably penalised.
Times are wall-clock seconds from the process's start (imports, data and model set-up included) to the eval line
that first reaches the target, and to the process's end. Prints a markdown table of medians: time to the target,
total time, the val loss at the end, and how many repeats reached the target.
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVAL = re.compile(r"eval at iter (\d+): .*val loss ([0-9.]+|nan|inf)")


def run_once(args, target, out_dir):
    """(seconds to the first eval with val <= target or None, seconds in all, last val loss) of one train.py run."""
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *args, f"--out_dir={out_dir}"]
    t0 = time.perf_counter()
    reached, last = None, None
    with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as p:
        for line in p.stdout:
            m = EVAL.search(line)
            if m:
                last = float(m.group(2))
                if reached is None and last <= target:
                    reached = time.perf_counter() - t0
        rc = p.wait()
    if rc:
        raise SystemExit(f"time_to_loss: {' '.join(cmd)} exited with {rc}")
    return reached, time.perf_counter() - t0, last


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("contestants", nargs="+", help="name=train.py arguments (a config file and --key=value)")
    p.add_argument("--target", type=float, required=True, help="the val loss to reach")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out_root", default="/tmp/time_to_loss", help="each run's out_dir goes under this folder")
    a = p.parse_args(argv)
    named = []
    for c in a.contestants:
        name, sep, args = c.partition("=")
        if not sep or not args.strip():
            p.error(f"contestant {c!r} is not name=train.py arguments")
        named.append((name, args.split()))
    results = {name: [] for name, _ in named}
    for r in range(a.repeats):
        order = named if r % 2 == 0 else named[::-1]
        for name, args in order:
            res = run_once(args, a.target, os.path.join(a.out_root, f"{name}_{r}"))
            results[name].append(res)
            print(f"repeat {r}: {name}: to {a.target}: {res[0] and f'{res[0]:.1f} s'}, total {res[1]:.1f} s, "
                  f"final val {res[2]}", file=sys.stderr, flush=True)
    print(f"| setting | time to val {a.target} (median) | total time (median) | final val (median) | reached |")
    print("|---|---|---|---|---|")
    for name, args in named:
        rows = results[name]
        hit = [t for t, _, _ in rows if t is not None]
        to = f"{statistics.median(hit):.1f} s" if len(hit) == len(rows) else "-"
        finals = [v for _, _, v in rows if v is not None]
        final = f"{statistics.median(finals):.4f}" if finals else "-"
        print(f"| {name}: `{' '.join(args)}` | {to} | {statistics.median(t for _, t, _ in rows):.1f} s | {final} | "
              f"{len(hit)}/{len(rows)} |")


if __name__ == "__main__":
    main()
