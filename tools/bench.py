"""
Time the training step (forward, backward, clip, AdamW step) and print ms/iter, tokens/s, MFU and peak memory.

    python tools/bench.py --preset=gpt2 --block_size=1024 --batch_size=16
    python tools/bench.py --preset=gpt2 --batch_size=8 --compare attention_backend=manual,sdpa compile=False,True
    python tools/bench.py --vs_hf_gpt2

Settings are train.py's (config files and --key=value, built by train.py's own functions), and the step timed is
train.py's (engine/step.py: forward and backward over the micro-batches, clipping, the step's one all-reduce, the
AdamW update). Plus:
  --warmup=N --iters=N --repeats=N  N untimed steps, then `repeats` timings of `iters` steps; the median is reported
  --compare key=a,b [key=c,d ...]   one row per combination of the values (the cartesian product), the first value
                                    of every key first; each row is compared with that first row
  --vs_hf_gpt2                      our step (sdpa, manual) against transformers' GPT2LMHeadModel (sdpa, eager) on
                                    the same batch: GPT-2 6 x 384, 6 heads, T=256, batch 8, float32 CPU
  --threads=N                       torch.set_num_threads(N) first (CPU)
All rows are built first and take turns in every repeat, in alternating order (A B, B A, ...), since whatever runs
first in a repeat is penalised; so they are all in memory at once. Tokens are random ids of the model's vocabulary,
one fixed batch. Peak memory, measured on one more step after the timings: on CUDA what the step allocates above
what was allocated before it, plus the row's parameters and optimizer state; on CPU the tensor bytes of that step
counted by TensorMemory (parameters, optimizer state, gradients, activations), because the process's resident size
keeps what earlier rows freed; on CPU it is not measured for compiled rows, since that count cannot see inside
compiled graphs.
"""
import gc
import itertools
import os
import platform
import statistics
import sys
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from engine import distributed as D
from engine.config import ConfigError, parse_args
from engine.data.bins import DataError, TokenDataset, resolve_dataset_dir
from engine.objectives import PretrainTask
from engine.optim import adamw, decay_groups, make_optimizer, parts
from engine.runlog import device_name, lookup_peak_flops, mfu
from engine.step import forward_backward, optimizer_step
from model import GPT
from train import check_layout, model_config, setup_device

COLUMNS = ("setting", "ms/iter", "tokens/s", "MFU", "peak mem GB", "vs row 1")


def data_vocab(cfg):
    """The dataset's vocabulary, which sizes the model when neither a preset nor --vocab_size does."""
    try:
        return TokenDataset(resolve_dataset_dir(cfg.dataset), check_ids=False).vocab_size
    except DataError as e:
        if cfg.preset or cfg.vocab_size:
            return None
        raise ConfigError(f"{e}; or give --vocab_size (or a --preset) to benchmark on random tokens") from None


class RandomTokens(PretrainTask):
    """The pretraining objective on a batch of random ids (no dataset needed)."""

    def __init__(self):  # no sampler: Run makes the batch
        pass


class Run:
    """One model and optimizer as train.py builds them, and train.py's step (engine/step.py) on a fixed random
    batch."""

    def __init__(self, cfg, batch_size=None):
        torch.manual_seed(cfg.seed)
        self.cfg = cfg
        hw = setup_device(cfg, D.Dist())
        self.device, self.dev_type, self.dtype, self.ctx = hw.device, hw.type, hw.dtype, hw.ctx
        self.model = GPT(model_config(cfg, data_vocab(cfg), hw.backend)).to(self.device)
        mc = self.model.config
        self.T = cfg.block_size or mc.block_size
        self.B = batch_size or cfg.batch_size
        self.ga = check_layout(cfg, D.Dist())
        self.tokens = self.B * self.T * self.ga
        self.flops_per_token = self.model.flops_per_token(self.T)
        self.forward, self.owner = D.parallelize(self.model, cfg, D.Dist(), self.dev_type, self.dtype)
        self.optimizer = make_optimizer(self.owner, cfg, self.dev_type)
        self.scaler = torch.amp.GradScaler(self.dev_type, enabled=self.dtype == "float16")
        self.task = RandomTokens()
        ids = torch.randint(0, mc.vocab_size, (self.B, self.T + 1), device=self.device)
        self.x, self.y = ids[:, :-1], ids[:, 1:]

    def step(self):
        micro = [{"input_ids": self.x, "labels": self.y}] * self.ga
        forward_backward(self.forward, self.owner, self.task, micro, self.ctx, self.scaler, self.optimizer,
                         self.cfg.grad_clip, cuda_graphs=self.cfg.use_cuda_graphs)
        optimizer_step(self.optimizer, self.scaler)


