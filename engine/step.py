"""One training step, as train.py runs it and tools/bench.py and tools/find_batch_size.py time and size it.

    forward_backward   every micro-batch of this rank's share of the step: forward, backward with gradient sync
                       only at the last one, each micro-batch's loss weighted by its share of the whole step's
                       weight (tokens or pairs, all ranks), then unscaling and clipping, and one all-reduce of
                       what the step reports, whose copy to the host is queued behind the step's kernels
    optimizer_step     the update, and the gradients dropped
    PendingStep        the step's numbers on their way to the host: result() waits for them

Nothing here waits for the device (float16's GradScaler excepted, which reads its overflow flag to skip a step), so
the loop can launch the next step before it reads this one's loss: on a GPU the host then runs ahead of the
kernels instead of idling at every step while Python checks the numbers and launches the optimizer.
"""
import time
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
    nonfinite_grads: list  # names of the parameters whose gradient holds an inf or a NaN, on any rank


class PendingStep:
    """A step's numbers, copied to the host behind the step's kernels (into pinned memory on CUDA, so the copy does
    not block); result() waits for them. mark_end() after the update notes when the step's work is done: on CUDA an
    event that result() waits on, elsewhere the time itself, since there the work is done when its call returns."""

    def __init__(self, stats, metric_names, n_flags, grad_names):
        self.cuda = stats.is_cuda
        self.host = stats
        if self.cuda:
            self.host = torch.empty(stats.shape, dtype=stats.dtype, pin_memory=True)
            self.host.copy_(stats, non_blocking=True)
            self.done = torch.cuda.Event()  # until mark_end(): the copy
            self.done.record()
        self.metric_names, self.n_flags, self.grad_names = metric_names, n_flags, grad_names
        self.values = None
        self.end = None  # when the step's work was done, as the host saw it
        self.ending = False  # an event marks the end, and result() notes when it passed

    def mark_end(self):
        if self.cuda and self.values is None:
            self.done = torch.cuda.Event()
            self.done.record()
            self.ending = True
        else:  # the work is done, or was waited for: now is when it ended
            self.end = time.time()

    def ready(self):
        """Whether result() would return without waiting."""
        return self.values is not None or not self.cuda or self.done.query()

    def result(self):
        """The StepResult; waits for the step's kernels (the update too, once mark_end() was called)."""
        if self.values is None:
            if self.cuda:
                self.done.synchronize()
                if self.ending:
                    self.end = time.time()
            self.values = self.host.tolist()
        k, f = len(self.metric_names), self.n_flags
        v = self.values
        flags, (tokens, real), bad = v[2 + k:2 + k + f], v[2 + k + f:4 + k + f], v[4 + k + f:]
        return StepResult(loss=v[0], metrics=dict(zip(self.metric_names, v[1:1 + k])), grad_norm=v[1 + k],
                          tokens=int(tokens), real_tokens=int(real), flags=flags,
                          nonfinite_grads=[n for n, b in zip(self.grad_names, bad) if b])


def forward_backward(model, owner, task, micro, ctx, scaler, optimizer, grad_clip=0.0, world_size=1,
                     cuda_graphs=False, flags=()):
    """Gradients of one step over `micro` (this rank's micro-batches, on the device) in `owner`'s parameters,
    unscaled and clipped to `grad_clip` (0: not clipped), and a PendingStep of what the step reports. `model` is
    what runs the forward (wrapped by DDP, FSDP, compile), `owner` what holds the parameters. `flags` are this
    rank's numbers for the caller, summed over ranks on their way back."""
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
    named = [(n, p.grad) for n, p in owner.named_parameters() if p.grad is not None]
    norms, norm = clip_gradients([g for _, g in named], grad_clip, device)
    # from the host without a blocking copy: pinned memory, copied behind the step's kernels
    mine = torch.tensor([*flags, sum(task.processed(b) for b in micro)], dtype=torch.float32)
    mine = mine.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else mine.to(device)
    # replicated gradients (DDP) give every rank the whole norm, so the sum over ranks is world_size times it; a
    # parameter's gradient counts as non-finite when any rank's part of it is
    stats = torch.cat([acc, (norm.float() / world_size).view(1), mine, real.float().view(1),
                       (~torch.isfinite(norms)).float()])
    return PendingStep(D.all_reduce_sum(stats), task.metric_names, len(flags), [n for n, _ in named])


def clip_gradients(grads, max_norm, device=None):
    """Scale `grads` in place so that their global L2 norm is at most max_norm (0: left as they are), as
    torch.nn.utils.clip_grad_norm_ does; returns (each tensor's norm on this rank, the global norm before clipping).
    The per-tensor norms, which torch's function computes but does not return, name the parameters whose gradient
    is non-finite without a second pass over the gradients. FSDP's gradients are this rank's shards, whose squared
    norms are summed over ranks."""
    if not grads:
        return torch.zeros(0, device=device), torch.zeros((), device=device)  # nothing trained, nothing to clip
    local = [D.local(g) for g in grads]
    norms = torch.stack(torch._foreach_norm(local))
    if local[0] is grads[0]:  # replicated: every rank holds the whole gradient
        norm = torch.linalg.vector_norm(norms)
    else:
        norm = D.all_reduce_sum(norms.double().square().sum()).sqrt().to(norms.dtype)
    if max_norm:
        torch._foreach_mul_(local, torch.clamp(max_norm / (norm + 1e-6), max=1.0))
    return norms, norm


def optimizer_step(optimizer, scaler):
    """The update (skipped by the scaler where float16 gradients overflowed), then the gradients freed."""
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
