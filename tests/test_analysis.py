import copy
import json

import pytest

from engine.runlog import RunLog
from tools.analyze_run import analyze, load_run, main, parse_tokens, report

DT_MS = [5000, 100, 200, 300, 100, 300]  # the first step pays for compilation
MFU = [0.05, 0.3, 0.4, 0.5, 0.2, 0.6]
RESERVED = [2.0, 4.0, 4.0, 5.0, 4.0, 4.0]


def synthetic_run(summary=True):
    """Six records at iterations 10..60 of a run of 100 iterations, 1000 tokens each."""
    recs = [{"iter": 10 * (k + 1), "loss": 5.0 - 0.4 * k, "lr": 1e-3, "grad_norm": 1.0 + k, "dt_ms": dt,
             "tokens_per_sec": 1000 / (dt / 1000), "mfu": m, "memory_allocated_gb": r / 2, "memory_reserved_gb": r}
            for k, (dt, m, r) in enumerate(zip(DT_MS, MFU, RESERVED))]
    return {
        "config": {"out_dir": "out-synth", "dataset": "synth", "preset": "tiny_gpt2", "max_iters": 100,
                   "batch_size": 2, "gradient_accumulation_steps": 5, "block_size": 100, "learning_rate": 1e-3,
                   "grad_clip": 1.0},
        "environment": {"torch_version": "2.13", "device_name": "NVIDIA H100 80GB HBM3", "world_size": 1,
                        "dtype": "bfloat16", "num_params": 1_234_567, "tokens_per_iter": 1000, "block_size": 100,
                        "model_config": {"n_layer": 2, "n_embd": 64}},
        "training_iterations": recs,
        "evals": [{"iter": 0, "train_loss": 5.5, "val_loss": 5.6, "train_bpb": 2.0, "val_bpb": 2.1},
                  {"iter": 30, "train_loss": 4.0, "val_loss": 4.1, "train_bpb": 1.25, "val_bpb": 1.3},
                  {"iter": 60, "train_loss": 3.2, "val_loss": 3.3, "train_bpb": 1.3, "val_bpb": 1.32}],
        "gradient_norms": [{"iter": 50, "norms": {"tok_emb": 0.5, "blocks.0": 0.7}}],
        "health": [{"iter": 55, "kind": "diverged", "loss": None, "nonfinite_grads": ["blocks.0.attn.qkv.weight"]}],
        "summary": {"status": "completed", "final_iter": 60, "best_val_loss": 3.3, "final_train_loss": 3.2,
                    "final_val_loss": 3.3, "wall_time_sec": 7.0, "mean_tokens_per_sec": 6000.0, "mean_mfu": 0.4,
                    "health_flags": [{"iter": 30, "kind": "grad_spike", "message": "gradient norm 1.2e3"}]}
        if summary else None,
    }


def without_bpb(run):
    """The run as a log from before train.py logged bits per byte."""
    for e in run["evals"]:
        del e["train_bpb"], e["val_bpb"]
    return run


def write(tmp_path, run, name="run.json"):
    path = tmp_path / name
    path.write_text(json.dumps(run))
    return str(path)


def test_means_and_peaks_skip_warmup():
    a = analyze(synthetic_run(), warmup=15)  # drops iteration 10 only
    s = a["stats"]
    assert a["records_used"] == 5
    assert s["dt_ms"]["mean"] == pytest.approx(200.0)  # (100 + 200 + 300 + 100 + 300) / 5
    assert s["dt_ms"]["median"] == pytest.approx(200.0)
    assert s["mfu"]["mean"] == pytest.approx(0.4)  # (0.3 + 0.4 + 0.5 + 0.2 + 0.6) / 5
    assert s["mfu"]["max"] == pytest.approx(0.6)
    assert s["tokens_per_sec"]["mean"] == pytest.approx((10000 + 5000 + 10000 / 3 + 10000 + 10000 / 3) / 5)
    assert s["tokens_per_sec"]["max"] == pytest.approx(10000.0)
    assert s["memory_reserved_gb"]["max"] == 5.0
    assert a["best_val_loss"] == 3.3 and a["best_val_iter"] == 60


def test_no_warmup_keeps_the_compile_step():
    assert analyze(synthetic_run(), warmup=0)["stats"]["dt_ms"]["mean"] == pytest.approx(1000.0)  # 6000 / 6


def test_warmup_after_each_resume_is_skipped():
    run = synthetic_run()
    run["environment"]["resumes"] = [{"iter": 40, "time": "2025-01-01T00:00:00"}]
    a = analyze(run, warmup=15)  # drops 10 (start) and 50 (resume at 40)
    assert a["records_used"] == 4
    assert a["stats"]["dt_ms"]["mean"] == pytest.approx((100 + 200 + 300 + 300) / 4)


