"""Turn a text corpus into token bins for pretraining: train.bin, val.bin (or shards of them) and meta.json.

    python data/shakespeare_char/prepare.py
    python data/slimpajama_6b_llama3/prepare.py                            # the hub dataset; needs network
    python data/slimpajama_6b_llama3/prepare.py --source='dl/*.parquet'    # the same corpus from local files

Sources (--source): local .txt (a file is one document, or split on --doc_sep), .jsonl, .json (a list of records)
and .parquet files, as files, folders or globs, text in --text_field; `hub:NAME` for a Hugging Face dataset (needs
network and the `datasets` package); `shakespeare` for the demo corpus (engine/data/corpus.py). Records are read by
engine/data/records.py, as the chat data and the dataset tools read them.

Output, the contract engine/data/bins.py reads: raw little-endian token arrays with no header, uint16 when every id fits
and uint32 otherwise, each document followed by the tokenizer's end-of-text id (and preceded by its begin-of-text
id with --add_bos); meta.json with the tokenizer, its file hash, counts and source; token_bytes.npy, the UTF-8 bytes
each token id stands for (0 for special tokens), from which evaluations compute bits per byte; meta.pkl as well for a
char vocabulary (nanoGPT's format). With --shard_tokens=N a split is written as <split>_000000.bin, ... of N tokens
each, the last one shorter; a reader takes a split's files in order as one stream.

Every record is a document (a .jsonl line that is not blank, a row, a list item; a .txt file or a non-blank piece of
it); the val split takes whole documents, a seeded sample of their indices (--val_fraction or --val_docs), so it does
not depend on --num_proc or chunking. A source of unknown size (a streamed dataset without split sizes) draws each
document into val with probability --val_fraction by a seeded hash of its index.

Safe by construction: files are written under *.tmp names and renamed only when every split is complete, meta.json
last, so an interrupted run leaves nothing that looks finished; an existing output is kept unless --force; free disk
space is checked against an estimate from the first chunk; a record that cannot be read fails naming file and row.

Fast: worker processes (all cores by default) each read, parse and tokenize chunks of about a megabyte and send
back numpy arrays; the parent process only splits and writes. tools/bench_prepare.py measures the throughput
against tiktoken's encode_ordinary_batch on the same text.
"""
import argparse
import datetime
import io
import json
import multiprocessing as mp
import os
import pickle
import re
import shutil
import sys
from collections import deque
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.data import records
from engine.data.tokenizers import CharTokenizer, get_tokenizer

CHUNK_BYTES = 1 << 20
KINDS = (".txt", *records.KINDS)
_OUTPUT = re.compile(r"(train|val)(_\d{6})?\.bin$")
TOKEN_BYTES = "token_bytes.npy"


@dataclass
class Plan:
    """What a source holds: `units()` yields chunks of work for a process, in order."""

    units: Callable
    label: str  # for meta.json
    rows: int = None  # size of the document-index space, where known
    nbytes: int = None  # the units' byte weights added up, where known


# ----------------------------------------------------------------------------------------------------------------
# sources: each unit is a small picklable tuple; a worker turns it into (row, text) pairs


def plan_source(source, text_field="text", doc_sep=None, hub_split="train", hub_config=None, streaming=True):
    if source == "shakespeare":
        from engine.data.corpus import SOURCE, shakespeare_works

        return _memory_plan(list(shakespeare_works().values()), "shakespeare", SOURCE)
    if source.startswith("hub:"):
        return _hub_plan(source[4:], text_field, hub_split, hub_config, streaming)
    files = records.expand(source, KINDS)
    units, row, nbytes = [], 0, 0
    for f in files:
        if f.endswith(".jsonl"):
            new, n = _jsonl_units(f, row)
        elif f.endswith(".txt"):
            n = len(_txt_docs(f, doc_sep)) if doc_sep else 1
            new = [("txt", f, row, os.path.getsize(f))]
        elif f.endswith(".parquet"):
            new, n = _parquet_units(f, row, text_field)
        else:
            texts = [_text(r, text_field, where) for where, r in records.json_records(f)]
            new, n = _memory_units(texts, row, f), len(texts)
        units += new
        row += n
        nbytes += sum(u[-1] for u in new)
    return Plan(lambda: iter(units), label=", ".join(files), rows=row, nbytes=nbytes)


