"""
The largest per-device micro-batch that fits one full training step (forward, backward, clip, AdamW step).

    python tools/find_batch_size.py config/full_llama3_1.5b_optimal.py --block_size=2048
    python tools/find_batch_size.py --preset=tiny_llama3 --block_size=128 --device=cpu --memory_limit_gb=0.5

Settings are train.py's, plus --memory_limit_gb (default: all of the GPU, or the machine's RAM on CPU) and
--max_batch (default 4096). Batches double from 1 until one fails, then a binary search between the last that fit
and the first that did not. One model and optimizer serve every try; a warm-up step at batch 1 creates the AdamW
state first, so each try sees the steady-state footprint.
On CUDA a try fails on torch.cuda.OutOfMemoryError or a peak (max_memory_allocated) over the limit. On CPU
nothing runs out: the peak is counted by tools/bench.py's TensorMemory (the bytes of every tensor torch ops
allocate, while alive) plus the parameters and optimizer state, and a try fails when it exceeds the limit. That
count is exact and repeatable, so the search is testable, but it leaves out allocator overhead and kernels'
scratch space.
"""
import gc
import os
import sys

import torch

from engine.config import ConfigError, parse_args
from engine.data.bins import DataError
from tools.bench import Run, cpu_step_bytes

GB = 1e9


def largest_fitting(fits, max_batch):
    """Largest batch in [1, max_batch] with fits(batch), 0 if none; assumes a larger batch never needs less."""
    good, bad, b = 0, None, 1
    while bad is None and good < max_batch:
        if fits(b):
            good, b = b, min(2 * b, max_batch)
        else:
            bad = b
    while bad is not None and bad - good > 1:
        mid = (good + bad) // 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good


class Finder:
    def __init__(self, cfg, limit):
        if cfg.use_cuda_graphs:
            raise ConfigError("use_cuda_graphs records a graph and keeps its memory pool for every batch size tried, "
                              "which inflates the later tries; search with compile=True, then run with CUDA graphs")
        self.run = Run(cfg, batch_size=1)
        self.cuda = self.run.dev_type == "cuda"
        if cfg.compile and not self.cuda:
            raise ConfigError("on CPU the finder counts the tensors torch ops allocate, which it cannot see inside "
                              "compiled graphs; leave out --compile=True there (on CUDA it measures compiled steps)")
        self.run.step()  # creates the AdamW state
        self.limit = limit
        self.tries = []  # (batch, peak bytes or None after an OOM, fits)

    def resize(self, batch):
        r = self.run
        ids = torch.randint(0, r.model.config.vocab_size, (batch, r.T + 1), device=r.device)
        r.x, r.y, r.B = ids[:, :-1], ids[:, 1:], batch

    def peak(self, batch):
        """Peak bytes of one training step at this batch; None when CUDA ran out of memory."""
        self.resize(batch)
        oom = False
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.run.device)
            try:
                self.run.step()
            except torch.cuda.OutOfMemoryError:
                oom = True  # freed below, once the exception no longer holds the failed step's tensors
            if oom:
                self.run.optimizer.zero_grad(set_to_none=True)
                self.run.scaler = torch.amp.GradScaler("cuda", enabled=self.run.scaler.is_enabled())  # mid-step
            self.run.x = self.run.y = None
            gc.collect()
            peak = None if oom else torch.cuda.max_memory_allocated(self.run.device)
            torch.cuda.empty_cache()
            return peak
        peak = cpu_step_bytes(self.run)
        self.run.x = self.run.y = None
        return peak

    def fits(self, batch):
        p = self.peak(batch)
        ok = p is not None and p <= self.limit
        self.tries.append((batch, p, ok))
        return ok


def split_argv(argv):
    opts, rest = {"memory_limit_gb": None, "max_batch": 4096}, []
    for a in argv:
        name, eq, value = a[2:].partition("=")
        if a.startswith("--") and name in opts and eq:
            try:
                opts[name] = float(value) if name == "memory_limit_gb" else int(value)
            except ValueError:
                raise ConfigError(f"--{name} takes a number, got {value!r}") from None
        else:
            rest.append(a)
    return rest, opts


def main(argv=None, out=print):
    """Returns (batch, Finder) and prints every try and the result."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        out(__doc__.strip())
        return None
    try:
        rest, opts = split_argv(argv)
        cfg = parse_args(rest)
        finder = Finder(cfg, float("inf"))
        total = (torch.cuda.get_device_properties(finder.run.device).total_memory if finder.cuda
                 else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        finder.limit = opts["memory_limit_gb"] * GB if opts["memory_limit_gb"] else total
        batch = largest_fitting(finder.fits, opts["max_batch"])
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    r = finder.run
    how = "cuda max_memory_allocated" if finder.cuda else "tensor bytes counted by TensorMemory + parameters and state"
    out(f"# {r.model.num_params() / 1e6:.1f}M parameters, T={r.T}, {r.dtype}, limit {finder.limit / GB:.4g} GB, "
        f"device total {total / GB:.2f} GB; peak = {how}")
    for b, p, ok in finder.tries:
        out(f"batch {b:5d}: " + ("out of memory" if p is None else f"peak {p / GB:.4g} GB")
            + ("" if ok else "  (does not fit)"))
    if batch == 0:
        out("no batch fits: even batch 1 exceeds the limit")
    else:
        p = next(p for b, p, _ in finder.tries if b == batch)
        out(f"largest batch: {batch} (peak {p / GB:.4g} GB of {finder.limit / GB:.4g} GB, headroom "
            f"{(finder.limit - p) / GB:.4g} GB)" + (" = --max_batch" if batch == opts["max_batch"] else ""))
    return batch, finder


if __name__ == "__main__":
    main()
