"""
The largest per-device micro-batch that fits one full training step (forward, backward, clip, AdamW step).

    python tools/find_batch_size.py config/full_llama3_1.5b_optimal.py --block_size=2048
    python tools/find_batch_size.py config/full_llama3_1.5b_optimal.py --use_fsdp=True --world_size=8
    python tools/find_batch_size.py --preset=tiny_llama3 --block_size=128 --device=cpu --memory_limit_gb=0.5

Settings are train.py's, plus --memory_limit_gb (default: all of the GPU, or the machine's RAM on CPU),
--max_batch (default 4096) and --world_size (or --gpus: the ranks the job will run on; default WORLD_SIZE, else 1).
Batches double from 1 until one fails, then a binary search between the last that fit and the first that did not.
One model and optimizer serve every try; a warm-up step at batch 1 creates the AdamW state first, so each try sees
the steady-state footprint.
On CUDA a try fails on torch.cuda.OutOfMemoryError or a peak (max_memory_allocated) over the limit. On CPU
nothing runs out: the peak is counted by tools/bench.py's TensorMemory (the bytes of every tensor torch ops
allocate, while alive) plus the parameters and optimizer state, and a try fails when it exceeds the limit. That
count is exact and repeatable, so the search is testable, but it leaves out allocator overhead and kernels'
scratch space.

The data-parallel mode: the steps run in this one process, unsharded (FSDP and ZeRO-1 need the job's ranks), and
each measured peak is then corrected to the rank of the job that holds the most: plus that rank's parameters,
gradients and optimizer state in the config's mode (use_fsdp, use_zero1, else DDP) over --world_size ranks, minus
this process's own, plus FSDP's gathered parameters (the largest block's twice and the root's), all as
engine/plan.py's estimate() counts them. A try fits when the corrected figure is within the limit; both figures
are printed. Activations and the loss are per rank already. DDP's gradients are views into its buckets
(gradient_as_bucket_view), so DDP over many ranks holds what one process does. On CUDA in bfloat16 the step measured
here also keeps autocast's bfloat16 copies of the weights for backward, which an FSDP rank (bfloat16 parameters, no
autocast) does not: there the FSDP figure errs high, by up to 2 bytes a parameter, as engine/plan.py's does.

Under compile (CUDA): train.py compiles its step once, for its one batch size, with static shapes. Here every try
is a new batch size, which dynamo would serve by recompiling with a dynamic batch dimension (other kernels,
another peak) and, past its recompile limit, by falling back to eager. So before each new batch size the compile
caches are cleared (torch._dynamo.reset()) and one untimed step compiles the step afresh at that size; the peak is
that of the next step, the one a run repeats, not the compiling step's (autotuning benchmarks kernels on copies of
their inputs). Each try then pays a full compilation: minutes for a model of billions of parameters.
"""
import dataclasses
import gc
import os
import sys

import torch

from engine.config import ConfigError, parse_args
from engine.data.bins import DataError
from engine.plan import config_mode, estimate, state_bytes
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


def rank_correction(cfg, model, world, T, dtype, device_type):
    """Bytes a rank of `world` in cfg's data-parallel mode holds beyond one unsharded process, for the rank that
    holds the most: {"mode", "world", "state" (that rank's parameters, gradients and optimizer state), "single"
    (one process's), "gathered" (FSDP's gathered parameters), "correction" (state - single + gathered)}."""
    mode = config_mode(cfg)
    parts = estimate(cfg, model, world, T, dtype, batch_size=1, mode=mode, device_type=device_type,
                     eval_only=False)["parts"]
    state = parts["params"] + parts["grads"] + parts["optimizer"]
    single = sum(state_bytes(model, "ddp", 1, cfg.optimizer)[0].values())
    gathered = parts.get("fsdp_gathered", 0)
    return {"mode": mode, "world": world, "state": state, "single": single, "gathered": gathered,
            "correction": state - single + gathered}


