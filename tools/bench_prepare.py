"""Benchmark: end-to-end prepare throughput against tiktoken's raw encode_ordinary_batch on the same text and cores.

    python tools/bench_prepare.py                        # Shakespeare cut into ~4 KB documents, repeated to 40 MB
    python tools/bench_prepare.py --tokenizer=llama3 --mb=100 --cores=2
    python tools/bench_prepare.py --source=my.jsonl      # your own documents

The reference is tiktoken alone: the documents already in memory as Python strings, encoded by the tokenizer's own
tiktoken Encoding with encode_ordinary_batch(num_threads=cores). prepare reads the same documents from a .jsonl on
disk, parses, tokenizes in `cores` processes, appends eot, splits val and writes the bins; the ratio is reference
time over prepare time, both for the same text tokens. One warm-up each, then --repeats interleaved runs; medians.
CPU seconds (all threads and worker processes) are shown too: on a shared, busy machine they vary less than wall time.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from engine.data.prepare import prepare
from engine.data.tokenizers import get_tokenizer


def cpu():
    t = os.times()  # this process's threads, and worker processes once they have exited
    return t.user + t.system + t.children_user + t.children_system


def shakespeare_docs(mb, doc_chars):
    from engine.data.corpus import shakespeare_works

    paras = "\n\n".join(shakespeare_works().values()).split("\n\n")
    docs, cur = [], ""
    while sum(map(len, docs)) < mb * 1e6:
        for p in paras:
            cur += p + "\n\n"
            if len(cur) >= doc_chars:
                docs.append(cur)
                cur = ""
    return docs


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", default="gpt2", help="a tiktoken-based one: gpt2, llama3, qwen3")
    p.add_argument("--source", help="a .jsonl of {'text': ...} records (default: Shakespeare, see --mb)")
    p.add_argument("--mb", type=float, default=40, help="megabytes of Shakespeare text to build")
    p.add_argument("--doc_chars", type=int, default=4000)
    p.add_argument("--cores", type=int, default=os.cpu_count())
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()

    tok = get_tokenizer(a.tokenizer)
    tmp = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    if a.source:
        src = Path(a.source)
        docs = [json.loads(line)["text"] for line in src.open(encoding="utf-8") if line.strip()]
    else:
        docs = shakespeare_docs(a.mb, a.doc_chars)
        src = tmp / "docs.jsonl"
        with open(src, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    mb = sum(len(d.encode()) for d in docs) / 1e6

    def timed(fn):
        t, c = time.perf_counter(), cpu()
        n = fn()
        return time.perf_counter() - t, cpu() - c, n

    def reference():
        return sum(map(len, tok.enc.encode_ordinary_batch(docs, num_threads=a.cores)))

    def ours():
        meta = prepare(str(src), tmp / "out", tokenizer=a.tokenizer, num_proc=a.cores, force=True, progress=False)
        s = meta["splits"]
        return s["train"]["tokens"] + s["val"]["tokens"] - len(docs)  # eots excluded

    runs = {"tiktoken encode_ordinary_batch": [], "prepare (jsonl -> bins)": []}
    reference(), ours()  # warm-up: page cache, tokenizer tables
    for _ in range(a.repeats):
        for name, fn in zip(runs, (reference, ours)):
            runs[name].append(timed(fn))
    tokens = runs["tiktoken encode_ordinary_batch"][0][2]
    assert all(n == tokens for r in runs.values() for *_, n in r), "both must encode the same text tokens"

    print(f"{a.tokenizer}: {len(docs):,} documents, {mb:.1f} MB, {tokens:,} tokens; {a.cores} cores "
          f"({platform.processor() or platform.machine()}), {datetime.date.today()}")
    print(f"{'':32s} {'median s':>9s} {'Mtokens/s':>10s} {'MB/s':>7s} {'CPU s':>7s}")
    wall, cpu_s = {}, {}
    for name, r in runs.items():
        wall[name], cpu_s[name] = statistics.median(t for t, _, _ in r), statistics.median(c for _, c, _ in r)
        print(f"{name:32s} {wall[name]:9.2f} {tokens / wall[name] / 1e6:10.2f} {mb / wall[name]:7.1f} "
              f"{cpu_s[name]:7.2f}")
    (ref, got), (ref_c, got_c) = wall.values(), cpu_s.values()
    print(f"ratio prepare / tiktoken throughput: {ref / got:.3f} (CPU time: {ref_c / got_c:.3f})")


if __name__ == "__main__":
    main()
