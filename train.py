"""
Train a GPT on memory-mapped token bins: one process on CPU or one GPU, or many under torchrun.

    python train.py config/train_shakespeare_char.py --max_iters=2000 --batch_size=32
    python train.py config/train_shakespeare_char.py --init_from=resume --eval_only=True
    torchrun --standalone --nproc_per_node=8 train.py config/full_llama3_1.5b_optimal.py --use_zero1=True
    python train.py --help

Config files and --key=value overrides apply left to right over the schema in engine/config.py. One loop serves
every objective (pretrain, sft, dpo); an objective is a task in engine/objectives.py: a batch source and a loss.
The phases of a run are the functions below, in the order run() calls them.
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
from contextlib import contextmanager, nullcontext

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
    load_model_state,
    load_state,
    save_checkpoint,
    state_tensors,
)
from engine.config import MODEL_KEYS, ConfigError, config_dict, help_text, parse_args
from engine.data.bins import DataError, TokenDataset, resolve_dataset_dir, to_device, train_batches
from engine.data.chat import chat_spec
from engine.data.tokenizers import resolve_tokenizer
from engine.evals import check_task, evaluate_tasks, load_task
from engine.health import HealthMonitor, TrainingDiverged
from engine.losses import loss_chunk_size
from engine.objectives import DPOTask, PretrainTask, SFTTask
from engine.optim import describe, lr_at, make_optimizer
from engine.plan import GB, config_mode, estimate, free_memory, keep_global_batch, largest_batch
from engine.rundir import claim
from engine.runlog import (
    MFU_CONVENTION,
    RunLog,
    device_name,
    finite_or_none,
    git_state,
    log_to_continue,
    lookup_peak_flops,
    mfu,
    new_log_path,
    process_memory,
)
from engine.step import forward_backward, optimizer_step
from model import GPT, PRESETS, ModelConfig

# ----------------------------------------------------------------------------------------------------------
# set-up: where the run computes, where it starts, what it trains on


@dataclasses.dataclass(frozen=True)
class Hardware:
    device: str  # "cpu", "cuda:3", ...
    type: str  # cpu | cuda | mps
    dtype: str  # float32 | bfloat16 | float16: what the forward computes in
    ctx: object  # the autocast context of that dtype (a null context for float32, and for FSDP's own casting)
    backend: str  # the attention backend resolved from attention_backend=auto or checked as asked
    backend_reason: str | None  # why, where auto chose
    dtype_reason: str = "as configured"  # why this dtype, where dtype=auto chose


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
    dtype, dtype_reason = cfg.dtype, "as configured"
    if dtype == "auto":
        dtype, dtype_reason = auto_dtype(dev_type)
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
    if dev_type == "cuda":  # the tensor cores for what float32 matmuls remain (all of them under dtype=float32)
        torch.set_float32_matmul_precision("high" if cfg.allow_tf32 else "highest")
        torch.backends.cudnn.allow_tf32 = cfg.allow_tf32
        if dtype == "float32":
            dtype_reason += "; TF32 matmuls" if cfg.allow_tf32 else "; full float32 matmuls (allow_tf32=False)"
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    # FSDP casts parameters itself (MixedPrecisionPolicy), so autocast is only for the other modes
    plain = dtype == "float32" or (cfg.use_fsdp and dev_type == "cuda" and dtype == "bfloat16")
    ctx = nullcontext() if plain else torch.autocast(device_type=dev_type, dtype=ptdtype)
    try:
        backend, reason = resolve_backend(cfg.attention_backend, dev_type, dtype)
    except (ValueError, RuntimeError) as e:
        raise ConfigError(str(e)) from None
    return Hardware(device, dev_type, dtype, ctx, backend, reason, dtype_reason)


def cpu_bf16_isa():
    """The instructions by which this CPU computes bfloat16 natively (AMX tiles, or AVX512-BF16), or None: without
    them a bfloat16 matmul is emulated through float32 and runs slower than float32 itself. Read through torch's own
    CPU feature checks (torch.cpu, private but present from torch 2.1 on)."""
    if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
        return "AMX"
    if getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "AVX512-BF16"
    return None


def auto_dtype(dev_type):
    """(dtype, why) for dtype=auto: bfloat16 autocast where the device computes it natively, float32 elsewhere."""
    if dev_type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bfloat16", "auto: this GPU computes bfloat16"
        return "float32", "auto: this GPU has no bfloat16; float16 needs dtype=float16 explicitly"
    if dev_type == "cpu":
        isa = cpu_bf16_isa()
        if isa:
            return "bfloat16", f"auto: this CPU computes bfloat16 natively ({isa}); autocast, float32 weights"
        return "float32", ("auto: this CPU has neither AMX nor AVX512-BF16, so bfloat16 would be emulated and slower "
                           "than float32")
    return "float32", f"auto: float32 on {dev_type}"


def check_layout(cfg, d):
    """The micro-batches of a step per rank, once the layout of the job is checked."""
    if cfg.gradient_accumulation_steps % d.world_size:
        raise ConfigError(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} counts the micro-batches "
                          f"of the whole job and must be divisible by the world size {d.world_size}")
    if (cfg.use_fsdp or cfg.use_zero1) and not d.enabled:
        raise ConfigError("use_fsdp and use_zero1 shard across the ranks of a torchrun job; launch with torchrun "
                          "(torchrun --standalone --nproc_per_node=N train.py ...), N=1 included")
    local_ga = cfg.gradient_accumulation_steps // d.world_size
    check_micro_steps(cfg, local_ga)
    return local_ga


def check_micro_steps(cfg, micro_steps):
    """CUDA graphs and gradient accumulation do not mix: the first micro-step's gradients live in the replayed
    graph's memory pool, and the next replay overwrites them before backward adds to them (pytorch/pytorch#169545)."""
    if cfg.use_cuda_graphs and micro_steps > 1:
        raise ConfigError(f"use_cuda_graphs with {micro_steps} micro-steps per rank and step: gradients of one replay "
                          "would be overwritten by the next; make gradient_accumulation_steps equal to the number of "
                          "GPUs (raise batch_size instead), or use compile=True without CUDA graphs")


