"""SFT and DPO through train.py: packing changes speed not results, the loss falls, preferences are learned, the
reference model is never run during training, and both objectives run on 2 gloo ranks."""
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, logged_losses, run_log

import train
from engine.config import ConfigError, parse_args
from engine.data.chat_data import (
    collate,
    make_toy_dpo,
    make_toy_sft,
    pack_sft,
    sft_messages,
    tokenize_all,
    unpacked_rows,
    write_jsonl,
)
from engine.data.tokenizers import get_tokenizer
from engine.objectives import DPOTask
from model import GPT, ModelConfig

SFT = ["--objective=sft", "--tokenizer=gpt2", "--device=cpu", "--dtype=float32", "--preset=tiny_gpt2",
       "--block_size=64",
       "--max_seq_length=64", "--batch_size=8", "--learning_rate=2e-3", "--min_lr=2e-4", "--warmup_iters=2",
       "--eval_iters=2", "--log_interval=1", "--gradient_log_interval=0", "--val_fraction=0.05"]


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat")
    write_jsonl(make_toy_sft(300, seed=0), folder / "sft.jsonl")
    write_jsonl(make_toy_dpo(200, seed=1), folder / "dpo.jsonl")
    return folder


@pytest.mark.parametrize("backend", ["manual", "sdpa"])
def test_packed_rows_give_the_unpacked_loss_and_gradients(backend):
    tok = get_tokenizer("gpt2")
    examples, _ = tokenize_all(tok, [sft_messages(r) for r in make_toy_sft(12, seed=3)], 64)
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("tiny_llama3", vocab_size=tok.vocab_size + 7, attention_backend=backend))
    packed = collate(pack_sft(examples, 64), tok.eot_id)
    plain = collate(unpacked_rows(examples), tok.eot_id)
    assert packed["input_ids"].size(0) < plain["input_ids"].size(0)  # packing really merged rows
    _, a = model(packed["input_ids"], packed["labels"], pos=packed["positions"], seg=packed["segments"])
    a.backward()
    ga = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    _, b = model(plain["input_ids"], plain["labels"])
    b.backward()
    assert abs(a.item() - b.item()) < 1e-5
    for g, p in zip(ga, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-5)
    _, wrong = model(packed["input_ids"], packed["labels"])  # without the masks, examples would see each other
    assert abs(wrong.item() - b.item()) > 1e-4


def test_packing_in_learned_position_models_restarts_positions():
    tok = get_tokenizer("gpt2")
    examples, _ = tokenize_all(tok, [sft_messages(r) for r in make_toy_sft(6, seed=5)], 64)
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("tiny_gpt2", vocab_size=tok.vocab_size, block_size=64))
    packed, plain = collate(pack_sft(examples, 64), tok.eot_id), collate(unpacked_rows(examples), tok.eot_id)
    _, a = model(packed["input_ids"], packed["labels"], pos=packed["positions"], seg=packed["segments"])
    _, b = model(plain["input_ids"], plain["labels"])
    assert abs(a.item() - b.item()) < 1e-5


def test_sft_loss_falls_and_logs_its_metrics(chat, tmp_path):
    res = train.main(parse_args(SFT + [f"--dataset={chat / 'sft.jsonl'}", f"--out_dir={tmp_path}",
                                       "--num_train_epochs=2", "--eval_interval=1000", "--packing=True"]),
                     log=lambda *a: None)
    doc = run_log(tmp_path)
    its = doc["training_iterations"]
    assert doc["config"]["max_iters"] == len(its) and len(its) >= 10  # set by num_train_epochs
    assert sum(r["loss"] for r in its[-3:]) / 3 < its[0]["loss"] - 2.0
    assert {"train_loss", "learning_rate", "total_tokens", "per_device_tps"} <= set(its[-1])
    assert its[-1]["total_tokens"] > its[0]["total_tokens"] > 0
    assert res["final"]["val"] < doc["evals"][0]["val_loss"]


