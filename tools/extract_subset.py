"""A toy subset of a json/jsonl dataset: its first N records, or N drawn at random with a seed, as .jsonl.

    python tools/extract_subset.py tulu_sft.jsonl data/sft_toy.jsonl --n=1000
    python tools/extract_subset.py dpo.json data/dpo_toy.jsonl --n=500 --random --seed=0

Records keep their format: a .jsonl line is copied byte for byte, a .json list item is written as one JSON line.
A random subset keeps the source's order, and reads a .jsonl in one pass (reservoir sampling), so it suits files
larger than memory.
"""
import argparse
import json
import random
from pathlib import Path


def _jsonl_records(path):
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                yield line if line.endswith(b"\n") else line + b"\n"


def _json_records(path):
    records = json.loads(Path(path).read_bytes())  # bytes: json decodes them itself, a byte-order mark included
    if not isinstance(records, list):
        raise ValueError(f"{path}: a .json dataset must hold a list of records")
    for r in records:
        yield (json.dumps(r, ensure_ascii=False) + "\n").encode()


def extract(src, dst, n, sample=False, seed=0, force=False):
    """Write N records of `src` to `dst`; returns how many were written (fewer if the source is shorter)."""
    dst = Path(dst)
    if dst.exists() and not force:
        raise FileExistsError(f"{dst} exists; pass --force to replace it")
    records = _json_records(src) if Path(src).suffix == ".json" else _jsonl_records(src)
    if sample:
        rng, chosen = random.Random(seed), []
        for i, r in enumerate(records):
            if i < n:
                chosen.append((i, r))
            elif (j := rng.randrange(i + 1)) < n:
                chosen[j] = (i, r)
        chosen.sort()
    else:
        chosen = list(zip(range(n), records))
    for i, r in chosen:
        try:
            json.loads(r)
        except ValueError as e:
            raise ValueError(f"{src} record {i}: not valid JSON ({e})") from None
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.write_bytes(b"".join(r for _, r in chosen))
    tmp.replace(dst)
    return len(chosen)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="a .jsonl or .json (a list of records)")
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