@dataclasses.dataclass(frozen=True)
class Start:
    """Where a run starts, decided once from init_from."""

    kind: str  # scratch | resume (this out_dir's newest checkpoint) | checkpoint (one of ours: its weights) | hf
    path: str | None = None  # the checkpoint folder, or the transformers directory
    meta: dict | None = None  # the checkpoint's meta.pt (resume, checkpoint)

    @property
    def saved_config(self):
        return (self.meta or {}).get("config") or {}


def find_start(cfg, log):
    if cfg.init_from == "scratch":
        return Start("scratch")
    if cfg.init_from == "resume":
        path, meta = find_latest(cfg.out_dir, warn=log)
        log(f"resuming from {path} (iteration {meta['iter_num']})")
        return Start("resume", path, meta)
    if not os.path.isdir(cfg.init_from):
        raise ConfigError(f"init_from={cfg.init_from!r} is not scratch, resume, one of our checkpoints, or a local "
                          "transformers checkpoint directory")
    ours = our_checkpoint(cfg.init_from)
    return Start("checkpoint", ours, load_meta(ours)) if ours else Start("hf", cfg.init_from)


def text_source(cfg, start):
    """(dataset folder, vocabulary, tokenizer): pretraining reads token bins, whose meta.json sizes the vocabulary;
    SFT and DPO read text, so they need a tokenizer: the one named, else a transformers start's own, else the one
    the starting checkpoint's run used (or its data was made with)."""
    if cfg.objective == "pretrain":
        data_dir = resolve_dataset_dir(cfg.dataset)
        return data_dir, TokenDataset(data_dir, check_ids=False).vocab_size, None
    try:
        tok = resolve_tokenizer(cfg.tokenizer, cfg.tokenizer_path, hf_dir=start.path if start.kind == "hf" else None,
                                saved=start.saved_config)
    except (ValueError, KeyError, FileNotFoundError, OSError) as e:
        raise ConfigError(f"objective={cfg.objective} needs a tokenizer: {e}") from e
    return None, tok.tok.vocab_size, tok


def our_checkpoint(path):
    """init_from may name one of our checkpoints, or a run's out_dir (its newest checkpoint): that folder, else None."""
    if os.path.isfile(os.path.join(path, "meta.pt")):
        return path
    found = list_checkpoints(path)
    return found[-1] if found else None


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
    vocab = over.get("vocab_size", base.get("vocab_size"))
    try:
        return ModelConfig(**{**base, **over, "attention_backend": backend,
                              "loss_chunk_size": loss_chunk_size(cfg.loss_chunk_size, vocab)})
    except ValueError as e:
        raise ConfigError(str(e)) from None


def build_model(cfg, vocab, backend, start):
    """A fresh model (weights still to load from a checkpoint); resumed, fine-tuned and transformers models keep
    their architecture and take only this run's settings of how to compute (backend, loss chunks, dropout)."""
    if start.kind == "scratch":
        return GPT(model_config(cfg, vocab, backend))
    run = {"attention_backend": backend}
    if cfg.dropout is not None:
        run["dropout"] = cfg.dropout
    if start.meta is not None:
        mc = start.meta["model_config"]
        return GPT(ModelConfig.from_dict({**mc, **run,
                                          "loss_chunk_size": loss_chunk_size(cfg.loss_chunk_size, mc["vocab_size"])}))
    try:
        model = GPT.from_hf(start.path, **run)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"init_from={start.path}: {e}") from e
    model.config = dataclasses.replace(model.config, loss_chunk_size=loss_chunk_size(cfg.loss_chunk_size,
                                                                                     model.config.vocab_size))
    return model


def check_memory(cfg, model, T, device, dtype, d, available=None):
    """engine/plan.py's per-rank estimate of one step of this run (T: the longest row a batch can hold), with the
    memory it is measured against: {"parts", "total", ..., "available"}. A run whose estimate exceeds that memory is
    refused, naming the largest micro-batch that would fit, unless skip_memory_check. The memory is what `device`
    has free now (`available` where given) plus what the model already holds there, the least over the ranks so
    that all decide alike; on CPU the ranks of one host share its RAM."""
    dev = torch.device(device)
    est = estimate(cfg, model, d.world_size, T, dtype, device_type=dev.type)
    est["block_size"] = T
    here = lambda t: t.device.type == dev.type  # noqa: E731  (a model on the meta device holds nothing)
    resident = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()] if here(t))
    host = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if dev.type == "cpu" else 1  # ranks sharing this memory
    free = free_memory(device) if available is None else available
    if d.world_size > 1:
        free = min((a for a in D.all_gather_objects(free) if a is not None), default=None)
    usable = None if free is None else free / host + resident  # per rank
    est["available"] = usable
    if usable is None or est["total"] <= usable or cfg.skip_memory_check:
        return est
    b = largest_batch(cfg, model, d.world_size, T, dtype, usable, margin=0.0, device_type=dev.type)
    rows = cfg.batch_size * cfg.gradient_accumulation_steps
    b, ga = keep_global_batch(rows, b, d.world_size)
    fixes = [f"batch_size={b} with gradient_accumulation_steps={ga} fits and keeps the rows per step" if b else
             "lower batch_size or block_size (more gradient_accumulation_steps keep the tokens per step)"]
    if est["parts"]["batches"] > usable / 2:
        fixes.insert(0, "lower gradient_accumulation_steps or batch_size (a step takes all its micro-batches at once)")
    if not cfg.activation_checkpointing and not cfg.eval_only:
        fixes.append("activation_checkpointing=True")
    if not model.config.loss_chunk_size and cfg.objective != "dpo":
        fixes.append("loss_chunk_size=1024")
    state = sum(est["parts"].get(k, 0) for k in ("params", "grads", "optimizer"))
    if config_mode(cfg) != "fsdp" and not cfg.eval_only and state > est["total"] / 3:
        fixes.append("shard the state over more GPUs (use_zero1 or use_fsdp under torchrun)")
    raise ConfigError(f"one step needs about {est['total'] / GB:,.2f} GB per rank on {device} by engine/plan.py's "
                      f"estimate ({parts_text(est)}) but {usable / GB:,.2f} GB is free for it"
                      + (f" (the host's free memory shared by {host} ranks)" if host > 1 else "") + "; "
                      + ", or ".join(fixes) + "; --skip_memory_check=True runs it anyway")


