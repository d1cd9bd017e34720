"""One training step, as train.py runs it and tools/bench.py and tools/find_batch_size.py time and size it.

    forward_backward   every micro-batch of this rank's share of the step: forward, backward with gradient sync
                       only at the last one, each micro-batch's loss weighted by its share of the whole step's
                       weight (tokens or pairs, all ranks), then unscaling and clipping, and one all-reduce of
                       what the step reports
    optimizer_step     the update, and the gradients dropped
"""
from dataclasses import dataclass

import torch

from engine import distributed as D


@dataclass
class StepResult:
    """What a step reports, summed or averaged over every rank by its single all-reduce."""

    loss: float  # the mean over every token (pair) of the step
    metrics: dict  # the task's metrics, weighted alike
    grad_norm: float  # before clipping
    tokens: int  # processed, padding included: what the FLOPs are spent on
    real_tokens: int  # without padding
    flags: list  # the caller's per-rank numbers, summed over ranks


def forward_backward(model, owner, task, micro, ctx, scaler, optimizer, grad_clip=0.0, world_size=1,
                     cuda_graphs=False, flags=()):
    """Gradients of one step over `micro` (this rank's micro-batches, on the device) in `owner`'s parameters,
    unscaled and clipped to `grad_clip` (0: not clipped). `model` is what runs the forward (wrapped by DDP, FSDP,
    compile), `owner` what holds the parameters. Costs one host sync: the all-reduce of the returned numbers."""
    device = next(owner.parameters()).device
    # each micro-batch counts by its weight in the mean over the whole step, every rank included; varying weights
    # are summed on the device, so they cost no host sync of their own
    weights = [task.weight(b) for b in micro]
    if task.static_weights:
        total = sum(weights) * world_size
    else:
        total = D.all_reduce_sum(torch.stack([torch.as_tensor(w, device=device) for w in weights]).sum().float())
    acc = torch.zeros(1 + len(task.metric_names), device=device)  # loss, metrics: weighted sums
    real = torch.zeros((), device=device)
    for m, b in enumerate(micro):
        if cuda_graphs:  # the last replay's outputs have been consumed: its buffers may be reused
            torch.compiler.cudagraph_mark_step_begin()
        share = weights[m] / total
        with D.grad_sync(model, m == len(micro) - 1):
            with ctx:
                loss, metrics = task.loss(model, b)
            acc += share * torch.stack([loss.detach().float(),
                                        *[metrics[n].detach().float() for n in task.metric_names]])
            scaler.scale(loss * (share * world_size)).backward()  # DDP and FSDP average over ranks
        real += task.tokens(b)
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(owner.parameters(), grad_clip or float("inf"))
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    mine = torch.tensor([*flags, sum(task.processed(b) for b in micro)], dtype=torch.float32, device=device)
    loss, *rest = D.all_reduce_sum(torch.cat([acc, (norm.float() / world_size).view(1), mine,
                                              real.float().view(1)])).tolist()
    k = len(task.metric_names)
    return StepResult(loss=loss, metrics=dict(zip(task.metric_names, rest[:k])), grad_norm=rest[k],
                      tokens=int(rest[-2]), real_tokens=int(rest[-1]), flags=rest[k + 1:-2])


def optimizer_step(optimizer, scaler):
    """The update (skipped by the scaler where float16 gradients overflowed), then the gradients freed."""
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
