"""What the README claims of the loop, each caused for real through train.py and checked against an independent
computation: health flags and stops, accumulation and clipping against a hand-made step, the decay split,
checkpointing only on improvement, eval_only's weights, the depth-scaled init, and the throughput figures."""
import json
import math
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import ROOT, run_log, skip_outside_ci, write_dataset

import train
from engine.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from engine.config import parse_args
from engine.data.bins import TokenDataset
from engine.health import GRAD_BAND, PERSISTENT, TrainingDiverged
from engine.objectives import PretrainTask
from engine.optim import make_optimizer, parts
from model import GPT, ModelConfig

TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
        "--eval_iters=2", "--warmup_iters=2", "--learning_rate=3e-3", "--min_lr=3e-4", "--device=cpu",
        "--dtype=float32", "--log_interval=1", "--gradient_log_interval=0"]


def run(dataset, out_dir, *extra, log=lambda *a: None):
    cfg = parse_args(TINY + [f"--dataset={dataset}", f"--out_dir={out_dir}", *extra])
    return train.main(cfg, log=log), cfg


def constant_dataset(folder, token=7):
    """Every window the same tokens: every batch is the same batch."""
    write_dataset(str(folder))
    for split, n in (("train", 40_000), ("val", 8_000)):
        np.full(n, token, dtype=np.uint16).tofile(os.path.join(folder, f"{split}.bin"))
    return str(folder)


def doctored(dataset, tmp_path, edit):
    """An out_dir whose one checkpoint holds a trained tiny model's weights changed by edit(state dict)."""
    run(dataset, tmp_path / "src", "--max_iters=1", "--eval_interval=1")
    state = load_checkpoint(list_checkpoints(tmp_path / "src")[-1])
    model = state.pop("model")
    with torch.no_grad():
        edit(model)
    save_checkpoint({"model": model}, state, str(tmp_path / "doctored"), 1)
    return str(tmp_path / "doctored")


# ----------------------------------------------------------------------------------------------------------
# health

def test_a_gradient_spike_is_flagged_at_its_step(dataset, tmp_path):
    def scale(m):  # tied embeddings: the logits grow with it, and the gradients by three orders
        for name in ("tok_emb.weight", "lm_head.weight"):  # both names of the one tied matrix
            m[name] *= 1e4

    start = doctored(dataset, tmp_path, scale)
    said = []
    res, _ = run(dataset, tmp_path / "o", f"--init_from={start}", "--max_iters=3", "--eval_interval=3",
                 "--grad_clip=1.0", log=said.append)
    doc = run_log(tmp_path / "o")
    norms = {r["iter"]: r["grad_norm"] for r in doc["training_iterations"]}
    spikes = [f["iter"] for f in doc["summary"]["health_flags"] if f["kind"] == "grad_spike"]
    assert spikes and spikes == [i for i, n in norms.items() if n > 1e3]  # every step above 1e3, and only those
    assert any(f"health warning at iter {spikes[0]}: gradient norm" in line for line in said)
    assert math.isfinite(res["final"]["train"])


def test_a_gradient_norm_outside_its_band_for_50_steps_is_flagged(tmp_path):
    data = constant_dataset(tmp_path / "const")  # learnt at once: the gradients fall far below 0.1 and stay there
    run(data, tmp_path / "o", "--max_iters=120", "--eval_interval=120", "--warmup_iters=0", "--lr_schedule=constant")
    doc = run_log(tmp_path / "o")
    norms = [r["grad_norm"] for r in doc["training_iterations"]]  # iterations 1..120, log_interval=1
    want, run_len = [], 0
    for it, n in enumerate(norms, start=1):
        run_len = run_len + 1 if not GRAD_BAND[0] <= n <= GRAD_BAND[1] else 0
        if run_len == PERSISTENT:
            want.append(it)
            run_len = 0
    got = [f["iter"] for f in doc["summary"]["health_flags"] if f["kind"] == "grad_band"]
    assert want and got == want


