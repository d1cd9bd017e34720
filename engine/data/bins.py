"""Pretraining data: memory-mapped token bins and deterministic batches.

A dataset folder holds flat token arrays (train.bin and val.bin, or shards train_000000.bin, ...), meta.json
(vocab_size, dtype, tokenizer, eot id, the files of each split; engine/data/prepare.py writes it) and the UTF-8 bytes
of each token id (token_bytes.npy, for bits per byte). Training windows are a pure function of (seed, iteration,
micro-step): a resumed run draws exactly the batches an uninterrupted run would have drawn, with no sampler state to
save. The micro-step is the global index within the optimizer step: under torchrun rank r takes micro-steps
r*k .. r*k+k-1 of the iteration's gradient_accumulation_steps = world_size*k, so the global batch of every iteration
is the same set of windows whatever the world size, and a run can resume on another number of ranks without
changing the data it sees.
"""
import functools
import json
import os
import queue
import threading

import numpy as np
import torch

from engine.data.tokenizers import tokenizer_from_meta

DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
TRAIN, VAL, EVAL = 0, 1, 2  # stream tags mixed into the seed, so train, eval-train and val draws never coincide


class DataError(ValueError):
    """A problem with a dataset on disk; the message names the file."""


def resolve_dataset_dir(dataset, root="data"):
    if os.path.isdir(dataset):
        return dataset
    path = os.path.join(root, dataset)
    if os.path.isdir(path):
        return path
    raise DataError(f"dataset {dataset!r} not found: neither {dataset!r} nor {path!r} is a folder; "
                    f"run the dataset's prepare.py (e.g. python data/{dataset}/prepare.py) first")


