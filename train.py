"""
Train a GPT on memory-mapped token bins: one process on CPU or one GPU, or many under torchrun.

    python train.py config/train_shakespeare_char.py --max_iters=2000 --batch_size=32
    python train.py config/train_shakespeare_char.py --init_from=resume --eval_only=True
    torchrun --standalone --nproc_per_node=8 train.py config/full_llama3_1.5b_optimal.py --use_zero1=True
    python train.py --help

Config files and --key=value overrides apply left to right over the schema in engine/config.py. One loop serves
every objective (pretrain, sft, dpo); an objective is a task in engine/tasks.py: a batch source and a loss.
"""
import dataclasses
import json
import math
import os
import platform
import signal
import sys
import threading
import time
from contextlib import nullcontext

import torch
from torch.distributed.elastic.multiprocessing.errors import record as record_errors
from tqdm import tqdm

from engine import distributed as D
from engine.attention import resolve_backend
from engine.checkpoint import (
    CheckpointError,
    DamagedCheckpoint,
    best_checkpoint,
    checkpoint_path,
    find_latest,
    list_checkpoints,
    load_meta,
    save_checkpoint,
)
from engine.config import MODEL_KEYS, ConfigError, config_dict, help_text, parse_args
from engine.data import DataError, TokenDataset, resolve_dataset_dir, to_device, train_batches
from engine.health import HealthMonitor, TrainingDiverged
from engine.metrics import (
    MFU_CONVENTION,
    RunLog,
    device_name,
    finite_or_none,
    git_state,
    log_to_continue,
    lookup_peak_flops,
    mfu,
    new_log_path,
)
from engine.optim import lr_at, make_optimizer
from engine.rundir import claim
from engine.tasks import DPOTask, PretrainTask, SFTTask
from engine.tokenizers import get_tokenizer
from model import GPT, PRESETS, ModelConfig

# ----------------------------------------------------------------------------------------------------------
# set-up

def setup_device(cfg, d):
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev_type = torch.device(device).type
    if dev_type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device} but CUDA is not available here; use --device=cpu")
    if dev_type == "cuda" and (torch.device(device).index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"device={device} but this machine has {torch.cuda.device_count()} GPU(s), numbered from 0")
    if dev_type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device={device} but MPS (Apple GPUs) is not available here; use --device=cpu")
    if dev_type == "cuda" and d.world_size > 1:
        device = f"cuda:{d.local_rank}"
    if dev_type == "cuda" and torch.device(device).index is not None:
        torch.cuda.set_device(torch.device(device))  # memory statistics and the RNG state then refer to this GPU
    dtype = cfg.dtype
    if dtype == "auto":
        dtype = "bfloat16" if dev_type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if dtype == "float16" and dev_type != "cuda":
        raise ConfigError("dtype=float16 needs CUDA (autocast with a GradScaler); use --dtype=float32 on "
                          f"{dev_type}")
    if dtype == "bfloat16" and dev_type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("dtype=bfloat16 but this GPU does not support it; use --dtype=float16")
    if cfg.use_cuda_graphs and dev_type != "cuda":
        raise ConfigError(f"use_cuda_graphs needs CUDA, but the device is {dev_type}; leave it False (or use "
                          "--compile=True)")
    if dtype == "float16" and cfg.use_fsdp:
        raise ConfigError("dtype=float16 with use_fsdp needs a sharded GradScaler, which this engine does not "
                          "have; use --dtype=bfloat16")
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    # FSDP casts parameters itself (MixedPrecisionPolicy), so autocast is only for the other modes
    plain = dtype == "float32" or (cfg.use_fsdp and dev_type == "cuda" and dtype == "bfloat16")
    ctx = nullcontext() if plain else torch.autocast(device_type=dev_type, dtype=ptdtype)
    return device, dev_type, dtype, ctx


def check_micro_steps(cfg, micro_steps):
    """CUDA graphs and gradient accumulation do not mix: the first micro-step's gradients live in the replayed
    graph's memory pool, and the next replay overwrites them before backward adds to them (pytorch/pytorch#169545)."""
    if cfg.use_cuda_graphs and micro_steps > 1:
        raise ConfigError(f"use_cuda_graphs with {micro_steps} micro-steps per rank and step: gradients of one replay "
                          "would be overwritten by the next; make gradient_accumulation_steps equal to the number of "
                          "GPUs (raise batch_size instead), or use compile=True without CUDA graphs")