def parts_text(est):
    return ", ".join(f"{k} {v / GB:,.2f}" for k, v in est["parts"].items() if v)


def make_task(cfg, mc, T, data_dir, tok, log):
    if cfg.objective == "pretrain":
        return PretrainTask(cfg, TokenDataset(data_dir, vocab_limit=mc.vocab_size), T)
    if tok.vocab_size > mc.vocab_size:
        raise ConfigError(f"tokenizer {tok.name} has {tok.vocab_size} ids but the model only {mc.vocab_size} rows; "
                          "use the model's own tokenizer")
    max_len = cfg.max_seq_length or T
    if max_len > mc.block_size:
        raise ConfigError(f"max_seq_length={max_len} exceeds the model's limit of {mc.block_size} positions")
    try:
        fmt = chat_spec(tok, cfg.chat_format, cfg.enable_thinking, cfg.chat_learn_newline)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    log(f"chat format: {fmt}")
    return (SFTTask if cfg.objective == "sft" else DPOTask)(cfg, tok, max_len, log, fmt)


def downstream_tasks(cfg, data_dir, tok, mc):
    """(tokenizer, {task: items}) of eval_tasks, read once at start, or (None, None). Pretraining runs take the
    tokenizer their dataset was made with (or --tokenizer)."""
    if not cfg.eval_tasks:
        return None, None
    names = [n.strip() for n in cfg.eval_tasks.split(",") if n.strip()]
    try:
        for name in names:
            check_task(name)
        if tok is None:
            tok = resolve_tokenizer(cfg.tokenizer or data_dir, cfg.tokenizer_path if cfg.tokenizer else None)
    except (ValueError, OSError) as e:
        raise ConfigError(f"eval_tasks: {e}") from e
    if tok.tok.vocab_size > mc.vocab_size:
        raise ConfigError(f"eval_tasks: tokenizer {tok.name} has {tok.tok.vocab_size} ids but the model only "
                          f"{mc.vocab_size} rows; give the run the tokenizer its data was made with (--tokenizer)")
    where = lambda name: os.path.join(cfg.eval_tasks_dir, f"{name}.jsonl") if cfg.eval_tasks_dir else None
    return tok.tok, {n: load_task(n, where(n), cfg.eval_tasks_max_examples, cfg.seed) for n in names}


def settle_config(cfg, task, tok, mc, log):
    """The run's config as resolved, the one place it changes: the tokenizer found (recorded, so that later tools
    find it), SFT/DPO's chat format, the loss chunks the vocabulary chose, and max_iters from num_train_epochs."""
    changes = {"tokenizer": tok.name, "tokenizer_path": tok.path} if tok else {}
    changes["loss_chunk_size"] = mc.loss_chunk_size
    if getattr(task, "chat", None):  # SFT and DPO record the format they rendered (sample.py --chat renders it)
        changes["chat_format"] = task.chat.name
    if task.iters_per_epoch and cfg.num_train_epochs:
        changes["max_iters"] = max(1, math.ceil(cfg.num_train_epochs * task.iters_per_epoch))
        log(f"{cfg.num_train_epochs} epochs of {task.iters_per_epoch} iterations: max_iters={changes['max_iters']}")
    return dataclasses.replace(cfg, **changes)


def restore(start, cfg, d, hw, owner, optimizer, scaler, T, log):
    """Load a resumed run's weights, optimizer, scaler and random state: (the checkpoint used, its iteration, its
    best val loss). Tensors that cannot be read (no checksums caught it) fall back to an older checkpoint."""
    if start.kind != "resume":
        return start, 0, float("inf")
    while True:
        try:
            load_state(start.path, owner, optimizer)
            break
        except DamagedCheckpoint as e:
            log(f"warning: {e}; trying an older checkpoint")
            path, meta = find_latest(cfg.out_dir, warn=log, before=start.meta["iter_num"])
            start = Start("resume", path, meta)
            log(f"resuming from {path} (iteration {meta['iter_num']})")
    meta = start.meta
    scaler.load_state_dict(meta["scaler"])
    rng = meta["rng"]
    if len(rng["torch"]) == d.world_size:
        torch.set_rng_state(rng["torch"][d.rank])
        if hw.type == "cuda" and rng["cuda"]:
            torch.cuda.set_rng_state(rng["cuda"][d.rank])
    else:  # another world size: dropout streams cannot carry over, so start fresh ones deterministically
        torch.manual_seed(cfg.seed + 1000003 * meta["iter_num"] + d.rank)
    saved = meta["data"]
    ga = cfg.gradient_accumulation_steps
    if (saved["batch_size"], saved["block_size"], saved["gradient_accumulation_steps"]) != (cfg.batch_size, T, ga):
        log(f"warning: the checkpoint was trained with batch_size={saved['batch_size']}, block_size="
            f"{saved['block_size']}, gradient_accumulation_steps={saved['gradient_accumulation_steps']}; "
            "the data from here on differs from what the original run would have seen")
    return start, meta["iter_num"], meta["best_val_loss"]


