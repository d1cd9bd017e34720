"""Faults a long run meets (kills, preemption, full disks, corrupt files, NaNs) and bad input it must refuse.
docs/reliability.md tabulates what each test shows."""
import errno
import json
import os
import pickle
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, write_dataset
from conftest import logged_losses as losses
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import train
from engine.checkpoint import CheckpointError, find_latest, list_checkpoints, load_checkpoint, load_meta
from engine.config import FIELDS, ConfigError, parse_args
from engine.data.bins import DataError

ARGS = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--eval_iters=2",
        "--warmup_iters=2", "--learning_rate=3e-3", "--min_lr=3e-4", "--device=cpu", "--dtype=float32",
        "--log_interval=1",
        "--max_iters=40", "--lr_decay_iters=40", "--eval_interval=4", "--gradient_log_interval=0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("rel") / "data"))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    train.main(parse_args(ARGS + [f"--dataset={data}", f"--out_dir={out}"]), log=lambda *a: None)
    return losses(out)


def start(out_dir, data, *extra, nproc=0, env=None):
    cmd = [sys.executable, os.path.join(ROOT, "tests/helpers/slow_train.py"), *ARGS, f"--dataset={data}",
           f"--out_dir={out_dir}", *extra]
    if nproc:
        cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    env = {**os.environ, "SLOW_STEP": "0.05", **(env or {})}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def wait_for(pred, proc, timeout=120):
    t0 = time.time()
    while not pred():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early:\n{proc.stdout.read()[-3000:]}")
        if time.time() - t0 > timeout:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


def resume(out_dir, data, *extra):
    train.main(parse_args(ARGS + [f"--dataset={data}", f"--out_dir={out_dir}", "--init_from=resume", *extra]),
               log=lambda *a: None)


def assert_same(got, reference):
    """Every iteration logged, each loss bit-identical to the uninterrupted run's."""
    assert sorted(got) == sorted(reference)
    assert {i: got[i] for i in got} == reference


def ckpt_iters(out_dir):
    return [int(os.path.basename(p).split("_")[1]) for p in list_checkpoints(out_dir)]


# ----------------------------------------------------------------------------------------------------------
# faults

def test_kill9_during_training_resumes_exactly(data, reference, tmp_path):
    proc = start(tmp_path, data)
    wait_for(lambda: 12 in ckpt_iters(tmp_path), proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    newest = ckpt_iters(tmp_path)[-1]
    assert newest >= 12  # at most one checkpoint interval (4 steps) of work is lost
    resume(tmp_path, data)
    assert_same(losses(tmp_path), reference)


def test_kill9_during_checkpoint_write_keeps_the_previous_one(data, reference, tmp_path):
    proc = start(tmp_path, data, env={"HANG_CHECKPOINT": "8"})
    wait_for(lambda: os.path.isdir(tmp_path / "ckpt_0000008.tmp") and
             any(n.endswith(".distcp") for n in os.listdir(tmp_path / "ckpt_0000008.tmp")), proc)
    time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert ckpt_iters(tmp_path) == [4]  # the half-written one never got a checkpoint's name
    path, meta = find_latest(tmp_path)
    assert meta["iter_num"] == 4
    resume(tmp_path, data)
    assert_same(losses(tmp_path), reference)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_preemption_signal_checkpoints_and_exits_zero(data, reference, tmp_path, sig):
    proc = start(tmp_path, data)
    wait_for(lambda: 4 in ckpt_iters(tmp_path), proc)
    t0 = time.time()
    os.kill(proc.pid, sig)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-3000:]
    assert time.time() - t0 < 30
    assert "stopping at iter" in out
    stopped = ckpt_iters(tmp_path)[-1]
    [log] = [p for p in os.listdir(tmp_path) if p.startswith("run_")]
    doc = json.load(open(tmp_path / log))
    assert doc["summary"]["status"] == "preempted" and doc["summary"]["final_iter"] == stopped
    resume(tmp_path, data)
    assert_same(losses(tmp_path), reference)


