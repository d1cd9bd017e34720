"""
Train a GPT on memory-mapped token bins: one process on CPU or one GPU, or many under torchrun.

    python train.py config/train_shakespeare_char.py --max_iters=2000 --batch_size=32
    python train.py config/train_shakespeare_char.py --init_from=resume --eval_only=True
    torchrun --standalone --nproc_per_node=8 train.py config/full_llama3_1.5b_optimal.py --use_zero1=True
    python train.py --help

Config files and --key=value overrides apply left to right over the schema in engine/config.py. One loop serves
every objective; an objective is a small function from (model, batch) to a loss.
"""
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
from engine.checkpoint import CheckpointError, checkpoint_path, find_latest, save_checkpoint
from engine.config import MODEL_KEYS, ConfigError, config_dict, help_text, parse_args
from engine.data import EVAL, BatchSampler, DataError, TokenDataset, resolve_dataset_dir, train_batches
from engine.health import HealthMonitor, TrainingDiverged
from engine.metrics import MFU_CONVENTION, RunLog, device_name, finite_or_none, git_state, lookup_peak_flops, mfu
from engine.optim import lr_at, make_optimizer
from model import GPT, PRESETS, ModelConfig


def pretrain_loss(model, batch):
    x, y = batch
    _, loss = model(x, y)
    return loss


OBJECTIVES = {"pretrain": pretrain_loss}


# ----------------------------------------------------------------------------------------------------------
# set-up

def setup_device(cfg, d):
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev_type = torch.device(device).type
    if dev_type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device} but CUDA is not available here; use --device=cpu")
    if dev_type == "cuda" and d.world_size > 1:
        device = f"cuda:{d.local_rank}"
    dtype = cfg.dtype
    if dtype == "auto":
        dtype = "bfloat16" if dev_type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if dtype == "float16" and dev_type != "cuda":
        raise ConfigError("dtype=float16 needs CUDA (autocast with a GradScaler); use --dtype=float32 on "
                          f"{dev_type}")
    if dtype == "bfloat16" and dev_type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("dtype=bfloat16 but this GPU does not support it; use --dtype=float16")
    if dtype == "float16" and cfg.use_fsdp:
        raise ConfigError("dtype=float16 with use_fsdp needs a sharded GradScaler, which this engine does not "
                          "have; use --dtype=bfloat16")
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    # FSDP casts parameters itself (MixedPrecisionPolicy), so autocast is only for the other modes
    plain = dtype == "float32" or (cfg.use_fsdp and dev_type == "cuda" and dtype == "bfloat16")
    ctx = nullcontext() if plain else torch.autocast(device_type=dev_type, dtype=ptdtype)
    return device, dev_type, dtype, ctx


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
        return ModelConfig(**{**base, **over, "attention_backend": backend})
    except ValueError as e:
        raise ConfigError(str(e)) from None


def build_model(cfg, data_vocab, backend, resume_meta):
    """A fresh model (weights still to load when resuming); resumed and transformers models keep their
    architecture."""
    if resume_meta is not None:
        saved = {**resume_meta["model_config"], "attention_backend": backend}
        if cfg.dropout is not None:
            saved["dropout"] = cfg.dropout
        return GPT(ModelConfig.from_dict(saved))
    if cfg.init_from == "scratch":
        return GPT(model_config(cfg, data_vocab, backend))
    if not os.path.isdir(cfg.init_from):
        raise ConfigError(f"init_from={cfg.init_from!r} is not scratch, resume, or a local transformers "
                          "checkpoint directory")
    over = {"attention_backend": backend}
    if cfg.dropout is not None:
        over["dropout"] = cfg.dropout
    try:
        return GPT.from_hf(cfg.init_from, **over)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"init_from={cfg.init_from}: {e}") from e


def layer_groups(model):
    """Parameter name -> the group its gradient norm is logged under (tok_emb, blocks.3, norm_f, ...)."""
    groups = {}
    for name, _ in model.named_parameters():
        parts = name.replace("_checkpoint_wrapped_module.", "").split(".")
        groups[name] = ".".join(parts[:2]) if parts[0] == "blocks" else parts[0]
    return groups


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def grad_norms_by_layer(model, groups):
    """Gradient norm of each layer group over the whole model (shards summed across ranks)."""
    names = sorted(set(groups.values()))
    sq = torch.zeros(len(names), device=next(model.parameters()).device)
    for name, p in model.named_parameters():
        if p.grad is not None:
            sq[names.index(groups[name])] += _local(p.grad).detach().float().pow(2).sum()
    if any(hasattr(p, "to_local") for p in model.parameters()):
        D.all_reduce_sum(sq)  # FSDP: each rank holds a shard of every gradient
    return dict(zip(names, sq.sqrt().tolist()))


def nonfinite_grads(model):
    return [n for n, p in model.named_parameters()
            if p.grad is not None and not torch.isfinite(_local(p.grad)).all()]