def environment(cfg, d, hw, model, T, data_dir):
    """What the run log records of where and how the run computes."""
    mc = model.config
    dev_name = device_name(hw.device)
    commit, dirty = git_state() if d.master else (None, None)
    return {
        "torch_version": torch.__version__, "python_version": platform.python_version(), "device": hw.device,
        "device_name": dev_name, "world_size": d.world_size, "dtype": hw.dtype, "attention_backend": hw.backend,
        "attention_backend_reason": hw.backend_reason, "dtype_reason": hw.dtype_reason,
        "git_commit": commit, "git_dirty": dirty,
        "mfu_convention": MFU_CONVENTION,
        "peak_flops": cfg.peak_flops if cfg.peak_flops is not None else (lookup_peak_flops(dev_name)
                                                                         if hw.type == "cuda" else None),
        "model_config": mc.to_dict(), "num_params": model.num_params(), "flops_per_token": model.flops_per_token(T),
        "tokens_per_iter": cfg.batch_size * T * cfg.gradient_accumulation_steps * (2 if cfg.objective == "dpo"
                                                                                   else 1),  # at most, with padding
        "block_size": T, "dataset_dir": data_dir, "init_from": cfg.init_from,
        "memory": ("memory_allocated_gb / memory_reserved_gb: torch.cuda.memory_allocated / memory_reserved"
                   if hw.type == "cuda" else "memory_allocated_gb / memory_reserved_gb: the process's resident set "
                   "size now / its peak (no device allocator on " + hw.type + ")"),
        "parallelism": "fsdp" if cfg.use_fsdp else "zero1" if cfg.use_zero1 else "ddp" if d.world_size > 1
        else "single",
    }


def open_run_log(cfg, d, resolved, env, mc, start, log):
    """Rank 0's run log: the one this run continues (a resume), else a new one; an eval_only run writes a log of its
    own and leaves config.json to the training run, which may still be running. None on the other ranks."""
    if not d.master:
        return None
    if cfg.eval_only:
        try:
            os.makedirs(cfg.out_dir, exist_ok=True)
            return RunLog(new_log_path(cfg.out_dir), resolved, env, warn=log)
        except OSError as e:
            log(f"out_dir {cfg.out_dir} is not writable ({e.strerror}); evaluating without writing a run log")
            return None
    with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
        json.dump(finite_or_none({"config": resolved, "model_config": mc.to_dict()}), f, indent=2)
    resumed = start.meta if start.kind == "resume" else None
    run_path, previous = log_to_continue(cfg.out_dir, (resumed or {}).get("run_log"), warn=log)
    return RunLog(run_path or new_log_path(cfg.out_dir), resolved, env, previous,
                  resumed["iter_num"] if resumed else 0, warn=log)


# ----------------------------------------------------------------------------------------------------------
# the loop's state, and the phases of one iteration


@dataclasses.dataclass
class Job:
    """The pieces of a run once built, which the phases below share."""

    cfg: object
    d: D.Dist
    hw: Hardware
    model: torch.nn.Module  # what runs forward (wrapped by DDP or FSDP, compiled)
    owner: torch.nn.Module  # what holds the parameters
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    task: object
    T: int
    tasks: dict | None  # downstream tasks {name: items} (eval_tasks), and the tokenizer that scores them
    task_tok: object
    local_ga: int  # micro-batches per rank and step
    env: dict
    resolved: dict  # the config as recorded
    runlog: RunLog | None
    health: HealthMonitor
    log: object

    def record(self, kind, rec):
        if self.runlog:
            self.runlog.add(kind, rec)


@dataclasses.dataclass
class Progress:
    """What the loop knows of its evaluations and checkpoints; evaluating and saving update it."""

    start_iter: int
    best_val: float
    last_ckpt: str | None  # the newest checkpoint, written or resumed from
    last_val: float | None  # its val loss
    best_ckpt: tuple | None  # (path, val loss) of the best checkpoint kept
    evaluated: tuple = (None, None)  # (iteration, val loss) of the latest evaluation
    last_losses: dict | None = None
    total_tokens: float = 0.0  # real tokens trained on since the start of this process
    last_end: float = 0.0  # when the last step read ended on the device, as the host saw it
    per_rank: dict | None = None  # bytes of parameters and optimizer state of each rank, after the first step
    status: str = "failed"  # "completed" once max_iters is reached; "preempted" when stopped on request


