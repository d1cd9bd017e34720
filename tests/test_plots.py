import json

import matplotlib.image as mpimg
import pytest
from test_analysis import synthetic_run, without_bpb

from plots import plot_compare, plot_single_run


def write(tmp_path, run, name):
    path = tmp_path / name
    path.write_text(json.dumps(run))
    return str(path)


def check_png(path, min_width=1000):
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(path)
    assert img.shape[1] >= min_width
    assert img[..., :3].std() > 0.05  # something was drawn, not a blank canvas


def test_single_run_png_beside_the_log(tmp_path):
    log = write(tmp_path, synthetic_run(), "run_20250101_000000.json")
    plot_single_run.main([log])
    check_png(tmp_path / "run_20250101_000000.png")


def test_single_run_of_a_cpu_log_still_being_written(tmp_path):
    run = synthetic_run(summary=False)
    for r in run["training_iterations"]:
        r["mfu"] = r["memory_allocated_gb"] = r["memory_reserved_gb"] = None
    out = tmp_path / "sub" / "plot.png"
    plot_single_run.main([write(tmp_path, run, "run.json"), f"--out={out}"])
    check_png(out)


def test_compare_overlays_runs(tmp_path):
    other = synthetic_run()
    other["config"]["out_dir"] = "out-other"
    other["environment"]["tokens_per_iter"] = 2000
    logs = [write(tmp_path, synthetic_run(), "a.json"), write(tmp_path, other, "b.json")]
    out = tmp_path / "cmp.png"
    plot_compare.main([*logs, f"--out={out}", "--labels=base,big"])
    check_png(out)


def drawn(monkeypatch, module, main, argv):
    """{panel title: [(x, y) of each line]} of the figure `main` would save."""
    figs = []
    monkeypatch.setattr(module, "save", lambda fig, out: figs.append(fig))
    main(argv)
    [fig] = figs
    panels = {ax.get_title(): [(list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.lines] for ax in fig.axes}
    plot_single_run.plt.close(fig)
    return panels


def test_single_run_shows_bits_per_byte_by_tokens(tmp_path, monkeypatch):
    panels = drawn(monkeypatch, plot_single_run, plot_single_run.main, [write(tmp_path, synthetic_run(), "r.json")])
    assert panels["bits per byte"] == [([0, 30_000, 60_000], [2.0, 1.25, 1.3]),  # train, val (1000 tokens/iter)
                                       ([0, 30_000, 60_000], [2.1, 1.3, 1.32])]
    old = drawn(monkeypatch, plot_single_run, plot_single_run.main,
                [write(tmp_path, without_bpb(synthetic_run()), "old.json")])
    assert old["bits per byte"] == [] and len(old["loss by tokens"]) == 3


def test_compare_runs_on_bits_per_byte(tmp_path, monkeypatch):
    other = synthetic_run()
    other["environment"]["tokens_per_iter"] = 2000
    logs = [write(tmp_path, synthetic_run(), "a.json"), write(tmp_path, other, "b.json"),
            write(tmp_path, without_bpb(synthetic_run()), "old.json")]
    panels = drawn(monkeypatch, plot_compare, plot_compare.main, [*logs, "--labels=gpt2,llama3,old"])
    [title] = [t for t in panels if "bits per byte" in t]
    assert panels[title] == [([0, 30_000, 60_000], [2.1, 1.3, 1.32]), ([0, 60_000, 120_000], [2.1, 1.3, 1.32])]


def test_missing_log_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        plot_single_run.main([str(tmp_path / "absent.json")])
    assert "absent.json does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        plot_compare.main([str(tmp_path / "absent.json"), "--labels=a,b"])


def test_single_run_shows_downstream_tasks(tmp_path, monkeypatch):
    run = synthetic_run()
    run["task_evals"] = [{"iter": i, "arc_easy": {"acc": a, "acc_norm": n, "centered": 0.0, "n": 5},
                          "winogrande": {"acc": w, "centered": 0.0, "n": 5}, "core": c}
                         for i, a, n, w, c in ((0, 0.2, 0.25, 0.5, -0.1), (30, 0.4, 0.45, 0.6, 0.2))]
    panels = drawn(monkeypatch, plot_single_run, plot_single_run.main, [write(tmp_path, run, "t.json")])
    assert panels["downstream tasks"] == [([0, 30], [0.25, 0.45]), ([0, 30], [0.5, 0.6]), ([0, 30], [-0.1, 0.2])]
    old = drawn(monkeypatch, plot_single_run, plot_single_run.main, [write(tmp_path, synthetic_run(), "o.json")])
    assert old["downstream tasks"] == []


def test_single_run_plots_the_logged_series(tmp_path, monkeypatch):
    """The loss, learning-rate and gradient-norm panels draw exactly the logged numbers, at their iterations (and
    at their token counts on the tokens axis)."""
    run = synthetic_run()
    for k, r in enumerate(run["training_iterations"]):
        r["lr"] = 1e-3 * (k + 1) / 7  # a schedule, so that a wrong key or order shows
    its = [r["iter"] for r in run["training_iterations"]]
    panels = drawn(monkeypatch, plot_single_run, plot_single_run.main, [write(tmp_path, run, "s.json")])
    by_iter = panels["loss by iteration"]
    assert (its, [r["loss"] for r in run["training_iterations"]]) in by_iter
    assert ([e["iter"] for e in run["evals"]], [e["val_loss"] for e in run["evals"]]) in by_iter
    tokens = run["environment"]["tokens_per_iter"]
    assert ([i * tokens for i in its], [r["loss"] for r in run["training_iterations"]]) in panels["loss by tokens"]
    assert panels["learning rate"] == [(its, [r["lr"] for r in run["training_iterations"]])]
    assert panels["gradient norm"][0] == (its, [r["grad_norm"] for r in run["training_iterations"]])