def model_config(cfg, data_vocab, backend):
    """The model's settings: the preset, overridden by any model key given, the vocabulary from the data if
    neither says (rounded up to a multiple of 64)."""
    if cfg.preset and cfg.preset not in PRESETS:
        raise ConfigError(f"unknown preset {cfg.preset!r}; known: {', '.join(PRESETS)}")
    base = dict(PRESETS[cfg.preset]) if cfg.preset else {}
    over = {k: getattr(cfg, k) for k in MODEL_KEYS if getattr(cfg, k) is not None}
    if cfg.block_size is not None:
        over["block_size"] = cfg.block_size
    if "vocab_size" not in base and "vocab_size" not in over:
        over["vocab_size"] = 64 * math.ceil(data_vocab / 64)
    try:
        return ModelConfig(**{**base, **over, "attention_backend": backend, "loss_chunk_size": cfg.loss_chunk_size})
    except ValueError as e:
        raise ConfigError(str(e)) from None


def our_checkpoint(path):
    """init_from may name one of our checkpoints, or a run's out_dir (its newest checkpoint): that folder, else None."""
    if os.path.isfile(os.path.join(path, "meta.pt")):
        return path
    found = list_checkpoints(path)
    return found[-1] if found else None


def build_model(cfg, data_vocab, backend, saved_meta):
    """A fresh model (weights still to load from a checkpoint); resumed, fine-tuned and transformers models keep
    their architecture and take only this run's settings of how to compute (backend, loss chunks, dropout)."""
    if cfg.init_from == "scratch" and saved_meta is None:
        return GPT(model_config(cfg, data_vocab, backend))
    run = {"attention_backend": backend, "loss_chunk_size": cfg.loss_chunk_size}
    if cfg.dropout is not None:
        run["dropout"] = cfg.dropout
    if saved_meta is not None:
        return GPT(ModelConfig.from_dict({**saved_meta["model_config"], **run}))
    if not os.path.isdir(cfg.init_from):
        raise ConfigError(f"init_from={cfg.init_from!r} is not scratch, resume, one of our checkpoints, or a local "
                          "transformers checkpoint directory")
    try:
        return GPT.from_hf(cfg.init_from, **run)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"init_from={cfg.init_from}: {e}") from e


def layer_groups(model):
    """Parameter name -> the group its gradient norm is logged under (tok_emb, blocks.3, norm_f, ...)."""
    groups = {}
    for name, _ in model.named_parameters():
        parts = name.replace("_checkpoint_wrapped_module.", "").split(".")
        groups[name] = ".".join(parts[:2]) if parts[0] == "blocks" else parts[0]
    return groups


def grad_norms_by_layer(model, groups):
    """Gradient norm of each layer group over the whole model (shards summed across ranks)."""
    names = sorted(set(groups.values()))
    sq = torch.zeros(len(names), device=next(model.parameters()).device)
    for name, p in model.named_parameters():
        if p.grad is not None:
            sq[names.index(groups[name])] += D.local(p.grad).detach().float().pow(2).sum()
    if any(hasattr(p, "to_local") for p in model.parameters()):
        D.all_reduce_sum(sq)  # FSDP: each rank holds a shard of every gradient
    return dict(zip(names, sq.sqrt().tolist()))


def nonfinite_grads(model):
    return [n for n, p in model.named_parameters()
            if p.grad is not None and not torch.isfinite(D.local(p.grad)).all()]


@torch.no_grad()
def evaluate(model, task, cfg, ctx, device, d):
    """Weighted mean loss (and the task's metrics) over eval_iters fixed batches per split, dealt round-robin across
    ranks. Every rank runs the same number of forward passes (FSDP's collectives need that); fillers weigh zero.
    A task without val examples (SFT or DPO with val_fraction=0) reports val and its metrics as None."""
    model.eval()
    out = {"val": None, **{f"val_{n}": None for n in task.metric_names}}
    per_rank = math.ceil(cfg.eval_iters / d.world_size)
    for split in task.eval_splits:
        acc = torch.zeros(2 + len(task.metric_names), device=device)  # weight, loss*weight, metric*weight...
        for j in range(per_rank):
            k = d.rank + j * d.world_size
            b = to_device(task.eval_batch(split, k % cfg.eval_iters), device)
            with ctx:
                loss, metrics = task.loss(model, b)
            w = float(task.weight(b)) if k < cfg.eval_iters else 0.0
            acc += w * torch.stack([torch.ones((), device=device), loss.float().detach(),
                                    *[metrics[n].float() for n in task.metric_names]])
        acc = D.all_reduce_sum(acc).tolist()
        out[split] = acc[1] / acc[0]
        if split == "val":
            out.update({f"val_{n}": v / acc[0] for n, v in zip(task.metric_names, acc[2:])})
    model.train()
    return out


