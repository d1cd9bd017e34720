"""What a run leaves in its out_dir stays true and its own: the run log's status after a crash, resuming a copied
folder or one with a damaged log, two runs on one out_dir, out_dirs that cannot be written, logs that cannot be
serialised. docs/reliability.md tabulates what each test shows."""
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import run_log, write_dataset
from test_reliability import ARGS, start, wait_for

import train
from engine.config import parse_args
from engine.runlog import RunLog, log_to_continue, new_log_path

# train.cli's error recorder (torch elastic) warns that pytest's captured stderr has no file descriptor
pytestmark = pytest.mark.filterwarnings("ignore:Unable to enable fault handler")


def run(out_dir, data, *extra, log=lambda *a: None):
    return train.main(parse_args(ARGS + [f"--dataset={data}", f"--out_dir={out_dir}", *extra]), log=log)


def cli(out_dir, data, *extra, capsys):
    """train.py's exit code and its stderr."""
    rc = train.cli(ARGS + [f"--dataset={data}", f"--out_dir={out_dir}", *extra])
    return rc, capsys.readouterr().err


def logs(out_dir):
    return sorted(p for p in os.listdir(out_dir) if p.startswith("run_") and p.endswith(".json"))


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("records") / "data"))


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A finished 8-step run (checkpoints at 4 and 8) to copy from."""
    out = tmp_path_factory.mktemp("trained") / "out"
    run(out, data, "--max_iters=8")
    return out


# ----------------------------------------------------------------------------------------------------------
# status

def test_second_ctrl_c_is_logged_as_failed(data, tmp_path):
    proc = start(tmp_path, data, env={"SLOW_STEP": "0.3", "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:  # the first signal lands at the start of a step, the second inside the same step
        if line.startswith("iter 2:"):
            break
    os.kill(proc.pid, signal.SIGINT)
    time.sleep(0.1)
    os.kill(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted; the run log says failed" in out, out[-3000:]
    assert "Traceback" not in out
    summary = run_log(tmp_path)["summary"]
    assert summary["status"] == "failed" and summary["error"]["type"] == "KeyboardInterrupt"
    assert summary["final_iter"] < 40


def test_only_a_run_that_reached_max_iters_is_completed(trained):
    summary = run_log(trained)["summary"]
    assert summary["status"] == "completed" and summary["final_iter"] == 8 and summary["error"] is None


# ----------------------------------------------------------------------------------------------------------
# which log a resume continues

def test_resuming_a_copied_folder_leaves_the_original_alone(data, trained, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    before = {n: digest(trained / n) for n in logs(trained)}
    run(copy, data, "--init_from=resume", "--max_iters=12")
    assert {n: digest(trained / n) for n in logs(trained)} == before
    [name] = logs(copy)
    doc = run_log(copy)
    assert name in before and sorted(r["iter"] for r in doc["training_iterations"]) == list(range(1, 13))
    assert doc["environment"]["resumes"][0]["iter"] == 8 and doc["summary"]["status"] == "completed"


def test_a_checkpoint_naming_a_log_by_full_path_is_looked_up_in_out_dir(trained, tmp_path):
    """Checkpoints written before the fix hold the log's full path: only its name counts."""
    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    [name] = logs(trained)
    path, doc = log_to_continue(str(copy), str(trained / name))
    assert path == str(copy / name) and doc["summary"]["status"] == "completed"
    said = []
    os.remove(copy / name)
    assert log_to_continue(str(copy), str(trained / name), warn=said.append) == (None, None)
    assert str(copy / name) in said[0] and "starting a new run log" in said[0]