def test_the_memory_check_counts_the_longest_row_the_data_has(chat, tmp_path):
    """SFT batches pad to their longest row: the start-up estimate is made at that length, not max_seq_length."""
    train.main(parse_args(SFT + [f"--dataset={chat / 'sft.jsonl'}", f"--out_dir={tmp_path}", "--max_iters=1",
                                 "--block_size=256", "--max_seq_length=256"]), log=lambda *a: None)
    tok = get_tokenizer("gpt2")
    examples, _ = tokenize_all(tok, [sft_messages(r) for r in make_toy_sft(300, seed=0)], 256)
    mem = run_log(tmp_path)["environment"]["memory_estimate"]
    assert mem["block_size"] == max(len(ids) for ids, _ in examples) < 256


def test_sft_resume_and_accumulation_layouts(chat, tmp_path):
    common = SFT + [f"--dataset={chat / 'sft.jsonl'}", "--max_iters=6", "--lr_decay_iters=6", "--eval_interval=3",
                    "--packing=True"]
    train.main(parse_args(common + [f"--out_dir={tmp_path / 'a'}", "--batch_size=8"]), log=lambda *a: None)
    train.main(parse_args(common + [f"--out_dir={tmp_path / 'b'}", "--batch_size=4",
                                    "--gradient_accumulation_steps=2"]), log=lambda *a: None)
    a, b = logged_losses(tmp_path / "a"), logged_losses(tmp_path / "b")
    assert all(abs(a[i] - b[i]) < 1e-5 for i in a)  # token-weighted: the layout of the batch does not matter


