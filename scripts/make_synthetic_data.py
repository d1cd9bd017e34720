"""Synthetic pretraining datasets for machines without the real ones (scripts/gpu_check.sh's first step).

    python scripts/make_synthetic_data.py /tmp/gpu_check/data                 # writes .../gpt2 and .../llama3
    python scripts/make_synthetic_data.py /tmp/data --tokens=1000000 --val_tokens=50000

Each folder is what data/<corpus>/prepare.py writes (train.bin, val.bin, meta.json, written by engine/data/prepare.py's
own BinWriter and commit), for a vocabulary of GPT-2's size (50257 ids, uint16 bins) and of LLaMA-3's (128256 ids,
uint32), so `--dataset=<folder>` runs train.py on either family's presets without a tokenizer or a download. The
stream is a ramp through the whole vocabulary (each token the previous plus one, so every row of the embedding is
used and there is something to learn) with a tenth of the tokens replaced by seeded random ids. The ids stand for no
text: meta.json names no token byte table and a tokenizer ("synthetic") that cannot be built, so runs on it report
no bits per byte.
"""
import sys
from pathlib import Path

import numpy as np

from engine.data.prepare import BinWriter, _commit

VOCABS = {"gpt2": 50257, "llama3": 128256}


def stream(n, vocab, seed):
    rng = np.random.default_rng(seed)
    ids = np.arange(n, dtype=np.int64) % vocab
    noise = rng.random(n) < 0.1
    ids[noise] = rng.integers(0, vocab, int(noise.sum()))
    return ids


def write(folder, vocab, tokens, val_tokens, seed=0):
    """One dataset folder of `tokens` training and `val_tokens` validation ids below `vocab`; returns its meta."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype("<u2") if vocab <= 1 << 16 else np.dtype("<u4")  # as prepare.py chooses
    writers = {}
    for i, (split, n) in enumerate((("train", tokens), ("val", val_tokens))):
        w = writers[split] = BinWriter(out, split, dtype)
        w.write(stream(n, vocab, seed + i).astype(dtype))
        w.documents = 1
        w.close()
    meta = dict(format=1, tokenizer="synthetic", tokenizer_path=None, tokenizer_sha256=None, vocab_size=vocab,
                dtype=dtype.name, eot_id=None, bos_id=None, token_bytes=None,
                splits={s: dict(files=w.files, tokens=w.tokens, documents=w.documents) for s, w in writers.items()},
                source="synthetic: a noisy ramp (scripts/make_synthetic_data.py)",
                settings=dict(seed=seed))
    # commit always stores a token byte table; meta.json names none (token_bytes=None), so it is never read
    _commit(out, writers, meta, np.zeros(vocab, np.int32))
    return meta


def main(argv=None, out=print):
    argv = sys.argv[1:] if argv is None else argv
    opts = {"tokens": 4_000_000, "val_tokens": 200_000}
    folders = []
    for a in argv:
        name, eq, value = a[2:].partition("=")
        if a in ("-h", "--help"):
            out(__doc__.strip())
            return 0
        if a.startswith("--") and name in opts and eq and value.isdigit() and int(value) > 0:
            opts[name] = int(value)
        elif a.startswith("--"):
            out(f"make_synthetic_data.py: unknown or bad option {a} (--tokens=N, --val_tokens=N)")
            return 2
        else:
            folders.append(a)
    if len(folders) != 1:
        out("make_synthetic_data.py: give one output folder")
        return 2
    for name, vocab in VOCABS.items():
        meta = write(Path(folders[0]) / name, vocab, opts["tokens"], opts["val_tokens"])
        out(f"{Path(folders[0]) / name}: vocab {vocab}, {meta['dtype']}, {meta['splits']['train']['tokens']:,} train "
            f"and {meta['splits']['val']['tokens']:,} val tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