def make_task(cfg, mc, T, data_dir, tok, log):
    if cfg.objective == "pretrain":
        return PretrainTask(cfg, TokenDataset(data_dir, vocab_limit=mc.vocab_size), T)
    if tok.vocab_size > mc.vocab_size:
        raise ConfigError(f"tokenizer {tok.name} has {tok.vocab_size} ids but the model only {mc.vocab_size} rows; "
                          "use the model's own tokenizer")
    max_len = cfg.max_seq_length or T
    if max_len > mc.block_size:
        raise ConfigError(f"max_seq_length={max_len} exceeds the model's limit of {mc.block_size} positions")
    return (SFTTask if cfg.objective == "sft" else DPOTask)(cfg, tok, max_len, log)


def resolve_tokenizer(cfg, saved_meta):
    """SFT and DPO need text: the tokenizer named, else a transformers init_from's own, else the one the resumed or
    starting checkpoint's run used (or its data was made with). Returns (tokenizer, name, path)."""
    name, path = cfg.tokenizer, cfg.tokenizer_path
    if name is None and cfg.init_from not in ("scratch", "resume") and saved_meta is None:
        name = f"hf:{cfg.init_from}"
    saved = (saved_meta or {}).get("config") or {}
    if name is None and saved.get("tokenizer"):
        name, path = saved["tokenizer"], saved.get("tokenizer_path")
    if name is None and saved.get("dataset"):
        try:
            meta = TokenDataset(resolve_dataset_dir(saved["dataset"]), check_ids=False).meta
            name, path = meta.get("tokenizer"), meta.get("tokenizer_path")
        except DataError:
            pass
    if name is None:
        raise ConfigError(f"objective={cfg.objective} needs a tokenizer: set --tokenizer (gpt2, llama3, qwen3, ...)")
    try:
        return get_tokenizer(name, path), name, path
    except (ValueError, KeyError, FileNotFoundError, OSError) as e:
        raise ConfigError(f"tokenizer {name!r}: {e}") from e