def test_a_loss_that_does_not_fall_is_flagged_at_step_100(tmp_path):
    data = constant_dataset(tmp_path / "const")
    # a learning rate below float32 resolution of the weights: none of them moves, the loss stays where it began
    run(data, tmp_path / "o", "--max_iters=101", "--eval_interval=101", "--learning_rate=1e-10", "--min_lr=1e-10",
        "--warmup_iters=0", "--bias=False")  # (a zero bias would move)
    flags = run_log(tmp_path / "o")["summary"]["health_flags"]
    assert [(f["iter"], f["kind"]) for f in flags if f["kind"] == "loss_not_falling"] == [(100, "loss_not_falling")]
    # the same run learning: no such flag
    run(data, tmp_path / "p", "--max_iters=101", "--eval_interval=101")
    assert not [f for f in run_log(tmp_path / "p")["summary"]["health_flags"] if f["kind"] == "loss_not_falling"]


def test_a_finite_loss_with_a_non_finite_gradient_norm_stops_the_run(dataset, tmp_path):
    def blow(m):  # one channel of the final norm scaled to 1e20: the loss stays finite, the squared gradients do not
        m["norm_f.weight"][0] = 1e20

    start = doctored(dataset, tmp_path, blow)
    with pytest.raises(TrainingDiverged, match="non-finite gradient norm at iter 1"):
        run(dataset, tmp_path / "o", f"--init_from={start}", "--max_iters=3", "--eval_interval=3")
    doc = run_log(tmp_path / "o")
    assert doc["summary"]["status"] == "diverged"
    assert not list_checkpoints(tmp_path / "o")


# ----------------------------------------------------------------------------------------------------------
# the loop's step against one made by hand

STEP = ["--max_iters=2", "--eval_interval=2", "--warmup_iters=0", "--lr_schedule=constant", "--grad_clip=0.05",
        "--gradient_log_interval=1"]


def check_against_a_hand_step(dataset, out, cfg, rows_per_micro, micro_steps):
    """Two steps of the mean loss over the rows train.py's micro-batches hold, as one batch, its gradient clipped
    and AdamW applied by hand, against the run in `out`: its logged loss, pre-clip gradient norm and per-layer
    norms (of the clipped gradients), and its weights after both steps."""
    torch.manual_seed(cfg.seed)
    model = GPT(train.model_config(cfg, TokenDataset(dataset).vocab_size, "sdpa"))
    optimizer = make_optimizer(model, cfg, "cpu")
    task = PretrainTask(replace(cfg, batch_size=rows_per_micro), TokenDataset(dataset), 32)
    doc = run_log(out)
    logged = {r["iter"]: r for r in doc["training_iterations"]}
    for it in range(2):
        rows = [task.batch(it, m) for m in range(micro_steps)]
        x = torch.cat([r["input_ids"] for r in rows])
        y = torch.cat([r["labels"] for r in rows])
        loss = model(x, y)[1]
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        assert norm > cfg.grad_clip  # clipping takes part
        # the per-layer norms the run log keeps, of the clipped gradients: each block, the embeddings, the final norm
        sq = {}
        for name, p in model.named_parameters():
            group = ".".join(name.split(".")[:2]) if name.startswith("blocks.") else name.split(".")[0]
            sq[group] = sq.get(group, 0.0) + p.grad.double().pow(2).sum().item()
        layers = next(g["norms"] for g in doc["gradient_norms"] if g["iter"] == it + 1)
        assert layers.keys() == sq.keys()
        for group, v in sq.items():
            assert layers[group] == pytest.approx(math.sqrt(v), rel=1e-4), group
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        assert logged[it + 1]["loss"] == pytest.approx(loss.item(), rel=1e-5)
        assert logged[it + 1]["grad_norm"] == pytest.approx(norm.item(), rel=1e-4)  # before clipping
    saved = load_checkpoint(list_checkpoints(out)[-1])["model"]
    # AdamW divides each gradient by its own running scale, so an element whose gradient is near zero turns the
    # float noise of another summation order (accumulation, ranks, the CPU's kernels) into a visible share of its
    # update: 1% of the largest update a step makes (lr) allows that, and is far below what a wrong step moves
    for name, p in model.named_parameters():
        torch.testing.assert_close(saved[name], p.detach(), rtol=1e-4, atol=0.01 * cfg.learning_rate)


