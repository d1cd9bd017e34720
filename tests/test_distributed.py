"""Two gloo ranks under torchrun on CPU against one process with the same global batch."""
import os
import subprocess
import sys
import time

import pytest
from conftest import ROOT, run_log, write_dataset
from conftest import logged_losses as losses

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ARGS = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=2", "--eval_iters=2",
        "--warmup_iters=2", "--learning_rate=3e-3", "--min_lr=3e-4", "--device=cpu", "--log_interval=1",
        "--gradient_accumulation_steps=4", "--lr_decay_iters=10", "--gradient_log_interval=0"]


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
