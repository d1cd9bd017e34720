"""Bad input answered with one line naming the problem and the fix (exit code 2), never a traceback: numbers out of
range, unknown devices, broken meta.json, unsafe transformers weights, steps too large for the machine, config files
that exit; and the inputs that run but used to crash or mislead (no val examples, a BOM, DPO pairs with no signal).
docs/reliability.md tabulates what each test shows."""
import codecs
import json
import math
import os
import re
import subprocess
import sys
import typing
from dataclasses import replace

import pytest
import torch
from conftest import ROOT, run_log, write_dataset

import train
from engine import distributed as D
from engine.config import FIELDS, ConfigError, parse_args
from engine.data.bins import DataError, TokenDataset
from engine.data.chat_data import load_records, make_toy_dpo, make_toy_sft, write_jsonl
from engine.data.tokenizers import get_tokenizer
from engine.objectives import DPOTask
from engine.plan import estimate
from model import GPT, ModelConfig

TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--eval_iters=1",
        "--device=cpu", "--dtype=float32", "--max_iters=2", "--eval_interval=2", "--log_interval=1",
        "--gradient_log_interval=0"]
CHAT = ["--tokenizer=gpt2", "--device=cpu", "--dtype=float32", "--preset=tiny_gpt2", "--block_size=64",
        "--max_seq_length=64",
        "--batch_size=4", "--eval_iters=1", "--max_iters=2", "--eval_interval=2", "--log_interval=1",
        "--gradient_log_interval=0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("bad") / "data"))


def refused(argv, capsys):
    """train.py's exit code for argv, and the one line it wrote to stderr."""
    code = train.cli(argv)
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return code, err


# ----------------------------------------------------------------------------------------------------------
# numbers and devices

@pytest.mark.parametrize("arg,msg", [
    ("--learning_rate=inf", "learning_rate must be a finite number, got inf"),
    ("--learning_rate=nan", "learning_rate must be a finite number, got nan"),
    ("--grad_clip=nan", "grad_clip must be a finite number"),
    ("--min_lr=nan", "min_lr must be a finite number"),
    ("--beta1=2", r"beta1 must be in \[0, 1\), got 2.0 \(AdamW beta1; default 0.9\)"),
    ("--weight_decay=-1", "weight_decay must be 0 or more, got -1.0"),
    ("--max_seq_length=0", "max_seq_length must be at least 1"),
    ("--eval_iters=-3", "eval_iters must be at least 1"),
    ("--dpo_beta=0", "dpo_beta must be positive"),
    ("--seed=-1", r"seed must be in \[0, 2\*\*63\)"),
    ("--device=foo", "device='foo' is not a device this engine runs on: use auto, cpu, cuda, cuda:N"),
    ("--device=cuda:x", "device='cuda:x' is not a device"),
])
def test_bad_values_exit_2_with_one_line(arg, msg, capsys):
    code, err = refused([arg], capsys)
    assert code == 2
    assert re.search(msg, err), err


def kinds(name):
    tp = FIELDS[name].type
    return set(typing.get_args(tp) or (tp,))


@pytest.mark.parametrize("name", [n for n in FIELDS if {int, float} & kinds(n)])
def test_every_numeric_key_refuses_negatives_and_non_finite_values(name):
    for v in ["-1", "nan", "inf", "-inf"] if float in kinds(name) else ["-1"]:
        with pytest.raises(ConfigError, match=name):
            parse_args([f"--{name}={v}"])


def test_devices_that_are_not_here_are_named(capsys):
    for ok in ("auto", "cpu", "cuda", "cuda:1", "mps"):
        assert parse_args([f"--device={ok}"]).device == ok
    if not torch.cuda.is_available():
        assert refused(["--device=cuda:0"], capsys)[1].endswith("CUDA is not available here; use --device=cpu")
    elif torch.cuda.device_count() < 8:
        assert "GPU(s), numbered from 0" in refused(["--device=cuda:7"], capsys)[1]
    if not torch.backends.mps.is_available():
        assert "MPS (Apple GPUs) is not available" in refused(["--device=mps"], capsys)[1]


def test_command_line_prints_one_error_line_and_exits_2():
    res = subprocess.run([sys.executable, "train.py", "--learning_rate=nan"], cwd=ROOT, capture_output=True,
                         text=True)
    assert res.returncode == 2
    assert res.stderr.splitlines() == ["error: learning_rate must be a finite number, got nan (peak learning rate; "
                                       "default 0.0006)"]


# ----------------------------------------------------------------------------------------------------------
# config files

def test_config_file_that_exits_is_an_error_and_ctrl_c_still_interrupts(tmp_path, capsys):
    f = tmp_path / "quits.py"
    f.write_text("import sys\nbatch_size = 4\nsys.exit(0)\n")
    code, err = refused([str(f)], capsys)
    assert code == 2 and str(f) in err and "exit" in err
    f.write_text("raise KeyboardInterrupt\n")
    with pytest.raises(KeyboardInterrupt):
        parse_args([str(f)])
    f.write_text("learning_rate = 10 ** 400\n")  # beyond any float
    with pytest.raises(ConfigError, match="learning_rate=1000.* is not a valid float"):
        parse_args([str(f)])


# ----------------------------------------------------------------------------------------------------------
# meta.json

@pytest.mark.parametrize("change,msg", [
    ({"vocab_size": "abc"}, "vocab_size 'abc' is not a positive integer"),
    ({"vocab_size": None}, "vocab_size None is not a positive integer"),
    ({"vocab_size": True}, "vocab_size True is not a positive integer"),
    ({"dtype": "int8"}, "dtype 'int8' is not uint16 or uint32"),
    ({"dtype": ["uint16"]}, r"dtype \['uint16'\] is not uint16 or uint32"),
    ({"splits": ["train.bin", "val.bin"]}, "splits is a JSON list, not an object"),
    ({"splits": "train.bin"}, "splits is a JSON str, not an object"),
    ({"splits": {"train": {"tokens": 5}, "val": {"files": ["val.bin"]}}}, r"splits.train needs \"files\""),
    ({"splits": {"train": {"files": "train.bin"}, "val": {"files": ["val.bin"]}}}, "got 'train.bin'"),
    ({"splits": {"train": {"files": [7]}, "val": {"files": ["val.bin"]}}}, r"got \[7\]"),
    ({"splits": {"train": ["train.bin"], "val": {"files": ["val.bin"]}}}, "splits.train needs"),
])
def test_malformed_meta_json_names_the_file_and_key(change, msg, tmp_path):
    ds = write_dataset(str(tmp_path / "d"), n_train=2000, n_val=500)
    meta = json.load(open(os.path.join(ds, "meta.json")))
    json.dump({**meta, **change}, open(os.path.join(ds, "meta.json"), "w"))
    with pytest.raises(DataError, match=msg) as e:
        TokenDataset(ds, vocab_limit=64)
    assert os.path.join(ds, "meta.json") in str(e.value) and "prepare.py" in str(e.value)


def test_meta_json_that_is_not_an_object(tmp_path, capsys):
    ds = write_dataset(str(tmp_path / "d"), n_train=2000, n_val=500)
    with open(os.path.join(ds, "meta.json"), "w") as f:
        json.dump([1, 2], f)
    code, err = refused(TINY + [f"--dataset={ds}", f"--out_dir={tmp_path / 'o'}"], capsys)
    assert code == 2 and "meta.json holds a JSON list" in err


def test_token_ids_beyond_meta_vocab_are_refused(tmp_path, capsys):
    ds = write_dataset(str(tmp_path / "d"), vocab_size=61, n_train=2000, n_val=500)  # ids up to 60
    meta = json.load(open(os.path.join(ds, "meta.json")))
    json.dump({**meta, "vocab_size": 40}, open(os.path.join(ds, "meta.json"), "w"))  # the model gets 64 rows
    code, err = refused(TINY + [f"--dataset={ds}", f"--out_dir={tmp_path / 'o'}"], capsys)
    assert code == 2 and "train.bin holds token id 60, outside the vocabulary of 40 that meta.json gives" in err


# ----------------------------------------------------------------------------------------------------------
# transformers weights

class Payload:
    marker = None

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def hf_dir(path):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 16,
                                                  "vocab_size": 64, "n_positions": 32}))
    return path


