"""A toy subset of a dataset: its first N records, or N drawn at random with a seed, as .jsonl.

    python tools/extract_subset.py tulu_sft.jsonl data/sft_toy.jsonl --n=1000
    python tools/extract_subset.py dpo.json data/dpo_toy.jsonl --n=500 --random --seed=0

Records keep their format: a .jsonl line is copied byte for byte, a .json list item or a .parquet row is written as
one JSON line. A random subset keeps the source's order, and reads its records in one pass (reservoir sampling), so
a .jsonl larger than memory suits it.
"""
import argparse
import itertools
import json
import random
from pathlib import Path

from engine.data import records


def _lines(src):
    """(where, the record as one JSON line of bytes) of each record of src, read by engine/data/records.py."""
    if Path(src).suffix == ".jsonl":
        for where, raw in records.jsonl_lines(src):
            yield where, raw if raw.endswith(b"\n") else raw + b"\n"
    else:
        for where, rec in records.read_records(src):
            yield where, (json.dumps(rec, ensure_ascii=False) + "\n").encode()


def extract(src, dst, n, sample=False, seed=0, force=False):
    """Write N records of `src` to `dst`; returns how many were written (fewer if the source is shorter)."""
    dst = Path(dst)
    if dst.exists() and not force:
        raise FileExistsError(f"{dst} exists; pass --force to replace it")
    if sample:
        rng, chosen = random.Random(seed), []
        for i, r in enumerate(_lines(src)):
            if i < n:
                chosen.append((i, r))
            elif (j := rng.randrange(i + 1)) < n:
                chosen[j] = (i, r)
        chosen = [r for _, r in sorted(chosen)]
    else:
        chosen = list(itertools.islice(_lines(src), n))
    for where, line in chosen:  # a .jsonl line is checked only once chosen: reading the rest stays fast
        records.parse_line(where, line)
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.write_bytes(b"".join(line for _, line in chosen))
    tmp.replace(dst)
    return len(chosen)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="a .jsonl, .json (a list of records) or .parquet")
    p.add_argument("dst", help="the .jsonl to write")
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--random", action="store_true", help="a seeded random sample instead of the first N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true")
    a = p.parse_args()
    k = extract(a.src, a.dst, a.n, a.random, a.seed, a.force)
    print(f"{k} records -> {a.dst}")


if __name__ == "__main__":
    main()