def _jsonl_units(path, row):
    # records (non-blank lines) are the documents the val split counts; lines are what error messages name
    units, row0 = [], row
    for start, size, line, n in records.jsonl_chunks(path, CHUNK_BYTES):
        units.append(("jsonl", path, row, line, start, size))
        row += n
    return units, row - row0


def _txt_docs(path, doc_sep):
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 at byte {e.start}") from None
    return [t for t in text.split(doc_sep) if t.strip()] if doc_sep else [text]


def _parquet_units(path, row, field):
    meta = records.pyarrow_parquet().ParquetFile(path).metadata
    names = [meta.schema.column(i).name for i in range(meta.num_columns)]
    if field not in names:
        raise ValueError(f"{path}: no column {field!r} (columns: {', '.join(names)}); set --text_field")
    col = names.index(field)
    units, row0 = [], row
    for g in range(meta.num_row_groups):
        rg = meta.row_group(g)
        units.append(("parquet", path, row, g, field, rg.column(col).total_uncompressed_size))
        row += rg.num_rows
    return units, row - row0


def _text(record, field, where):
    if not isinstance(record, dict) or field not in record:
        keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{where}: no field {field!r} (has: {keys}); set --text_field")
    text = record[field]
    if not isinstance(text, str):
        raise ValueError(f"{where}: field {field!r} is {type(text).__name__}, not text")
    return text


def _memory_units(texts, row, label):
    units, i = [], 0
    while i < len(texts):
        j, size = i, 0
        while j < len(texts) and size < CHUNK_BYTES:
            size += len(texts[j])  # characters: close enough to bytes for sizing a chunk
            j += 1
        units.append(("mem", label, row + i, texts[i:j], size))
        i = j
    return units


def _memory_plan(texts, label, source):
    units = _memory_units(texts, 0, label)
    return Plan(lambda: iter(units), label=source, rows=len(texts), nbytes=sum(u[-1] for u in units))


def _hub_plan(name, field, split, config, streaming):
    ds = records.hub_dataset(name, split, config, streaming)
    info = (ds.info.splits or {}).get(split) if ds.info else None

    def units():
        batch, row, size = [], 0, 0
        for i, (where, rec) in enumerate(records.hub_rows(ds, name, split)):
            batch.append(_text(rec, field, where))
            size += len(batch[-1])
            if size >= CHUNK_BYTES:
                yield "mem", f"hub:{name}", row, batch, size
                batch, row, size = [], i + 1, 0
        if batch:
            yield "mem", f"hub:{name}", row, batch, size

    label = f"hub:{name}" + (f" ({config})" if config else "") + f" split {split}"
    return Plan(units, label, rows=info.num_examples if info else None, nbytes=info.num_bytes if info else None)


def read_unit(unit, text_field="text", doc_sep=None):
    """(row, text) for every document of a unit. Every record is a document, an empty text too (it becomes a lone
    eot), so the row numbers the val split draws from are exactly the documents."""
    kind, path, row = unit[:3]
    if kind == "mem":
        yield from enumerate(unit[3], start=row)
    elif kind == "jsonl":
        for i, (where, record) in enumerate(records.jsonl_records(path, unit[4], unit[5], unit[3]), start=row):
            yield i, _text(record, text_field, where)
    elif kind == "txt":
        yield from enumerate(_txt_docs(path, doc_sep), start=row)
    else:
        for i, (where, record) in enumerate(records.parquet_records(path, [unit[4]], unit[3]), start=row):
            yield i, _text(record, unit[4], where)


# ----------------------------------------------------------------------------------------------------------------
# workers

_WORKER = {}


def _init_worker(settings):
    _WORKER.update(settings)