def test_unsafe_or_damaged_pytorch_model_bin_is_refused(data, tmp_path, capsys):
    Payload.marker = tmp_path / "payload_ran"
    bad = hf_dir(tmp_path / "evil")
    torch.save({"transformer.wte.weight": torch.zeros(64, 16), "x": Payload()}, bad / "pytorch_model.bin")
    noise = hf_dir(tmp_path / "noise")
    (noise / "pytorch_model.bin").write_bytes(os.urandom(4096))
    broken = hf_dir(tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(os.urandom(4096))
    for folder, msg in ((bad, "is refused as unsafe or damaged (it asks for posix.system)"),
                        (noise, "is refused as unsafe or damaged"), (broken, "is damaged")):
        code, err = refused(TINY + [f"--dataset={data}", f"--out_dir={tmp_path / 'o'}", f"--init_from={folder}"],
                            capsys)
        assert code == 2 and str(folder) in err and msg in err and "safetensors" in err
        assert "weights_only" not in err
    assert not Payload.marker.exists()


def test_unsafe_weights_from_the_command_line(data, tmp_path):
    marker = tmp_path / "payload_ran"
    bad = hf_dir(tmp_path / "evil")
    with open(bad / "pytorch_model.bin", "wb") as f:  # a plain pickle: os.system at load time
        f.write(b"cposix\nsystem\n(V" + f"touch {marker}".encode() + b"\ntR.")
    res = subprocess.run([sys.executable, "train.py", *TINY, f"--dataset={data}", f"--out_dir={tmp_path / 'o'}",
                          f"--init_from={bad}"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and not marker.exists()
    [line] = res.stderr.splitlines()
    assert line.startswith(f"error: init_from={bad}: {bad / 'pytorch_model.bin'} is refused as unsafe or damaged")


# ----------------------------------------------------------------------------------------------------------
# memory

def test_a_step_too_large_for_the_machine_is_refused_at_start(data, tmp_path, capsys):
    common = TINY + [f"--dataset={data}", f"--out_dir={tmp_path / 'o'}"]
    code, err = refused(common + ["--batch_size=1000000"], capsys)
    assert code == 2 and "one step needs about" in err and "GB is free for it" in err
    assert "activations" in err and "--skip_memory_check=True runs it anyway" in err
    # the largest micro-batch that fits, with the accumulation that keeps the rows per step
    match = re.search(r"batch_size=(\d+) with gradient_accumulation_steps=(\d+) fits", err)
    assert match and int(match[1]) * int(match[2]) == 1000000 and 4 <= int(match[1]) < 1000000
    # a model made with 100000 positions, so that its own limit is no obstacle
    code, err = refused(common + ["--preset=tiny_gpt2", "--block_size=100000", "--batch_size=1000"], capsys)
    assert code == 2 and "one step needs about" in err and "loss_chunk_size=1024" in err
    assert "activation_checkpointing=True" in err
    code, err = refused(common + ["--gradient_accumulation_steps=1000000000"], capsys)  # all held in one step
    assert code == 2 and "lower gradient_accumulation_steps or batch_size" in err and "batches" in err
    assert not os.path.exists(tmp_path / "o" / "ckpt")  # nothing written


def test_the_memory_estimate_is_logged_and_recorded(data, tmp_path):
    lines = []
    train.main(parse_args(TINY + [f"--dataset={data}", f"--out_dir={tmp_path / 'o'}"]), log=lines.append)
    doc = run_log(tmp_path / "o")
    mem = doc["environment"]["memory_estimate"]
    cfg = parse_args(TINY + [f"--dataset={data}"])
    with torch.device("meta"):
        model = GPT(ModelConfig(**doc["environment"]["model_config"]))
    want = estimate(cfg, model, 1, 32, "float32", device_type="cpu")
    assert mem["parts_bytes"] == want["parts"] and mem["total_bytes"] == want["total"]
    assert mem["mode"] == "ddp" and mem["batch_size"] == 4 and 0 < mem["total_bytes"] < mem["available_bytes"]
    assert any(line.startswith("Memory: about ") and "GB per rank by engine/plan.py" in line for line in lines)


def test_skip_memory_check_lets_the_run_start():
    cfg = parse_args(TINY + ["--vocab_size=256"])
    with torch.device("meta"):
        model = GPT(train.model_config(cfg, None, "sdpa"))
    with pytest.raises(ConfigError, match="GB is free for it"):
        train.check_memory(cfg, model, 32, "cpu", "float32", D.Dist(), available=1000)
    est = train.check_memory(replace(cfg, skip_memory_check=True), model, 32, "cpu", "float32", D.Dist(),
                             available=1000)
    assert est["total"] > est["available"] == 1000


@pytest.mark.parametrize("extra", [
    [],
    ["--attention_backend=manual", "--dropout=0.1"],
    ["--gradient_accumulation_steps=2"],
    ["--preset=tiny_llama", "--n_kv_head=2", "--vocab_size=512", "--activation_checkpointing=True"],
    ["--preset=tiny_llama3", "--vocab_size=512", "--dtype=bfloat16"],
    ["--preset=tiny_llama3", "--vocab_size=4096", "--batch_size=8"],
    ["--preset=tiny_llama3", "--vocab_size=4096", "--batch_size=2", "--gradient_accumulation_steps=3"],
    ["--preset=tiny_qwen3", "--vocab_size=512", "--activation_checkpointing=True", "--loss_chunk_size=16"],
    ["--block_size=128", "--n_layer=6", "--activation_checkpointing=True", "--attention_backend=manual"],
    ["--preset=tiny_llama3", "--vocab_size=512", "--optimizer=muon"],
])
def test_memory_estimate_matches_a_real_step(extra):
    """engine/plan.py's estimate, as train.py checks it, against tools/bench.py's count of the tensor bytes a real
    CPU step allocates at its peak (parameters, optimizer state, batch, and everything the step creates)."""
    from tools.bench import Run, cpu_step_bytes

    cfg = parse_args(TINY + ["--vocab_size=256", *extra])
    run = Run(cfg)
    run.step()  # the optimizer state exists from here on, as in training
    measured = cpu_step_bytes(run) + run.x.untyped_storage().nbytes()  # and the batch, made before the step
    est = train.check_memory(cfg, run.model, run.T, "cpu", run.dtype, D.Dist(), available=math.inf)
    assert abs(est["total"] - measured) <= 0.10 * measured, (est["total"], measured)


@pytest.mark.parametrize("name", ["train_shakespeare_char", "smoke"])
def test_the_cpu_configs_fit_in_a_gigabyte(name):
    cfg = parse_args([os.path.join(ROOT, "config", f"{name}.py")])
    with torch.device("meta"):  # shapes only: no memory, no time
        model = GPT(train.model_config(cfg, 65, "sdpa"))
    est = train.check_memory(cfg, model, cfg.block_size or model.config.block_size, "cpu", "float32", D.Dist(),
                             available=1e9)
    assert est["total"] < 1e9


# ----------------------------------------------------------------------------------------------------------
# chat data

@pytest.mark.parametrize("objective,records", [("sft", "sft"), ("sft", "one"), ("dpo", "dpo")])
def test_no_val_examples_skips_val_and_still_checkpoints(objective, records, tmp_path):
    path = tmp_path / "chat.jsonl"
    write_jsonl({"sft": make_toy_sft(8), "one": make_toy_sft(1), "dpo": make_toy_dpo(8)}[records], path)
    lines = []
    res = train.main(parse_args(CHAT + [f"--objective={objective}", f"--dataset={path}", f"--out_dir={tmp_path / 'o'}",
                                        "--val_fraction=0", "--always_save_checkpoint=False"]), log=lines.append)
    doc = run_log(tmp_path / "o")
    assert [e["val_loss"] for e in doc["evals"]] == [None, None]
    assert all(math.isfinite(e["train_loss"]) for e in doc["evals"])
    assert res["final"]["val"] is None and res["checkpoint"] and os.path.isdir(res["checkpoint"])
    assert any("evaluations report no val loss" in line for line in lines)
    assert any("no val examples" in line for line in lines)


def test_byte_order_mark_is_stripped(tmp_path):
    """By the trainer's reader and by the tools that read chat files."""
    from tools.analyze_dataset import record_lengths
    from tools.extract_subset import extract

    recs = make_toy_sft(3)
    write_jsonl(recs, tmp_path / "a.jsonl")
    (tmp_path / "a.jsonl").write_bytes(codecs.BOM_UTF8 + (tmp_path / "a.jsonl").read_bytes())
    (tmp_path / "b.json").write_bytes(codecs.BOM_UTF8 + json.dumps(recs).encode())
    tok = get_tokenizer("gpt2")
    for name in ("a.jsonl", "b.json"):
        assert [r for _, r in load_records(str(tmp_path / name))] == recs
        assert len(record_lengths(tmp_path / name, tok)[1]["sequence"]) == 3
    assert extract(tmp_path / "b.json", tmp_path / "c.jsonl", 3) == 3
    assert [r for _, r in load_records(str(tmp_path / "c.jsonl"))] == recs


def test_dpo_pairs_with_identical_answers_warn(tmp_path):
    recs = make_toy_dpo(10)
    for r in recs[:3]:
        r["rejected"] = r["chosen"]
    write_jsonl(recs, tmp_path / "some.jsonl")
    write_jsonl([{**r, "rejected": r["chosen"]} for r in recs], tmp_path / "all.jsonl")
    long = "the same words again and " * 30  # differ only past max_seq_length: identical once truncated
    write_jsonl([{"prompt": "Say it.", "chosen": long + "yes", "rejected": long + "no"}] + recs[3:],
                tmp_path / "cut.jsonl")
    tok = get_tokenizer("gpt2")
    cfg = lambda name: parse_args(CHAT + ["--objective=dpo", f"--dataset={tmp_path / name}.jsonl"])  # noqa: E731

    lines = []
    task = DPOTask(cfg("some"), tok, 64, lines.append)
    [warning] = [line for line in lines if line.startswith("warning:")]
    assert "the same in 3 of 10 records" in warning and "left out" in warning
    assert len(task.items) == 7

    lines = []
    with pytest.raises(ConfigError, match="no training examples"):
        DPOTask(cfg("all"), tok, 64, lines.append)
    [warning] = [line for line in lines if line.startswith("warning:")]
    assert "the same in 10 of 10 records" in warning and "check which fields" in warning

    lines = []
    task = DPOTask(cfg("cut"), tok, 64, lines.append)
    [warning] = [line for line in lines if line.startswith("warning:")]
    assert warning.startswith("warning: dpo: chosen and rejected are the same tokens in 1 of 8 pairs (within "
                              "max_seq_length=64); those pairs teach nothing")