def test_time_and_iterations_to_token_budgets():
    a = analyze(synthetic_run(), warmup=15, budgets=[1e6, 85e9])
    this_run, one_m, big = a["plans"]
    assert this_run["tokens"] == 100_000 and this_run["iters"] == 100
    assert this_run["seconds"] == pytest.approx(100 * 0.2)
    assert this_run["remaining_seconds"] == pytest.approx(40 * 0.2)  # 60 of 100 iterations done
    assert one_m["iters"] == 1000 and one_m["seconds"] == pytest.approx(200.0)
    assert big["iters"] == 85_000_000 and big["seconds"] == pytest.approx(17_000_000.0)


def test_health_flags_from_summary_and_records():
    kinds = [(f["iter"], f["kind"]) for f in analyze(synthetic_run())["health_flags"]]
    assert kinds == [(30, "grad_spike"), (55, "diverged")]


def test_log_still_being_written():
    a = analyze(synthetic_run(summary=False), warmup=15, budgets=[1e6])
    assert a["status"].startswith("running")
    assert a["stats"]["mfu"]["mean"] == pytest.approx(0.4)
    assert [f["kind"] for f in a["health_flags"]] == ["diverged"]  # summary flags arrive only at the end


def test_log_written_by_runlog_without_records_yet(tmp_path):
    run = synthetic_run()
    path = str(tmp_path / "run_x.json")
    log = RunLog(path, run["config"], run["environment"])  # what train.py has written before the first step
    a = analyze(load_run(path), budgets=[1e6])
    assert a["iter"] == 0 and a["stats"]["dt_ms"] is None and a["plans"][1]["seconds"] is None
    log.add("training_iterations", run["training_iterations"][0])
    log.add("training_iterations", run["training_iterations"][1])
    log.flush()
    a = analyze(load_run(path), warmup=15)
    assert a["iter"] == 20 and a["stats"]["dt_ms"]["mean"] == pytest.approx(100.0)


def test_cpu_log_without_mfu_or_memory():
    run = synthetic_run()
    for r in run["training_iterations"]:
        r["mfu"] = r["memory_allocated_gb"] = r["memory_reserved_gb"] = None
    s = analyze(run)["stats"]
    assert s["mfu"] is None and s["memory_reserved_gb"] is None and s["dt_ms"] is not None


def test_bits_per_byte_best_and_last(capsys):
    a = analyze(synthetic_run())
    assert (a["best_val_bpb"], a["best_val_bpb_iter"], a["last_val_bpb"]) == (1.3, 30, 1.32)
    assert "val bits per byte: best 1.3000 at iteration 30, last 1.3200" in report(a)


def test_log_without_bits_per_byte(tmp_path, capsys):
    a = analyze(without_bpb(synthetic_run()))
    assert a["best_val_bpb"] is None and a["last_val_bpb"] is None and a["best_val_loss"] == 3.3
    assert "bits per byte" not in report(a)
    main([write(tmp_path, without_bpb(synthetic_run()), "old.json"), write(tmp_path, synthetic_run(), "new.json")])
    head, _, old, new = capsys.readouterr().out.splitlines()[-4:]
    col = head.index("best val bpb") + len("best val bpb")
    assert old[:col].endswith("-") and new[:col].endswith("1.3000")


def test_parse_tokens():
    assert parse_tokens("85B") == 85e9
    assert parse_tokens("1.5T") == 1.5e12
    assert parse_tokens("300m") == 300e6
    assert parse_tokens("2e9") == 2e9
    with pytest.raises(ValueError, match="token budget"):
        parse_tokens("lots")


def test_cli_report_and_side_by_side_table(tmp_path, capsys):
    a = write(tmp_path, synthetic_run(), "a.json")
    other = copy.deepcopy(synthetic_run(summary=False))
    other["config"]["out_dir"] = "out-other"
    b = write(tmp_path, other, "b.json")
    main([a, b, "--warmup=15", "--tokens=1M"])
    out = capsys.readouterr().out
    assert "to 1M tokens: 1,000 iterations, 3.3 min of training steps" in out
    assert "grad_spike" in out and "running" in out
    assert "out-synth" in out and "out-other" in out and "peak MFU %" in out  # the table
    assert "60.00" in out  # peak MFU of the first run, in percent


def test_cli_names_a_missing_file(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path / "nope.json")])
    assert "nope.json does not exist" in capsys.readouterr().err