def free_memory(device):
    """Bytes still free on `device`: the GPU's free memory, or the host's MemAvailable (what it can allocate without
    swapping; os.sysconf's free pages where there is no /proc); None where neither can be read (MPS, macOS)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(torch.device(device))[0]
    if torch.device(device).type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def check_memory(cfg, model, T, device, dtype, d, available=None):
    """Refuse at start a run whose step cannot fit: a lower bound of the bytes a step still needs once the model is
    on `device`, against what is free there (`available`, else free_memory; the least over the ranks, so that all
    decide alike). Returns the bound.

    Counted: float32 gradients and AdamW's two moments, sharded as ZeRO-1 and FSDP shard them (less the full
    parameters FSDP frees); per micro-batch, in the compute dtype, the inputs the linear layers keep for backward
    (qkv, output projection and both MLP layers of every block, and the head; with activation_checkpointing each
    block's input and one block's recompute) and manual attention's probabilities; the loss's float32 logits (one
    chunk's with loss_chunk_size; DPO's in the compute dtype); the int64 ids and labels of all the step's
    micro-batches, which it takes at once. eval_only counts the logits alone. Ranks on one host share its RAM. Left
    out, so that the true need is higher: what attention kernels, norms, activations and dropout keep; the logits'
    gradient; cast copies of weights; DDP's buckets and FSDP's gathered parameters; batches prefetched ahead,
    allocator overhead and the CUDA context. SFT and DPO pad a batch only to its longest row, unknown before the
    data is read, so their rows count one token each.
    """
    mc, P = model.config, sum(p.numel() for p in model.parameters())
    rows = cfg.batch_size * (2 if cfg.objective == "dpo" else 1)  # DPO: chosen and rejected in one forward
    L = T if cfg.objective == "pretrain" else 1
    n = rows * L  # tokens of one micro-batch
    act = 4 if dtype == "float32" else 2
    w = d.world_size
    state = max(0, P * (16 - 4 * w) // w) if cfg.use_fsdp else P * 4 + P * 8 // (w if cfg.use_zero1 else 1)
    # per token and block; manual attention also keeps each head's row of (T, T) probabilities
    block = 2 * mc.n_embd + mc.n_head * mc.head_dim + mc.intermediate_size + (
        mc.n_head * L if mc.attention_backend == "manual" else 0)
    kept = mc.n_layer * mc.n_embd + block if cfg.activation_checkpointing else mc.n_layer * block
    acts = n * (kept + mc.n_embd) * act
    chunked = cfg.loss_chunk_size and cfg.objective != "dpo"  # DPO's forward has no targets, so no chunked loss
    logits = (min(n, cfg.loss_chunk_size) if chunked else n) * mc.vocab_size * (act if cfg.objective == "dpo" else 4)
    data = cfg.gradient_accumulation_steps // w * n * 16
    if cfg.eval_only:
        state = acts = data = 0
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if torch.device(device).type == "cpu" else 1
    need = (state + acts + logits + data) * ranks
    available = free_memory(device) if available is None else available
    if w > 1:
        available = min((a for a in D.all_gather_objects(available) if a is not None), default=None)
    if available is None or need <= available:
        return need
    fixes = ["lower batch_size or block_size (more gradient_accumulation_steps keep the tokens per step)"
             if acts + logits >= data else "lower gradient_accumulation_steps or batch_size"]
    if not cfg.activation_checkpointing and acts:
        fixes.append("set activation_checkpointing=True")
    if not chunked and cfg.objective != "dpo":
        fixes.append("set loss_chunk_size=1024")
    if state > acts + logits + data:
        fixes.append("shard the optimizer state over more GPUs (use_zero1 or use_fsdp under torchrun)")
    GB = 1e9
    raise ConfigError(f"a step needs at least {need / GB:,.1f} GB on {device} (gradients and optimizer state "
                      f"{state / GB:,.1f}, activations {acts / GB:,.1f}, logits {logits / GB:,.1f}, batches "
                      f"{data / GB:,.1f}"
                      + (f", for each of {ranks} ranks on this host" if ranks > 1 else "")
                      + f") but {available / GB:,.1f} GB is free; " + ", or ".join(fixes))


class StopRequest:
    """Catches SIGTERM, SIGINT and SIGUSR1 (preemption, Ctrl-C, Slurm's warning) so the loop can checkpoint,
    flush its log and exit cleanly at the end of the current step. A second SIGINT interrupts at once."""

    SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")

    def __init__(self):
        self.signum, self.saved = None, {}

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self.saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------------------------------------
# the run

def main(cfg, log=print):
    cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    d = D.init_distributed("cuda" if cuda else "cpu", cfg.dist_init_timeout_minutes)
    try:
        with StopRequest() as stop, claim(cfg.out_dir, d, read_only=cfg.eval_only, warn=log):
            result = run(cfg, d, log if d.master else (lambda *a, **k: None), stop)
        D.barrier()  # leave together: a rank tearing gloo down while another still talks can abort
        return result
    except Exception as e:  # a collective that failed because ranks went silent: say which
        failure = e if isinstance(e, D.RankFailure) else D.explain(e, d)
        if failure is None:
            raise
        if d.master or not failure.everywhere:  # each rank's own view; only rank 0 logs what all ranks share
            print(f"error: {failure}", file=sys.stderr, flush=True)
        if failure is e:
            raise
        raise failure from e
    finally:
        D.cleanup(d)


def run(cfg, d, log, stop=None):
    stop = stop or StopRequest()
    device, dev_type, dtype, ctx = setup_device(cfg, d)
    try:
        backend, backend_reason = resolve_backend(cfg.attention_backend, dev_type, dtype)
    except (ValueError, RuntimeError) as e:
        raise ConfigError(str(e)) from None
    if cfg.gradient_accumulation_steps % d.world_size:
        raise ConfigError(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} counts the micro-batches "
                          f"of the whole job and must be divisible by the world size {d.world_size}")
    if (cfg.use_fsdp or cfg.use_zero1) and not d.enabled:
        raise ConfigError("use_fsdp and use_zero1 shard across the ranks of a torchrun job; launch with torchrun "
                          "(torchrun --standalone --nproc_per_node=N train.py ...), N=1 included")
    ga = cfg.gradient_accumulation_steps
    local_ga = ga // d.world_size
    check_micro_steps(cfg, local_ga)

    resume_path, resume_meta = None, None
    if cfg.init_from == "resume":
        resume_path, resume_meta = find_latest(cfg.out_dir, warn=log)
        log(f"resuming from {resume_path} (iteration {resume_meta['iter_num']})")

    start_ckpt = None
    if resume_meta is None and cfg.init_from not in ("scratch", "resume") and os.path.isdir(cfg.init_from):
        start_ckpt = our_checkpoint(cfg.init_from)
    saved_meta = resume_meta or (load_meta(start_ckpt) if start_ckpt else None)
    if cfg.objective == "pretrain":
        data_dir, tok = resolve_dataset_dir(cfg.dataset), None
        vocab = TokenDataset(data_dir, check_ids=False).vocab_size  # vocabulary first, so the model can size itself
    else:
        tok, name, path = resolve_tokenizer(cfg, saved_meta)
        cfg = dataclasses.replace(cfg, tokenizer=name, tokenizer_path=path)  # recorded, so later tools find it
        data_dir, vocab = None, tok.vocab_size
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = build_model(cfg, vocab, backend, saved_meta).to(device)
    mc = model.config
    T = cfg.block_size if cfg.block_size is not None else mc.block_size
    if T > mc.block_size:
        raise ConfigError(f"block_size={T} exceeds the model's limit of {mc.block_size} positions")
    check_memory(cfg, model, T, device, dtype, d)  # before the data is read and anything of the step allocated
    task = make_task(cfg, mc, T, data_dir, tok, log)
    if task.iters_per_epoch and cfg.num_train_epochs:
        cfg = dataclasses.replace(cfg, max_iters=max(1, math.ceil(cfg.num_train_epochs * task.iters_per_epoch)))
        log(f"{cfg.num_train_epochs} epochs of {task.iters_per_epoch} iterations: max_iters={cfg.max_iters}")
    if cfg.objective != "pretrain":
        T = cfg.max_seq_length or T  # what one example spans, for the FLOP count
    num_params, flops_per_token = model.num_params(), model.flops_per_token(T)

    if start_ckpt:
        log(f"starting from the weights of {start_ckpt}")
    model, owner = D.parallelize(model, cfg, d, dev_type, dtype)
    if start_ckpt:
        D.load_model_state(start_ckpt, owner)
    if isinstance(task, DPOTask):
        task.reference(owner, model, device, ctx, dtype, saved_key=(resume_meta or {}).get("reference_key"), log=log)
    optimizer = make_optimizer(owner, cfg.learning_rate, cfg.weight_decay, (cfg.beta1, cfg.beta2), dev_type,
                               zero1=cfg.use_zero1)
    scaler = torch.amp.GradScaler(dev_type, enabled=dtype == "float16")
    start_iter, best_val = 0, float("inf")
    torch.manual_seed(cfg.seed + d.rank)  # dropout differs across ranks
    while resume_meta is not None:  # tensors that cannot be read (no checksums caught it): an older checkpoint serves
        try:
            D.load_state(resume_path, owner, optimizer)
            break
        except DamagedCheckpoint as e:
            log(f"warning: {e}; trying an older checkpoint")
            resume_path, resume_meta = find_latest(cfg.out_dir, warn=log, before=resume_meta["iter_num"])
            log(f"resuming from {resume_path} (iteration {resume_meta['iter_num']})")
    if resume_meta is not None:
        scaler.load_state_dict(resume_meta["scaler"])
        start_iter, best_val = resume_meta["iter_num"], resume_meta["best_val_loss"]
        rng = resume_meta["rng"]
        if len(rng["torch"]) == d.world_size:
            torch.set_rng_state(rng["torch"][d.rank])
            if dev_type == "cuda" and rng["cuda"]:
                torch.cuda.set_rng_state(rng["cuda"][d.rank])
        else:  # another world size: dropout streams cannot carry over, so start fresh ones deterministically
            torch.manual_seed(cfg.seed + 1000003 * start_iter + d.rank)
        saved = resume_meta["data"]
        if (saved["batch_size"], saved["block_size"], saved["gradient_accumulation_steps"]) != (cfg.batch_size, T, ga):
            log(f"warning: the checkpoint was trained with batch_size={saved['batch_size']}, block_size="
                f"{saved['block_size']}, gradient_accumulation_steps={saved['gradient_accumulation_steps']}; "
                "the data from here on differs from what the original run would have seen")

    tokens_per_iter = cfg.batch_size * T * ga * (2 if cfg.objective == "dpo" else 1)  # at most, with padding
    dev_name = device_name(device)
    peak = cfg.peak_flops if cfg.peak_flops is not None else (lookup_peak_flops(dev_name) if dev_type == "cuda"
                                                              else None)
    resolved = config_dict(cfg)
    commit, dirty = git_state() if d.master else (None, None)
    env = {
        "torch_version": torch.__version__, "python_version": platform.python_version(), "device": device,
        "device_name": dev_name, "world_size": d.world_size, "dtype": dtype, "attention_backend": backend,
        "attention_backend_reason": backend_reason, "git_commit": commit, "git_dirty": dirty,
        "mfu_convention": MFU_CONVENTION, "peak_flops": peak, "model_config": mc.to_dict(),
        "num_params": num_params, "flops_per_token": flops_per_token, "tokens_per_iter": tokens_per_iter,
        "block_size": T, "dataset_dir": data_dir, "init_from": cfg.init_from,
        "parallelism": "fsdp" if cfg.use_fsdp else "zero1" if cfg.use_zero1 else "ddp" if d.world_size > 1
        else "single",
    }
    log("config: " + ", ".join(f"{k}={v!r}" for k, v in resolved.items()))
    log(f"model: {num_params / 1e6:.2f}M parameters, {flops_per_token / 1e6:.1f} MFLOP/token at T={T}; attention "
        f"{backend}" + (f" ({backend_reason})" if backend_reason else ""))
    log(f"{tokens_per_iter:,} tokens per iteration on {d.world_size} x {dev_name} in {dtype} ({env['parallelism']})")

    runlog = None
    if d.master and cfg.eval_only:  # a log of its own; config.json stays the training run's, which may be running
        try:
            os.makedirs(cfg.out_dir, exist_ok=True)
            runlog = RunLog(new_log_path(cfg.out_dir), resolved, env, warn=log)
        except OSError as e:
            log(f"out_dir {cfg.out_dir} is not writable ({e.strerror}); evaluating without writing a run log")
    elif d.master:
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump(finite_or_none({"config": resolved, "model_config": mc.to_dict()}), f, indent=2)
        run_path, previous = log_to_continue(cfg.out_dir, (resume_meta or {}).get("run_log"), warn=log)
        runlog = RunLog(run_path or new_log_path(cfg.out_dir), resolved, env, previous, start_iter, warn=log)
    record = runlog.add if runlog else (lambda *a: None)
    first = runlog.doc["training_iterations"][:1] if runlog else []
    health = HealthMonitor(warn=log, start_iter=start_iter, first_loss=first[0]["loss"] if first else None)
    last_ckpt, last_val = resume_path, (resume_meta or {}).get("val_loss")
    best_ckpt = best_checkpoint(cfg.out_dir, upto=start_iter) if resume_meta else None  # (path, val loss)
    evaluated = (None, None)  # (iteration, val loss) of the latest evaluation

    def checkpoint(iter_num):
        nonlocal last_ckpt, last_val, best_ckpt
        val = finite_or_none(evaluated[1]) if evaluated[0] == iter_num else None  # of these very weights
        rng_cpu = D.all_gather_objects(torch.get_rng_state())
        rng_cuda = D.all_gather_objects(torch.cuda.get_rng_state()) if dev_type == "cuda" else []
        meta = {
            "iter_num": iter_num, "val_loss": val, "best_val_loss": best_val, "scaler": scaler.state_dict(),
            "rng": {"torch": rng_cpu, "cuda": rng_cuda},
            "data": {"seed": cfg.seed, "next_iter": iter_num, "batch_size": cfg.batch_size, "block_size": T,
                     "gradient_accumulation_steps": ga, "world_size": d.world_size},
            "config": resolved, "model_config": mc.to_dict(), "run_log": runlog and os.path.basename(runlog.path),
            "reference_key": getattr(task, "key", None),
        }
        if runlog:  # the log first, so that it always reaches at least as far as the newest checkpoint
            runlog.flush()
        last_ckpt = save_checkpoint(D.state_tensors(owner, optimizer), meta, cfg.out_dir, iter_num,
                                    cfg.keep_last_n_checkpoints)
        last_val = val
        if val is not None and (best_ckpt is None or val <= best_ckpt[1]):
            best_ckpt = (last_ckpt, val)
        log(f"saved checkpoint {last_ckpt}")

    def run_eval(iter_num):
        nonlocal best_val, evaluated
        losses = evaluate(model, task, cfg, ctx, device, d)
        extra = {k: finite_or_none(v) for k, v in losses.items() if k.startswith("val_")}
        val = losses["val"]
        log(f"eval at iter {iter_num}: train loss {losses['train']:.4f}, "
            + (f"val loss {val:.4f}" if val is not None else "no val examples")
            + "".join(f", {k} {v:.4f}" for k, v in extra.items() if v is not None))
        record("evals", {"iter": iter_num, "train_loss": losses["train"], "val_loss": val, **extra})
        evaluated = (iter_num, val)
        if val is None:  # nothing to judge by: every evaluation checkpoints, as always_save_checkpoint would
            return losses, True
        rising = health.check_val(iter_num, val, best_val)
        if rising:
            record("health", rising)
        improved = val < best_val
        best_val = min(best_val, val)
        return losses, improved

    if cfg.eval_only:
        losses, _ = run_eval(start_iter)
        if runlog:
            runlog.finish({"status": "eval_only", "iter": start_iter, "train_loss": losses["train"],
                           "val_loss": losses["val"]})
        return {"train_loss": losses["train"], "val_loss": losses["val"], "run_log": runlog and runlog.path}

    groups = layer_groups(owner)
    # each step takes all its micro-batches at once, so the thread keeps up to two steps' worth ready
    batches = train_batches(task, start_iter, cfg.max_iters, local_ga, device, first_micro=d.rank * local_ga,
                            num_workers=cfg.dataloader_num_workers, use_dataloader=cfg.use_dataloader,
                            prefetch=2 * local_ga)
    total_tokens = 0
    t_start = time.time()
    status, error, last_losses, per_rank = "failed", None, None, None  # "completed" only once max_iters is reached
    bar = tqdm(total=cfg.max_iters, initial=start_iter, dynamic_ncols=True,
               disable=not (d.master and sys.stderr.isatty()))
    say = tqdm.write if not bar.disable else log
    try:
        if start_iter == 0:
            run_eval(0)
        model.train()
        for it in range(start_iter, cfg.max_iters):
            t0 = time.time()
            if d.heartbeat:
                d.heartbeat.step = it + 1
            lr = lr_at(it, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            t_data = time.time()
            micro = [next(batches) for _ in range(local_ga)]
            data_wait = time.time() - t_data  # host time spent waiting for batches: near 0 while prefetch keeps up
            # each micro-batch counts by its weight (tokens or pairs) in the mean over the whole iteration, every
            # rank included; varying weights are summed on the device, so this costs no host sync
            weights = [task.weight(b) for b in micro]
            if task.static_weights:
                total_w = sum(weights) * d.world_size
            else:
                total_w = D.all_reduce_sum(torch.stack([torch.as_tensor(w, device=device) for w in weights])
                                           .sum().float())
            acc = torch.zeros(1 + len(task.metric_names), device=device)  # loss, metrics: weighted sums
            real = torch.zeros((), device=device)
            for m, b in enumerate(micro):
                if cfg.use_cuda_graphs:  # the last replay's outputs have been consumed: its buffers may be reused
                    torch.compiler.cudagraph_mark_step_begin()
                share = weights[m] / total_w
                with D.grad_sync(model, m == local_ga - 1):
                    with ctx:
                        loss, metrics = task.loss(model, b)
                    acc += share * torch.stack([loss.detach().float(),
                                                *[metrics[n].detach().float() for n in task.metric_names]])
                    scaler.scale(loss * (share * d.world_size)).backward()  # DDP and FSDP average over ranks
                real += task.tokens(b)
            tokens = sum(v.numel() for b in micro for k, v in b.items() if k.endswith("input_ids") or
                         k.endswith("_ids"))  # processed, padding included: what the FLOPs are spent on
            scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(owner.parameters(), cfg.grad_clip or float("inf"))
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            # the mean over every micro-batch of every rank, the norm, and whether any rank was asked to stop, in
            # one sync per step
            flags = torch.tensor([stop.signum is not None, stop.signum is not None and D.launcher_gone(), tokens],
                                 dtype=torch.float32, device=device)
            loss_val, *metric_vals, norm_val, stops, orphans, tokens, real = D.all_reduce_sum(
                torch.cat([acc, (norm.float() / d.world_size).view(1), flags, real.float().view(1)])).tolist()
            total_tokens += real
            iter_num = it + 1
            if scaler.is_enabled() and not math.isfinite(norm_val) and math.isfinite(loss_val):
                health.flag(iter_num, "fp16_overflow", "float16 gradients overflowed; the step was skipped")
                norm_for_health = None
            else:
                norm_for_health = norm_val
            try:
                health.check(iter_num, loss_val, norm_for_health, (last_ckpt, last_val), best_ckpt)
            except TrainingDiverged:
                record("health", {"iter": iter_num, "kind": "diverged", "loss": loss_val,
                                  "nonfinite_grads": nonfinite_grads(owner)})
                raise
            if cfg.gradient_log_interval and iter_num % cfg.gradient_log_interval == 0:
                norms = grad_norms_by_layer(owner, groups)
                record("gradient_norms", {"iter": iter_num, "norms": norms})
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if per_rank is None:  # after the first step, when the optimizer state exists
                per_rank = {"param_bytes": D.all_gather_objects(D.local_bytes(owner.parameters())),
                            "optimizer_state_bytes": D.all_gather_objects(D.optimizer_state_bytes(optimizer))}
                D.set_timeout(cfg.dist_timeout_minutes)  # start-up and first compilation are behind us
            dt = time.time() - t0
            bar.update(1)
            if iter_num % cfg.log_interval == 0 or iter_num == cfg.max_iters:
                tps = tokens / dt
                m = mfu(flops_per_token, tps / d.world_size, peak)
                mem_a = torch.cuda.memory_allocated() / 1e9 if dev_type == "cuda" else None
                mem_r = torch.cuda.memory_reserved() / 1e9 if dev_type == "cuda" else None
                record("training_iterations", {
                    "iter": iter_num, "loss": loss_val, "lr": lr, "grad_norm": norm_val,
                    "dt_ms": dt * 1000, "data_wait_ms": data_wait * 1000, "tokens_per_sec": tps,
                    "tokens_per_sec_per_device": tps / d.world_size,
                    "mfu": m, "memory_allocated_gb": mem_a, "memory_reserved_gb": mem_r,
                    **post_training_record(cfg.objective, loss_val, lr, total_tokens, real / dt / d.world_size,
                                           dict(zip(task.metric_names, metric_vals)))})
                say(f"iter {iter_num}: loss {loss_val:.4f}, lr {lr:.3e}, grad norm {norm_val:.3f}, "
                    f"{dt * 1000:.1f} ms, {tps:,.0f} tok/s" + (f" ({tps / d.world_size:,.0f}/device)"
                                                              if d.world_size > 1 else "")
                    + (f", mfu {m * 100:.1f}%" if m is not None else "")
                    + (f", mem {mem_a:.2f}/{mem_r:.2f} GB" if mem_a is not None else ""))
            if iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters:
                last_losses, improved = run_eval(iter_num)
                if improved or cfg.always_save_checkpoint:
                    checkpoint(iter_num)
            if stops:
                if last_ckpt != checkpoint_path(cfg.out_dir, iter_num):
                    checkpoint(iter_num)
                status = "preempted"
                log(f"stopping at iter {iter_num} on request (signal {stop.signum or 'on another rank'}); resume "
                    "with --init_from=resume")
                if orphans:  # exit non-zero, so that the launchers still alive end the job now
                    raise D.RankFailure(f"the torchrun launcher of {orphans:.0f} rank(s) died; every rank saved "
                                        f"checkpoint {last_ckpt} and stopped; resume with --init_from=resume",
                                        everywhere=True)
                break
        else:  # no stop request: max_iters reached
            status = "completed"
    except BaseException as e:  # a second Ctrl-C, a lost rank, a full disk: the log says what ended the run
        failure = D.explain(e, d) if isinstance(e, Exception) else None
        error = {"type": type(failure or e).__name__, "message": str(failure or e)}
        if isinstance(e, TrainingDiverged):
            status = "diverged"
            log(f"error: {e}")
        if failure:
            raise failure from e
        raise
    finally:
        batches.close()
        bar.close()
        if runlog:
            runlog.finish(summarize(runlog, status, error, start_iter, best_val, last_losses, time.time() - t_start,
                                    health, per_rank))
    return {"best_val_loss": best_val, "final": last_losses, "run_log": runlog and runlog.path,
            "checkpoint": last_ckpt, "per_rank": per_rank}


def post_training_record(objective, loss, lr, total_tokens, per_device_tps, metrics):
    """The extra fields SFT and DPO runs log, under the names TRL and open-instruct users look for."""
    if objective == "sft":
        return {"train_loss": loss, "learning_rate": lr, "total_tokens": total_tokens,
                "per_device_tps": per_device_tps}
    if objective == "dpo":
        return {"learning_rate": lr, "total_tokens": total_tokens, "per_device_tps": per_device_tps, **metrics}
    return {}


def summarize(runlog, status, error, start_iter, best_val, last_losses, wall, health, per_rank):
    iters = runlog.doc["training_iterations"]
    steady = [r for r in iters[len(iters) // 10:] if r["iter"] > start_iter] or iters
    mean = lambda k: (sum(r[k] for r in steady) / len(steady)  # noqa: E731
                      if steady and steady[0].get(k) is not None else None)
    return {
        "status": status, "error": error, "final_iter": iters[-1]["iter"] if iters else start_iter,
        "best_val_loss": best_val,
        "final_train_loss": last_losses["train"] if last_losses else None,
        "final_val_loss": last_losses["val"] if last_losses else None,
        "wall_time_sec": wall, "mean_tokens_per_sec": mean("tokens_per_sec"),
        "mean_tokens_per_sec_per_device": mean("tokens_per_sec_per_device"), "mean_mfu": mean("mfu"),
        "per_rank_bytes": per_rank, "health_flags": health.flags,
    }


@record_errors
def cli(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(help_text())
        return 0
    try:
        cfg = parse_args(argv)
        main(cfg)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (TrainingDiverged, D.RankFailure):  # already reported
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C
        print("interrupted; the run log says failed; resume from the newest checkpoint with --init_from=resume",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(cli())