@pytest.mark.parametrize("damage", ["empty", "truncated", "not a log"])
def test_a_damaged_run_log_is_kept_and_a_new_one_started(data, trained, tmp_path, damage):
    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    [name] = logs(copy)
    text = (copy / name).read_text()
    (copy / name).write_text({"empty": "", "truncated": text[:len(text) // 2], "not a log": "[1, 2]"}[damage])
    before = digest(copy / name)
    said = []
    run(copy, data, "--init_from=resume", "--max_iters=12", log=said.append)
    assert digest(copy / name) == before
    assert any(str(copy / name) in s and "damaged" in s for s in said), said
    [new] = [n for n in logs(copy) if n != name]
    doc = json.load(open(copy / new))
    assert [r["iter"] for r in doc["training_iterations"]] == list(range(9, 13))
    assert doc["summary"]["status"] == "completed"


# ----------------------------------------------------------------------------------------------------------
# writing the log

def strict(path):
    """The file as JSON that has no NaN or Infinity."""
    def refuse(c):
        raise ValueError(f"{c} in {path}")

    with open(path) as f:
        return json.load(f, parse_constant=refuse)


def test_non_finite_values_are_logged_as_null(tmp_path):
    path = str(tmp_path / "run_x.json")
    log = RunLog(path, {"learning_rate": math.inf, "betas": (0.9, math.nan)}, {"peak_flops": -math.inf})
    log.add("training_iterations", {"iter": 1, "loss": 2.0, "grad_norm": math.nan})
    log.finish({"status": "completed", "best_val_loss": math.inf})
    doc = strict(path)
    assert doc["config"] == {"learning_rate": None, "betas": [0.9, None]}
    assert doc["environment"]["peak_flops"] is None and doc["summary"]["best_val_loss"] is None
    assert doc["training_iterations"] == [{"iter": 1, "loss": 2.0, "grad_norm": None}]
    assert os.listdir(tmp_path) == ["run_x.json"]


def test_a_write_that_fails_leaves_the_log_whole_and_no_tmp(tmp_path):
    path = str(tmp_path / "run_x.json")
    said = []
    log = RunLog(path, {"max_iters": 2}, {}, warn=said.append)
    log.doc["environment"]["odd"] = math.nan  # slipped past the sanitising: json.dump raises ValueError
    log.flush()
    assert "could not write the run log" in said[0] and os.listdir(tmp_path) == ["run_x.json"]
    assert strict(path)["environment"] == {}


WRITE_PAST_A_SIZE_LIMIT = """
import json, os, resource, signal, sys
from engine.runlog import RunLog
path = sys.argv[1]
said = []
log = RunLog(path, {"max_iters": 500}, {}, warn=said.append)
for i in range(5):
    log.doc["training_iterations"].append({"iter": i, "loss": 1.0})
log.flush()
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, as on a full disk
size = os.path.getsize(path)
resource.setrlimit(resource.RLIMIT_FSIZE, (size + 200, resource.RLIM_INFINITY))
for i in range(5, 500):
    log.doc["training_iterations"].append({"iter": i, "loss": 1.0})
log.flush()  # the new document is larger than the limit: its temporary file is cut short mid-write
print(json.dumps(said))
"""


def test_a_write_cut_short_by_a_file_size_limit_leaves_the_previous_log(tmp_path):
    """A real failed write (the kernel refuses the bytes past RLIMIT_FSIZE), then the file on disk read back."""
    path = tmp_path / "run_x.json"
    res = subprocess.run([sys.executable, "-c", WRITE_PAST_A_SIZE_LIMIT, str(path)], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    [said] = json.loads(res.stdout)
    assert "could not write the run log" in said and "File too large" in said
    doc = json.loads(path.read_text())  # whole, and the version before the failed write
    assert [r["iter"] for r in doc["training_iterations"]] == [0, 1, 2, 3, 4]
    assert os.listdir(tmp_path) == ["run_x.json"]  # the cut-short temporary file is gone


def test_rewrites_are_synced_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b)))
    path = str(tmp_path / "run_x.json")
    RunLog(path, {}, {})
    assert events == [("fsync", path + ".tmp"), ("replace", path), ("fsync", str(tmp_path))]


def test_run_log_names_never_collide(data, tmp_path, monkeypatch):
    monkeypatch.setattr(time, "strftime", lambda *a: "20250101_000000")  # two runs started in the same second
    assert len({new_log_path(str(tmp_path)) for _ in range(3)}) == 3
    out = tmp_path / "o"
    run(out, data, "--max_iters=2")
    first = logs(out)
    before = digest(out / first[0])
    run(out, data, "--max_iters=2")
    assert len(logs(out)) == 2 and digest(out / first[0]) == before


# ----------------------------------------------------------------------------------------------------------
# one run per out_dir

def test_a_busy_out_dir_is_refused_and_a_killed_holder_frees_it(data, tmp_path, capsys):
    proc = start(tmp_path, data, env={"SLOW_STEP": "0.5"})
    wait_for(lambda: logs(tmp_path), proc)  # the lock is taken before the log is started
    rc, err = cli(tmp_path, data, capsys=capsys)  # this test's process is the second run
    assert proc.poll() is None, "the first run ended before the second was refused"
    assert rc == 2 and err.count("\n") == 1, err
    assert f"out_dir {tmp_path} is in use by another run (pid {proc.pid} on " in err and "slow_train.py" in err
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert run(tmp_path, data, "--max_iters=2")["final"]  # the kernel dropped the dead run's lock


@pytest.mark.distributed
def test_under_torchrun_every_rank_refuses_a_busy_out_dir_and_a_lost_rank_is_logged(data, tmp_path):
    layout = ["--gradient_accumulation_steps=2", "--batch_size=2"]
    first = start(tmp_path, data, *layout, nproc=2, env={"SLOW_STEP": "1"})
    wait_for(lambda: logs(tmp_path), first, timeout=180)
    second = start(tmp_path, data, *layout, nproc=2)
    out, _ = second.communicate(timeout=180)
    assert first.poll() is None, "the first job ended before the second was refused"
    # each rank says it (the two lines may interleave, each message is one write), none is left in a collective
    holders = re.findall(r"is in use by another run \(pid (\d+) on ", out)
    assert second.returncode != 0 and len(holders) == 2 and holders[0] == holders[1], out[-3000:]
    workers = subprocess.run(["pgrep", "-P", str(first.pid), "-f", "slow_train.py"], capture_output=True,
                             text=True).stdout.split()
    assert holders[0] in workers  # rank 0, the only one to touch out_dir
    os.kill(int(next(w for w in workers if w != holders[0])), signal.SIGKILL)
    out, _ = first.communicate(timeout=120)
    assert first.returncode != 0
    summary = run_log(tmp_path)["summary"]
    assert summary["status"] == "failed" and summary["error"]["message"], summary


# ----------------------------------------------------------------------------------------------------------
# out_dirs that cannot take a run

def test_out_dir_that_is_a_file_or_under_one(data, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    rc, err = cli(tmp_path / "f", data, capsys=capsys)
    assert rc == 2 and err.count("\n") == 1 and "is not a folder" in err, err
    rc, err = cli(tmp_path / "f" / "sub", data, capsys=capsys)
    assert rc == 2 and err.count("\n") == 1 and f"lies under {tmp_path / 'f'}, which is a file" in err, err


@pytest.fixture
def mount(tmp_path):
    """A small tmpfs at tmp_path/m and a function to remount it read-only; skips where mounting is not allowed."""
    m = tmp_path / "m"
    m.mkdir()
    if not shutil.which("mount") or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(m)],
                                                   capture_output=True).returncode:
        pytest.skip("mounting a tmpfs is not permitted here")
    yield m, lambda: subprocess.run(["mount", "-o", "remount,ro", str(m)], check=True)
    subprocess.run(["umount", "-l", str(m)], check=True)