class Finder:
    def __init__(self, cfg, limit, world=1):
        if cfg.use_cuda_graphs:
            raise ConfigError("use_cuda_graphs records a graph and keeps its memory pool for every batch size tried, "
                              "which inflates the later tries; search with compile=True, then run with CUDA graphs")
        self.run = Run(dataclasses.replace(cfg, use_fsdp=False, use_zero1=False), batch_size=1)  # one process
        self.cuda = self.run.dev_type == "cuda"
        if cfg.compile and not self.cuda:
            raise ConfigError("on CPU the finder counts the tensors torch ops allocate, which it cannot see inside "
                              "compiled graphs; leave out --compile=True there (on CUDA it measures compiled steps)")
        self.compiled = cfg.compile
        self.run.step()  # creates the AdamW state (and compiles at batch 1)
        self.compiled_at = 1
        self.rank = rank_correction(cfg, self.run.owner, world, self.run.T, self.run.dtype, self.run.dev_type)
        self.limit = limit
        self.tries = []  # (batch, measured peak bytes or None after an OOM, fits)

    def per_rank(self, peak):
        """A measured single-process peak as the job's fullest rank would see it."""
        return None if peak is None else peak + self.rank["correction"]

    def resize(self, batch):
        r = self.run
        ids = torch.randint(0, r.model.config.vocab_size, (batch, r.T + 1), device=r.device)
        r.x, r.y, r.B = ids[:, :-1], ids[:, 1:], batch

    def fresh_compile(self, batch):
        """Compile the step afresh, with static shapes, at a batch size not compiled for yet (see the docstring)."""
        if self.compiled and batch != self.compiled_at:
            torch._dynamo.reset()
            self.compiled_at = batch
            self.run.step()

    def peak(self, batch):
        """Peak bytes of one training step at this batch, in this process; None when CUDA ran out of memory."""
        self.resize(batch)
        oom = False
        if self.cuda:
            try:
                self.fresh_compile(batch)
                torch.cuda.reset_peak_memory_stats(self.run.device)
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
        self.fresh_compile(batch)
        peak = cpu_step_bytes(self.run)
        self.run.x = self.run.y = None
        return peak

    def fits(self, batch):
        p = self.peak(batch)
        ok = p is not None and self.per_rank(p) <= self.limit
        self.tries.append((batch, p, ok))
        return ok


def split_argv(argv):
    opts, rest = {"memory_limit_gb": None, "max_batch": 4096, "world_size": int(os.environ.get("WORLD_SIZE", 1))}, []
    for a in argv:
        name, eq, value = a[2:].partition("=")
        name = "world_size" if name == "gpus" else name  # tools/plan.py's name for it
        if a.startswith("--") and name in opts and eq:
            try:
                opts[name] = float(value) if name == "memory_limit_gb" else int(value)
            except ValueError:
                raise ConfigError(f"--{name} takes a number, got {value!r}") from None
        else:
            rest.append(a)
    if opts["world_size"] < 1:
        raise ConfigError(f"--world_size must be at least 1, got {opts['world_size']}")
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
        finder = Finder(cfg, float("inf"), opts["world_size"])
        total = (torch.cuda.get_device_properties(finder.run.device).total_memory if finder.cuda
                 else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        finder.limit = opts["memory_limit_gb"] * GB if opts["memory_limit_gb"] else total
        batch = largest_fitting(finder.fits, opts["max_batch"])
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    r, k = finder.run, finder.rank
    how = "cuda max_memory_allocated" if finder.cuda else "tensor bytes counted by TensorMemory + parameters and state"
    where = f"{k['mode']}, world size {k['world']}"
    out(f"# {r.model.num_params() / 1e6:.1f}M parameters, T={r.T}, {r.dtype}, limit {finder.limit / GB:.4g} GB, "
        f"device total {total / GB:.2f} GB; peak = {how}")
    out(f"# per rank ({where}) = measured single-process peak {k['correction'] / GB:+.4g} GB: the fullest rank's "
        f"parameters, gradients and optimizer state {k['state'] / GB:.4g} GB less one process's {k['single'] / GB:.4g}"
        + (f", plus FSDP's gathered parameters {k['gathered'] / GB:.4g}" if k["mode"] == "fsdp" else "") + " GB")
    for b, p, ok in finder.tries:
        out(f"batch {b:5d}: " + ("out of memory" if p is None else
                                 f"single-process peak {p / GB:.4g} GB, per rank ({where}) "
                                 f"{finder.per_rank(p) / GB:.4g} GB") + ("" if ok else "  (does not fit)"))
    if batch == 0:
        out("no batch fits: even batch 1 exceeds the limit")
    else:
        p = finder.per_rank(next(p for b, p, _ in finder.tries if b == batch))
        out(f"largest batch: {batch} (per rank ({where}) {p / GB:.4g} GB of {finder.limit / GB:.4g} GB, headroom "
            f"{(finder.limit - p) / GB:.4g} GB)" + (" = --max_batch" if batch == opts["max_batch"] else ""))
    return batch, finder


if __name__ == "__main__":
    main()
