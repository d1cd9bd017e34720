"""Sequence-length statistics of a dataset, in tokens, to choose block_size / max_length before training.

    python tools/analyze_dataset.py data/slimpajama_6b_llama3              # pretraining bins: document lengths
    python tools/analyze_dataset.py sft.jsonl --tokenizer=qwen3            # SFT conversations, chat-formatted
    python tools/analyze_dataset.py dpo.jsonl --tokenizer=llama3           # DPO pairs: chosen, rejected, longer

Prints a table (median, p95, p99, max, the share that fits each --max_lengths, a recommended max_length: the
smallest power of two, at least 64, that holds --coverage of the sequences) and writes it as JSON (--out).
Pretraining bins are split into documents at the eot id from their meta.json. SFT and DPO records are rendered with
the tokenizer's chat format (Tokenizer.encode_chat), the same ids SFT trains on. Record shapes understood:
{"messages": [{"role", "content"}]}, {"conversations": [{"from", "value"}]}, {"prompt", "response"|"completion"|
"output"|"answer"}, {"instruction", "input", "output"}, {"text"}; DPO: {"prompt"?, "chosen", "rejected"}, each a
string or a message list (a chosen list that already holds the prompt is taken whole).
"""
import argparse
import json
import math
import multiprocessing as mp
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.tokenizers import get_tokenizer  # noqa: E402

ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
CONVERSATION_KEYS = {"messages", "conversations", "prompt", "instruction"}


def to_messages(x, where):
    """A conversation as [{"role", "content"}] from the record shapes the module docstring lists."""
    if isinstance(x, str):
        return [{"role": "assistant", "content": x}]
    if isinstance(x, list):
        return [{"role": ROLES.get(m.get("role", m.get("from")), m.get("role", m.get("from"))),
                 "content": m.get("content", m.get("value", ""))} for m in x]
    if "messages" in x or "conversations" in x:
        return to_messages(x.get("messages", x.get("conversations")), where)
    answer = next((x[k] for k in ("response", "completion", "output", "answer") if k in x), None)
    prompt = x.get("prompt", x.get("instruction"))
    if prompt is not None and answer is not None:
        if x.get("input"):
            prompt = f"{prompt}\n\n{x['input']}"
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    raise ValueError(f"{where}: no conversation found (keys: {', '.join(x)})")


def pair_messages(x, where):
    """(chosen, rejected) conversations of a DPO record."""
    prompt = x.get("prompt") or []
    prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else to_messages(prompt, where)
    out = []
    for side in ("chosen", "rejected"):
        msgs = to_messages(x[side], where)
        out.append(msgs if prompt and msgs[:len(prompt)] == prompt else prompt + msgs)
    return out


_TOK = None


def _lengths(job):
    kind, records, start, source = job
    out = []
    for i, r in enumerate(records, start):
        where = f"{source} row {i}"
        if kind == "dpo":
            out.append([len(_TOK.encode_chat(m)[0]) for m in pair_messages(r, where)])
        elif "text" in r and not CONVERSATION_KEYS & set(r):  # plain text: a document, closed by eot
            out.append([len(_TOK.encode(r["text"])) + (_TOK.eot_id is not None)])
        else:
            out.append([len(_TOK.encode_chat(to_messages(r, where))[0])])
    return out


def record_lengths(path, tok, num_proc=1):
    """{"sequence": lengths} for SFT/text records, {"chosen", "rejected", "pair"} for DPO."""
    global _TOK
    _TOK = tok
    path = Path(path)
    with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark, which some editors write, is dropped
        records = json.load(f) if path.suffix == ".json" else [json.loads(line) for line in f if line.strip()]
    kind = "dpo" if records and "chosen" in records[0] and "rejected" in records[0] else "sft"
    step = max(1, math.ceil(len(records) / (4 * num_proc)))
    jobs = [(kind, records[i:i + step], i, str(path)) for i in range(0, len(records), step)]
    if num_proc > 1:
        with mp.get_context("fork").Pool(num_proc) as pool:
            rows = [r for part in pool.map(_lengths, jobs) for r in part]
    else:
        rows = [r for job in jobs for r in _lengths(job)]
    a = np.array(rows, dtype=np.int64).reshape(len(rows), -1)
    if kind == "dpo":
        return kind, {"chosen": a[:, 0], "rejected": a[:, 1], "pair": a.max(axis=1)}
    return kind, {"sequence": a[:, 0]}