def test_read_only_out_dir_is_refused_and_eval_only_needs_no_write_access(data, mount, capsys):
    m, read_only = mount
    run(m / "out", data, "--max_iters=4")
    read_only()
    for out_dir in (m / "out", m / "new"):
        rc, err = cli(out_dir, data, "--init_from=resume", capsys=capsys)
        assert rc == 2 and err.count("\n") == 1 and "Read-only file system" in err, err
    before = sorted(os.listdir(m / "out"))
    said = []
    res = run(m / "out", data, "--init_from=resume", "--eval_only=True", log=said.append)
    assert res["val_loss"] > 0 and res["run_log"] is None
    assert any("not writable" in s and "without writing a run log" in s for s in said), said
    assert sorted(os.listdir(m / "out")) == before


# ----------------------------------------------------------------------------------------------------------
# what other engines' analysis scripts read

# The analysis snippets of our users' training guide, as they stand: they read the newest run log of an out_dir
SNIPPET = """
import glob, json, sys
data = json.load(open(sorted(glob.glob(sys.argv[1] + '/run_*.json'))[-1]))
last = data['training_iterations'][-1]
print('last', last['iter'], last['loss'], last['mfu'])
rows = data.get('training_progress', [])[50:]
print('avg', sum(r['mfu'] for r in rows) / len(rows), max(r['mfu'] for r in rows),
      sum(r['tokens_per_sec'] for r in rows) / len(rows), sum(r['memory_allocated_gb'] for r in rows) / len(rows),
      sum(r['dt_ms'] for r in rows) / len(rows))
"""


