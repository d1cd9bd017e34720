"""
One PNG of a run from its JSON log: loss against iterations and tokens, bits per byte, downstream task scores,
learning rate, gradient norm, MFU, tokens/s, memory, and the run's facts.

    python plots/plot_single_run.py out-shakespeare-char/run_20250101_120000.json        # writes run_....png beside it
    python plots/plot_single_run.py RUN.json --out=plots/demo.png

Works on a log that is still being written.
"""
import argparse
import os

from plots.common import empty, human, model_desc, plt, run_title, save, series, tokens_axis
from tools.analyze_run import best_and_last, health_flags, load_run, tokens_per_iter


def eval_lines(ax, run, measure, scale):
    """The evaluations' train_<measure> and val_<measure> against iterations times `scale`."""
    for split, style in (("train", "s--"), ("val", "o-")):
        ei, ev = series(run.get("evals") or [], f"{split}_{measure}")
        if ei:
            ax.plot([i * scale for i in ei], ev, style, ms=4, label=f"{split} (eval)")


def loss_panel(ax, run, scale, xlabel):
    it, loss = series(run["training_iterations"], "loss")
    ax.plot([i * scale for i in it], loss, lw=1, alpha=0.8, label="train (per step)")
    eval_lines(ax, run, "loss", scale)
    ax.set_ylabel("loss")
    ax.legend()
    if xlabel:
        ax.set_xlabel(xlabel)


def bpb_panel(ax, run):
    """Bits per byte against tokens: unlike the loss per token, it compares across tokenizers."""
    eval_lines(ax, run, "bpb", tokens_per_iter(run))
    if not ax.lines:
        empty(ax, "no bits per byte logged\n(a log older than it, or data whose tokenizer is unknown)")
        return
    ax.set_ylabel("bits per byte")
    tokens_axis(ax)
    ax.legend()


def tasks_panel(ax, run):
    """Each downstream task's accuracy (acc_norm where the task has it) and the core score, against iterations."""
    rows = run.get("task_evals") or []
    names = [k for k in rows[-1] if k not in ("iter", "core")] if rows else []
    for name in names:
        pts = [(r["iter"], r[name].get("acc_norm", r[name]["acc"])) for r in rows if name in r]
        label = name + (" (acc_norm)" if "acc_norm" in rows[-1][name] else " (acc)")
        ax.plot(*zip(*pts), "o-", ms=3, lw=1, label=label)
    if not names:
        empty(ax, "no downstream tasks logged\n(train with --eval_tasks=hellaswag,arc_easy,...)")
        return
    ax.plot([r["iter"] for r in rows], [r["core"] for r in rows], "k--", lw=1.5, label="core (centered mean)")
    ax.set_ylabel("accuracy")
    ax.set_xlabel("iteration")
    ax.legend(fontsize=8)


def line_panel(ax, run, keys, ylabel, note, log=False, scale=1.0):
    """Fields of the training records against iterations; `note` fills the panel when none was logged."""
    drawn = False
    for key, label in keys:
        it, v = series(run["training_iterations"], key, scale)
        if it:
            ax.plot(it, v, lw=1, label=label)
            drawn = True
    if not drawn:
        empty(ax, note)
        return
    ax.set_ylabel(ylabel)
    ax.set_xlabel("iteration")
    if log:
        ax.set_yscale("log")
    if len(keys) > 1:
        ax.legend()


