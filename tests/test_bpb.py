"""Bits per byte: the UTF-8 bytes each token id stands for, per tokenizer kind, against the texts they spell; the
val_bpb a run logs against a direct float64 formula, under several tokenizers; and the data sets it is known for."""
import json
import math
import unicodedata

import numpy as np
import pytest
import torch
from conftest import write_dataset
from test_tokenizers import TEXTS, _hf_gpt2, _installed, _sp_model

import train
from engine.checkpoint import list_checkpoints, load_checkpoint
from engine.config import parse_args
from engine.data.bins import EVAL, BatchSampler, DataError, TokenDataset
from engine.data.prepare import prepare
from engine.data.tokenizers import CharTokenizer, get_tokenizer, tokenizer_file
from engine.objectives import PretrainTask
from model import GPT, ModelConfig


def spelled(tok, table, text):
    """The bytes the table gives the ids of `text`."""
    return int(table[tok.encode(text)].sum())


def utf8(text):
    return len(text.encode("utf-8"))


# ---- token byte lengths against the texts the ids spell


@pytest.mark.parametrize("name", ["gpt2", "llama3", "qwen3"])
def test_byte_level_tokens_spell_the_text(name):
    _installed(name)
    tok = get_tokenizer(name)
    table = tok.token_bytes()
    assert table.shape == (tok.vocab_size,)
    for t in TEXTS:  # unicode, emoji, whitespace runs, newlines, special-token lookalikes
        assert spelled(tok, table, t) == utf8(unicodedata.normalize("NFC", t) if name == "qwen3" else t), t
    special = list(tok.special_tokens.values())
    assert (table[special] == 0).all() and (np.delete(table, special) > 0).all()


def check_sentencepiece(tok, table):
    for t in TEXTS:  # sentencepiece puts its dummy-prefix space before every text it encodes; the model predicts it
        assert spelled(tok, table, t) == (utf8(" " + t) if t else 0), t
    assert list(table[[0, 1, 2]]) == [0, 0, 0]  # <unk>, <s>, </s>
    assert table[tok.sp.piece_to_id("<0x0A>")] == 1  # a byte-fallback piece, not its six characters


def test_sentencepiece_pieces_spell_the_text(tmp_path):
    _sp_model(tmp_path)
    tok = get_tokenizer("llama2", path=tmp_path)
    check_sentencepiece(tok, tok.token_bytes())


@pytest.mark.slow
def test_llama2_default_file_spells_the_text():
    try:
        tokenizer_file("llama2")  # mistral-common's file, fetched with pip if the package is absent
    except FileNotFoundError as e:
        pytest.skip(str(e))
    tok = get_tokenizer("llama2")
    check_sentencepiece(tok, tok.token_bytes())


def test_char_tokens_spell_the_text():
    tok = CharTokenizer.from_texts(TEXTS)
    table = tok.token_bytes()
    for t in TEXTS:
        assert spelled(tok, table, t) == utf8(t)


def test_hf_byte_level_matches_gpt2_and_counts_added_tokens(tmp_path):
    ref = _hf_gpt2(tmp_path / "src")
    ref.add_tokens(["<naïve>"])  # ordinary vocabulary: its text as written, not byte-level characters
    ref.add_special_tokens({"additional_special_tokens": ["<|sep|>"]})
    ref.save_pretrained(tmp_path / "hf")
    tok = get_tokenizer(f"hf:{tmp_path / 'hf'}")
    table = tok.token_bytes()
    # transformers' byte-level strings against tiktoken's bytes, id by id
    np.testing.assert_array_equal(table[:50257], get_tokenizer("gpt2").token_bytes())
    assert list(table[50257:]) == [utf8("<naïve>"), 0]
    for t in [*TEXTS, "a <naïve> b"]:
        assert spelled(tok, table, t) == utf8(t), t


