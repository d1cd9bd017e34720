"""engine/plan.py and tools/plan.py against what a real CPU step holds (the per-rank state of 2-rank runs is checked
against their run logs in tests/test_distributed.py)."""
import json
import os
import re

import pytest
import torch
from conftest import ROOT

import train
from engine import distributed as D
from engine.config import parse_args
from engine.losses import loss_chunk_size
from engine.plan import GB, estimate, shard_rows, state_bytes, zero1_partition
from model import GPT, ModelConfig
from tools import plan as plan_tool
from tools.bench import TensorMemory, data_vocab

FAMILIES = ["tiny_gpt2", "tiny_llama", "tiny_llama3", "tiny_qwen3"]
LLAMA3 = os.path.join(ROOT, "config", "full_llama3_1.5b_optimal.py")


def test_fsdp_chunks_and_zero1_partition_by_hand():
    assert [shard_rows(10, 4, r) for r in range(4)] == [3, 3, 3, 1]
    assert [shard_rows(2, 4, r) for r in range(4)] == [1, 1, 0, 0]
    # largest first, each to the emptiest rank (the lowest of equals); the counts carry over to the second group
    assert zero1_partition([{"a": 5, "b": 9, "c": 4}, {"d": 3, "e": 1}], 2) == {"b": 0, "a": 1, "c": 1, "d": 0,
                                                                              "e": 1}
    assert zero1_partition([{"a": 10, "b": 3}, {"c": 2}], 2) == {"a": 0, "b": 1, "c": 1}

@pytest.mark.parametrize("preset", FAMILIES)
@pytest.mark.parametrize("ac", [False, True])
def test_activations_equal_what_a_real_forward_keeps(preset, ac):
    """What a CPU forward leaves allocated for its backward (TensorMemory counts every tensor torch allocates, while
    it is alive) against the traced estimate: the blocks' saved tensors (their inputs alone under activation
    checkpointing), the final norm's and the output projection's, and the cross-entropy's float32 log-probabilities."""
    B, T, V = 4, 64, 256
    cfg = parse_args([f"--preset={preset}", f"--vocab_size={V}", f"--block_size={T}", f"--batch_size={B}",
                      "--device=cpu", "--dtype=float32", f"--activation_checkpointing={ac}"])
    torch.manual_seed(0)
    model = GPT(train.model_config(cfg, None, "sdpa"))
    forward, _ = D.parallelize(model, cfg, D.Dist(), "cpu", "float32")
    x, y = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))
    with TensorMemory() as mem:
        before = mem.live
        loss = forward(x, y)[1]  # the logits are dropped here, as the loop drops them
        kept = mem.live - before
    loss.backward()
    with torch.device("meta"):
        meta = GPT(model.config)
    parts = estimate(cfg, meta, 1, T, "float32", device_type="cpu")["parts"]
    predicted = parts["activations"] + B * T * V * 4
    # (the issue allows 10%; the trace counts the same saved tensors the real forward keeps, so it is exact to the
    # loss's few bytes of scalars)
    assert abs(predicted - kept) <= 0.10 * kept, (kept, predicted)
    assert (parts["recompute"] > 0) == ac


def test_single_process_state_equals_the_optimizers_own():
    cfg = parse_args(["--preset=tiny_llama3", "--vocab_size=256", "--block_size=32", "--device=cpu",
                      "--dtype=float32", "--optimizer=muon"])
    from tools.bench import Run

    run = Run(cfg)
    run.step()
    want = state_bytes(run.owner, "ddp", 1, "muon")[0]
    assert want["params"] == D.local_bytes(run.owner.parameters())
    assert want["optimizer"] == D.optimizer_state_bytes(run.optimizer)
    adam = state_bytes(run.owner, "ddp", 1, "adamw")[0]["optimizer"]
    assert want["optimizer"] < adam  # Muon keeps one moment where AdamW keeps two