def facts(run):
    cfg, env, summary = run.get("config") or {}, run.get("environment") or {}, run.get("summary")
    recs = run["training_iterations"]
    last = recs[-1]["iter"] if recs else 0
    lines = [
        f"model: {model_desc(run)}",
        f"status: {summary['status'] if summary else 'running or killed (no summary yet)'}",
        f"iteration {last} of {cfg.get('max_iters')}, {human(last * tokens_per_iter(run))} tokens",
        f"{human(tokens_per_iter(run))} tokens/iter: batch {cfg.get('batch_size')} x block {env.get('block_size')}"
        f" x accum {cfg.get('gradient_accumulation_steps')}",
        f"lr {cfg.get('learning_rate')} ({cfg.get('lr_schedule')}), warm-up {cfg.get('warmup_iters')}",
        f"{env.get('device_name')}, {env.get('dtype')}, attention {env.get('attention_backend')}",
        f"torch {env.get('torch_version')}, commit {(env.get('git_commit') or '?')[:10]}"
        + (" (dirty)" if env.get("git_dirty") else ""),
    ]
    if summary and summary.get("best_val_loss") is not None:
        lines.append(f"best val loss {summary['best_val_loss']:.4f}, wall time {summary['wall_time_sec']:.0f} s")
    best_bpb, _ = best_and_last(run, "val_bpb")
    if best_bpb:
        lines.append(f"best val bits per byte {best_bpb['val_bpb']:.4f} at iteration {best_bpb['iter']}")
    flags = health_flags(run)
    kinds = sorted({f["kind"] for f in flags})
    lines.append(f"health flags: {len(flags)}" + (f" ({', '.join(kinds)})" if kinds else ""))
    if env.get("resumes"):
        lines.append("resumed at iteration " + ", ".join(str(r["iter"]) for r in env["resumes"]))
    return "\n".join(lines)


def plot_run(run, out):
    fig, ax = plt.subplots(3, 4, figsize=(26, 14))
    loss_panel(ax[0, 0], run, 1, "iteration")
    ax[0, 0].set_title("loss by iteration")
    loss_panel(ax[0, 1], run, tokens_per_iter(run), None)
    tokens_axis(ax[0, 1])
    ax[0, 1].set_title("loss by tokens")
    bpb_panel(ax[0, 2], run)
    ax[0, 2].set_title("bits per byte")
    tasks_panel(ax[0, 3], run)
    ax[0, 3].set_title("downstream tasks")
    line_panel(ax[1, 0], run, [("lr", None)], "learning rate", "no learning rate logged")
    ax[1, 0].set_title("learning rate")
    line_panel(ax[1, 1], run, [("grad_norm", None)], "global norm (before clipping)", "no gradient norm logged",
               log=True)
    clip = (run.get("config") or {}).get("grad_clip")
    if clip and ax[1, 1].lines:
        ax[1, 1].axhline(clip, color="gray", ls=":", label=f"clip {clip}")
        ax[1, 1].legend()
    ax[1, 1].set_title("gradient norm")
    line_panel(ax[1, 2], run, [("mfu", None)], "MFU (%)",
               "MFU not logged: it needs a peak FLOP/s\n(known GPUs, or --peak_flops on CPU)", scale=100)
    ax[1, 2].set_title("model FLOPs utilisation")
    line_panel(ax[1, 3], run, [("tokens_per_sec", None)], "tokens / s", "no throughput logged")
    ax[1, 3].set_title("throughput")
    cpu = "resident" in ((run.get("environment") or {}).get("memory") or "")  # CPU runs log the process's memory
    line_panel(ax[2, 0], run, [("memory_allocated_gb", "resident" if cpu else "allocated"),
                               ("memory_reserved_gb", "peak resident" if cpu else "reserved")], "GB",
               "memory not logged (a CPU run's log older than it)")
    ax[2, 0].set_title("process memory" if cpu else "GPU memory")
    for a in ax[2, 1:]:
        a.axis("off")
    ax[2, 1].text(0, 1, facts(run), va="top", family="monospace", fontsize=9, transform=ax[2, 1].transAxes)
    ax[2, 1].set_title("run")
    for a in ax.flat:
        if a.lines:
            a.grid(alpha=0.3)
    fig.suptitle(run_title(run), fontsize=13)
    fig.tight_layout()
    save(fig, out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("run", help="run_*.json written by train.py")
    p.add_argument("--out", help="PNG to write (default: the log's name with .png, beside it)")
    args = p.parse_args(argv)
    try:
        plot_run(load_run(args.run), args.out or os.path.splitext(args.run)[0] + ".png")
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))


if __name__ == "__main__":
    main()
