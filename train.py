"""
Train a GPT on memory-mapped token bins: one process on CPU or one GPU.

    python train.py config/train_shakespeare_char.py --max_iters=2000 --batch_size=32
    python train.py config/train_shakespeare_char.py --init_from=resume --eval_only=True
    python train.py --help

Config files and --key=value overrides apply left to right over the schema in engine/config.py. One loop serves
every objective; an objective is a small function from (model, batch) to a loss.
"""
import json
import math
import os
import platform
import sys
import time
from contextlib import nullcontext

import torch
from tqdm import tqdm

from engine.attention import resolve_backend
from engine.checkpoint import CheckpointError, clean_state_dict, load_latest, save_checkpoint
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

def setup_device(cfg):
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev_type = torch.device(device).type
    if dev_type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device} but CUDA is not available here; use --device=cpu")
    dtype = cfg.dtype
    if dtype == "auto":
        dtype = "bfloat16" if dev_type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if dtype == "float16" and dev_type != "cuda":
        raise ConfigError("dtype=float16 needs CUDA (autocast with a GradScaler); use --dtype=float32 on "
                          f"{dev_type}")
    if dtype == "bfloat16" and dev_type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("dtype=bfloat16 but this GPU does not support it; use --dtype=float16")
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    ctx = nullcontext() if dtype == "float32" else torch.autocast(device_type=dev_type, dtype=ptdtype)
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


def build_model(cfg, data_vocab, backend, resume_state):
    """(model, where it came from). Resumed and transformers models keep their architecture."""
    if resume_state is not None:
        mc = ModelConfig.from_dict({**resume_state["model_config"], "attention_backend": backend,
                                    **({"dropout": cfg.dropout} if cfg.dropout is not None else {})})
        model = GPT(mc)
        model.load_state_dict(resume_state["model"])
        return model
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
        parts = name.split(".")
        groups[name] = ".".join(parts[:2]) if parts[0] == "blocks" else parts[0]
    return groups


def grad_norms_by_layer(model, groups):
    acc = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            acc.setdefault(groups[name], []).append(p.grad.detach().float().pow(2).sum())
    names = list(acc)
    norms = torch.stack([torch.stack(acc[n]).sum() for n in names]).sqrt().tolist()
    return dict(zip(names, norms))


def nonfinite_grads(model):
    return [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]


@torch.no_grad()
def evaluate(model, sampler, cfg, ctx, device):
    model.eval()
    out = {}
    for split, stream in (("train", EVAL), ("val", None)):
        total = 0.0
        for k in range(cfg.eval_iters):
            x, y = sampler.batch(split, k, stream=stream)
            with ctx:
                _, loss = model(x.to(device), y.to(device))
            total += loss.item()
        out[split] = total / cfg.eval_iters
    model.train()
    return out


# ----------------------------------------------------------------------------------------------------------
# the run