def _encode_unit(unit):
    """Tokens of a unit's documents, each closed by eot, as one array; per document its token count and row."""
    w = _WORKER
    tok, lo, hi = w["tok"], w["bos"], w["eot"]
    arrs, lens, rows = [], [], []
    for row, text in read_unit(unit, w["text_field"], w["doc_sep"]):
        if row >= w["max_rows"]:
            break
        a = tok.encode_numpy(text)
        arrs += [x for x in (lo, a, hi) if x is not None]
        lens.append(len(a) + (lo is not None) + (hi is not None))
        rows.append(row)
    tokens = np.concatenate(arrs).astype(w["dtype"], copy=False) if arrs else np.zeros(0, w["dtype"])
    return tokens, np.array(lens, np.int64), np.array(rows, np.int64), unit[-1]


def _unit_chars(unit):
    return set().union(*(set(t) for _, t in read_unit(unit, _WORKER["text_field"], _WORKER["doc_sep"])))


@contextmanager
def _workers(num_proc, settings):
    """A pool of `num_proc` processes holding `settings` (the tokenizer among them), or None: work in this one."""
    _init_worker(settings)
    if num_proc <= 1:
        yield None
        return
    # fork before any thread starts (tqdm's monitor, for one): workers inherit the loaded tokenizer for free
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(num_proc, initializer=_init_worker, initargs=(settings,)) as pool:
        yield pool


def _ordered_map(pool, fn, units, in_flight):
    """fn over units, results in order, at most `in_flight` chunks read ahead (a streamed source stays streamed)."""
    if pool is None:
        yield from map(fn, units)
        return
    pending = deque()
    for u in units:
        pending.append(pool.apply_async(fn, (u,)))
        if len(pending) >= in_flight:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


# ----------------------------------------------------------------------------------------------------------------
# output


class BinWriter:
    """Appends tokens to <split>.bin, or to shards of `shard_tokens`, under .tmp names until commit()."""

    def __init__(self, out_dir, split, dtype, shard_tokens=0):
        self.out, self.split, self.dtype, self.shard = Path(out_dir), split, dtype, shard_tokens
        self.files, self.tokens, self.documents, self.f, self.room = [], 0, 0, None, 0

    def _next_file(self):
        if self.f:
            self.f.close()
        name = f"{self.split}_{len(self.files):06d}.bin" if self.shard else f"{self.split}.bin"
        self.files.append(name)
        self.f, self.room = open(self.out / (name + ".tmp"), "wb"), self.shard

    def write(self, tokens):
        if self.f is None:
            self._next_file()
        while len(tokens):
            if self.shard and self.room == 0:
                self._next_file()
            n = min(self.room, len(tokens)) if self.shard else len(tokens)
            tokens[:n].tofile(self.f)
            self.tokens += n
            self.room -= n
            tokens = tokens[n:]

    def close(self):
        if self.f is None:
            self._next_file()  # an empty split still gets its file
        self.f.close()


def _existing_outputs(out):
    return sorted(p.name for p in out.iterdir()
                  if p.name in ("meta.json", "meta.pkl", TOKEN_BYTES) or _OUTPUT.match(p.name))


def _val_rows(rows, val_fraction, val_docs, seed):
    """Sorted rows that go to val, or None where the source's size is unknown (then rows are drawn by hash)."""
    if rows is None:
        if val_docs is not None:
            raise ValueError("--val_docs needs a source of known size; use --val_fraction")
        return None
    if val_docs is None:  # at least one val document, and never all of them
        val_docs = min(max(round(val_fraction * rows), int(val_fraction > 0)), max(rows - 1, 0))
    elif val_docs >= rows > 0:
        raise ValueError(f"a val split of {val_docs} documents would leave none of the {rows} to train on")
    return np.sort(np.random.default_rng(seed).choice(rows, size=val_docs, replace=False))


def _hashed(rows, seed):
    # splitmix64: a fixed, seeded uniform number per row, for sources whose size is unknown up front
    with np.errstate(over="ignore"):
        z = rows.astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return z.astype(np.float64) / 2.0**64


