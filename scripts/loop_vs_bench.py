"""train.py's real loop against tools/bench.py's step, on the same model and batch: tokens/s of each and the ratio.

    python scripts/loop_vs_bench.py --preset=gpt2 --block_size=1024 --batch_size=16 --compile=True \
        --dataset=/tmp/gpu_check/data/gpt2 [--iters=40] [--out_dir=DIR]

Settings are train.py's (a config file first, then --key=value), and go to both. train.py runs as its own process
for --iters steps (default 40) on the dataset, logging every step, evaluating only at the start and the end (2
batches), into --out_dir (default a fresh temporary folder); its figure is the median tokens_per_sec of the second
half of its steps, read from its JSON run log, so compilation and the first steps are left out. bench.py then times
its step on random tokens in this process (3 warm-up steps, median of 3 x 10). What the loop adds to the step is
what the ratio shows: fetching batches (data_wait_ms, also printed), the per-step logging and the host reading the
loss. Exit 1 when the loop fails.
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile

from tools import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def loop_figures(run_log):
    """(median tokens/s, median data_wait_ms, steps) over the second half of a run log's steps."""
    with open(run_log) as f:
        iters = json.load(f)["training_iterations"]
    late = iters[len(iters) // 2:]
    return (statistics.median(r["tokens_per_sec"] for r in late), statistics.median(r["data_wait_ms"] for r in late),
            len(late))


def main(argv=None, out=print):
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        out(__doc__.strip())
        return 0
    iters, out_dir, files, flags = 40, None, [], []
    for a in argv:
        name, _, value = a[2:].partition("=")
        if a.startswith("--iters="):
            iters = int(value)
        elif a.startswith("--out_dir="):
            out_dir = value
        elif a.startswith("--"):
            flags.append(a)
        else:
            files.append(a)  # config files come before every --key=value
    out_dir = out_dir or tempfile.mkdtemp(prefix="loop_vs_bench_")
    train = [sys.executable, os.path.join(ROOT, "train.py"), *files, f"--max_iters={iters}",
             f"--eval_interval={iters}", "--eval_iters=2", "--log_interval=1", "--gradient_log_interval=0",
             f"--out_dir={out_dir}", *flags]
    out("$ " + " ".join(train[1:]))
    if subprocess.run(train, cwd=ROOT).returncode != 0:
        out("the loop failed; no comparison")
        return 1
    logs = sorted((os.path.join(out_dir, n) for n in os.listdir(out_dir)
                   if n.startswith("run_") and n.endswith(".json")), key=os.path.getmtime)
    loop_tps, wait_ms, n = loop_figures(logs[-1])
    out(f"train.py: {loop_tps:,.0f} tokens/s (median of its last {n} steps), data_wait {wait_ms:.2f} ms; "
        f"run log {logs[-1]}")
    rows = bench.main([*files, *flags, "--warmup=3", "--iters=10", "--repeats=3"], out=out)
    bench_tps = rows[0]["tokens/s"]
    out(f"loop / bench tokens/s: {loop_tps:,.0f} / {bench_tps:,.0f} = {loop_tps / bench_tps:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