def test_dpo_learns_the_rule_without_running_the_reference(chat, tmp_path, monkeypatch):
    sft_dir = tmp_path / "sft"
    train.main(parse_args(SFT + [f"--dataset={chat / 'sft.jsonl'}", f"--out_dir={sft_dir}", "--max_iters=30",
                                 "--eval_interval=30"]), log=lambda *a: None)
    forwards = {"train": 0, "reference": 0}
    real_ref, real_loss = DPOTask.reference, DPOTask.loss

    def counting_reference(self, *a, **k):
        forwards["reference"] += 1
        return real_ref(self, *a, **k)

    def counting_loss(self, model, b):
        forwards["train"] += model.training
        return real_loss(self, model, b)

    monkeypatch.setattr(DPOTask, "reference", counting_reference)
    monkeypatch.setattr(DPOTask, "loss", counting_loss)
    calls = {"n": 0}
    real_forward = GPT.forward

    def counted(self, *a, **k):
        calls["n"] += 1
        return real_forward(self, *a, **k)

    monkeypatch.setattr(GPT, "forward", counted)
    dpo = ["--objective=dpo", f"--dataset={chat / 'dpo.jsonl'}", f"--init_from={sft_dir}", "--device=cpu",
           "--dtype=float32", "--max_seq_length=64", "--batch_size=8", "--learning_rate=5e-4", "--min_lr=0",
           "--warmup_iters=2",
           "--eval_iters=4", "--log_interval=1", "--gradient_log_interval=0", "--dpo_beta=0.1",
           "--val_fraction=0.1", "--max_iters=40", "--eval_interval=40"]
    train.main(parse_args(dpo + [f"--out_dir={tmp_path / 'dpo'}"]), log=lambda *a: None)
    doc = run_log(tmp_path / "dpo")
    n_eval = 2 * 2 * 4  # two evaluations, two splits, eval_iters batches
    assert forwards["reference"] == 1
    # the reference pass ran once over every pair before training; training ran one forward per micro-step
    ref_batches = -(-len(make_toy_dpo(200, seed=1)) // 8)
    assert calls["n"] == ref_batches + forwards["train"] + n_eval and forwards["train"] == 40
    first, last = doc["evals"][0], doc["evals"][-1]
    # policy = reference: every reward is zero up to float rounding (the reference pass batches the pairs otherwise,
    # so on some CPUs a few pairs differ by ~1e-7 and "accuracy", a strict comparison, is not exactly zero)
    assert all(abs(first[f"val_rewards/{k}"]) < 1e-4 for k in ("chosen", "rejected", "margin"))
    assert abs(first["val_loss"] - 0.6931) < 1e-3
    assert last["val_rewards/accuracy"] > 0.6 and last["val_rewards/margin"] > first["val_rewards/margin"]
    rec = doc["training_iterations"][-1]
    for k in ("rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin", "logps/chosen",
              "logps/rejected"):
        assert k in rec
    # a second run finds the cached reference log-probs: no reference pass at all
    calls["n"] = 0
    train.main(parse_args(dpo + [f"--out_dir={tmp_path / 'dpo2'}", "--max_iters=1", "--eval_interval=1",
                                 f"--reference_cache_dir={tmp_path / 'dpo' / 'reference_cache'}"]),
               log=lambda *a: None)
    assert calls["n"] == 1 + n_eval


QWEN_SFT = ["--objective=sft", "--tokenizer=qwen3", "--device=cpu", "--dtype=float32", "--preset=tiny_qwen3",
            "--block_size=64", "--max_seq_length=64", "--batch_size=4", "--max_iters=2", "--eval_iters=1",
            "--eval_interval=2", "--log_interval=1", "--gradient_log_interval=0", "--val_fraction=0.05",
            "--max_examples=40"]


def test_chat_format_reaches_the_data_the_checkpoint_and_sampling(chat, tmp_path, capsys):
    from engine.data.chat import chat_prompt, chat_spec
    from tools import sample

    logged = []
    train.main(parse_args(QWEN_SFT + [f"--dataset={chat / 'sft.jsonl'}", f"--out_dir={tmp_path}",
                                      "--enable_thinking=False"]), log=logged.append)
    assert "chat format: qwen3 (enable_thinking=False)" in logged
    cfg = run_log(tmp_path)["config"]
    assert (cfg["chat_format"], cfg["enable_thinking"]) == ("qwen3", False)  # the tokenizer's own, recorded
    # the rows trained on are the no-think rendering: the empty think block is in the prompt, not learned
    tok = get_tokenizer("qwen3")
    fmt = chat_spec(tok, "qwen3", enable_thinking=False)
    task = train.make_task(parse_args(QWEN_SFT + [f"--dataset={chat / 'sft.jsonl'}", "--enable_thinking=False"]),
                           ModelConfig.from_preset("tiny_qwen3"), 64, None, tok, lambda *a: None)
    learned = sorted(t for r in task.train + task.val for t in r["labels"] if t != -100)
    examples, _ = tokenize_all(tok, [sft_messages(r) for r in make_toy_sft(40, seed=0)], 64, fmt)
    assert learned == sorted(t for _, labels in examples for t in labels if t != -100)
    assert 151667 not in learned and 151645 in learned
    # sample.py --chat renders the prompt the run trained on, unless told otherwise
    msgs = [{"role": "user", "content": "Hi"}]
    for extra, want in (([], fmt), (["--enable_thinking=true"], chat_spec(tok, "qwen3"))):
        sample.main([f"--out_dir={tmp_path}", "--chat", "--prompt=Hi", "--max_new_tokens=2", "--device=cpu",
                     *extra])
        err = capsys.readouterr().err
        assert f"chat format {want}, {len(chat_prompt(tok, msgs, want)[0])} prompt tokens" in err


def test_chat_format_errors_name_the_fix(chat, tmp_path):
    with pytest.raises(ConfigError, match="chat_format='qwen4' is not one of"):
        parse_args(["--chat_format=qwen4"])
    gpt2 = SFT + [f"--dataset={chat / 'sft.jsonl'}", f"--out_dir={tmp_path}", "--max_iters=1"]
    with pytest.raises(ConfigError, match=r"chat format chatml needs <\|im_start\|>.*can render tulu"):
        train.main(parse_args(gpt2 + ["--chat_format=chatml"]), log=lambda *a: None)
    with pytest.raises(ConfigError, match="enable_thinking=False applies to the qwen3"):
        train.main(parse_args(gpt2 + ["--enable_thinking=False"]), log=lambda *a: None)
    traced = tmp_path / "traced.jsonl"
    write_jsonl([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}] * 3 + [
        {"messages": [{"role": "user", "content": "q"},
                      {"role": "assistant", "content": "a", "reasoning_content": "because"}]}], traced)
    with pytest.raises(ConfigError, match="conversation 3 .*reasoning_content.*chat_format=qwen3"):
        train.main(parse_args(SFT + [f"--dataset={traced}", f"--out_dir={tmp_path}", "--max_iters=1"]),
                   log=lambda *a: None)