@torch.no_grad()
def evaluate(model, task, cfg, ctx, device, d):
    """Weighted mean loss (and the task's metrics) over eval_iters fixed batches per split, dealt round-robin across
    ranks. Every rank runs the same number of forward passes (FSDP's collectives need that); fillers weigh zero.
    A task without val examples (SFT or DPO with val_fraction=0) reports val and its metrics as None. Pretraining also
    reports bits per byte (train_bpb, val_bpb), None where the data's token byte lengths are unknown."""
    model.eval()
    out = {"val": None, "train_bpb": None, "val_bpb": None, **{f"val_{n}": None for n in task.metric_names}}
    bpb = getattr(task, "bpb_sums", None)
    per_rank = math.ceil(cfg.eval_iters / d.world_size)
    for split in task.eval_splits:
        # weight, loss*weight, metric*weight..., nats, bytes
        acc = torch.zeros(4 + len(task.metric_names), device=device)
        for j in range(per_rank):
            k = d.rank + j * d.world_size
            b = to_device(task.eval_batch(split, k % cfg.eval_iters), device)
            with ctx:
                loss, metrics = task.loss(model, b)
                sums = bpb(model, b, loss) if bpb else None
            w = float(task.weight(b)) if k < cfg.eval_iters else 0.0
            acc[:-2] += w * torch.stack([torch.ones((), device=device), loss.float().detach(),
                                         *[metrics[n].float() for n in task.metric_names]])
            if sums is not None and w:
                acc[-2:] += sums
        acc = D.all_reduce_sum(acc).tolist()
        out[split] = acc[1] / acc[0]
        if split == "val":
            out.update({f"val_{n}": v / acc[0] for n, v in zip(task.metric_names, acc[2:-2])})
        if acc[-1]:
            out[f"{split}_bpb"] = acc[-2] / acc[-1] / math.log(2)
    model.train()
    return out


def run_eval(job, prog, iter_num):
    """Evaluate, log and record; returns (losses, whether val improved on the best so far)."""
    losses = evaluate(job.model, job.task, job.cfg, job.hw.ctx, job.hw.device, job.d)
    extra = {k: v for k, v in losses.items() if k.startswith("val_")}
    val = losses["val"]
    job.log(f"eval at iter {iter_num}: train loss {losses['train']:.4f}, "
            + (f"val loss {val:.4f}" if val is not None else "no val examples")
            + "".join(f", {k} {v:.4f}" for k, v in extra.items() if v is not None))
    job.record("evals", {"iter": iter_num, "train_loss": losses["train"], "val_loss": val,
                         "train_bpb": losses["train_bpb"], **extra})
    prog.evaluated = (iter_num, val)
    if val is None:  # nothing to judge by: every evaluation checkpoints, as always_save_checkpoint would
        return losses, True
    rising = job.health.check_val(iter_num, val, prog.best_val)
    if rising:
        job.record("health", rising)
    improved = val < prog.best_val
    prog.best_val = min(prog.best_val, val)
    return losses, improved


def run_task_evals(job, iter_num):
    """Score the downstream tasks (engine/evals.py), log a line and record it under task_evals."""
    # the module that holds the parameters: DDP's wrapper would sync nothing here, and compiled graphs would
    # recompile for every sequence length
    res = evaluate_tasks(job.owner, job.task_tok, job.tasks, job.hw.device, job.hw.ctx, job.cfg.batch_size)
    job.log(f"task evals at iter {iter_num}: " + ", ".join(
        f"{n} {r.get('acc_norm', r['acc']):.4f}" for n, r in res.items() if n != "core") + f"; core {res['core']:.4f}")
    job.record("task_evals", {"iter": iter_num, **res})
    return res


def save(job, prog, iter_num):
    cfg, d = job.cfg, job.d
    val = finite_or_none(prog.evaluated[1]) if prog.evaluated[0] == iter_num else None  # of these very weights
    rng_cpu = D.all_gather_objects(torch.get_rng_state())
    rng_cuda = D.all_gather_objects(torch.cuda.get_rng_state()) if job.hw.type == "cuda" else []
    meta = {
        "iter_num": iter_num, "val_loss": val, "best_val_loss": prog.best_val, "scaler": job.scaler.state_dict(),
        "rng": {"torch": rng_cpu, "cuda": rng_cuda},
        "data": {"seed": cfg.seed, "next_iter": iter_num, "batch_size": cfg.batch_size, "block_size": job.T,
                 "gradient_accumulation_steps": cfg.gradient_accumulation_steps, "world_size": d.world_size},
        "config": job.resolved, "model_config": job.env["model_config"],
        "run_log": job.runlog and os.path.basename(job.runlog.path),
        "reference_key": getattr(job.task, "key", None),
    }
    if job.runlog:  # the log first, so that it always reaches at least as far as the newest checkpoint
        job.runlog.flush()
    prog.last_ckpt = save_checkpoint(state_tensors(job.owner, job.optimizer), meta, cfg.out_dir, iter_num,
                                     cfg.keep_last_n_checkpoints)
    prog.last_val = val
    if val is not None and (prog.best_ckpt is None or val <= prog.best_ckpt[1]):
        prog.best_ckpt = (prog.last_ckpt, val)
    job.log(f"saved checkpoint {prog.last_ckpt}")


@dataclasses.dataclass
class Launched:
    """A step whose kernels are queued, and what its log record needs besides its numbers."""

    iter: int
    pending: object  # engine/step.py's PendingStep
    lr: float
    t0: float  # when its iteration began
    data_wait: float
    result: object = None  # its StepResult, once read and checked


def check_step(job, prog, s):
    """Read a step's numbers (waiting for them if need be) and run the health checks on them; returns its
    StepResult."""
    if s.result is None:
        s.result = step = s.pending.result()
        prog.total_tokens += step.real_tokens
        check_health(job, prog, s.iter, step)
    return s.result


def finish(job, prog, s):
    """check_step, then report: a step read, checked and logged."""
    result = check_step(job, prog, s)
    report(job, prog, s)
    return result


def report(job, prog, s):
    """A checked step's time and its log record. Its time runs from the later of its iteration's start and the end
    of the step before (the host starts an iteration while the device still runs the previous step's kernels)."""
    end = s.pending.end
    dt = end - max(s.t0, prog.last_end)
    prog.last_end = end
    if s.iter % job.cfg.log_interval == 0 or s.iter == job.cfg.max_iters:
        log_step(job, prog, s.iter, s.result, s.lr, dt, s.data_wait)


