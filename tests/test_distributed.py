"""Two gloo ranks under torchrun on CPU against one process with the same global batch."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import ROOT, run_log, write_dataset
from conftest import logged_losses as losses
from test_reliability import ckpt_iters, wait_for

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ARGS = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=2", "--eval_iters=2",
        "--warmup_iters=2", "--learning_rate=3e-3", "--min_lr=3e-4", "--device=cpu", "--dtype=float32",
        "--log_interval=1", "--gradient_accumulation_steps=4", "--lr_decay_iters=10", "--gradient_log_interval=0"]


def launch(nproc, out_dir, dataset, *extra, script="train.py", timeout=240):
    cmd = [sys.executable, os.path.join(ROOT, script), *ARGS, f"--dataset={dataset}", f"--out_dir={out_dir}",
           *extra]
    if nproc:
        cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def ok(res):
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return res


def close(a, b, tol=1e-5):
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    bad = {i: (a[i], b[i]) for i in a if abs(a[i] - b[i]) > tol}
    assert not bad, bad


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("dist") / "data"))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    ok(launch(0, out, data, "--max_iters=10", "--eval_interval=5"))
    return out


@pytest.mark.parametrize("mode", ["ddp", "zero1", "fsdp"])
def test_two_ranks_match_one_process(data, reference, tmp_path, mode):
    flags = {"ddp": [], "zero1": ["--use_zero1=True"], "fsdp": ["--use_fsdp=True"]}[mode]
    ok(launch(2, tmp_path, data, "--max_iters=10", "--eval_interval=5", *flags))
    close(losses(reference), losses(tmp_path))
    doc, ref = run_log(tmp_path), run_log(reference)
    assert doc["environment"]["world_size"] == 2 and doc["environment"]["parallelism"] == mode
    close({e["iter"]: e["val_loss"] for e in doc["evals"]}, {e["iter"]: e["val_loss"] for e in ref["evals"]})
    single = ref["summary"]["per_rank_bytes"]
    mine = doc["summary"]["per_rank_bytes"]
    opt_ratio = [b / single["optimizer_state_bytes"][0] for b in mine["optimizer_state_bytes"]]
    param_ratio = [b / single["param_bytes"][0] for b in mine["param_bytes"]]
    print(mode, "optimizer state per rank / single:", opt_ratio, "params per rank / single:", param_ratio)
    if mode == "ddp":
        assert all(abs(r - 1) < 1e-9 for r in opt_ratio + param_ratio)
    else:
        assert all(0.3 < r < 0.7 for r in opt_ratio) and abs(sum(opt_ratio) - 1) < 0.05
    if mode == "fsdp":
        assert all(0.4 < r < 0.6 for r in param_ratio)
    # engine/plan.py's per-rank state, worked out from shapes alone, is what each rank held
    for ranks, (m, w) in ((mine, (mode, 2)), (single, ("ddp", 1))):
        want = plan_state(data, flags, m, w)
        assert [x["params"] for x in want] == ranks["param_bytes"], (m, w)
        assert [x["grads"] for x in want] == ranks["grad_bytes"], (m, w)
        assert [x["optimizer"] for x in want] == ranks["optimizer_state_bytes"], (m, w)


def plan_state(data, flags, mode, world, *extra):
    import torch

    import train
    from engine.config import parse_args
    from engine.plan import state_bytes
    from model import GPT

    cfg = parse_args(ARGS + [f"--dataset={data}", *flags, *extra])
    with torch.device("meta"):
        model = GPT(train.model_config(cfg, 61, "sdpa"))
    return state_bytes(model, mode, world, cfg.optimizer)


@pytest.mark.parametrize("mode", ["ddp", "zero1", "fsdp"])
def test_compiled_two_ranks_match_one_eager_process(data, reference, tmp_path, mode):
    """compile=True under each wrapping: DDP's graph split at its buckets, ZeRO-1, FSDP's per-block graphs with
    activation checkpointing inside them."""
    flags = {"ddp": [], "zero1": ["--use_zero1=True"],
             "fsdp": ["--use_fsdp=True", "--activation_checkpointing=True"]}[mode]
    ok(launch(2, tmp_path, data, "--max_iters=10", "--eval_interval=5", "--compile=True", *flags, timeout=480))
    close(losses(reference), losses(tmp_path), tol=1e-4)
    doc, ref = run_log(tmp_path), run_log(reference)
    close({e["iter"]: e["val_loss"] for e in doc["evals"]}, {e["iter"]: e["val_loss"] for e in ref["evals"]},
          tol=1e-4)


@pytest.mark.parametrize("save,resume", [
    ((2, ["--use_fsdp=True"]), (0, [])),              # FSDP on 2 ranks -> one plain process
    ((0, []), (2, ["--use_zero1=True"])),             # one process -> ZeRO-1 on 2 ranks
    ((2, ["--use_zero1=True"]), (2, ["--use_fsdp=True"])),  # ZeRO-1 on 2 -> FSDP on 2
    ((2, []), (2, [])),                               # DDP on 2 -> DDP on 2
])
def test_resume_across_world_sizes(data, reference, tmp_path, save, resume):
    ok(launch(save[0], tmp_path, data, "--max_iters=5", "--eval_interval=5", *save[1]))
    ok(launch(resume[0], tmp_path, data, "--max_iters=10", "--eval_interval=5", "--init_from=resume", *resume[1]))
    close(losses(reference), losses(tmp_path))


def test_indivisible_accumulation_is_refused(data, tmp_path):
    res = launch(2, tmp_path, data, "--max_iters=2", "--gradient_accumulation_steps=3")
    assert res.returncode != 0
    assert "must be divisible by the world size 2" in res.stderr + res.stdout


def test_failing_rank_ends_the_job_with_its_error(data, tmp_path):
    t0 = time.time()
    res = launch(2, tmp_path, data, "--max_iters=10", "--eval_interval=5", script="tests/helpers/failing_train.py",
                 timeout=180)
    assert res.returncode != 0
    assert "injected failure on rank 1" in res.stderr + res.stdout
    assert time.time() - t0 < 120


# ----------------------------------------------------------------------------------------------------------
# more than one node, lost nodes and stopped ranks: two torchrun launchers meeting at a c10d rendezvous on
# 127.0.0.1 run the same code path as two hosts

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(out_dir, dataset, *extra, launcher, step=0.1):
    """train.py, each micro-step slowed by `step` seconds, under torchrun with `launcher` arguments; its own
    session, so that a test can signal the launcher alone."""
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, os.path.join(ROOT, "tests/helpers/slow_train.py"),
           *ARGS, f"--dataset={dataset}", f"--out_dir={out_dir}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SLOW_STEP": str(step)}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def start_nodes(out_dir, dataset, *extra, step=0.1):
    """Two one-process "nodes". The first is started alone until it listens, so that it hosts the rendezvous store."""
    port = free_port()
    launcher = ["--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
                "--rdzv_id=engine-test", "--shutdown_timeout=5"]
    first = start(out_dir, dataset, *extra, launcher=launcher + ["--node_rank=0"], step=step)
    wait_for(lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0, first, timeout=180)
    return first, start(out_dir, dataset, *extra, launcher=launcher + ["--node_rank=1"], step=step)


def has_ckpt(out_dir, it):
    return lambda: it in ckpt_iters(out_dir)


def workers(launcher):
    """{RANK: pid} of the worker processes a launcher started."""
    ranks = {}
    for pid in subprocess.run(["pgrep", "-P", str(launcher.pid), "-f", "slow_train.py"], capture_output=True,
                              text=True).stdout.split():
        env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        ranks[int(dict(e.split(b"=", 1) for e in env if b"=" in e)[b"RANK"])] = int(pid)
    return ranks


def test_two_nodes_match_one_process_and_a_killed_launcher_stops_both_with_a_checkpoint(data, reference, tmp_path):
    """A launcher killed outright (kill -9, the OOM killer) takes its worker with it in an orderly way: the worker
    gets SIGTERM from the kernel, every rank stops at the same step with a checkpoint and exits 1, so that the other
    node's launcher ends the job at once (on success it would wait 5 minutes for the dead launcher), and resuming on
    two nodes gives the uninterrupted curve."""
    a, b = start_nodes(tmp_path, data, "--max_iters=10", "--eval_interval=5")
    wait_for(has_ckpt(tmp_path, 5), a, timeout=180)
    os.kill(b.pid, signal.SIGKILL)
    out, _ = a.communicate(timeout=120)
    assert a.returncode != 0, out[-3000:]
    assert "stopping at iter" in out and "on another rank" in out, out[-3000:]
    assert "error: the torchrun launcher of 1 rank(s) died; every rank saved checkpoint" in out, out[-3000:]
    doc = run_log(tmp_path)
    assert doc["summary"]["status"] == "preempted"
    assert os.path.isdir(os.path.join(tmp_path, f"ckpt_{doc['summary']['final_iter']:07d}"))
    a, b = start_nodes(tmp_path, data, "--max_iters=10", "--eval_interval=5", "--init_from=resume", step=0)
    for p in (a, b):
        out, _ = p.communicate(timeout=180)
        assert p.returncode == 0, out[-3000:]
    doc = run_log(tmp_path)
    assert doc["environment"]["world_size"] == 2 and doc["summary"]["status"] == "completed"
    close(losses(reference), losses(tmp_path))


def test_lost_node_ends_the_other_naming_the_rank(data, tmp_path):
    """A host that disappears (its launcher and worker killed at once): the other node's rank fails in its next
    collective, names the silent rank, and its launcher ends the job."""
    a, b = start_nodes(tmp_path, data, "--max_iters=40", "--eval_interval=5", "--dist_timeout_minutes=0.5")
    wait_for(has_ckpt(tmp_path, 5), a, timeout=180)
    [(rank, pid)] = workers(b).items()
    os.kill(b.pid, signal.SIGKILL)
    os.kill(pid, signal.SIGKILL)
    t0 = time.time()
    out, _ = a.communicate(timeout=120)
    assert a.returncode != 0
    assert time.time() - t0 < 90  # the 30 s collective timeout at most, not the default half hour
    assert f"rank {rank} (last heard in step" in out and "stopped answering" in out, out[-3000:]
    summary = run_log(tmp_path)["summary"]
    if rank:  # rank 0 survived and wrote the log: it says why the run ended
        assert summary["status"] == "failed" and f"rank {rank} (last heard" in summary["error"]["message"]


def test_stopped_rank_times_out_is_named_and_the_job_resumes(data, reference, tmp_path):
    """A rank frozen with SIGSTOP: after dist_timeout_minutes the other rank names it and the job ends; resuming
    gives the uninterrupted curve."""
    p = start(tmp_path, data, "--max_iters=10", "--eval_interval=5", "--dist_timeout_minutes=0.1",
              launcher=["--standalone", "--nproc_per_node=2", "--shutdown_timeout=5"])
    wait_for(has_ckpt(tmp_path, 5), p, timeout=180)
    os.kill(workers(p)[1], signal.SIGSTOP)
    out, _ = p.communicate(timeout=150)
    assert p.returncode != 0
    assert "rank 0 waited in step" in out and "rank 1 (last heard in step" in out, out[-3000:]
    assert "Timed out waiting 6000ms" in out
    summary = run_log(tmp_path)["summary"]
    assert summary["status"] == "failed" and summary["error"]["type"] == "RankFailure"
    assert "rank 1 (last heard in step" in summary["error"]["message"]
    ok(launch(2, tmp_path, data, "--max_iters=10", "--eval_interval=5", "--init_from=resume"))
    close(losses(reference), losses(tmp_path))


FAKE_SRUN = """#!/bin/bash
# srun on one node: drop srun's own options and run the task, slowed down (train.py -> tests/helpers/slow_train.py)
while [[ $1 == --* ]]; do shift; done
args=("$@")
exec "${args[@]/#train.py/tests/helpers/slow_train.py}"
"""
FAKE_SCONTROL = """#!/bin/bash
case $1 in show) echo 127.0.0.1 ;; requeue) echo "$@" >> "$SCONTROL_LOG" ;; esac
"""


def test_slurm_script_checkpoints_on_the_warning_signal_requeues_and_resumes(data, reference, tmp_path):
    """scripts/slurm_train.sbatch with stand-ins for srun and scontrol: the SIGUSR1 Slurm sends before the time
    limit reaches the workers through the script and a forwarding torchrun; every rank stops at one step with a
    checkpoint, the script requeues the job and exits 0 (torchrun itself exits 1 after a signal), and the requeued
    run resumes onto the uninterrupted curve."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
           "SLURM_JOB_NODELIST": "n0", "SLURM_NNODES": "1", "SLURM_JOB_ID": "42", "GPUS_PER_NODE": "2",
           "MASTER_PORT": str(free_port()), "SCONTROL_LOG": str(tmp_path / "scontrol.log"), "OMP_NUM_THREADS": "1",
           "SLURM_SUBMIT_DIR": ROOT}
    cmd = ["bash", os.path.join(ROOT, "scripts/slurm_train.sbatch"), *ARGS, f"--dataset={data}", f"--out_dir={out}",
           "--max_iters=10", "--eval_interval=5"]
    p = subprocess.Popen(cmd, cwd=ROOT, env={**env, "SLOW_STEP": "0.1"}, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    wait_for(has_ckpt(out, 5), p, timeout=180)
    os.kill(p.pid, signal.SIGUSR1)
    log, _ = p.communicate(timeout=120)
    assert p.returncode == 0, log[-3000:]
    assert "SignalException" in log  # what torchrun itself says
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "42"]
    doc = run_log(out)
    assert doc["summary"]["status"] == "preempted"
    assert os.path.isdir(os.path.join(out, f"ckpt_{doc['summary']['final_iter']:07d}"))
    res = subprocess.run(cmd, cwd=ROOT, env={**env, "SLURM_RESTART_COUNT": "1"}, capture_output=True, text=True,
                         timeout=180)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert run_log(out)["summary"]["status"] == "completed"
    close(losses(reference), losses(out))