def test_post_training_config_errors(chat, tmp_path):
    with pytest.raises(ConfigError, match="packing=True is for objective=sft"):
        parse_args(["--packing=True"])
    with pytest.raises(ConfigError, match="needs a tokenizer"):
        train.main(parse_args(["--objective=sft", f"--dataset={chat / 'sft.jsonl'}", "--device=cpu", "--dtype=float32",
                               f"--out_dir={tmp_path}"]), log=lambda *a: None)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("objective,mode", [("sft", "ddp"), ("sft", "fsdp"), ("dpo", "zero1"), ("dpo", "fsdp")])
def test_post_training_on_two_ranks(chat, tmp_path, objective, mode):
    if objective == "sft":
        args = SFT + [f"--dataset={chat / 'sft.jsonl'}", "--packing=True"]
    else:
        sft_dir = tmp_path / "sft"
        train.main(parse_args(SFT + [f"--dataset={chat / 'sft.jsonl'}", f"--out_dir={sft_dir}", "--max_iters=2",
                                     "--eval_interval=2"]), log=lambda *a: None)
        args = ["--objective=dpo", f"--dataset={chat / 'dpo.jsonl'}", f"--init_from={sft_dir}", "--device=cpu",
                "--dtype=float32", "--max_seq_length=64", "--batch_size=4", "--eval_iters=2",
                "--log_interval=1",
                "--gradient_log_interval=0", "--warmup_iters=1"]
    args += ["--gradient_accumulation_steps=2", "--max_iters=4", "--lr_decay_iters=4", "--eval_interval=4"]
    single = tmp_path / "one"
    train.main(parse_args(args + [f"--out_dir={single}"]), log=lambda *a: None)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          os.path.join(ROOT, "train.py"), *args, f"--out_dir={tmp_path / 'two'}",
                          *{"ddp": [], "zero1": ["--use_zero1=True"], "fsdp": ["--use_fsdp=True"]}[mode]],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    a, b = logged_losses(single), logged_losses(tmp_path / "two")
    assert sorted(a) == sorted(b) and all(abs(a[i] - b[i]) < 1e-5 for i in a)


def test_sft_from_a_transformers_dir_exports_back(chat, tmp_path):
    """Start from a local transformers model with its own tokenizer and chat template, fine-tune, export: the
    exported folder loads in transformers as the same class and gives our logits."""
    import shutil

    from transformers import AutoModelForCausalLM, GPT2TokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from engine.checkpoint import list_checkpoints, load_checkpoint
    from engine.data.tokenizers import tokenizer_file
    from tools.export_hf import export

    src = tmp_path / "base"
    src.mkdir()
    files = tokenizer_file("gpt2")[0].parent
    shutil.copy(files / "encoder.json", src / "vocab.json")
    shutil.copy(files / "vocab.bpe", src / "merges.txt")
    hf_tok = GPT2TokenizerFast.from_pretrained(str(src))
    hf_tok.chat_template = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + eos_token + '\\n' }}"
                            "{% endfor %}")
    hf_tok.save_pretrained(src)
    torch.manual_seed(0)
    base = Qwen2ForCausalLM(Qwen2Config(vocab_size=50304, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                        tie_word_embeddings=True))
    base.save_pretrained(src)
    out = tmp_path / "sft"
    train.main(parse_args(["--objective=sft", f"--dataset={chat / 'sft.jsonl'}", f"--init_from={src}",
                           f"--out_dir={out}", "--device=cpu", "--dtype=float32", "--max_seq_length=64",
                           "--batch_size=4",
                           "--max_iters=3", "--eval_interval=3", "--eval_iters=1", "--gradient_log_interval=0",
                           "--learning_rate=1e-3", "--min_lr=1e-4", "--warmup_iters=1"]), log=lambda *a: None)
    state = load_checkpoint(list_checkpoints(out)[-1])
    assert state["config"]["tokenizer"] == f"hf:{src}"  # taken from init_from, and recorded
    export(str(out), str(tmp_path / "exported"))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    assert type(hf).__name__ == "Qwen2ForCausalLM"
    ours = GPT(ModelConfig.from_dict(state["model_config"])).eval()
    ours.load_state_dict(state["model"])
    idx = torch.randint(0, 50257, (2, 17))
    with torch.no_grad():
        assert (hf(idx).logits - ours(idx)[0]).abs().max() < 1e-4
        assert not torch.allclose(hf(idx).logits, base.eval()(idx).logits, atol=1e-3)  # it did train
    assert (tmp_path / "exported" / "tokenizer.json").exists() or (tmp_path / "exported" / "vocab.json").exists()