def test_hf_sentencepiece_style_pieces(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    sp = _sp_model(tmp_path)
    model = models.Unigram([(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())], unk_id=0,
                           byte_fallback=True)
    backend = Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(tmp_path / "hf")
    tok = get_tokenizer(f"hf:{tmp_path / 'hf'}")
    table = tok.token_bytes()
    np.testing.assert_array_equal(table, get_tokenizer("llama2", path=tmp_path).token_bytes())
    # Metaspace prepends its space unless the text begins with one; this Unigram model, unlike sentencepiece, finds
    # "<s>" in text, so the lookalikes are left out
    for t in [t for t in TEXTS if "<s>" not in t]:
        assert spelled(tok, table, t) == utf8(t) + (t[:1] not in ("", " ")), t


# ---- the logged bits per byte against a direct formula

DOCS = [f"Doc {i}: café naïve — 🙂 line {i}\n\n  tabs\tand    spaces {i * 37}." for i in range(60)]


def prepared(tmp_path, tokenizer, docs=DOCS):
    src = tmp_path / "corpus.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return prepare(str(src), tmp_path / "data", tokenizer=tokenizer, val_docs=len(docs) // 4, num_proc=1,
                   progress=False)


TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--eval_iters=3",
        "--warmup_iters=2", "--learning_rate=1e-2", "--device=cpu", "--dtype=float32"]


def run(data, out, *extra):
    cfg = parse_args(TINY + [f"--dataset={data}", f"--out_dir={out}", *extra])
    return train.main(cfg, log=lambda *a: None), cfg


def direct_bpb(model, data, cfg, split, table, special):
    """sum of -log2 p(target) over targets that are not special tokens / sum of their UTF-8 bytes, in float64, over
    the batches evaluate() draws."""
    sampler = BatchSampler(data, cfg.batch_size, cfg.block_size, cfg.seed)
    bits = nbytes = 0.0
    for k in range(cfg.eval_iters):
        x, y = sampler.batch(split, k, stream=EVAL if split == "train" else None)
        with torch.no_grad():
            logp = torch.log_softmax(model(x)[0].double(), dim=-1).gather(-1, y[..., None])[..., 0]
        keep = ~torch.isin(y, special)
        bits += -(logp[keep] / math.log(2)).sum().item()
        nbytes += float(table[y[keep]].sum())
    return bits / nbytes


@pytest.mark.parametrize("tokenizer,chunk", [("char", 0), ("gpt2", 0), pytest.param("gpt2", 64, marks=pytest.mark.slow),
                                             pytest.param("llama3", 0, marks=pytest.mark.slow)])
def test_logged_bpb_is_bits_over_bytes(tmp_path, tokenizer, chunk):
    if tokenizer != "char":
        _installed(tokenizer)
    meta = prepared(tmp_path, tokenizer)
    res, cfg = run(tmp_path / "data", tmp_path / "o", "--max_iters=12", "--eval_interval=12",
                   f"--loss_chunk_size={chunk}")
    last = json.load(open(res["run_log"]))["evals"][-1]
    state = load_checkpoint(list_checkpoints(tmp_path / "o")[-1])  # the weights of that last evaluation
    model = GPT(ModelConfig.from_dict({**state["model_config"], "loss_chunk_size": 0}))  # logits, for the test
    model.load_state_dict(state["model"])
    model.double().eval()
    tok = get_tokenizer(tokenizer, chars=meta.get("chars"))
    table = torch.from_numpy(tok.token_bytes()).double()  # tested against the texts above
    special = torch.tensor(sorted(tok.special_tokens.values()), dtype=torch.long)
    data = TokenDataset(str(tmp_path / "data"))
    for split in ("train", "val"):
        assert last[f"{split}_bpb"] == pytest.approx(direct_bpb(model, data, cfg, split, table, special), rel=2e-5)
    if tokenizer != "char":  # documents end in a special token; counting its bits would show
        with_specials = direct_bpb(model, data, cfg, "val", table, special[:0])
        assert abs(with_specials / last["val_bpb"] - 1) > 1e-3