def test_the_guides_analysis_snippets_read_our_run_logs(data, tmp_path):
    out = tmp_path / "out"
    run(out, data, "--max_iters=60", "--log_interval=1", "--eval_interval=60", "--peak_flops=1e12")
    res = subprocess.run(["python", "-c", SNIPPET, str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    last, avg = (line.split()[1:] for line in res.stdout.splitlines())
    doc = run_log(out)
    rows = doc["training_iterations"]
    assert len(rows) == 60 and doc["training_progress"] == rows
    assert [float(v) for v in last] == [60, rows[-1]["loss"], rows[-1]["mfu"]]
    # independently: MFU from the model's FLOP count, memory the process's resident size (a plausible number)
    flops = doc["environment"]["flops_per_token"]
    steady = rows[50:]
    mfu, peak_mfu, tps, mem, dt = (float(v) for v in avg)
    assert mfu == pytest.approx(sum(flops * r["tokens_per_sec"] / 1e12 for r in steady) / len(steady))
    assert peak_mfu == pytest.approx(max(flops * r["tokens_per_sec"] / 1e12 for r in steady))
    tokens = doc["environment"]["tokens_per_iter"]
    assert tps == pytest.approx(sum(tokens * 1000 / r["dt_ms"] for r in steady) / len(steady))
    assert 0.05 < mem < os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    assert all(r["memory_reserved_gb"] >= r["memory_allocated_gb"] for r in rows)
    assert "resident" in doc["environment"]["memory"]
    assert dt == pytest.approx(sum(r["dt_ms"] for r in steady) / len(steady))


@pytest.mark.parametrize("extra, loader", [((), "DataLoader: off; batches come from a prefetch thread"),
                                           (("--use_dataloader=True", "--dataloader_num_workers=1"),
                                            "DataLoader: on, 1 worker processes")])
def test_the_console_log_file_answers_the_guides_greps(data, tmp_path, extra, loader):
    out = tmp_path / "out"
    printed = []
    run(out, data, "--max_iters=2", *extra, log=printed.append)
    [name] = [p for p in os.listdir(out) if p.startswith("train_") and p.endswith(".log")]
    text = (out / name).read_text()
    assert text.splitlines() == printed  # every console line, in order
    res = subprocess.run(f'grep -E "CUDA Graph|DataLoader|Attention backend" {out}/*.log', shell=True,
                         capture_output=True, text=True)
    found = res.stdout.splitlines()
    assert len(found) == 3, res.stdout
    assert found[0].startswith("Attention backend: sdpa")
    assert found[1] == "CUDA Graphs: off" and found[2].startswith(loader)


def test_the_console_log_file_ends_with_the_error(data, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(Exception, match="block_size"):
        run(out, data, "--max_iters=2", "--block_size=100000")
    [name] = [p for p in os.listdir(out) if p.startswith("train_")]
    last = (out / name).read_text().splitlines()[-1]
    assert last.startswith("error: DataError: ") and "shorter than block_size + 1 = 100001 tokens" in last


def test_the_older_flash_attn_spelling(data, tmp_path, capsys):
    assert parse_args(["--flash_attn=True"]).attention_backend == "flash_attn_2"
    assert parse_args(["--flash_attn=True", "--attention_backend=flash_attn_2"]).attention_backend == "flash_attn_2"
    rc, err = cli(tmp_path / "a", data, "--flash_attn=True", "--attention_backend=manual", capsys=capsys)
    assert rc == 2 and "flash_attn=True means attention_backend=flash_attn_2, but attention_backend=manual" in err
    printed = []
    run(tmp_path / "b", data, "--max_iters=1", "--flash_attn=False", log=printed.append)
    assert "flash_attn=False is the older spelling of attention_backend=sdpa" in printed
    assert "Attention backend: sdpa (as configured)" in printed
    if not __import__("torch").cuda.is_available():  # flash-attn needs CUDA: a clear error, not a silent fallback
        rc, err = cli(tmp_path / "c", data, "--flash_attn=True", capsys=capsys)
        assert rc == 2 and "flash" in err.lower()