DDP_SCRIPT = """
import sys
import torch, torch.distributed as dist
from engine import distributed as D
from engine.config import parse_args
from model import GPT, ModelConfig
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
model = GPT(ModelConfig.from_preset("tiny_llama3", vocab_size=64))
ddp, owner = D.parallelize(model, parse_args(["--device=cpu", *sys.argv[2:]]), D.Dist(world_size=2), "cpu",
                           "float32")
x = torch.randint(0, 64, (2, 16))
for _ in range(2):  # the second backward refills the same buckets
    ddp(x, x)[1].backward()
grads = [p.grad for p in owner.parameters()]
print(len(grads), len({g.untyped_storage().data_ptr() for g in grads}), ddp.broadcast_buffers,
      ddp.bucket_bytes_cap)
"""


@pytest.mark.parametrize("extra, cap", [([], 25), (["--ddp_bucket_cap_mb=7"], 7)])
def test_ddp_gradients_are_views_into_its_buckets(tmp_path, extra, cap):
    """No second copy of the gradients beside DDP's all-reduce buckets: every gradient is a view into a bucket
    (the tiny model's fit in one), and the constant buffers are not broadcast before each forward."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    res = ok(subprocess.run([sys.executable, "-c", DDP_SCRIPT, str(tmp_path / "init"), *extra], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120))
    n, storages, broadcast, cap_bytes = res.stdout.split()
    assert int(n) > 10 and int(storages) == 1 and broadcast == "False"
    assert int(cap_bytes) == cap * 1024 * 1024
