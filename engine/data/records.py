"""Record readers, one set for every reader of data files: prepare.py's corpora, chat_data.py's SFT and DPO records,
the dataset tools.

    files = expand("dl/*.jsonl,more/")               # files, folders, globs, comma-separated
    for where, rec in read_records(files[0]): ...    # where: "file line N" (.jsonl, from 1), "file row N" (from 0)
    ds = hub_dataset("org/name", split="train")      # a Hugging Face dataset, through the datasets package
    for where, rec in hub_rows(ds, "org/name", "train"): ...

A .jsonl holds one record a line (blank lines are none); a .json a list of records, or {"data": [...]}; a .parquet
one record a row. A .jsonl can be read in byte ranges cut at line ends (jsonl_chunks), so that worker processes read
a large file in parallel, each naming the true line numbers. Errors (RecordError, a ValueError) name the file and
the line or row.
"""
import glob
import json
from pathlib import Path

KINDS = (".jsonl", ".json", ".parquet")


class RecordError(ValueError):
    """A record file or dataset that cannot be read; the message names the file and the line or row."""


def expand(source, kinds=KINDS):
    """The files of a source: files, folders (every file of `kinds` below them) or globs, comma-separated."""
    files = []
    for part in source.split(","):
        p = Path(part).expanduser()
        if p.is_dir():
            found = sorted(str(f) for f in p.rglob("*") if f.suffix in kinds and f.is_file())
        else:
            found = sorted(glob.glob(str(p), recursive=True))
        if not found:
            raise FileNotFoundError(f"no files at {part!r}; a local source is {'/'.join(kinds)} files, folders or "
                                    f"globs, and a Hugging Face dataset is written hub:NAME")
        bad = [f for f in found if Path(f).suffix not in kinds]
        if bad:
            raise ValueError(f"cannot read {bad[0]}: sources are {', '.join(kinds)} files")
        files += found
    return files


def read_records(path):
    """(where, record) of every record of a .jsonl, .json or .parquet file, in order."""
    read = {".jsonl": jsonl_records, ".json": json_records, ".parquet": parquet_records}.get(Path(path).suffix)
    if read is None:
        raise RecordError(f"cannot read {path}: records come in {', '.join(KINDS)} files")
    return read(path)


def jsonl_lines(path, start=0, size=None, line=1):
    """(where, bytes) of each non-blank line of a .jsonl, or of its bytes [start, start + size), which begin at line
    number `line` and end at a line end."""
    with open(path, "rb") as f:
        f.seek(start)
        lines = f if size is None else f.read(size).split(b"\n")
        for i, raw in enumerate(lines, start=line):
            if raw.strip():
                yield f"{path} line {i}", raw


def jsonl_records(path, start=0, size=None, line=1):
    """(where, record) of a .jsonl, or of a byte range of it (as jsonl_lines)."""
    for where, raw in jsonl_lines(path, start, size, line):
        yield where, parse_line(where, raw)


def parse_line(where, raw):
    try:
        return json.loads(raw)  # bytes: json decodes them itself, a leading byte-order mark included
    except ValueError as e:
        raise RecordError(f"{where}: not valid JSON or UTF-8 ({e})") from None


def jsonl_chunks(path, chunk_bytes):
    """(start, size, first line, records) of consecutive byte ranges of a .jsonl, each about chunk_bytes and ending
    at a line end: the units a pool of workers reads."""
    chunks, start, line = [], 0, 1
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            if not block.endswith(b"\n"):
                block += f.readline()
            lines = block.split(b"\n")
            chunks.append((start, len(block), line, sum(1 for x in lines if x.strip())))
            start += len(block)
            line += len(lines) - 1
    return chunks


def json_records(path):
    """(where, record) of a .json holding a list of records, or {"data": [...]}."""
    with open(path, "rb") as f:
        try:
            data = json.load(f)
        except ValueError as e:
            raise RecordError(f"{path}: not valid JSON or UTF-8 ({e}); one record a line is .jsonl") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise RecordError(f"{path}: a .json source holds a list of records, or {{\"data\": [...]}}")
    for i, rec in enumerate(data):
        yield f"{path} row {i}", rec


def parquet_records(path, columns=None, row_group=None):
    """(where, record) of each row of a .parquet: every column or only `columns`, every row group or only one.
    A table gives every row every column, None where a record has no value."""
    pf = pyarrow_parquet().ParquetFile(path)
    groups = list(range(pf.num_row_groups)) if row_group is None else [row_group]
    row = sum(pf.metadata.row_group(g).num_rows for g in range(groups[0])) if groups else 0  # rows before it
    for batch in pf.iter_batches(batch_size=1024, row_groups=groups, columns=columns):
        for rec in batch.to_pylist():
            yield f"{path} row {row}", rec
            row += 1


def pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading .parquet needs pyarrow: pip install pyarrow") from None
    return pq


def hub_dataset(name, split="train", config=None, streaming=True):
    """A Hugging Face dataset through the datasets package; streamed, it reads only the rows that are asked for."""
    try:
        import datasets
    except ImportError:
        raise RecordError(f"hub:{name} needs the datasets package (pip install datasets) and network access; or "
                          f"pass local {'/'.join(KINDS)} files") from None
    try:
        return datasets.load_dataset(name, config, split=split, streaming=streaming)
    except Exception as e:  # the hub raises many kinds (connection, offline, missing split); all end here
        raise RecordError(f"could not load hub:{name} split {split!r} ({type(e).__name__}: {e}); the hub must be "
                          f"reachable, or the dataset in the local datasets cache, or pass local files") from None


def hub_rows(ds, name, split):
    """(where, record) of each row of a dataset from hub_dataset."""
    for i, rec in enumerate(ds):
        yield f"hub:{name} ({split}) row {i}", dict(rec)