def check_health(job, prog, iter_num, step):
    norm = step.grad_norm
    if job.scaler.is_enabled() and not math.isfinite(norm) and math.isfinite(step.loss):
        job.health.flag(iter_num, "fp16_overflow", "float16 gradients overflowed; the step was skipped")
        norm = None
    try:
        job.health.check(iter_num, step.loss, norm, (prog.last_ckpt, prog.last_val), prog.best_ckpt)
    except TrainingDiverged:
        job.record("health", {"iter": iter_num, "kind": "diverged", "loss": step.loss,
                              "nonfinite_grads": step.nonfinite_grads})
        raise


def log_step(job, prog, iter_num, step, lr, dt, data_wait):
    w, dev_type = job.d.world_size, job.hw.type
    tps = step.tokens / dt
    m = mfu(job.env["flops_per_token"], tps / w, job.env["peak_flops"])
    if dev_type == "cuda":
        mem_a, mem_r = torch.cuda.memory_allocated() / 1e9, torch.cuda.memory_reserved() / 1e9
    else:  # no device allocator to ask: the process's resident memory now, and its peak (environment.memory)
        mem_a, mem_r = (b / 1e9 for b in process_memory())
    job.record("training_iterations", {
        "iter": iter_num, "loss": step.loss, "lr": lr, "grad_norm": step.grad_norm,
        "dt_ms": dt * 1000, "data_wait_ms": data_wait * 1000, "tokens_per_sec": tps,
        "tokens_per_sec_per_device": tps / w,
        "mfu": m, "memory_allocated_gb": mem_a, "memory_reserved_gb": mem_r,
        **post_training_record(job.cfg.objective, step.loss, lr, prog.total_tokens, step.real_tokens / dt / w,
                               step.metrics)})
    job.log(f"iter {iter_num}: loss {step.loss:.4f}, lr {lr:.3e}, grad norm {step.grad_norm:.3f}, "
        f"{dt * 1000:.1f} ms, {tps:,.0f} tok/s" + (f" ({tps / w:,.0f}/device)" if w > 1 else "")
        + (f", mfu {m * 100:.1f}%" if m is not None else "")
        + f", mem {mem_a:.2f}/{mem_r:.2f} GB")


def train(job, prog, stop):
    """Iterations from prog.start_iter to max_iters, evaluating and checkpointing on schedule; a stop request ends
    the loop after a checkpoint of the current step.

    With defer_step_stats a step's numbers (loss, gradient norm, the stop flags) are read and checked once the next
    step is launched, so the host never waits for the device mid-loop; they are read at once where something
    depends on them before the update or this iteration (an evaluation, a checkpoint, gradient norms, the first
    step, the last). Either way each step is checked and logged with the same numbers."""
    cfg, d, task = job.cfg, job.d, job.task
    groups = layer_groups(job.owner)
    # each step takes all its micro-batches at once, so the thread keeps up to two steps' worth ready
    batches = train_batches(task, prog.start_iter, cfg.max_iters, job.local_ga, job.hw.device,
                            first_micro=d.rank * job.local_ga, num_workers=cfg.dataloader_num_workers,
                            use_dataloader=cfg.use_dataloader, prefetch=2 * job.local_ga)
    bar = tqdm(total=cfg.max_iters, initial=prog.start_iter, dynamic_ncols=True,
               disable=not (d.master and sys.stderr.isatty()))
    pending = None  # the step launched last, not yet read (defer_step_stats)
    try:
        if prog.start_iter == 0:
            run_eval(job, prog, 0)
            if job.tasks:
                run_task_evals(job, 0)
        job.model.train()
        for it in range(prog.start_iter, cfg.max_iters):
            t0 = time.time()
            if d.heartbeat:
                d.heartbeat.step = it + 1
            lr = lr_at(it, cfg)
            for group in job.optimizer.param_groups:
                group["lr"] = lr * group["lr_ratio"]  # Muon's groups keep their own peak (engine/optim.py)
            t_data = time.time()
            micro = [next(batches) for _ in range(job.local_ga)]
            data_wait = time.time() - t_data  # host time spent waiting for batches: near 0 while prefetch keeps up
            # whether any rank was asked to stop, and whether its launcher is gone, travel in the step's one sync
            asked = stop.signum is not None
            iter_num = it + 1
            step = Launched(iter_num, forward_backward(
                job.model, job.owner, task, micro, job.hw.ctx, job.scaler, job.optimizer, cfg.grad_clip,
                d.world_size, cfg.use_cuda_graphs, flags=(asked, asked and D.launcher_gone())), lr, t0, data_wait)
            evaluating = iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters
            scoring = bool(job.tasks) and (iter_num % (cfg.eval_tasks_interval or cfg.eval_interval) == 0
                                           or iter_num == cfg.max_iters)
            norms = bool(cfg.gradient_log_interval) and iter_num % cfg.gradient_log_interval == 0
            checked = []
            if not cfg.defer_step_stats or evaluating or scoring or norms or prog.per_rank is None:
                if pending:  # read in order: the previous step first
                    checked.append(finish(job, prog, pending))
                    pending = None
                checked.append(check_step(job, prog, step))  # a non-finite step stops here, before its update
            if norms:
                job.record("gradient_norms", {"iter": iter_num, "norms": grad_norms_by_layer(job.owner, groups)})
            if prog.per_rank is None:  # the gradients, while they exist
                grads = D.all_gather_objects(D.local_bytes(p.grad for p in job.owner.parameters()
                                                           if p.grad is not None))
            optimizer_step(job.optimizer, job.scaler)
            step.pending.mark_end()
            if prog.per_rank is None:  # after the first step, when the optimizer state exists
                prog.per_rank = {"param_bytes": D.all_gather_objects(D.local_bytes(job.owner.parameters())),
                                 "grad_bytes": grads,
                                 "optimizer_state_bytes": D.all_gather_objects(D.optimizer_state_bytes(job.optimizer))}
                D.set_timeout(cfg.dist_timeout_minutes)  # start-up and first compilation are behind us
            bar.update(1)
            if pending:  # the previous step's kernels ran before this one's: reading it does not stall the device
                checked.append(finish(job, prog, pending))
            pending = step
            stops = sum(r.flags[0] for r in checked)
            if step.result is not None or stops:  # a stop saves this step: it is read now
                stops += finish(job, prog, step).flags[0]
                pending = None
            if evaluating:
                prog.last_losses, improved = run_eval(job, prog, iter_num)
                if improved or cfg.always_save_checkpoint:
                    save(job, prog, iter_num)
            if scoring:
                run_task_evals(job, iter_num)
            if stops:
                if prog.last_ckpt != checkpoint_path(cfg.out_dir, iter_num):
                    save(job, prog, iter_num)
                prog.status = "preempted"
                job.log(f"stopping at iter {iter_num} on request (signal {stop.signum or 'on another rank'}); resume "
                        "with --init_from=resume")
                orphans = max(r.flags[1] for r in checked + [step.result])
                if orphans:  # exit non-zero, so that the launchers still alive end the job now
                    raise D.RankFailure(f"the torchrun launcher of {orphans:.0f} rank(s) died; every rank saved "
                                        f"checkpoint {prog.last_ckpt} and stopped; resume with --init_from=resume",
                                        everywhere=True)
                return
        prog.status = "completed"
    finally:
        # a step that ended before a failure keeps its record, if its numbers can be read without waiting
        if pending is not None and pending.result is None and pending.pending.ready():
            try:
                finish(job, prog, pending)
            except Exception:  # noqa: BLE001 the failure already raised is the one to report
                pass
        batches.close()
        bar.close()


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