def test_a_second_ctrl_c_interrupts_at_once(data, tmp_path):
    proc = start(tmp_path, data, env={"SLOW_STEP": "0.5"})  # steps long enough that the first stop is not reached
    wait_for(lambda: 4 in ckpt_iters(tmp_path), proc)
    os.kill(proc.pid, signal.SIGINT)
    time.sleep(0.2)
    t0 = time.time()
    os.kill(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130 and time.time() - t0 < 5, out[-3000:]
    assert "interrupted; the run log says failed" in out
    [log] = [p for p in os.listdir(tmp_path) if p.startswith("run_")]
    doc = json.load(open(tmp_path / log))
    assert doc["summary"]["status"] == "failed" and doc["summary"]["error"]["type"] == "KeyboardInterrupt"
    stopped = doc["summary"]["final_iter"]
    assert ckpt_iters(tmp_path)[-1] < stopped or ckpt_iters(tmp_path)[-1] == 4  # no checkpoint of the interrupted step


@pytest.mark.distributed
def test_signal_to_torchrun_stops_every_rank_at_one_step(data, tmp_path):
    layout = ["--batch_size=2", "--gradient_accumulation_steps=2"]  # one micro-batch of two rows on each rank
    train.main(parse_args(ARGS + [f"--dataset={data}", f"--out_dir={tmp_path / 'ref'}", *layout]),
               log=lambda *a: None)
    reference = losses(tmp_path / "ref")
    tmp_path = tmp_path / "two"
    proc = start(tmp_path, data, *layout, nproc=2, env={"OMP_NUM_THREADS": "1"})
    wait_for(lambda: 4 in ckpt_iters(tmp_path), proc, timeout=240)
    os.kill(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    stopped = ckpt_iters(tmp_path)[-1]
    # the checkpoint is one collective save: every rank wrote its part at the same step, and the log says so
    assert sorted(f for f in os.listdir(tmp_path / f"ckpt_{stopped:07d}") if f.endswith(".distcp")) == [
        "__0_0.distcp", "__1_0.distcp"], out[-3000:]
    [log] = [p for p in os.listdir(tmp_path) if p.startswith("run_")]
    doc = json.load(open(tmp_path / log))
    assert doc["summary"]["status"] == "preempted" and doc["summary"]["final_iter"] == stopped > 4
    assert f"stopping at iter {stopped}" in out
    resume(tmp_path, data, *layout)  # one process from the 2-rank checkpoint: the uninterrupted run's losses
    got = losses(tmp_path)
    assert sorted(got) == sorted(reference) and all(abs(got[i] - reference[i]) < 1e-5 for i in got)


def run_cli(*args, preexec=None, wrap=()):
    """train.py's command line in a process of its own: (exit code, stderr lines)."""
    proc = subprocess.run([*wrap, sys.executable, os.path.join(ROOT, "train.py"), *ARGS, *args], cwd=ROOT,
                          capture_output=True, text=True, preexec_fn=preexec, timeout=300)
    return proc.returncode, proc.stderr.splitlines()


def assert_checkpoint_write_refused(code, err, out_dir, kept, why):
    """One line naming the cause and the fix, exit code 2, no traceback; the partial folder gone, earlier ones whole."""
    assert code == 2 and not any("Traceback" in line for line in err), "\n".join(err[-40:])
    [line] = [e for e in err if e.startswith("error:")]
    assert re.fullmatch(rf"error: could not write checkpoint \S+/ckpt_0000008 \({why}\); the earlier checkpoints in "
                        r"\S+ are intact; free disk space \(or point --out_dir elsewhere\) and resume", line), line
    assert ckpt_iters(out_dir) == kept and not [p for p in os.listdir(out_dir) if ".tmp" in p]
    path, meta = find_latest(out_dir)  # whole: every file matches the checksum it was written with
    assert meta["iter_num"] == kept[-1] and load_checkpoint(path)["iter_num"] == kept[-1]


def file_size_limit(limit):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def test_full_disk_during_checkpoint(data, tmp_path):
    """A write the storage refuses for real: the checkpoint at iteration 4 is written without a limit, the resumed run
    under a file-size limit that the run log and the small checkpoint files fit and a tensor shard (0.5 MB) does not."""
    train.main(parse_args(ARGS + [f"--dataset={data}", f"--out_dir={tmp_path}", "--max_iters=4"]),
               log=lambda *a: None)
    code, err = run_cli(f"--dataset={data}", f"--out_dir={tmp_path}", "--init_from=resume", "--max_iters=12",
                        preexec=file_size_limit(256 << 10))
    assert_checkpoint_write_refused(code, err, tmp_path, [4], r"\[Errno 27\] File too large")


@pytest.mark.slow
def test_full_disk_on_a_small_file_system(data, tmp_path):
    """A file system that really fills up: a 1 MB tmpfs holds the first checkpoint and not the second. Mounting it
    needs a user and mount namespace (unshare -rm); where those are not allowed the test is skipped."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("cannot create a user and mount namespace here")
    mnt, after = tmp_path / "mnt", tmp_path / "after"
    mnt.mkdir()
    after.mkdir()
    # the tmpfs disappears with the namespace, so what it holds is copied out before the shell leaves
    script = (f"mount -t tmpfs -o size=1m tmpfs {mnt} || exit 99; \"$@\"; code=$?; cp -a {mnt}/. {after}/; "
              "exit $code")
    code, err = run_cli(f"--dataset={data}", f"--out_dir={mnt}", "--max_iters=12",
                        wrap=["unshare", "-rm", "sh", "-c", script, "sh"])
    if code == 99:
        pytest.skip("cannot mount a tmpfs here")
    assert_checkpoint_write_refused(code, err, after, [4], r"\[Errno 28\] No space left on device")


def test_full_disk_during_run_log_write_keeps_the_log_valid(data, tmp_path, monkeypatch):
    import engine.runlog as M

    real = M.json.dump
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            a[1].write('{"truncated')
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(M.json, "dump", flaky)
    warnings = []
    train.main(parse_args(ARGS + [f"--dataset={data}", f"--out_dir={tmp_path}", "--max_iters=8"]),
               log=warnings.append)
    assert any("could not write the run log" in w for w in warnings)
    assert len(losses(tmp_path)) == 8  # the records kept in memory reached the file later


def test_corrupt_or_truncated_newest_checkpoint_falls_back(data, tmp_path):
    train.main(parse_args(ARGS + [f"--dataset={data}", f"--out_dir={tmp_path}", "--max_iters=12",
                                  "--keep_last_n_checkpoints=0"]), log=lambda *a: None)
    newest, middle = list_checkpoints(tmp_path)[-1], list_checkpoints(tmp_path)[-2]
    shard = [n for n in os.listdir(newest) if n.endswith(".distcp")][0]
    with open(os.path.join(newest, shard), "r+b") as f:
        f.truncate(100)
    with open(os.path.join(middle, "meta.pt"), "wb") as f:
        f.write(b"garbage")
    warned = []
    path, meta = find_latest(tmp_path, warn=warned.append)
    assert meta["iter_num"] == 4
    assert "truncated" in warned[0] and "ckpt_0000012" in warned[0]
    assert "ckpt_0000008 is truncated: meta.pt has 7 bytes" in warned[1]


# ----------------------------------------------------------------------------------------------------------
# bad input

@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(sorted(FIELDS) + ["batch_sise", "lr", "", "x-y", "max_iters "]),
                          st.one_of(st.text(max_size=12), st.sampled_from(["True", "None", "1e3", "-1", "0",
                                                                           "3e-4", "nan", "inf", "1.5"]))),
                max_size=4))
def test_fuzzed_overrides_give_config_errors_only(pairs):
    try:
        parse_args([f"--{k}={v}" for k, v in pairs])
    except ConfigError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=30))
def test_fuzzed_raw_arguments(arg):
    try:
        parse_args(["--" + arg])
    except ConfigError:
        pass


def test_missing_val_split_in_metadata(tmp_path):
    ds = write_dataset(str(tmp_path / "d"))
    meta = json.load(open(os.path.join(ds, "meta.json")))
    del meta["splits"]["val"]
    json.dump(meta, open(os.path.join(ds, "meta.json"), "w"))
    with pytest.raises(DataError, match="lists no val split"):
        train.main(parse_args(ARGS + [f"--dataset={ds}", f"--out_dir={tmp_path / 'o'}"]), log=lambda *a: None)


def test_checkpoint_of_another_architecture_names_the_keys(data, tmp_path):
    train.main(parse_args(ARGS + [f"--dataset={data}", f"--out_dir={tmp_path}", "--max_iters=4"]),
               log=lambda *a: None)
    path = list_checkpoints(tmp_path)[-1]
    meta = torch.load(os.path.join(path, "meta.pt"), weights_only=True)
    meta["model_config"].update(n_layer=3, n_embd=48)  # as if another model's weights sat in this folder
    del meta["checksums"]  # and as if written before checksums, which would refuse the edited meta.pt
    torch.save(meta, os.path.join(path, "meta.pt"))
    os.remove(os.path.join(path, "checksums.json"))
    with pytest.raises(CheckpointError, match=r"architecture.*blocks\.2.*shape mismatches"):
        resume(tmp_path, data)


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = "/tmp/engine_pickle_payload_ran"


def test_pickle_payloads_in_a_checkpoint_are_refused(data, tmp_path):
    if os.path.exists(MARKER):
        os.remove(MARKER)
    train.main(parse_args(ARGS + [f"--dataset={data}", f"--out_dir={tmp_path}", "--max_iters=4"]),
               log=lambda *a: None)
    path = list_checkpoints(tmp_path)[-1]
    os.remove(os.path.join(path, "checksums.json"))  # whoever plants a payload can drop or forge the checksums too
    with open(os.path.join(path, "meta.pt"), "wb") as f:
        torch.save({"iter_num": 4, "model_config": {}, "evil": Payload()}, f)
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_meta(path)
    torch.save({"iter_num": 4, "model_config": {}}, os.path.join(path, "meta.pt"))
    with open(os.path.join(path, ".metadata"), "wb") as f:
        pickle.dump(Payload(), f)
    with pytest.raises(CheckpointError, match="posix.system|refusing"):
        load_meta(path)
    assert not os.path.exists(MARKER)


def test_transformers_dir_asking_for_remote_code_is_refused(data, tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(
        {"model_type": "llama", "auto_map": {"AutoModelForCausalLM": "modeling_evil.Model"}}))
    with pytest.raises(ConfigError, match="remote code"):
        train.main(parse_args(ARGS + [f"--dataset={data}", f"--out_dir={tmp_path / 'o'}",
                                      f"--init_from={tmp_path / 'hf'}"]), log=lambda *a: None)


@pytest.mark.distributed
def test_killed_rank_ends_the_job_and_it_resumes(data, tmp_path):
    layout = ["--gradient_accumulation_steps=2", "--batch_size=2"]
    ref_dir = tmp_path / "ref"
    train.main(parse_args(ARGS + layout + [f"--dataset={data}", f"--out_dir={ref_dir}"]), log=lambda *a: None)
    out_dir = tmp_path / "run"
    proc = start(out_dir, data, *layout, nproc=2)
    wait_for(lambda: 8 in ckpt_iters(out_dir), proc, timeout=180)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid), "-f", "slow_train.py"], capture_output=True,
                             text=True).stdout.split()
    assert workers, "no worker processes found"
    t0 = time.time()
    os.kill(int(workers[-1]), signal.SIGKILL)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and time.time() - t0 < 90
    assert "SIGKILL" in out or "Signal 9" in out, out[-3000:]
    assert ckpt_iters(out_dir)[-1] >= 8
    proc = start(out_dir, data, *layout, "--init_from=resume", nproc=2, env={"SLOW_STEP": "0"})
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:]
    ref, got = losses(ref_dir), losses(out_dir)
    assert sorted(ref) == sorted(got) and all(abs(ref[i] - got[i]) < 1e-5 for i in ref)