@pytest.mark.parametrize("layout", [(8, 1), (4, 2), (2, 4), (1, 8)])
def test_the_step_equals_one_made_by_hand_over_the_same_rows(dataset, tmp_path, layout):
    """In micro-batches of B rows x G accumulation steps (clipping at 0.05: below the norms here)."""
    B, G = layout
    _, cfg = run(dataset, tmp_path / "o", f"--batch_size={B}", f"--gradient_accumulation_steps={G}", *STEP)
    check_against_a_hand_step(dataset, tmp_path / "o", cfg, B, G)


@pytest.mark.distributed
def test_two_ranks_of_four_micro_steps_equal_the_hand_step(dataset, tmp_path):
    """2 gloo ranks x 4 micro-batches of 1 row: the same step, and each device's throughput half the job's."""
    args = TINY + [f"--dataset={dataset}", f"--out_dir={tmp_path / 'o'}", "--batch_size=1",
                   "--gradient_accumulation_steps=8", "--peak_flops=1e12", *STEP]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          os.path.join(ROOT, "train.py"), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    check_against_a_hand_step(dataset, tmp_path / "o", parse_args(args), 1, 8)
    doc = run_log(tmp_path / "o")
    for r in doc["training_iterations"]:
        assert r["tokens_per_sec_per_device"] == pytest.approx(r["tokens_per_sec"] / 2, rel=1e-6)
        assert r["mfu"] == pytest.approx(doc["environment"]["flops_per_token"] * r["tokens_per_sec"] / 2 / 1e12,
                                         rel=1e-6)


