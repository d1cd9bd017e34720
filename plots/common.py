"""What the plotting scripts share: the Agg backend, series from a run log, axes in tokens, titles from the config."""
import os

import matplotlib

matplotlib.use("Agg")  # files only: no display needed, so plots work on headless machines and in tests
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from tools.analyze_run import human  # noqa: E402


def series(records, key, scale=1.0):
    """(iterations, values) of one field, leaving out records where it is null (NaN, Inf, or not measured)."""
    pts = [(r["iter"], r[key] * scale) for r in records if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def tokens_axis(ax):
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: human(x)))
    ax.set_xlabel("tokens")


def model_desc(run):
    cfg, env = run.get("config") or {}, run.get("environment") or {}
    mc = env.get("model_config") or {}
    shape = f"{mc.get('n_layer')}L x {mc.get('n_embd')}" if mc else ""
    what = " ".join(x for x in (cfg.get("preset") or "", shape) if x)
    params = f", {human(env['num_params'])} params" if env.get("num_params") else ""
    return f"{what}{params}"


def run_title(run):
    cfg, env = run.get("config") or {}, run.get("environment") or {}
    where = ", ".join(x for x in (env.get("device_name"), env.get("dtype")) if x)
    return f"{cfg.get('out_dir', 'run')}: {model_desc(run)} on {cfg.get('dataset', '?')}" + \
        (f" ({where})" if where else "")


def empty(ax, message):
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="gray", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def save(fig, out):
    if os.path.dirname(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {out}")
