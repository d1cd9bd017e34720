"""
Several runs overlaid in one PNG: train and val loss against tokens, val bits per byte, MFU and throughput.

    python plots/plot_compare.py out-a/run_*.json out-b/run_*.json --labels=baseline,wsd --out=compare.png
    python plots/plot_compare.py out-gpt2/run_*.json out-llama3/run_*.json --labels=gpt2,llama3

Tokens put runs with different batch sizes on one axis; bits per byte puts runs with different tokenizers on one
scale, where their losses per token do not compare. Works on logs that are still being written.
"""
import argparse
import os

from plots.common import empty, model_desc, plt, save, series, tokens_axis
from tools.analyze_run import load_run, tokens_per_iter


def plot_compare(runs, labels, out):
    fig, (ax_loss, ax_bpb, ax_mfu, ax_tps) = plt.subplots(1, 4, figsize=(26, 6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (run, label) in enumerate(zip(runs, labels)):
        c, tpi = colors[k % len(colors)], tokens_per_iter(run)
        it, loss = series(run["training_iterations"], "loss")
        ax_loss.plot([i * tpi for i in it], loss, color=c, lw=1, alpha=0.45)
        ei, ev = series(run.get("evals") or [], "val_loss")
        ax_loss.plot([i * tpi for i in ei], ev, "o-", color=c, ms=4, label=f"{label} (val)")
        ei, ev = series(run.get("evals") or [], "val_bpb")
        if ei:
            ax_bpb.plot([i * tpi for i in ei], ev, "o-", color=c, ms=4, label=label)
        for ax, key, scale in ((ax_mfu, "mfu", 100), (ax_tps, "tokens_per_sec", 1)):
            it, v = series(run["training_iterations"], key, scale)
            if it:
                ax.plot([i * tpi for i in it], v, color=c, lw=1, label=label)
    ax_loss.set_title("loss (lines: train per step, markers: val)")
    ax_loss.set_ylabel("loss")
    for ax, title, ylabel, note in ((ax_bpb, "val bits per byte (compares across tokenizers)", "bits per byte",
                                     "no run logged bits per byte"),
                                    (ax_mfu, "MFU", "MFU (%)", "no run logged MFU (it needs a peak FLOP/s)"),
                                    (ax_tps, "throughput", "tokens / s", "no run logged throughput")):
        ax.set_title(title)
        if ax.lines:
            ax.set_ylabel(ylabel)
        else:
            empty(ax, note)
    for ax in (ax_loss, ax_bpb, ax_mfu, ax_tps):
        if ax.lines:
            tokens_axis(ax)
            ax.grid(alpha=0.3)
            ax.legend()
    fig.suptitle("; ".join(f"{label}: {model_desc(run)}" for run, label in zip(runs, labels)), fontsize=11)
    fig.tight_layout()
    save(fig, out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("runs", nargs="+", help="run_*.json logs written by train.py")
    p.add_argument("--labels", help="comma-separated names for the runs (default: each run's out_dir)")
    p.add_argument("--out", default="compare.png", help="PNG to write (default compare.png)")
    args = p.parse_args(argv)
    labels = args.labels.split(",") if args.labels else None
    if labels and len(labels) != len(args.runs):
        p.error(f"--labels names {len(labels)} runs but {len(args.runs)} logs were given")
    try:
        runs = [load_run(path) for path in args.runs]
        if labels is None:
            labels = [(r.get("config") or {}).get("out_dir", path) for r, path in zip(runs, args.runs)]
            if len(set(labels)) < len(labels):  # several logs of one out_dir: the file names tell them apart
                labels = [os.path.basename(path) for path in args.runs]
        plot_compare(runs, labels, args.out)
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))


if __name__ == "__main__":
    main()
