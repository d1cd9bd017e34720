"""Sequence-length statistics of a dataset, in tokens, to choose block_size / max_seq_length before training.

    python tools/analyze_dataset.py data/slimpajama_6b_llama3              # pretraining bins: document lengths
    python tools/analyze_dataset.py sft.jsonl --tokenizer=qwen3            # SFT conversations
    python tools/analyze_dataset.py dpo.jsonl --tokenizer=llama3           # DPO pairs: chosen, rejected, longer

Prints a table (median, p95, p99, max, the share that fits each --max_lengths, a recommended max_length: the
smallest power of two, at least 64, that holds --coverage of the sequences) and writes it as JSON (--out).
Pretraining bins are split into documents at the eot id from their meta.json. SFT and DPO sources (any that
training reads: .jsonl/.json/.parquet files, folders, globs, hub:NAME) go through the very functions training uses
(engine/data/chat_data.py): the same record formats and errors, the same chat format, the same label convention.
So a length is what the example takes of max_seq_length: its input_ids, the rendered conversation less its last
token (labels are the next tokens), and an example fits max_seq_length=L untruncated exactly when its length <= L.
Examples that training leaves out (nothing to learn; DPO pairs whose chosen equals rejected) are left out here too.
The tokenizer is --tokenizer (a name, hf:<dir>, or a prepared dataset whose tokenizer it is); the chat format
--chat_format (and --enable_thinking=false for qwen3's no-think rendering), else the tokenizer's own, as in training.
"""
import argparse
import json
import math
import multiprocessing as mp
import os
import sys
from pathlib import Path

import numpy as np

from engine.data.chat import FORMATS, chat_spec
from engine.data.chat_data import load_dpo, load_records, load_sft, tokenize_pair, tokenize_sft
from engine.data.tokenizers import resolve_tokenizer

_TOK = _FMT = None


def _lengths(job):
    kind, items = job
    if kind == "dpo":
        pairs = [tokenize_pair(_TOK, *t, sys.maxsize, _FMT) for t in items]
        return [None if x is None else [len(x["chosen_ids"]), len(x["rejected_ids"])] for x in pairs]
    return [None if x is None else [len(x[0])] for x in (tokenize_sft(_TOK, m, sys.maxsize, _FMT) for m in items)]


def record_lengths(source, tok, num_proc=1, fmt=None):
    """(kind, lengths, dropped): "sft" with {"sequence"}, or "dpo" with {"chosen", "rejected", "pair"}, each the
    input_ids length training gives an example; dropped, the examples training would leave out for having nothing
    to learn. fmt: the chat format (chat_spec), None: the tokenizer's own."""
    global _TOK, _FMT
    _TOK, _FMT = tok, fmt if fmt is not None else chat_spec(tok)
    source = str(source)
    first = load_records(source, limit=1)
    kind = "dpo" if first and {"chosen", "rejected"} <= set(first[0][1]) else "sft"
    items = load_dpo(source) if kind == "dpo" else load_sft(source)
    step = max(1, math.ceil(len(items) / (4 * num_proc)))
    jobs = [(kind, items[i:i + step]) for i in range(0, len(items), step)]
    if num_proc > 1:
        with mp.get_context("fork").Pool(num_proc) as pool:
            rows = [r for part in pool.map(_lengths, jobs) for r in part]
    else:
        rows = [r for job in jobs for r in _lengths(job)]
    kept = [r for r in rows if r is not None]
    a = np.array(kept, dtype=np.int64).reshape(len(kept), 2 if kind == "dpo" else 1)
    if kind == "dpo":
        return kind, {"chosen": a[:, 0], "rejected": a[:, 1], "pair": a.max(axis=1)}, len(rows) - len(kept)
    return kind, {"sequence": a[:, 0]}, len(rows) - len(kept)


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
            num_proc=1, chat_format=None, enable_thinking=True):
    p = Path(path)
    folder = p.parent if p.name == "meta.json" else p
    if (folder / "meta.json").is_file():  # prepared bins; anything else is SFT or DPO records
        meta = json.loads((folder / "meta.json").read_text())
        kind, lengths, tok_name, dropped = "pretrain", bin_lengths(folder), meta["tokenizer"], 0
    else:
        if not tokenizer:
            raise ValueError("SFT and DPO data need --tokenizer to count tokens")
        tok = resolve_tokenizer(tokenizer, tokenizer_path).tok
        fmt = chat_spec(tok, chat_format, enable_thinking)
        (kind, lengths, dropped), tok_name = record_lengths(path, tok, num_proc, fmt), tok.name
    return {"path": str(path), "kind": kind, "tokenizer": tok_name, "coverage": coverage, "dropped": dropped,
            **({"chat_format": str(fmt)} if kind != "pretrain" else {}),
            "stats": {k: stats(v, max_lengths, coverage) for k, v in lengths.items()}}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="a prepared data folder, or an SFT/DPO source (files, folders, globs, hub:NAME)")
    p.add_argument("--tokenizer", help="gpt2, llama2, llama3, qwen3, hf:<folder> or a prepared dataset (SFT/DPO)")
    p.add_argument("--tokenizer_path", help="your own tokenizer file, or a folder holding it")
    p.add_argument("--chat_format", choices=FORMATS, help="SFT/DPO: the chat format (default: the tokenizer's own)")
    p.add_argument("--enable_thinking", choices=("true", "false"), default="true",
                   help="SFT/DPO with chat_format qwen3: false renders the no-think prompt")
    p.add_argument("--max_lengths", default="256,512,1024,2048,4096,8192")
    p.add_argument("--coverage", type=float, default=0.99, help="share of sequences the recommendation must hold")
    p.add_argument("--num_proc", type=int, default=os.cpu_count())
    p.add_argument("--out", help="JSON report (default: analysis.json in the folder, or <file>.analysis.json)")
    a = p.parse_args()
    max_lengths = [int(m) for m in a.max_lengths.split(",")]
    try:
        report = analyze(a.path, a.tokenizer, a.tokenizer_path, max_lengths, a.coverage, a.num_proc, a.chat_format,
                         a.enable_thinking == "true")
    except (ValueError, OSError) as e:  # bad records or a tokenizer that cannot load: the message says which
        p.error(str(e))
    print(f"{report['path']} ({report['kind']}, {report['tokenizer']} tokens"
          + (f", chat format {report['chat_format']})" if "chat_format" in report else ")"))
    if report["dropped"]:
        print(f"{report['dropped']} examples are left out for having nothing to learn, as training leaves them out")
    print(table(report, max_lengths))
    path = Path(a.path)
    out = a.out or (path / "analysis.json" if path.is_dir() else path.with_name(path.name + ".analysis.json")
                    if path.is_file() else "analysis.json")
    Path(out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