class TokenDataset:
    """The memory-mapped splits of one dataset folder, checked against its metadata and the model's vocabulary."""

    def __init__(self, folder, vocab_limit=None, check_ids=True):
        self.folder = folder
        meta_path = os.path.join(folder, "meta.json")
        if not os.path.isfile(meta_path):
            raise DataError(f"{meta_path} is missing; run the dataset's prepare.py to create it")
        try:
            with open(meta_path, "rb") as f:
                self.meta = json.load(f)
        except ValueError as e:  # not JSON, or not UTF-8
            raise DataError(f"{meta_path} is not valid JSON ({e}); re-run prepare.py with --force") from e
        if not isinstance(self.meta, dict):
            raise DataError(f"{meta_path} holds a JSON {type(self.meta).__name__}, not an object with vocab_size, "
                            "dtype and splits; re-run prepare.py with --force")
        for k in ("vocab_size", "dtype", "splits"):
            if k not in self.meta:
                raise DataError(f"{meta_path} lacks {k!r}; re-run prepare.py with --force")
        dtype, vocab, splits = self.meta["dtype"], self.meta["vocab_size"], self.meta["splits"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise DataError(f"{meta_path}: dtype {dtype!r} is not uint16 or uint32; re-run prepare.py with --force")
        if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab < 1:
            raise DataError(f"{meta_path}: vocab_size {vocab!r} is not a positive integer; re-run prepare.py with "
                            "--force")
        if not isinstance(splits, dict):
            raise DataError(f"{meta_path}: splits is a JSON {type(splits).__name__}, not an object naming the files "
                            "of train and val; re-run prepare.py with --force")
        self.dtype, self.vocab_size = DTYPES[dtype], vocab
        if vocab_limit is not None and self.vocab_size > vocab_limit:
            raise DataError(f"{meta_path}: the tokenizer's vocab_size {self.vocab_size} exceeds the model's "
                            f"vocab_size {vocab_limit}; set --vocab_size={self.vocab_size} or larger")
        self.splits = {}
        for split in ("train", "val"):
            info = splits.get(split)
            if not info:
                raise DataError(f"{meta_path} lists no {split} split; re-run prepare.py with a {split} split")
            files = info.get("files") if isinstance(info, dict) else None
            if not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files):
                raise DataError(f"{meta_path}: splits.{split} needs \"files\", a non-empty list of file names, got "
                                f"{files!r}; re-run prepare.py with --force")
            self.splits[split] = [self._open(f, vocab_limit if check_ids else None) for f in files]
            n = sum(len(a) for a in self.splits[split])
            if "tokens" in info and n != info["tokens"]:
                raise DataError(f"{folder}: the {split} files hold {n} tokens but meta.json says {info['tokens']}; "
                                "the bins and metadata disagree, re-run prepare.py with --force")

    @functools.cached_property
    def token_bytes(self):
        """(vocab_size,) UTF-8 bytes of each token id, 0 for special tokens: the table prepare.py stored, else (data
        prepared before it stored one) the tokenizer's that meta.json names; None when that tokenizer cannot be built
        here (test data made without one, a tokenizer file that is not here), and then there is no bits per byte."""
        name = self.meta.get("token_bytes")
        if name:
            path = os.path.join(self.folder, name)
            try:
                table = np.load(path)
            except (OSError, ValueError) as e:
                raise DataError(f"{path} (named in meta.json) cannot be read ({e}); re-run prepare.py") from e
        else:
            try:
                table = tokenizer_from_meta(self.meta).token_bytes()
            except (ValueError, KeyError, OSError, ImportError):
                return None
        if table.shape != (self.vocab_size,):
            raise DataError(f"{self.folder}: the token byte lengths cover {table.shape} ids, not the vocab_size "
                            f"{self.vocab_size} of meta.json; re-run prepare.py with --force")
        return table

    def _open(self, name, vocab_limit):
        path = os.path.join(self.folder, name)
        if not os.path.isfile(path):
            raise DataError(f"{path} is missing (listed in meta.json); re-run prepare.py")
        itemsize = np.dtype(self.dtype).itemsize
        size = os.path.getsize(path)
        if size % itemsize:
            raise DataError(f"{path} has {size} bytes, not a whole number of {self.meta['dtype']} tokens; "
                            "the file is truncated or of another dtype, re-run prepare.py")
        if size == 0:
            raise DataError(f"{path} is empty")
        arr = np.memmap(path, dtype=self.dtype, mode="r")
        if vocab_limit is not None:
            top = max(int(arr[i:i + (1 << 24)].max()) for i in range(0, len(arr), 1 << 24))
            if top >= vocab_limit:
                raise DataError(f"{path} holds token id {top}, outside the model's vocabulary of {vocab_limit}; "
                                "the data was made with another tokenizer, or vocab_size is too small")
            if top >= self.vocab_size:  # a row the model has only as padding: the bins and meta.json disagree
                raise DataError(f"{path} holds token id {top}, outside the vocabulary of {self.vocab_size} that "
                                "meta.json gives; the data was made with another tokenizer or meta.json is wrong: "
                                "re-run prepare.py with --force")
        return arr


class BatchSampler:
    """Random windows of T+1 tokens; the draw for (iteration, micro-step) depends on nothing else."""

    def __init__(self, data: TokenDataset, batch_size, block_size, seed):
        self.data, self.B, self.T, self.seed = data, batch_size, block_size, seed
        self.weights = {}
        for split, arrays in data.splits.items():
            starts = np.array([len(a) - block_size - 1 for a in arrays], dtype=np.float64)
            if (starts < 0).all():
                raise DataError(f"{data.folder}: the {split} split is shorter than block_size + 1 = "
                                f"{block_size + 1} tokens; use a smaller --block_size or more data")
            starts = starts.clip(min=0)
            self.weights[split] = starts / starts.sum()

    def batch(self, split, iteration, micro_step=0, stream=None):
        """(x, y) int64 tensors of shape (B, T); y is x shifted by one token."""
        stream = (TRAIN if split == "train" else VAL) if stream is None else stream
        rng = np.random.default_rng([self.seed, stream, iteration, micro_step])
        arrays, w = self.data.splits[split], self.weights[split]
        shard = rng.choice(len(arrays), size=self.B, p=w) if len(arrays) > 1 else np.zeros(self.B, dtype=int)
        rows = []
        for s in shard:
            a = arrays[s]
            i = int(rng.integers(0, len(a) - self.T))
            rows.append(np.asarray(a[i:i + self.T + 1], dtype=np.int64))
        xy = torch.from_numpy(np.stack(rows))
        # contiguous, so that pinning and the non-blocking copy to a GPU apply to the tensors as they are
        return xy[:, :-1].contiguous(), xy[:, 1:].contiguous()