def bin_lengths(folder):
    """{split: document lengths} of prepared bins, each document counted with its eot."""
    folder = Path(folder)
    meta = json.loads((folder / "meta.json").read_text())
    eot, out = meta["eot_id"], {}
    if eot is None:
        raise ValueError(f"{folder}: the {meta['tokenizer']} tokenizer has no end-of-text id, so its bins carry no "
                         f"document boundaries to measure")
    for split, info in meta["splits"].items():
        ends, offset = [], 0
        for name in info["files"]:  # a split's shards are one stream: documents may cross them
            data = np.memmap(folder / name, dtype=meta["dtype"], mode="r") if os.path.getsize(folder / name) else []
            for i in range(0, len(data), 1 << 26):
                ends.append(np.flatnonzero(np.asarray(data[i:i + (1 << 26)]) == eot) + offset + i)
            offset += len(data)
        ends = np.concatenate(ends) if ends else np.zeros(0, np.int64)
        out[split] = np.diff(np.r_[-1, ends]).astype(np.int64)
    return out


def stats(lengths, max_lengths, coverage):
    x = np.asarray(lengths)
    if x.size == 0:
        return {"n": 0}
    q = np.percentile(x, [50, 95, 99, 100 * coverage])
    return {
        "n": int(x.size), "mean": float(x.mean()), "median": float(q[0]), "p95": float(q[1]), "p99": float(q[2]),
        "max": int(x.max()), "fits": {str(m): float((x <= m).mean()) for m in max_lengths},
        "recommended_max_length": int(max(64, 2 ** math.ceil(math.log2(max(q[3], 1))))),
    }


def table(report, max_lengths):
    head = f"{'':10s} {'n':>9s} {'median':>8s} {'p95':>8s} {'p99':>8s} {'max':>8s} " + \
        " ".join(f"{'<=' + str(m):>7s}" for m in max_lengths) + "  recommended"
    lines = [head]
    for name, s in report["stats"].items():
        if s["n"] == 0:
            lines.append(f"{name:10s} {0:9d}")
            continue
        lines.append(f"{name:10s} {s['n']:9d} {s['median']:8.0f} {s['p95']:8.0f} {s['p99']:8.0f} {s['max']:8d} " +
                     " ".join(f"{s['fits'][str(m)]:7.1%}" for m in max_lengths) + f"  {s['recommended_max_length']}")
    return "\n".join(lines)


def analyze(path, tokenizer=None, tokenizer_path=None, max_lengths=(256, 512, 1024, 2048, 4096, 8192), coverage=0.99,
            num_proc=1):
    p = Path(path)
    if p.is_dir() or p.name == "meta.json":
        folder = p if p.is_dir() else p.parent
        meta = json.loads((folder / "meta.json").read_text())
        kind, lengths, tok_name = "pretrain", bin_lengths(folder), meta["tokenizer"]
    else:
        if not tokenizer:
            raise ValueError("jsonl/json datasets need --tokenizer to count tokens")
        kind, lengths = record_lengths(p, get_tokenizer(tokenizer, tokenizer_path), num_proc)
        tok_name = tokenizer
    return {"path": str(path), "kind": kind, "tokenizer": tok_name, "coverage": coverage,
            "stats": {k: stats(v, max_lengths, coverage) for k, v in lengths.items()}}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="a prepared data folder, or an SFT/DPO .jsonl/.json")
    p.add_argument("--tokenizer", help="gpt2, llama2, llama3, qwen3 or hf:<folder> (jsonl/json only)")
    p.add_argument("--tokenizer_path")
    p.add_argument("--max_lengths", default="256,512,1024,2048,4096,8192")
    p.add_argument("--coverage", type=float, default=0.99, help="share of sequences the recommendation must hold")
    p.add_argument("--num_proc", type=int, default=os.cpu_count())
    p.add_argument("--out", help="JSON report (default: analysis.json in the folder, or <file>.analysis.json)")
    a = p.parse_args()
    max_lengths = [int(m) for m in a.max_lengths.split(",")]
    report = analyze(a.path, a.tokenizer, a.tokenizer_path, max_lengths, a.coverage, a.num_proc)
    print(f"{report['path']} ({report['kind']}, {report['tokenizer']} tokens)")
    print(table(report, max_lengths))
    path = Path(a.path)
    out = a.out or (path / "analysis.json" if path.is_dir() else path.with_name(path.name + ".analysis.json"))
    Path(out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