class HFRun:
    """transformers' GPT2LMHeadModel of the same shape doing the same step: same AdamW groups, clipping, batch."""

    def __init__(self, ours, attn_implementation):
        from transformers import GPT2Config, GPT2LMHeadModel

        mc, cfg = ours.model.config, ours.cfg
        hc = GPT2Config(vocab_size=mc.vocab_size, n_positions=mc.block_size, n_embd=mc.n_embd, n_layer=mc.n_layer,
                        n_head=mc.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
        self.model = GPT2LMHeadModel._from_config(hc, attn_implementation=attn_implementation)
        self.optimizer = adamw(decay_groups(list(self.model.parameters()), cfg.weight_decay), cfg.learning_rate,
                               (cfg.beta1, cfg.beta2), "cpu")
        self.grad_clip = cfg.grad_clip or float("inf")
        self.x = ours.x  # transformers shifts the labels itself: loss over T-1 positions of the same forward
        self.tokens, self.flops_per_token = ours.tokens, ours.flops_per_token

    def step(self):
        self.model(input_ids=self.x, labels=self.x).loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------------------------------------
# measuring

class TensorMemory(TorchDispatchMode):
    """Counts the bytes of tensor storage that aten ops allocate while the mode is on: `live` now, `peak` at most,
    `largest` in one allocation. A storage counts when an op returns it and no input of the op owns it (views and
    in-place results are not new memory), and stops counting when it is freed, even after the mode is left.
    The CPU stand-in for torch.cuda.max_memory_allocated: exact and repeatable, but blind to allocator overhead
    and to kernels' scratch space."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = self.largest = 0
        self.refs = {}

    def _free(self, ptr, nbytes):
        self.refs.pop(ptr, None)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        owned = {x.untyped_storage().data_ptr() for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)}
        for x in tree_flatten(out)[0]:
            if not isinstance(x, torch.Tensor):
                continue
            st = x.untyped_storage()
            ptr, n = st.data_ptr(), st.nbytes()
            if n == 0 or ptr in owned or ptr in self.refs:
                continue
            # the Python storage object lives exactly as long as the storage, so its weakref reports the free
            self.refs[ptr] = weakref.ref(st, lambda _, ptr=ptr, n=n: self._free(ptr, n))
            self.live += n
            self.largest = max(self.largest, n)
        self.peak = max(self.peak, self.live)
        return out


def tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def resident_bytes(run):
    """Parameters and optimizer state: what stays allocated between steps (gradients are freed each step)."""
    state = [v for o in parts(run.optimizer) for s in o.state.values() for v in s.values() if torch.is_tensor(v)]
    return tensor_bytes(run.owner.parameters()) + tensor_bytes(state)


def cpu_step_bytes(run):
    """Peak tensor bytes of one more (untimed) step: resident bytes plus TensorMemory's peak."""
    with TensorMemory() as mem:
        run.step()
    return resident_bytes(run) + mem.peak


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(run, n, device):
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        run.step()
    sync(device)
    return (time.perf_counter() - t0) / n


def measure(runs, warmup, iters, repeats, device):
    """Median seconds per step of each run. The runs take turns within every repeat, in an order that alternates
    (A B, B A, A B, ...): whatever runs first in a repeat is measurably penalised on these machines."""
    for run in runs:
        for _ in range(warmup):
            run.step()
    times = [[] for _ in runs]
    for r in range(repeats):
        order = list(zip(times, runs))
        for t, run in order if r % 2 == 0 else reversed(order):
            t.append(time_steps(run, iters, device))
    return [statistics.median(t) for t in times]


def row(name, run, sec, peak, mem):
    tps = run.tokens / sec
    m = mfu(run.flops_per_token, tps, peak) if run.flops_per_token else None
    return {"setting": name, "ms/iter": sec * 1000, "tokens/s": tps, "MFU": m, "peak mem GB": mem}


def table(rows):
    first = rows[0]["tokens/s"]
    fmt = {"ms/iter": "{:.1f}", "tokens/s": "{:,.0f}", "MFU": "{:.1%}", "peak mem GB": "{:.2f}"}
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = [r["setting"]] + [("-" if r[c] is None else fmt[c].format(r[c])) for c in COLUMNS[1:-1]]
        cells.append(f"{r['tokens/s'] / first:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def header(device, command, extra=""):
    return [f"# {device_name(device)}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
            f"{torch.get_num_threads()} torch threads, python "
            f"{platform.python_version()}, {time.strftime('%Y-%m-%d')}{extra}",
            "# command: python tools/bench.py " + " ".join(command)]


# ----------------------------------------------------------------------------------------------------------
# the two modes

def peak_bytes(run):
    """Peak bytes of one more (untimed) step, parameters and optimizer state included: on CUDA what the step
    allocates above what was allocated before it, plus the run's resident bytes; on CPU counted by TensorMemory,
    which cannot see inside compiled graphs (None there)."""
    if run.dev_type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(run.device)
        before = torch.cuda.memory_allocated(run.device)
        run.step()
        return torch.cuda.max_memory_allocated(run.device) - before + resident_bytes(run)
    return None if run.cfg.compile else cpu_step_bytes(run)


def compare(base_argv, combos, warmup, iters, repeats, command, out=print):
    """Every row is built first and kept in memory, so that the rows can take turns in each repeat."""
    runs = [Run(parse_args(base_argv + [f"--{k}={v}" for k, v in combo])) for combo in combos]
    first = runs[0]
    for line in header(first.device, command, f", {first.dtype}, batch {first.B} x {first.T} x {first.ga} "
                       f"micro-steps, {first.model.num_params() / 1e6:.1f}M parameters, warmup {warmup}, "
                       f"{repeats} x {iters} timed steps, rows alternating, median"):
        out(line)
    secs = measure(runs, warmup, iters, repeats, first.device)
    rows = []
    for combo, run, sec in zip(combos, runs, secs):
        used = peak_bytes(run)
        peak = run.cfg.peak_flops or (lookup_peak_flops(device_name(run.device)) if run.dev_type == "cuda" else None)
        name = " ".join(f"{k}={v}" for k, v in combo) or "as configured"
        rows.append(row(name, run, sec, peak, None if used is None else used / 1e9))
    for line in table(rows):
        out(line)
    return rows


def vs_hf_gpt2(argv, warmup, iters, repeats, command, out=print):
    """GPT-2 6 layers x 384 wide, 6 heads, T=256, batch 8 (sizes overridable), float32 on CPU, interleaved."""
    base = ["--preset=gpt2", "--n_layer=6", "--n_embd=384", "--n_head=6", "--block_size=256", "--batch_size=8"]
    base += argv + ["--device=cpu", "--dtype=float32"]  # the CPU target; transformers' side is not moved
    cfg = parse_args(base)
    ours = {b: Run(parse_args(base + [f"--attention_backend={b}"])) for b in ("sdpa", "manual")}
    ref = ours["sdpa"]
    ours["manual"].x, ours["manual"].y = ref.x, ref.y  # the same batch for everyone
    mc = ref.model.config
    runs = {"ours, sdpa": ref, "transformers, sdpa": HFRun(ref, "sdpa"),
            "ours, manual": ours["manual"], "transformers, eager": HFRun(ref, "eager")}
    secs = measure(list(runs.values()), warmup, iters, repeats, "cpu")
    peak = cfg.peak_flops
    for line in header("cpu", command, f", float32, GPT-2 {mc.n_layer}L {mc.n_embd}d {mc.n_head}h, vocab "
                       f"{mc.vocab_size}, batch {ref.B} x {ref.T}, warmup "
                       f"{warmup}, {repeats} x {iters} timed steps, alternating order, median"):
        out(line)
    rows = [row(name, run, s, peak, None) for (name, run), s in zip(runs.items(), secs)]
    for line in table(rows):
        out(line)
    tps = {r["setting"]: r["tokens/s"] for r in rows}
    out(f"ours/transformers tokens/s: sdpa {tps['ours, sdpa'] / tps['transformers, sdpa']:.2f}, "
        f"manual vs eager {tps['ours, manual'] / tps['transformers, eager']:.2f}")
    return rows


def split_argv(argv):
    """(train.py arguments, bench options, compare combinations)."""
    opts = {"warmup": 2, "iters": 3, "repeats": 5, "threads": 0, "vs_hf_gpt2": False}
    rest, axes = [], []
    i = 0
    while i < len(argv):
        a = argv[i]
        name, eq, value = a[2:].partition("=")
        if a == "--compare":
            while i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                k, eq, vals = argv[i + 1].partition("=")
                if not eq or not vals:
                    raise ConfigError(f"--compare takes key=value1,value2,...; got {argv[i + 1]!r}")
                axes.append([(k, v) for v in vals.split(",")])
                i += 1
            if not axes:
                raise ConfigError("--compare needs at least one key=value1,value2,... after it")
        elif a.startswith("--") and name in ("warmup", "iters", "repeats", "threads"):
            least = 1 if name in ("iters", "repeats") else 0
            if not value.isdigit() or int(value) < least:
                raise ConfigError(f"--{name} takes an integer of at least {least}, got {value!r}")
            opts[name] = int(value)
        elif a.startswith("--") and name == "vs_hf_gpt2":
            opts["vs_hf_gpt2"] = value.lower() != "false"
        else:
            rest.append(a)
        i += 1
    return rest, opts, [list(c) for c in itertools.product(*axes)]


def main(argv=None, out=print):
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        out(__doc__.strip())
        return None
    try:
        rest, opts, combos = split_argv(argv)
        if opts["threads"]:
            torch.set_num_threads(opts["threads"])
        if opts["vs_hf_gpt2"]:
            return vs_hf_gpt2(rest, opts["warmup"], opts["iters"], opts["repeats"], argv, out)
        return compare(rest, combos, opts["warmup"], opts["iters"], opts["repeats"], argv, out)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