class WindowDataset(torch.utils.data.Dataset):
    """The training batches from `start_iter` on, one item per local micro-step, for a DataLoader with workers."""

    def __init__(self, task, start_iter, max_iters, micro_steps, first_micro=0):
        self.task, self.start, self.micro, self.first = task, start_iter, micro_steps, first_micro
        self.n = (max_iters - start_iter) * micro_steps

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.task.batch(self.start + i // self.micro, self.first + i % self.micro)


def to_device(batch, device):
    """A dict of tensors on `device`; on CUDA through pinned memory without blocking."""
    if torch.device(device).type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: pin(v).to(device, non_blocking=True) for k, v in batch.items()}


def pin(t):
    return t if t.is_pinned() else t.pin_memory()


_END = object()


class Prefetcher:
    """Iterate over the batches of `source` (dicts of CPU tensors) on `device`, built ahead of the consumer.

    A background thread draws up to `depth` batches ahead, into pinned memory when the device is CUDA, so that the
    host work of the next batch (memmap reads, collation) overlaps the current step instead of following its sync.
    On CUDA the next batch's copy to the device is issued on a side stream as soon as it is built; the consumer's
    stream waits on that copy's event only when the batch is handed over. Order and content are exactly those of
    `source`; an exception in `source` is raised in the consumer. close() stops the thread early.
    """

    def __init__(self, source, device, depth=2):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.queue = queue.Queue(maxsize=depth)
        self.stopping = threading.Event()
        self.staged = None  # the next batch, its copy to the device already issued
        self.thread = threading.Thread(target=self._fill, args=(source,), name="batch-prefetch", daemon=True)
        self.thread.start()

    def _fill(self, source):
        try:
            for b in source:
                if self.cuda:
                    b = {k: pin(v) for k, v in b.items()}
                if not self._put(b):
                    return
            self._put(_END)
        except BaseException as e:  # handed to the consumer, which raises it
            self._put(e)

    def _put(self, item):
        while not self.stopping.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _stage(self, block):
        try:
            b = self.queue.get(block=block)
        except queue.Empty:
            return None
        if not self.cuda or not isinstance(b, dict):
            return b, None
        with torch.cuda.stream(self.stream):
            b = {k: v.to(self.device, non_blocking=True) for k, v in b.items()}
            done = torch.cuda.Event()
            done.record()
        return b, done

    def __iter__(self):
        return self

    def __next__(self):
        b, done = self.staged or self._stage(block=True)
        self.staged = None
        if b is _END or isinstance(b, BaseException):
            self.staged = (_END, None)  # every later call ends too
            self.close()
            if b is _END:
                raise StopIteration
            raise b
        if done is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(done)
            for v in b.values():  # the side stream allocated it; tell the allocator it is used on this one
                v.record_stream(current)
        self.staged = self._stage(block=False)  # the following batch's copy starts now if it is built
        return b

    def close(self):
        self.stopping.set()
        self.thread.join()


def train_batches(task, start_iter, max_iters, micro_steps, device, first_micro=0, num_workers=0,
                  use_dataloader=False, prefetch=2):
    """This rank's training micro-batches in order (global micro-steps first_micro .. first_micro + micro_steps - 1
    of each iteration), on `device`, built `prefetch` batches ahead by a Prefetcher. With use_dataloader a
    DataLoader's worker processes build them (in pinned memory on CUDA) and the Prefetcher takes them from there."""
    if use_dataloader:
        ds = WindowDataset(task, start_iter, max_iters, micro_steps, first_micro)
        source = iter(torch.utils.data.DataLoader(
            ds, batch_size=None, shuffle=False, num_workers=num_workers, pin_memory=torch.device(device).type == "cuda",
            prefetch_factor=4 if num_workers else None, persistent_workers=num_workers > 0,
            generator=torch.Generator()))  # its own generator: leave the global RNG (dropout) alone
    else:
        source = (task.batch(it, first_micro + m) for it in range(start_iter, max_iters) for m in range(micro_steps))
    return Prefetcher(source, device, depth=prefetch)