def test_a_batch_of_special_targets_adds_nothing():
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("tiny_llama3", vocab_size=64))
    task = PretrainTask.__new__(PretrainTask)  # the method alone, without data to sample
    task.token_bytes = torch.tensor([0] + [1] * 63)  # id 0 special
    b = {"input_ids": torch.randint(1, 64, (2, 8)), "labels": torch.zeros(2, 8, dtype=torch.long)}
    with torch.no_grad():
        assert task.bpb_sums(model, b, model(b["input_ids"], b["labels"])[1]).tolist() == [0.0, 0.0]


# ---- which data sets have it


def test_prepare_stores_the_table_and_older_data_gets_it_from_the_tokenizer(tmp_path):
    _installed("gpt2")
    meta = prepared(tmp_path, "gpt2")
    folder = tmp_path / "data"
    assert meta["token_bytes"] == "token_bytes.npy"
    stored = np.load(folder / "token_bytes.npy")
    np.testing.assert_array_equal(TokenDataset(str(folder)).token_bytes, stored)
    (folder / "token_bytes.npy").unlink()  # as prepared before the table existed
    del meta["token_bytes"]
    (folder / "meta.json").write_text(json.dumps(meta))
    np.testing.assert_array_equal(TokenDataset(str(folder)).token_bytes, stored)
    assert stored.sum() > 0 and stored[50256] == 0


def test_a_table_that_does_not_fit_is_named(tmp_path):
    prepared(tmp_path, "char")
    np.save(tmp_path / "data" / "token_bytes.npy", np.ones(3, np.int32))
    with pytest.raises(DataError, match="vocab_size"):
        _ = TokenDataset(str(tmp_path / "data")).token_bytes


def test_synthetic_data_logs_no_bpb(tmp_path):
    data = write_dataset(str(tmp_path / "d"))
    assert TokenDataset(data).token_bytes is None  # its tokenizer ("synthetic") cannot be built
    res, _ = run(data, tmp_path / "o", "--max_iters=2", "--eval_interval=2")
    evals = json.load(open(res["run_log"]))["evals"]
    assert [(e["train_bpb"], e["val_bpb"]) for e in evals] == [(None, None)] * 2
    assert all(math.isfinite(e["val_loss"]) for e in evals)


@pytest.mark.distributed
@pytest.mark.slow
def test_two_fsdp_ranks_log_the_bpb_of_one_process(tmp_path):
    """Ranks whose batches differ in special targets still run the same forward passes (FSDP would hang otherwise),
    and the filler batch of an odd eval_iters counts nothing."""
    from test_distributed import launch, ok

    _installed("gpt2")
    prepared(tmp_path, "gpt2", [" ".join(DOCS[i:i + n]) for i in range(0, 60, 6) for n in (1, 5)])
    sampler = BatchSampler(TokenDataset(str(tmp_path / "data")), 2, 32, 1337)
    has_eot = [bool((sampler.batch("train", k, stream=EVAL)[1] == 50256).any()) for k in range(3)]
    assert has_eot[2] != has_eot[0]  # rank 0's second batch and rank 1's (a filler): one needs a second forward pass
    for n, out, flags in ((0, "one", []), (2, "two", ["--use_fsdp=True"])):
        ok(launch(n, tmp_path / out, tmp_path / "data", "--max_iters=4", "--eval_interval=2", "--eval_iters=3",
                  *flags))
    one, two = (json.load(open(next((tmp_path / out).glob("run_*.json"))))["evals"] for out in ("one", "two"))
    assert [e["iter"] for e in two] == [0, 2, 4]
    for a, b in zip(one, two):
        assert b["val_bpb"] == pytest.approx(a["val_bpb"], rel=1e-5)
        assert b["train_bpb"] == pytest.approx(a["train_bpb"], rel=1e-5)
