"""The optimizers (AdamW, or Muon for the blocks' matrices with AdamW for the rest) and the learning-rate schedules."""
import math

import torch
from torch.distributed.optim import ZeroRedundancyOptimizer

FUSED_DEVICES = ("cuda", "cpu")  # where torch.optim.AdamW(fused=True) runs, on torch 2.11 and later


def adamw(groups, lr, betas, device_type, zero1=False):
    """AdamW over param groups. Fused (the update of all tensors in a few multi-tensor kernels) on CUDA and CPU, the
    devices torch has those kernels for. With zero1, torch's ZeroRedundancyOptimizer shards its state across ranks."""
    fused = device_type in FUSED_DEVICES
    if zero1:
        return ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, lr=lr, betas=betas, fused=fused)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)


def decay_groups(params, weight_decay):
    """Matrices and embeddings decay, norms and biases (every tensor under 2-D) do not."""
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def muon_names(model):
    """The parameters Muon takes: the 2-D weights inside the transformer blocks (attention's fused q/k/v and output
    projections, the MLP's), as modded-nanogpt and nanochat split them. Embeddings, the output head, norms and
    biases stay on AdamW: they are lookups, a classifier or vectors, not the hidden linear maps Muon is made for."""
    return [n for n, p in model.named_parameters() if p.requires_grad and p.dim() == 2 and n.startswith("blocks.")]


class Optimizers:
    """Several optimizers stepped as one. The loop, GradScaler (unscale_, step) and the schedule see their param
    groups together; checkpoints save and load each (engine/checkpoint.py)."""

    def __init__(self, *optimizers):
        self.optimizers = list(optimizers)

    @property
    def param_groups(self):
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self):
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none=True):
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)


def parts(optimizer):
    """The torch optimizers behind `optimizer` (one, or those an Optimizers holds)."""
    return optimizer.optimizers if isinstance(optimizer, Optimizers) else [optimizer]


def make_optimizer(model, cfg, device_type):
    """The optimizer cfg asks for over model's trainable parameters: AdamW with decay / no-decay groups
    (optimizer=adamw), or torch.optim.Muon on muon_names(model) beside that AdamW for the rest (optimizer=muon).

    Every param group carries lr_ratio, its peak learning rate over learning_rate: the loop sets each group's lr to
    lr_at(it) * lr_ratio, so one schedule drives both (Muon from muon_lr down to muon_lr * min_lr / learning_rate).
    Under ZeRO-1 each is a ZeroRedundancyOptimizer: Muon's parameters are assigned whole to ranks, so each rank
    orthogonalises whole matrices. Under FSDP the matrices are sharded and Muon is refused (engine/config.py)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "adamw":
        opt = adamw(decay_groups([p for _, p in named], cfg.weight_decay), cfg.learning_rate, betas, device_type,
                    cfg.use_zero1)
        for g in opt.param_groups:
            g["lr_ratio"] = 1.0
        return opt
    matrices = set(muon_names(model))
    if not matrices:
        raise ValueError("optimizer=muon found no 2-D weights inside the model's blocks to give Muon")
    hidden = [p for n, p in named if n in matrices]
    rest = [p for n, p in named if n not in matrices]
    kw = {"lr": cfg.muon_lr, "momentum": cfg.muon_momentum, "weight_decay": cfg.muon_weight_decay}
    if cfg.use_zero1:
        muon = ZeroRedundancyOptimizer(hidden, optimizer_class=torch.optim.Muon, **kw)
    else:
        muon = torch.optim.Muon(hidden, **kw)
    for g in muon.param_groups:
        g["lr_ratio"] = cfg.muon_lr / cfg.learning_rate
    rest_opt = adamw(decay_groups(rest, cfg.weight_decay), cfg.learning_rate, betas, device_type, cfg.use_zero1)
    for g in rest_opt.param_groups:
        g["lr_ratio"] = 1.0
    return Optimizers(muon, rest_opt)


def describe(model, optimizer):
    """A start-up line naming which parameters each optimizer holds (None for AdamW alone)."""
    if not isinstance(optimizer, Optimizers):
        return None
    matrices = set(muon_names(model))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def kinds(names):  # "attn.qkv.weight" for "blocks.3.attn.qkv.weight"; other names whole
        return ", ".join(sorted({n.replace("_checkpoint_wrapped_module.", "").split(".", 2)[2] if n.startswith(
            "blocks.") else n for n in names}))

    mine = [(n, p) for n, p in named if n in matrices]
    rest = [(n, p) for n, p in named if n not in matrices]
    return (f"optimizer: Muon on {len(mine)} block matrices ({sum(p.numel() for _, p in mine) / 1e6:.2f}M "
            f"parameters: {kinds(n for n, _ in mine)}); AdamW on {len(rest)} tensors "
            f"({sum(p.numel() for _, p in rest) / 1e6:.2f}M: {kinds(n for n, _ in rest)})")


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