def post_training_record(objective, loss, lr, total_tokens, per_device_tps, metrics):
    """The extra fields SFT and DPO runs log, under the names TRL and open-instruct users look for."""
    if objective == "sft":
        return {"train_loss": loss, "learning_rate": lr, "total_tokens": total_tokens,
                "per_device_tps": per_device_tps}
    if objective == "dpo":
        return {"learning_rate": lr, "total_tokens": total_tokens, "per_device_tps": per_device_tps, **metrics}
    return {}


def summarize(runlog, prog, error, wall, health):
    iters = runlog.doc["training_iterations"]
    steady = [r for r in iters[len(iters) // 10:] if r["iter"] > prog.start_iter] or iters
    mean = lambda k: (sum(r[k] for r in steady) / len(steady)  # noqa: E731
                      if steady and steady[0].get(k) is not None else None)
    last = prog.last_losses
    return {
        "status": prog.status, "error": error, "final_iter": iters[-1]["iter"] if iters else prog.start_iter,
        "best_val_loss": prog.best_val,
        "final_train_loss": last["train"] if last else None,
        "final_val_loss": last["val"] if last else None,
        "wall_time_sec": wall, "mean_tokens_per_sec": mean("tokens_per_sec"),
        "mean_tokens_per_sec_per_device": mean("tokens_per_sec_per_device"), "mean_mfu": mean("mfu"),
        "per_rank_bytes": prog.per_rank, "health_flags": health.flags,
        "final_task_evals": runlog.doc["task_evals"][-1] if runlog.doc["task_evals"] else None,
    }


# ----------------------------------------------------------------------------------------------------------
# the run


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


@contextmanager
def console_file(cfg, d, log):
    """`log`, with every line also written to <out_dir>/train_<time>.log on rank 0 (an eval_only run on an out_dir
    it cannot write keeps to the console), and the error that ends the run last."""
    if not d.master:
        yield lambda *a, **k: None
        return
    try:
        f = open(new_log_path(cfg.out_dir, prefix="train_", suffix=".log"), "w", encoding="utf-8")
    except OSError as e:
        log(f"out_dir {cfg.out_dir} is not writable ({e.strerror}); the console output is not kept in a file")
        yield log
        return

    def tee(msg):
        log(msg)
        f.write(f"{msg}\n")
        f.flush()

    try:
        yield tee
    except BaseException as e:
        f.write(f"error: {type(e).__name__}: {e}\n")
        raise
    finally:
        f.close()


def main(cfg, log=tqdm.write):
    """Run `cfg` in this process (one rank of a torchrun job, or alone); `log` prints a console line (tqdm.write
    keeps it above the progress bar)."""
    cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    d = D.init_distributed("cuda" if cuda else "cpu", cfg.dist_init_timeout_minutes)
    try:
        with (StopRequest() as stop, claim(cfg.out_dir, d, read_only=cfg.eval_only, warn=log),
              console_file(cfg, d, log) as log):
            result = run(cfg, d, log, stop)
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
    hw = setup_device(cfg, d)
    local_ga = check_layout(cfg, d)
    start = find_start(cfg, log)
    data_dir, vocab, tok = text_source(cfg, start)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = build_model(cfg, vocab, hw.backend, start).to(hw.device)
    mc = model.config
    T = cfg.block_size if cfg.block_size is not None else mc.block_size
    if T > mc.block_size:
        raise ConfigError(f"block_size={T} exceeds the model's limit of {mc.block_size} positions")
    # the memory a step needs, before anything of it is allocated: pretraining's rows are T tokens (checked before
    # the data is read); SFT and DPO batches pad to their longest row, known once the data is
    memory = check_memory(cfg, model, T, hw.device, hw.dtype, d) if cfg.objective == "pretrain" else None
    task = make_task(cfg, mc, T, data_dir, tok and tok.tok, log)
    memory = memory or check_memory(cfg, model, min(T, task.longest), hw.device, hw.dtype, d)
    task_tok, tasks = downstream_tasks(cfg, data_dir, tok, mc)
    cfg = settle_config(cfg, task, tok, mc, log)
    if cfg.objective != "pretrain":
        T = cfg.max_seq_length or T  # what one example spans, for the FLOP count
    env = environment(cfg, d, hw, model, T, data_dir)
    env["memory_estimate"] = {"total_bytes": memory["total"], "available_bytes": memory["available"],
                              "parts_bytes": memory["parts"], "block_size": memory["block_size"],
                              **{k: memory[k] for k in ("mode", "batch_size", "activation_checkpointing", "optimizer",
                                                         "eval_only")}}

    if start.kind == "checkpoint":
        log(f"starting from the weights of {start.path}")
    model, owner = D.parallelize(model, cfg, d, hw.type, hw.dtype)
    if start.kind == "checkpoint":
        load_model_state(start.path, owner)
    if isinstance(task, DPOTask):
        task.reference(owner, model, hw.device, hw.ctx, hw.dtype, log=log,
                       saved_key=start.meta.get("reference_key") if start.kind == "resume" else None)
    optimizer = make_optimizer(owner, cfg, hw.type)
    if describe(owner, optimizer):
        log(describe(owner, optimizer))
    scaler = torch.amp.GradScaler(hw.type, enabled=hw.dtype == "float16")
    torch.manual_seed(cfg.seed + d.rank)  # dropout differs across ranks
    start, start_iter, best_val = restore(start, cfg, d, hw, owner, optimizer, scaler, T, log)

    resolved = config_dict(cfg)
    log("config: " + ", ".join(f"{k}={v!r}" for k, v in resolved.items()))
    log(f"model: {env['num_params'] / 1e6:.2f}M parameters, {env['flops_per_token'] / 1e6:.1f} MFLOP/token at T={T}")
    if cfg.flash_attn is not None:
        log(f"flash_attn={cfg.flash_attn} is the older spelling of attention_backend={cfg.attention_backend}")
    log(f"Attention backend: {hw.backend}" + (f" ({hw.backend_reason})" if hw.backend_reason else " (as configured)"))
    log("CUDA Graphs: " + ("on (torch.compile's reduce-overhead mode)" if cfg.use_cuda_graphs else "off"))
    log(f"DataLoader: on, {cfg.dataloader_num_workers} worker processes, pinned memory" if cfg.use_dataloader else
        "DataLoader: off; batches come from a prefetch thread, two steps ahead")
    if tok:
        log(f"tokenizer: {tok.name} ({tok.source})")
    log(f"Precision: {hw.dtype} ({hw.dtype_reason})")
    log(f"Memory: about {memory['total'] / GB:,.2f} GB per rank by engine/plan.py ({parts_text(memory)})"
        + (f" of {memory['available'] / GB:,.2f} GB free" if memory["available"] is not None else "")
        + (" (skip_memory_check: not enforced)" if cfg.skip_memory_check else ""))
    log(f"{env['tokens_per_iter']:,} tokens per iteration on {d.world_size} x {env['device_name']} in {hw.dtype} "
        f"({env['parallelism']})")
    runlog = open_run_log(cfg, d, resolved, env, mc, start, log)
    first = runlog.doc["training_iterations"][:1] if runlog else []
    health = HealthMonitor(warn=log, start_iter=start_iter, first_loss=first[0]["loss"] if first else None)
    job = Job(cfg, d, hw, model, owner, optimizer, scaler, task, T, tasks, task_tok, local_ga, env, resolved, runlog,
              health, log)
    prog = Progress(start_iter, best_val, last_ckpt=start.path if start.kind == "resume" else None,
                    last_val=start.meta.get("val_loss") if start.kind == "resume" else None,
                    best_ckpt=best_checkpoint(cfg.out_dir, upto=start_iter) if start.kind == "resume" else None)

    if cfg.eval_only:
        losses, _ = run_eval(job, prog, start_iter)
        scores = run_task_evals(job, start_iter) if tasks else None
        if runlog:
            runlog.finish({"status": "eval_only", "iter": start_iter, "train_loss": losses["train"],
                           "val_loss": losses["val"], "task_evals": scores})
        return {"train_loss": losses["train"], "val_loss": losses["val"], "task_evals": scores,
                "run_log": runlog and runlog.path}

    t_start, error = time.time(), None
    try:
        train(job, prog, stop)
    except BaseException as e:  # a second Ctrl-C, a lost rank, a full disk: the log says what ended the run
        failure = D.explain(e, d) if isinstance(e, Exception) else None
        error = {"type": type(failure or e).__name__, "message": str(failure or e)}
        if isinstance(e, TrainingDiverged):
            prog.status = "diverged"
            log(f"error: {e}")
        if failure:
            raise failure from e
        raise
    finally:
        if runlog:
            runlog.finish(summarize(runlog, prog, error, time.time() - t_start, health))
    return {"best_val_loss": prog.best_val, "final": prog.last_losses, "run_log": runlog and runlog.path,
            "checkpoint": prog.last_ckpt, "per_rank": prog.per_rank}


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