def prepare(source, out_dir, tokenizer="gpt2", tokenizer_path=None, text_field="text", val_fraction=0.0005,
            val_docs=None, seed=1337, num_proc=None, shard_tokens=0, add_bos=False, doc_sep=None, max_docs=None,
            force=False, check_disk=True, hub_split="train", hub_config=None, streaming=True, progress=True):
    """Tokenize `source` into `out_dir`; returns the meta.json dict. Arguments as the command line's (see cli)."""
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    existing = _existing_outputs(out)
    if existing and not force:
        raise FileExistsError(f"{out} already holds {', '.join(existing)}; pass --force to replace them")
    for p in out.glob("*.tmp"):  # what an interrupted run left
        p.unlink()
    num_proc = num_proc or os.cpu_count()
    plan = plan_source(source, text_field, doc_sep, hub_split, hub_config, streaming)
    max_rows = plan.rows if max_docs is None else min(max_docs, plan.rows or max_docs)
    settings = dict(text_field=text_field, doc_sep=doc_sep, max_rows=max_rows or float("inf"))

    if tokenizer == "char":  # the vocabulary is the corpus's characters: one pass to collect them
        with _workers(num_proc, settings) as pool:
            chars = set().union(*_ordered_map(pool, _unit_chars, plan.units(), 4 * num_proc))
        tok = CharTokenizer("".join(sorted(chars)))
    else:
        tok = get_tokenizer(tokenizer, tokenizer_path)
    dtype = np.dtype("<u2") if tok.vocab_size <= 1 << 16 else np.dtype("<u4")
    bos = np.array([tok.bos_id], dtype) if add_bos and tok.bos_id is not None else None
    eot = np.array([tok.eot_id], dtype) if tok.eot_id is not None else None
    settings.update(tok=tok, dtype=dtype, bos=bos, eot=eot)
    val = _val_rows(max_rows, val_fraction, val_docs, seed)

    writers = {s: BinWriter(out, s, dtype, shard_tokens) for s in ("train", "val")}
    with _workers(num_proc, settings) as pool:
        bar = tqdm(total=plan.nbytes, unit="B", unit_scale=True, desc=f"{tok.name} {out.name}", disable=not progress)
        try:
            for i, (tokens, lens, rows, nbytes) in enumerate(_ordered_map(pool, _encode_unit, plan.units(),
                                                                          4 * num_proc)):
                if i == 0 and check_disk and plan.nbytes and nbytes:
                    _check_disk(out, plan.nbytes * len(tokens) / nbytes * dtype.itemsize)
                in_val = np.isin(rows, val) if val is not None else _hashed(rows, seed) < val_fraction
                if in_val.any():
                    per_token = np.repeat(in_val, lens)
                    writers["train"].write(tokens[~per_token])
                    writers["val"].write(tokens[per_token])
                else:
                    writers["train"].write(tokens)
                writers["train"].documents += int((~in_val).sum())
                writers["val"].documents += int(in_val.sum())
                bar.update(nbytes)
                bar.set_postfix(tokens=f"{writers['train'].tokens + writers['val'].tokens:,}", refresh=False)
                if len(rows) and rows[-1] + 1 >= settings["max_rows"]:
                    break
            for w in writers.values():
                w.close()
        except BaseException:
            for w in writers.values():
                if w.f:
                    w.f.close()
                for name in w.files:
                    (out / (name + ".tmp")).unlink(missing_ok=True)
            raise
        finally:
            bar.close()
    meta = dict(
        format=1, tokenizer=tok.name, tokenizer_path=tok.path, tokenizer_sha256=tok.file_sha256,
        vocab_size=tok.vocab_size, dtype=dtype.name, eot_id=tok.eot_id, bos_id=tok.bos_id, token_bytes=TOKEN_BYTES,
        splits={s: dict(files=w.files, tokens=w.tokens, documents=w.documents) for s, w in writers.items()},
        source=plan.label, created=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        settings=dict(text_field=text_field, val_fraction=val_fraction, val_docs=val_docs, seed=seed,
                      add_bos=add_bos, doc_sep=doc_sep, max_docs=max_docs, shard_tokens=shard_tokens),
    )
    if isinstance(tok, CharTokenizer):
        meta["chars"] = tok.chars
    _commit(out, writers, meta, tok.token_bytes())
    return meta


