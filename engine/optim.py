"""AdamW with decay / no-decay groups, and the learning-rate schedules."""
import math

import torch
from torch.distributed.optim import ZeroRedundancyOptimizer

FUSED_DEVICES = ("cuda", "cpu")  # where torch.optim.AdamW(fused=True) runs, on torch 2.11 and later


def make_optimizer(model, lr, weight_decay, betas, device_type, zero1=False):
    """AdamW; matrices and embeddings decay, norms and biases (every tensor under 2-D) do not. Fused (the update of
    all tensors in a few multi-tensor kernels) on CUDA and CPU, the devices torch has those kernels for. With zero1,
    torch's ZeroRedundancyOptimizer shards its state across the ranks."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device_type in FUSED_DEVICES
    if zero1:
        return ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, lr=lr, betas=betas,
                                       fused=fused)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)


def warmup_steps(cfg):
    return int(cfg.warmup_ratio * cfg.max_iters) if cfg.warmup_ratio is not None else cfg.warmup_iters


def lr_at(it, cfg):
    """Learning rate for optimizer step `it` (0-based): linear warm-up to learning_rate, then the schedule,
    reaching min_lr at lr_decay_iters and staying there."""
    warmup = warmup_steps(cfg)
    decay_end = cfg.lr_decay_iters if cfg.lr_decay_iters is not None else cfg.max_iters
    top, bottom = cfg.learning_rate, cfg.min_lr
    if it < warmup:
        return top * (it + 1) / (warmup + 1)
    if cfg.lr_schedule == "constant":
        return top
    if it >= decay_end:
        return bottom
    if cfg.lr_schedule == "wsd":  # flat until the last wsd_decay_ratio of the run, then linear to min_lr
        decay_start = max(warmup, decay_end - int(cfg.wsd_decay_ratio * decay_end))
        if it < decay_start:
            return top
        progress = (it - decay_start) / max(1, decay_end - decay_start)
        return top - (top - bottom) * progress
    progress = (it - warmup) / max(1, decay_end - warmup)
    if cfg.lr_schedule == "linear":
        return top - (top - bottom) * progress
    return bottom + 0.5 * (1.0 + math.cos(math.pi * progress)) * (top - bottom)  # cosine