@torch.no_grad()
def evaluate(model, sampler, cfg, ctx, device, d):
    """Mean loss over eval_iters fixed batches per split, the batches dealt round-robin across ranks. Every rank
    runs the same number of forward passes (FSDP's collectives need that); padding passes weigh zero."""
    model.eval()
    out = {}
    per_rank = math.ceil(cfg.eval_iters / d.world_size)
    for split, stream in (("train", EVAL), ("val", None)):
        total = torch.zeros((), device=device)
        for j in range(per_rank):
            k = d.rank + j * d.world_size
            x, y = sampler.batch(split, k % cfg.eval_iters, stream=stream)
            with ctx:
                _, loss = model(x.to(device), y.to(device))
            if k < cfg.eval_iters:
                total += loss.float()
        out[split] = D.all_reduce_sum(total).item() / cfg.eval_iters
    model.train()
    return out


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
    d = D.init_distributed("cuda" if cuda else "cpu")
    try:
        with StopRequest() as stop:
            result = run(cfg, d, log if d.master else (lambda *a, **k: None), stop)
        D.barrier()  # leave together: a rank tearing gloo down while another still talks can abort
        return result
    finally:
        D.cleanup()


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
    if d.master:
        os.makedirs(cfg.out_dir, exist_ok=True)

    resume_path, resume_meta = None, None
    if cfg.init_from == "resume":
        resume_path, resume_meta = find_latest(cfg.out_dir, warn=log)
        log(f"resuming from {resume_path} (iteration {resume_meta['iter_num']})")

    data_dir = resolve_dataset_dir(cfg.dataset)
    probe = TokenDataset(data_dir, check_ids=False)  # vocabulary first, so the model can size itself
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = build_model(cfg, probe.vocab_size, backend, resume_meta).to(device)
    mc = model.config
    T = cfg.block_size if cfg.block_size is not None else mc.block_size
    if T > mc.block_size:
        raise ConfigError(f"block_size={T} exceeds the model's limit of {mc.block_size} positions")
    data = TokenDataset(data_dir, vocab_limit=mc.vocab_size)
    sampler = BatchSampler(data, cfg.batch_size, T, cfg.seed)
    num_params, flops_per_token = model.num_params(), model.flops_per_token(T)

    model, owner = D.parallelize(model, cfg, d, dev_type, dtype)
    optimizer = make_optimizer(owner, cfg.learning_rate, cfg.weight_decay, (cfg.beta1, cfg.beta2), dev_type,
                               zero1=cfg.use_zero1)
    scaler = torch.amp.GradScaler(dev_type, enabled=dtype == "float16")
    start_iter, best_val = 0, float("inf")
    torch.manual_seed(cfg.seed + d.rank)  # dropout differs across ranks
    if resume_meta is not None:
        D.load_state(resume_path, owner, optimizer)
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

    tokens_per_iter = cfg.batch_size * T * ga
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
    if d.master:
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump({"config": resolved, "model_config": mc.to_dict()}, f, indent=2)
        previous = None
        if resume_meta is not None and resume_meta.get("run_log") and os.path.isfile(resume_meta["run_log"]):
            run_path = resume_meta["run_log"]
            previous = RunLog.read(run_path)
        else:
            run_path = os.path.join(cfg.out_dir, f"run_{time.strftime('%Y%m%d_%H%M%S')}.json")
        runlog = RunLog(run_path, resolved, env, previous, start_iter, warn=log)
    record = runlog.add if runlog else (lambda *a: None)
    health = HealthMonitor(warn=log)
    last_ckpt = resume_path

    def checkpoint(iter_num):
        nonlocal last_ckpt
        rng_cpu = D.all_gather_floats(torch.get_rng_state())
        rng_cuda = D.all_gather_floats(torch.cuda.get_rng_state()) if dev_type == "cuda" else []
        meta = {
            "iter_num": iter_num, "best_val_loss": best_val, "scaler": scaler.state_dict(),
            "rng": {"torch": rng_cpu, "cuda": rng_cuda},
            "data": {"seed": cfg.seed, "next_iter": iter_num, "batch_size": cfg.batch_size, "block_size": T,
                     "gradient_accumulation_steps": ga, "world_size": d.world_size},
            "config": resolved, "model_config": mc.to_dict(), "run_log": runlog.path if runlog else None,
        }
        if runlog:  # the log first, so that it always reaches at least as far as the newest checkpoint
            runlog.flush()
        last_ckpt = save_checkpoint(D.state_tensors(owner, optimizer), meta, cfg.out_dir, iter_num,
                                    cfg.keep_last_n_checkpoints)
        log(f"saved checkpoint {last_ckpt}")

    def run_eval(iter_num):
        nonlocal best_val
        losses = evaluate(model, sampler, cfg, ctx, device, d)
        log(f"eval at iter {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        record("evals", {"iter": iter_num, "train_loss": finite_or_none(losses["train"]),
                         "val_loss": finite_or_none(losses["val"])})
        improved = losses["val"] < best_val
        best_val = min(best_val, losses["val"])
        return losses, improved

    if cfg.eval_only:
        losses, _ = run_eval(start_iter)
        if runlog:
            runlog.finish({"status": "eval_only", "iter": start_iter, "train_loss": losses["train"],
                           "val_loss": losses["val"]})
        return {"train_loss": losses["train"], "val_loss": losses["val"], "run_log": runlog and runlog.path}

    objective = OBJECTIVES[cfg.objective]
    groups = layer_groups(owner)
    batches = train_batches(sampler, start_iter, cfg.max_iters, local_ga, device, first_micro=d.rank * local_ga,
                            num_workers=cfg.dataloader_num_workers, use_dataloader=cfg.use_dataloader)
    if start_iter == 0:
        run_eval(0)
    t_start = time.time()
    status, last_losses, per_rank = "completed", None, None
    bar = tqdm(total=cfg.max_iters, initial=start_iter, dynamic_ncols=True,
               disable=not (d.master and sys.stderr.isatty()))
    say = tqdm.write if not bar.disable else log
    model.train()
    batch = next(batches, None)
    try:
        for it in range(start_iter, cfg.max_iters):
            t0 = time.time()
            lr = lr_at(it, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            for m in range(local_ga):
                with D.grad_sync(model, m == local_ga - 1):
                    with ctx:
                        loss = objective(model, batch)
                    batch = next(batches, None)  # the next copy overlaps this backward
                    loss_sum += loss.detach().float()
                    scaler.scale(loss / local_ga).backward()
            scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(owner.parameters(), cfg.grad_clip or float("inf"))
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            # the mean over every micro-batch of every rank, the norm, and whether any rank was asked to stop, in
            # one sync per step
            flags = torch.tensor([0.0 if stop.signum is None else 1.0], device=device)
            loss_val, norm_val, stops = D.all_reduce_sum(torch.cat([(loss_sum / ga).view(1),
                                                                     (norm.float() / d.world_size).view(1),
                                                                     flags])).tolist()
            iter_num = it + 1
            if scaler.is_enabled() and not math.isfinite(norm_val) and math.isfinite(loss_val):
                health.flag(iter_num, "fp16_overflow", "float16 gradients overflowed; the step was skipped")
                norm_for_health = None
            else:
                norm_for_health = norm_val
            try:
                health.check(iter_num, loss_val, norm_for_health, last_ckpt)
            except TrainingDiverged:
                record("health", {"iter": iter_num, "kind": "diverged", "loss": finite_or_none(loss_val),
                                  "nonfinite_grads": nonfinite_grads(owner)})
                raise
            if cfg.gradient_log_interval and iter_num % cfg.gradient_log_interval == 0:
                norms = grad_norms_by_layer(owner, groups)
                record("gradient_norms", {"iter": iter_num, "norms": norms})
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if per_rank is None:  # after the first step, when the optimizer state exists
                per_rank = {"param_bytes": D.all_gather_floats(D.local_bytes(owner.parameters())),
                            "optimizer_state_bytes": D.all_gather_floats(D.optimizer_state_bytes(optimizer))}
            dt = time.time() - t0
            bar.update(1)
            if iter_num % cfg.log_interval == 0 or iter_num == cfg.max_iters:
                tps = tokens_per_iter / dt
                m = mfu(flops_per_token, tps / d.world_size, peak)
                mem_a = torch.cuda.memory_allocated() / 1e9 if dev_type == "cuda" else None
                mem_r = torch.cuda.memory_reserved() / 1e9 if dev_type == "cuda" else None
                record("training_iterations", {
                    "iter": iter_num, "loss": loss_val, "lr": lr, "grad_norm": finite_or_none(norm_val),
                    "dt_ms": dt * 1000, "tokens_per_sec": tps, "tokens_per_sec_per_device": tps / d.world_size,
                    "mfu": m, "memory_allocated_gb": mem_a, "memory_reserved_gb": mem_r})
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
                break
    except TrainingDiverged as e:
        status = "diverged"
        log(f"error: {e}")
        raise
    finally:
        bar.close()
        if runlog:
            runlog.finish(summarize(runlog, status, start_iter, best_val, last_losses, time.time() - t_start,
                                    health, per_rank))
    return {"best_val_loss": best_val, "final": last_losses, "run_log": runlog and runlog.path,
            "checkpoint": last_ckpt, "per_rank": per_rank}


def summarize(runlog, status, start_iter, best_val, last_losses, wall, health, per_rank):
    iters = runlog.doc["training_iterations"]
    steady = [r for r in iters[len(iters) // 10:] if r["iter"] > start_iter] or iters
    mean = lambda k: (sum(r[k] for r in steady) / len(steady)  # noqa: E731
                      if steady and steady[0].get(k) is not None else None)
    return {
        "status": status, "final_iter": iters[-1]["iter"] if iters else start_iter,
        "best_val_loss": finite_or_none(best_val),
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
    except TrainingDiverged:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