def _check_disk(out, need):
    free = shutil.disk_usage(out).free
    if need * 1.1 > free:
        raise OSError(f"the output needs about {need / 1e9:.1f} GB by an estimate from the first chunk, and {out} has "
                      f"{free / 1e9:.1f} GB free; free some space, or pass --check_disk=False if the estimate is off")


def _commit(out, writers, meta, token_bytes):
    # meta.json goes first and comes back last, so a folder with one always holds the files it describes
    for name in ("meta.json", "meta.pkl"):
        (out / name).unlink(missing_ok=True)
    new = {name for w in writers.values() for name in w.files}
    for name in new:
        os.replace(out / (name + ".tmp"), out / name)
    for name in _existing_outputs(out):
        if _OUTPUT.match(name) and name not in new:  # shards of an earlier, larger run
            (out / name).unlink()
    if "chars" in meta:
        itos = dict(enumerate(meta["chars"]))
        _write(out / "meta.pkl", pickle.dumps(dict(vocab_size=meta["vocab_size"], itos=itos,
                                                   stoi={c: i for i, c in itos.items()})))
    buf = io.BytesIO()
    np.save(buf, token_bytes)
    _write(out / TOKEN_BYTES, buf.getvalue())
    _write(out / "meta.json", (json.dumps(meta, indent=1, ensure_ascii=False) + "\n").encode())


def _write(path, data):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------
# command line, shared by every data/<corpus>_<tokenizer>/prepare.py


def _flag(s):
    if s.lower() in ("1", "true", "yes"):
        return True
    if s.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {s!r}")


def cli(argv=None, **defaults):
    """Parse --key=value flags over a script's defaults (source, tokenizer, out_dir, ...) and run prepare()."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", help="files, folders or globs (comma-separated), hub:NAME, or shakespeare")
    p.add_argument("--out_dir", help="where train.bin, val.bin and meta.json go")
    p.add_argument("--tokenizer", help="gpt2, llama2, llama3, qwen3, char or hf:<folder>")
    p.add_argument("--tokenizer_path", help="your own tokenizer file, or a folder holding it")
    p.add_argument("--text_field", default="text", help="the record field holding the text (jsonl, json, parquet)")
    p.add_argument("--val_fraction", type=float, default=0.0005, help="share of documents for val")
    p.add_argument("--val_docs", type=int, help="number of documents for val (instead of a fraction)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--num_proc", type=int, help="worker processes (default: all cores)")
    p.add_argument("--shard_tokens", type=int, default=0, help="tokens per output shard (0: one file per split)")
    p.add_argument("--add_bos", type=_flag, nargs="?", const=True, default=False, help="begin documents with bos")
    p.add_argument("--doc_sep", help="split .txt files into documents on this string")
    p.add_argument("--max_docs", type=int, help="stop after this many source rows (a quick trial)")
    p.add_argument("--force", type=_flag, nargs="?", const=True, default=False, help="replace an existing output")
    p.add_argument("--check_disk", type=_flag, nargs="?", const=True, default=True)
    p.add_argument("--hub_split", default="train")
    p.add_argument("--hub_config")
    p.add_argument("--streaming", type=_flag, nargs="?", const=True, default=True)
    p.set_defaults(**defaults)
    args = vars(p.parse_args(argv))
    missing = [k for k in ("source", "out_dir", "tokenizer") if not args[k]]
    if missing:
        p.error(f"--{missing[0]} is required")
    if args["doc_sep"]:  # let a shell pass "\n\n"
        args["doc_sep"] = args["doc_sep"].encode().decode("unicode_escape")
    try:
        meta = prepare(**args)
    except (OSError, ValueError, ImportError) as e:  # bad input or setup: the message says what to do
        sys.exit(f"error: {e}")
    for s, v in meta["splits"].items():
        print(f"{s}: {v['tokens']:,} tokens in {v['documents']:,} documents -> {', '.join(v['files'])}")
    print(f"{meta['tokenizer']} vocab_size {meta['vocab_size']}, {meta['dtype']}, written to {args['out_dir']}")
    return meta