def test_data_the_install_fetches_is_never_skipped_in_ci(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI: no archive"):
        skip_outside_ci("no archive")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        skip_outside_ci("no archive")


@pytest.mark.parametrize("preset", ["tiny_gpt2", "tiny_llama", "tiny_llama3", "tiny_qwen3"])
def test_decay_reaches_matrices_and_embeddings_never_norms_or_biases(preset):
    cfg = parse_args([f"--preset={preset}", "--device=cpu", "--weight_decay=0.1", "--bias=True"])
    model = GPT(ModelConfig.from_preset(preset, bias=True))
    optimizer = make_optimizer(model, cfg, "cpu")
    decay = {id(p): g["weight_decay"] for o in parts(optimizer) for g in o.param_groups
             for p in g["params"]}
    kinds = set()
    for name, p in model.named_parameters():
        is_norm = "norm" in name
        is_bias = name.endswith(".bias")
        want = 0.0 if is_norm or is_bias else 0.1
        assert decay[id(p)] == want, name
        kinds.add("norm" if is_norm else "bias" if is_bias else "emb" if "emb" in name else "matrix")
    assert kinds == {"norm", "bias", "emb", "matrix"}  # every kind was seen


# ----------------------------------------------------------------------------------------------------------
# checkpoints, eval_only

def test_without_always_save_a_checkpoint_comes_only_when_val_improves(dataset, tmp_path):
    out = tmp_path / "o"
    # learning for 6 steps, then a learning rate so high that val gets worse at some evaluations
    run(dataset, out, "--max_iters=16", "--eval_interval=2", "--always_save_checkpoint=False",
        "--keep_last_n_checkpoints=0", "--learning_rate=0.3", "--min_lr=0.3", "--warmup_iters=6",
        "--lr_schedule=constant", "--grad_clip=0")
    evals = [e for e in run_log(out)["evals"] if e["iter"] > 0]
    best, improved = math.inf, []
    for e in evals:
        if e["val_loss"] < best:
            best = e["val_loss"]
            improved.append(e["iter"])
    saved = [load_checkpoint(p)["iter_num"] for p in list_checkpoints(out)]
    assert saved == improved and len(improved) < len(evals)  # some evaluations did not improve, and saved nothing


def test_eval_only_scores_the_checkpoint_weights(dataset, tmp_path):
    out = tmp_path / "o"
    run(dataset, out, "--max_iters=4", "--eval_interval=4")
    recorded = load_checkpoint(list_checkpoints(out)[-1])["val_loss"]
    res, _ = run(dataset, out, "--init_from=resume", "--eval_only=True")
    assert res["val_loss"] == pytest.approx(recorded, rel=1e-6)
    fresh, _ = run(dataset, tmp_path / "fresh", "--eval_only=True")  # untrained weights score otherwise
    assert abs(fresh["val_loss"] - recorded) > 0.1
    with open(res["run_log"]) as f:
        assert json.load(f)["summary"]["status"] == "eval_only"


@pytest.mark.parametrize("preset", ["tiny_gpt2", "tiny_llama", "tiny_llama3", "tiny_qwen3"])
def test_every_residual_projection_is_scaled_by_depth(preset):
    torch.manual_seed(0)
    n_layer = 8
    model = GPT(ModelConfig.from_preset(preset, n_layer=n_layer, n_embd=256, n_head=4, n_kv_head=4,
                                        intermediate_size=1024))
    resid = 0.02 / math.sqrt(2 * n_layer)
    seen = 0
    for name, p in model.named_parameters():
        if p.dim() != 2:
            continue
        # the projections that write into the residual stream: attention's output and the MLP's last layer
        into_residual = name.endswith(("attn.proj.weight", "mlp.proj.weight"))
        seen += into_residual
        assert p.std().item() == pytest.approx(resid if into_residual else 0.02, rel=0.05), name
    assert seen == 2 * n_layer


# ----------------------------------------------------------------------------------------------------------
# throughput figures

def test_tokens_per_sec_and_flops_per_token_are_what_they_say(dataset, tmp_path):
    res, cfg = run(dataset, tmp_path / "o", "--max_iters=3", "--eval_interval=3", "--attention_backend=manual",
                   "--gradient_accumulation_steps=2")
    doc = run_log(tmp_path / "o")
    env = doc["environment"]
    assert env["tokens_per_iter"] == 4 * 32 * 2
    for r in doc["training_iterations"]:
        assert r["tokens_per_sec"] == pytest.approx(env["tokens_per_iter"] / (r["dt_ms"] / 1000), rel=1e-3)
    # torch's own count of one forward and backward through the manual backend (whose matmuls it sees)
    from torch.utils.flop_counter import FlopCounterMode

    from model import ModelConfig as MC
    model = GPT(MC(**env["model_config"]))
    x = torch.randint(0, model.config.vocab_size, (2, 32))
    with FlopCounterMode(display=False) as counter:
        model(x, x)[1].backward()
    assert env["flops_per_token"] == counter.get_total_flops() / x.numel()


# ----------------------------------------------------------------------------------------------------------
# SFT and DPO through train.py: their settings reach the loss, and their runs resume exactly

CHAT = ["--tokenizer=gpt2", "--device=cpu", "--dtype=float32", "--preset=tiny_gpt2", "--block_size=64",
        "--max_seq_length=64", "--eval_iters=1", "--log_interval=1", "--gradient_log_interval=0",
        "--val_fraction=0.1", "--learning_rate=1e-3", "--min_lr=1e-4", "--warmup_iters=1"]


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    from engine.data.chat_data import make_toy_dpo, make_toy_sft, write_jsonl

    folder = tmp_path_factory.mktemp("chat")
    write_jsonl(make_toy_sft(60, seed=0), folder / "sft.jsonl")
    write_jsonl(make_toy_dpo(40, seed=1), folder / "dpo.jsonl")
    return folder


def chat_run(out, *extra):
    res = train.main(parse_args(CHAT + [f"--out_dir={out}", *extra]), log=lambda *a: None)
    with open(res["run_log"]) as f:
        return {r["iter"]: r for r in json.load(f)["training_iterations"]}


def dpo_args(chat):
    return ["--objective=dpo", f"--dataset={chat / 'dpo.jsonl'}", "--batch_size=1"]


def test_dpo_beta_loss_type_and_smoothing_reach_the_logged_loss(chat, tmp_path):
    """One pair a step; the step after a checkpoint is logged at that checkpoint's weights, whatever the settings of
    the run that resumes it, so the runs below score the same policy on the same pair."""
    base = dpo_args(chat) + ["--max_iters=4", "--eval_interval=4", "--lr_decay_iters=8"]
    chat_run(tmp_path / "a", *base)
    softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731
    rows = {}
    for name, extra in {"b1": ["--dpo_beta=0.1"], "b3": ["--dpo_beta=0.3"],
                        "smooth": ["--dpo_beta=0.1", "--dpo_label_smoothing=0.2"],
                        "norm": ["--dpo_beta=0.1", "--dpo_loss_type=dpo_norm"]}.items():
        out = tmp_path / name
        import shutil

        shutil.copytree(tmp_path / "a", out)
        rows[name] = chat_run(out, *base[:-3], "--max_iters=5", "--eval_interval=5", "--lr_decay_iters=8",
                              "--init_from=resume", *extra)[5]
    b1, b3 = rows["b1"], rows["b3"]
    m = b1["rewards/margin"]
    assert abs(m) > 1e-4  # four steps moved the policy away from the reference
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margin"):
        assert b3[k] == pytest.approx(3 * b1[k], rel=1e-4)  # rewards are beta times the log-ratio
    assert b3["logps/chosen"] == pytest.approx(b1["logps/chosen"], rel=1e-6)
    assert b1["loss"] == pytest.approx(softplus(-m), rel=1e-5)
    assert b3["loss"] == pytest.approx(softplus(-3 * m), rel=1e-5)
    s = rows["smooth"]
    assert s["loss"] == pytest.approx(0.8 * softplus(-m) + 0.2 * softplus(m), rel=1e-5)
    n = rows["norm"]
    assert n["loss"] == pytest.approx(softplus(-n["rewards/margin"]), rel=1e-5)
    tokens = b1["logps/chosen"] / n["logps/chosen"]  # summed over the completion against its per-token mean
    assert tokens > 1.5 and tokens == pytest.approx(round(tokens), abs=1e-3)


@pytest.mark.parametrize("objective,extra", [("sft", []), ("sft", ["--packing=True"]), ("dpo", [])])
def test_post_training_resumes_exactly(chat, tmp_path, objective, extra):
    args = (dpo_args(chat) if objective == "dpo" else
            ["--objective=sft", f"--dataset={chat / 'sft.jsonl'}", "--batch_size=4"]) + extra + [
        "--lr_decay_iters=8", "--eval_interval=4", "--gradient_accumulation_steps=2"]
    straight = chat_run(tmp_path / "straight", *args, "--max_iters=8")
    chat_run(tmp_path / "parts", *args, "--max_iters=4")
    resumed = chat_run(tmp_path / "parts", *args, "--max_iters=8", "--init_from=resume")
    assert sorted(resumed) == list(range(1, 9))  # one run log, continued by the resumed run
    for it in (5, 6, 7, 8):
        assert resumed[it]["loss"] == straight[it]["loss"], it
    a = load_checkpoint(list_checkpoints(tmp_path / "straight")[-1])["model"]
    b = load_checkpoint(list_checkpoints(tmp_path / "parts")[-1])["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA A100-SXM4-40GB", 312e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100-PCIE-40GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12), ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12), ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA B200", 2250e12),
    ("NVIDIA GH200 480GB", 989e12), ("Tesla T4", None),
])
def test_peak_table_takes_the_most_specific_name(name, peak):
    """torch.cuda.get_device_name's strings as the cards report them, against their dense bf16 peaks."""
    from engine.runlog import lookup_peak_flops

    assert lookup_peak_flops(name) == peak
