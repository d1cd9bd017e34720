import json

import matplotlib.image as mpimg
import pytest
from test_analysis import synthetic_run

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


def test_missing_log_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        plot_single_run.main([str(tmp_path / "absent.json")])
    assert "absent.json does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        plot_compare.main([str(tmp_path / "absent.json"), "--labels=a,b"])