def test_tool_table_json_and_time(capsys):
    lines = []
    res = plan_tool.main([LLAMA3, "--gpus=8", "--gpu=H100", "--tokens=85B",
                          "--mfu=0.5"], out=lines.append)
    text = "\n".join(lines)
    assert "| ddp (config) | off |" in text and "| fsdp | on |" in text
    fpt = res["flops_per_token"]
    assert res["tokens_per_sec_per_gpu"] == pytest.approx(0.5 * 989e12 / fpt)
    assert res["hours"] == pytest.approx(85e9 / (8 * 0.5 * 989e12 / fpt) / 3600)
    assert res["gpu_hours"] == pytest.approx(8 * res["hours"])
    by = {(r["mode"], r["activation_checkpointing"]): r for r in res["modes"]}
    cfg = parse_args([LLAMA3])
    with torch.device("meta"):
        model = GPT(train.model_config(cfg, None, "sdpa"))
    # more sharding, less per GPU; checkpointing, fewer activations; and the largest batch follows
    assert by["fsdp", False]["total_bytes"] < by["zero1", False]["total_bytes"] < by["ddp", False]["total_bytes"]
    assert by["ddp", True]["parts"]["activations"] < by["ddp", False]["parts"]["activations"] / 4
    for r in res["modes"]:
        assert r["largest_batch"] >= 1
        if r["batch_size"]:
            assert r["batch_size"] * r["gradient_accumulation_steps"] == 8 * 192  # the config's rows per step
            assert r["gradient_accumulation_steps"] % 8 == 0
        fit = estimate(cfg, model, 8, 2048, "bfloat16", batch_size=r["largest_batch"], mode=r["mode"],
                       activation_checkpointing=r["activation_checkpointing"])["total"]
        assert fit <= 0.9 * 85.0 * GB  # the largest batch fits under the margin
    plan_tool.main([LLAMA3, "--gpus=8", "--gpu_memory_gb=80", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert doc["memory_per_gpu_bytes"] == 80 * GB and "tokens_per_sec" not in doc  # no peak without a GPU name
    with pytest.raises(SystemExit, match="unknown GPU 'H1OO'"):
        plan_tool.main([LLAMA3, "--gpu=H1OO"])
    with pytest.raises(SystemExit, match="not a token count"):
        plan_tool.main([LLAMA3, "--gpu=H100", "--tokens=lots"])



@pytest.mark.parametrize("name", ["full_gpt2_1.36b", "full_llama_1.36b", "full_llama3_1.5b_optimal",
                                  "full_llama3_2.2b_chinchilla", "full_qwen3_1.8b_optimal"])
def test_every_pretraining_recipe_fits_the_gpus_its_comment_names(name):
    """Each seed recipe says which GPUs it is sized for and what the planner gives per GPU; the estimate agrees and
    stays under the planner's 10% margin of that card's memory (train.py would refuse it otherwise)."""
    path = os.path.join(ROOT, "config", f"{name}.py")
    text = open(path).read()
    sized = re.search(r"# Sized for (\d+) x (\S+) ", text)
    said = re.search(r"about ([\d.]+) GB per GPU", text)
    assert sized and said, "the recipe's comment names its GPUs and the planner's figure"
    cfg = parse_args([path])
    with torch.device("meta"):
        model = GPT(train.model_config(cfg, data_vocab(cfg), "sdpa"))
    est = estimate(cfg, model, int(sized[1]), cfg.block_size, "bfloat16")
    assert round(est["total"] / GB, 1) == float(said[1])
    assert est["total"] <= 0.9 * plan_tool.gpu_memory(sized[2])
    assert cfg.batch_size * cfg.gradient_accumulation_steps == 1536  # the guide's global batch: 24 x 64 rows
    if model.config.vocab_size >= 100_000:
        assert cfg.loss_chunk_size > 0  # never the full float32 logits of a 128K+ vocabulary


# the models the post-training recipes start from, as their published config.json files give them (they come from
# init_from, so no preset names them)
LLAMA31_8B = dict(n_layer=32, n_head=32, n_kv_head=8, n_embd=4096, intermediate_size=14336, vocab_size=128256,
                  norm="rmsnorm", mlp="swiglu", pos_encoding="rope", rope_theta=500000.0, rope_scaling_factor=8.0,
                  bias=False, tie_embeddings=False)
OLMO2_7B = dict(n_layer=32, n_head=32, n_kv_head=32, n_embd=4096, intermediate_size=11008, vocab_size=100352,
                norm="rmsnorm", mlp="swiglu", pos_encoding="rope", rope_theta=500000.0, qk_norm=True, bias=False,
                tie_embeddings=False)


@pytest.mark.parametrize("files, shape", [(["sft_tulu3"], LLAMA31_8B), (["sft_tulu3", "sft_tulu3_10pct"], LLAMA31_8B),
                                          (["dpo_tulu3"], LLAMA31_8B), (["dpo_tulu3", "dpo_tulu_10pct"], LLAMA31_8B),
                                          (["dpo_olmo3_instruct"], OLMO2_7B)])
def test_every_post_training_recipe_fits_the_gpus_its_comment_names(files, shape):
    """The SFT and DPO recipes, at the longest row their data may hold (max_seq_length), on the model they start
    from; the base recipe's comment gives the planner's figure, the 10% overlays must fit the same GPUs."""
    paths = [os.path.join(ROOT, "config", f"{f}.py") for f in files]
    text = open(paths[0]).read()
    sized = re.search(r"# Sized for (\d+) x (\S+) ", text)
    said = re.search(r"about ([\d.]+) GB per GPU", text)
    assert sized and said, "the recipe's comment names its GPUs and the planner's figure"
    cfg = parse_args(paths)
    with torch.device("meta"):
        mc = ModelConfig(**shape, block_size=cfg.max_seq_length,
                         loss_chunk_size=loss_chunk_size(cfg.loss_chunk_size, shape["vocab_size"]))
        model = GPT(mc)
    est = estimate(cfg, model, int(sized[1]), cfg.max_seq_length, "bfloat16")
    if len(files) == 1:
        assert round(est["total"] / GB, 1) == float(said[1])
    assert est["total"] <= 0.9 * plan_tool.gpu_memory(sized[2])
    if cfg.objective == "sft":
        assert mc.loss_chunk_size > 0  # never the full float32 logits of the 128K vocabulary


@pytest.mark.parametrize("extra", [["--preset=tiny_llama3"], ["--preset=tiny_gpt2", "--attention_backend=manual"]])
def test_two_traces_give_every_batch_size(extra):
    """traced_bytes traces batches of 1 and 2 rows and extends the line: the same bytes as tracing the batch."""
    from engine.plan import _trace, traced_bytes
    from model import rope_cache

    cfg = parse_args(extra + ["--vocab_size=256", "--block_size=32", "--device=cpu"])
    mc = train.model_config(cfg, None, "manual" if "manual" in extra[-1] else "sdpa")
    for dtype in ("float32", "bfloat16"):
        for T in (32, 20):  # SFT and DPO rows shorter than the model's positions
            assert traced_bytes(mc, 7, T, dtype) == _trace(GPT, rope_cache, mc, 7, T, dtype)


def test_measure_puts_the_estimate_beside_two_real_steps(capsys):
    res = plan_tool.main(["--preset=tiny_qwen3", "--vocab_size=512", "--block_size=64", "--batch_size=4",
                          "--device=cpu", "--dtype=float32", "--activation_checkpointing=True", "--measure", "--json"])
    m = res["measured"]
    assert m["params_predicted"] == m["params_measured"] and m["optimizer_predicted"] == m["optimizer_measured"]
    assert abs(m["peak_predicted"] - m["peak_measured"]) <= 0.10 * m["peak_measured"]
    assert json.loads(capsys.readouterr().out)["measured"] == m
    with pytest.raises(SystemExit, match="--measure runs one process"):
        plan_tool.main(["--preset=tiny_qwen3", "--device=cpu", "--use_zero1=True", "--measure"])