def main(cfg, log=print):
    torch.manual_seed(cfg.seed)
    device, dev_type, dtype, ctx = setup_device(cfg)
    try:
        backend, backend_reason = resolve_backend(cfg.attention_backend, dev_type, dtype)
    except (ValueError, RuntimeError) as e:
        raise ConfigError(str(e)) from None
    os.makedirs(cfg.out_dir, exist_ok=True)

    resume_path, resume_state = None, None
    if cfg.init_from == "resume":
        resume_path, resume_state = load_latest(cfg.out_dir, warn=log)
        log(f"resuming from {resume_path} (iteration {resume_state['iter_num']})")

    data_dir = resolve_dataset_dir(cfg.dataset)
    probe = TokenDataset(data_dir, check_ids=False)  # vocabulary first, so the model can size itself
    model = build_model(cfg, probe.vocab_size, backend, resume_state).to(device)
    mc = model.config
    T = cfg.block_size if cfg.block_size is not None else mc.block_size
    if T > mc.block_size:
        raise ConfigError(f"block_size={T} exceeds the model's limit of {mc.block_size} positions")
    data = TokenDataset(data_dir, vocab_limit=mc.vocab_size)
    sampler = BatchSampler(data, cfg.batch_size, T, cfg.seed)

    optimizer = make_optimizer(model, cfg.learning_rate, cfg.weight_decay, (cfg.beta1, cfg.beta2), dev_type)
    scaler = torch.amp.GradScaler(dev_type, enabled=dtype == "float16")
    start_iter, best_val = 0, float("inf")
    if resume_state is not None:
        optimizer.load_state_dict(resume_state["optimizer"])
        scaler.load_state_dict(resume_state["scaler"])
        start_iter, best_val = resume_state["iter_num"], resume_state["best_val_loss"]
        torch.set_rng_state(resume_state["rng"]["torch"])
        if dev_type == "cuda" and resume_state["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(resume_state["rng"]["cuda"])
    raw_model = model
    if cfg.compile:
        model = torch.compile(model)

    ga = cfg.gradient_accumulation_steps
    tokens_per_iter = cfg.batch_size * T * ga
    flops_per_token = raw_model.flops_per_token(T)
    dev_name = device_name(device)
    peak = cfg.peak_flops if cfg.peak_flops is not None else (lookup_peak_flops(dev_name) if dev_type == "cuda"
                                                              else None)
    resolved = config_dict(cfg)
    commit, dirty = git_state()
    env = {
        "torch_version": torch.__version__, "python_version": platform.python_version(), "device": device,
        "device_name": dev_name, "world_size": 1, "dtype": dtype, "attention_backend": backend,
        "attention_backend_reason": backend_reason, "git_commit": commit, "git_dirty": dirty,
        "mfu_convention": MFU_CONVENTION, "peak_flops": peak, "model_config": mc.to_dict(),
        "num_params": raw_model.num_params(), "flops_per_token": flops_per_token,
        "tokens_per_iter": tokens_per_iter, "block_size": T, "dataset_dir": data_dir,
        "init_from": cfg.init_from,
    }
    log("config: " + ", ".join(f"{k}={v!r}" for k, v in resolved.items()))
    log(f"model: {raw_model.num_params() / 1e6:.2f}M parameters, {flops_per_token / 1e6:.1f} MFLOP/token at "
        f"T={T}; attention {backend}" + (f" ({backend_reason})" if backend_reason else ""))
    log(f"{tokens_per_iter:,} tokens per iteration on {dev_name} in {dtype}")
    with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
        json.dump({"config": resolved, "model_config": mc.to_dict()}, f, indent=2)

    previous = None
    if resume_state is not None and resume_state.get("run_log") and os.path.isfile(resume_state["run_log"]):
        run_path = resume_state["run_log"]
        previous = RunLog.read(run_path)
    else:
        run_path = os.path.join(cfg.out_dir, f"run_{time.strftime('%Y%m%d_%H%M%S')}.json")
    runlog = RunLog(run_path, resolved, env, previous, start_iter)
    health = HealthMonitor(warn=log)
    last_ckpt = resume_path

    def checkpoint(iter_num):
        nonlocal last_ckpt
        state = {
            "model": clean_state_dict(raw_model.state_dict()), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(), "iter_num": iter_num, "best_val_loss": best_val,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if dev_type == "cuda" else []},
            "data": {"seed": cfg.seed, "next_iter": iter_num, "batch_size": cfg.batch_size, "block_size": T,
                     "gradient_accumulation_steps": ga, "world_size": 1},
            "config": resolved, "model_config": mc.to_dict(), "run_log": run_path,
        }
        last_ckpt = save_checkpoint(state, cfg.out_dir, iter_num, cfg.keep_last_n_checkpoints)
        log(f"saved checkpoint {last_ckpt}")

    def run_eval(iter_num):
        nonlocal best_val
        losses = evaluate(model, sampler, cfg, ctx, device)
        log(f"eval at iter {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        runlog.add("evals", {"iter": iter_num, "train_loss": finite_or_none(losses["train"]),
                             "val_loss": finite_or_none(losses["val"])})
        improved = losses["val"] < best_val
        best_val = min(best_val, losses["val"])
        return losses, improved

    if cfg.eval_only:
        losses, _ = run_eval(start_iter)
        runlog.finish({"status": "eval_only", "iter": start_iter, "train_loss": losses["train"],
                       "val_loss": losses["val"]})
        return {"train_loss": losses["train"], "val_loss": losses["val"], "run_log": run_path}

    objective = OBJECTIVES[cfg.objective]
    groups = layer_groups(raw_model)
    batches = train_batches(sampler, start_iter, cfg.max_iters, ga, device, num_workers=cfg.dataloader_num_workers,
                            use_dataloader=cfg.use_dataloader)
    if start_iter == 0:
        run_eval(0)
    t_start = time.time()
    status, last_losses = "completed", None
    bar = tqdm(total=cfg.max_iters, initial=start_iter, disable=not sys.stderr.isatty(), dynamic_ncols=True)
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
            for _ in range(ga):
                with ctx:
                    loss = objective(model, batch)
                batch = next(batches, None)  # the next copy overlaps this backward
                loss_sum += loss.detach()
                scaler.scale(loss / ga).backward()
            scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip or float("inf"))
            loss_val, norm_val = torch.stack([loss_sum / ga, norm.float()]).tolist()  # one sync per step
            iter_num = it + 1
            if scaler.is_enabled() and not math.isfinite(norm_val) and math.isfinite(loss_val):
                health.flag(iter_num, "fp16_overflow", "float16 gradients overflowed; the step was skipped")
                norm_for_health = None
            else:
                norm_for_health = norm_val
            try:
                health.check(iter_num, loss_val, norm_for_health, last_ckpt)
            except TrainingDiverged:
                bad = nonfinite_grads(raw_model)
                runlog.add("health", {"iter": iter_num, "kind": "diverged", "loss": finite_or_none(loss_val),
                                      "nonfinite_grads": bad})
                raise
            if cfg.gradient_log_interval and iter_num % cfg.gradient_log_interval == 0:
                runlog.add("gradient_norms", {"iter": iter_num, "norms": grad_norms_by_layer(raw_model, groups)})
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            dt = time.time() - t0
            bar.update(1)
            if iter_num % cfg.log_interval == 0 or iter_num == cfg.max_iters:
                tps = tokens_per_iter / dt
                m = mfu(flops_per_token, tps, peak)
                mem_a = torch.cuda.memory_allocated() / 1e9 if dev_type == "cuda" else None
                mem_r = torch.cuda.memory_reserved() / 1e9 if dev_type == "cuda" else None
                runlog.add("training_iterations", {
                    "iter": iter_num, "loss": loss_val, "lr": lr, "grad_norm": finite_or_none(norm_val),
                    "dt_ms": dt * 1000, "tokens_per_sec": tps, "mfu": m, "memory_allocated_gb": mem_a,
                    "memory_reserved_gb": mem_r})
                say(f"iter {iter_num}: loss {loss_val:.4f}, lr {lr:.3e}, grad norm {norm_val:.3f}, "
                    f"{dt * 1000:.1f} ms, {tps:,.0f} tok/s" + (f", mfu {m * 100:.1f}%" if m is not None else "")
                    + (f", mem {mem_a:.2f}/{mem_r:.2f} GB" if mem_a is not None else ""))
            if iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters:
                last_losses, improved = run_eval(iter_num)
                if improved or cfg.always_save_checkpoint:
                    checkpoint(iter_num)
                runlog.flush()
    except TrainingDiverged as e:
        status = "diverged"
        log(f"error: {e}")
        raise
    finally:
        bar.close()
        iters = runlog.doc["training_iterations"]
        steady = [r for r in iters[len(iters) // 10:] if r["iter"] > start_iter] or iters
        runlog.finish({
            "status": status, "final_iter": iters[-1]["iter"] if iters else start_iter,
            "best_val_loss": finite_or_none(best_val),
            "final_train_loss": last_losses["train"] if last_losses else None,
            "final_val_loss": last_losses["val"] if last_losses else None,
            "wall_time_sec": time.time() - t_start,
            "mean_tokens_per_sec": sum(r["tokens_per_sec"] for r in steady) / len(steady) if steady else None,
            "mean_mfu": (sum(r["mfu"] for r in steady) / len(steady)
                         if steady and steady[0]["mfu"] is not None else None),
            "health_flags": health.flags,
        })
    return {"best_val_loss": best_val, "final": last_losses, "run_log": run_path, "checkpoint": last_ckpt}


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