class DeviceReads(torch.utils._python_dispatch.TorchDispatchMode):
    """The ops that make a CUDA host wait for the GPU, because their result's size or value must reach the host:
    nonzero, boolean masks, .item(), unique. On the CPU they are visible all the same."""

    SIZED = {"nonzero", "masked_select", "_local_scalar_dense", "unique_dim", "_unique2", "unique_consecutive",
             "repeat_interleave"}

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        flat = [*args, *(kwargs or {}).values()]
        bool_index = name == "index" and any(t is not None and t.dtype == torch.bool for t in flat[1])
        if name in self.SIZED or bool_index:
            self.found.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("objective", ["pretrain", "sft", "dpo"])
def test_a_training_step_reads_nothing_back_from_the_device(chat, tmp_path, monkeypatch, objective):
    """engine/step.py's forward_backward, as train.py runs it (SFT packed, with per-example attention; DPO with its
    cached reference), runs no op whose output the host must wait for: the step's numbers arrive one step late."""
    args = SFT + [f"--out_dir={tmp_path}", "--max_iters=3", "--eval_interval=3"]
    if objective == "pretrain":
        from conftest import write_dataset

        args = [a for a in args if not a.startswith(("--objective", "--tokenizer", "--max_seq_length"))]
        args += [f"--dataset={write_dataset(str(tmp_path / 'data'))}", "--vocab_size=64"]
    else:
        args += [f"--objective={objective}", f"--dataset={chat / f'{objective}.jsonl'}"]
        args += ["--packing=True"] if objective == "sft" else []
    steps, real = [], train.forward_backward

    def watched(*a, **k):
        with DeviceReads() as mode:
            pending = real(*a, **k)
        steps.append(mode.found)
        return pending

    monkeypatch.setattr(train, "forward_backward", watched)
    train.main(parse_args(args), log=lambda *a: None)
    assert len(steps) == 3 and steps == [[], [], []]


def test_packed_sft_batches_bring_their_cu_seqlens_from_the_host(chat):
    from engine.attention import cumulative_seqlens
    from engine.objectives import SFTTask

    cfg = parse_args(SFT + [f"--dataset={chat / 'sft.jsonl'}", "--packing=True"])
    task = SFTTask(cfg, get_tokenizer("gpt2"), 64, log=lambda *a: None)
    b = task.batch(0, 0)
    assert torch.equal(b["cu_seqlens"], cumulative_seqlens(b["segments"])) and len(b["cu_seqlens"]) > cfg.batch_size + 1
    seen = {}
    monkey = GPT(ModelConfig.from_preset("tiny_gpt2", vocab_size=50304, block_size=64))
    real = monkey.blocks[0].attn.attend
    monkey.blocks[0].attn.attend = lambda *a, **k: seen.update(k) or real(*a, **k)
    task.loss(monkey, b)
    assert seen["cu_seqlens"] is b["cu_seqlens"]
