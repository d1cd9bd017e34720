"""Losses over the model's outputs.

chunked_cross_entropy is the cross-entropy of `hidden @ weight.T` against targets without the (N, V) logits: with a
128K-152K vocabulary those logits, their float32 copy and their gradient are the largest tensors of a training step
(8192 tokens x 151936 x 4 bytes = 5 GB each). It walks over chunks of rows, in forward for the loss and again in
backward, recomputing each chunk's logits, so at most one chunk's logits exist at a time.
"""
import torch

IGNORE_INDEX = -100


class ChunkedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy over non-ignored rows and its gradients; chunked_cross_entropy turns it into a mean.

    Autocast is switched off inside and casts are explicit: backward can run under another autocast state than
    forward (or none), and the recomputed logits must be the same numbers forward saw.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, ignore_index, dtype):
        valid = targets != ignore_index
        safe = targets.masked_fill(~valid, 0)  # any in-range id; the row's loss is masked out
        acc = torch.promote_types(dtype, torch.float32)  # softmax precision: float32, or float64 if given that
        lse = torch.empty(hidden.size(0), dtype=acc, device=hidden.device)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            for s in range(0, hidden.size(0), chunk_size):
                logits = (hidden[s:s + chunk_size].to(dtype) @ w.T).to(acc)  # (n, V)
                lse[s:s + chunk_size] = torch.logsumexp(logits, dim=-1)
                picked = logits.gather(1, safe[s:s + chunk_size, None]).squeeze(1)
                total += ((lse[s:s + chunk_size] - picked) * valid[s:s + chunk_size]).sum()
        ctx.save_for_backward(hidden, weight, safe, valid, lse)
        ctx.chunk_size, ctx.dtype = chunk_size, dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, safe, valid, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        dtype, cs = ctx.dtype, ctx.chunk_size
        grad_h = torch.empty_like(hidden) if need_h else None
        # accumulated in the softmax precision whatever the compute dtype: adding chunks' bfloat16 partial sums in
        # bfloat16 would round away what the later chunks add
        grad_w = torch.zeros_like(weight, dtype=lse.dtype) if need_w else None
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            for s in range(0, hidden.size(0), cs):
                h = hidden[s:s + cs].to(dtype)
                # d(sum of losses)/d(logits) = softmax - onehot on valid rows, 0 on ignored ones
                g = (h @ w.T).to(lse.dtype).sub_(lse[s:s + cs, None]).exp_()  # (n, V) softmax
                g.scatter_add_(1, safe[s:s + cs, None], -torch.ones_like(lse[s:s + cs, None]))
                g.mul_((grad_total * valid[s:s + cs])[:, None])
                g = g.to(dtype)
                if need_h:
                    grad_h[s:s + cs] = g @ w
                if need_w and grad_w.dtype == dtype:
                    grad_w.addmm_(g.T, h)  # (V, C), in place
                elif need_w:
                    grad_w += g.T @ h  # a (V, C) partial in the compute dtype, half the accumulator's size
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None


def chunked_cross_entropy(hidden, weight, targets, chunk_size=1024, ignore_index=IGNORE_INDEX):
    """Mean cross-entropy of the logits `hidden @ weight.T` over the targets that are not ignore_index.

    hidden (N, C), weight (V, C), targets (N,). The same value and gradients as
    F.cross_entropy((hidden @ weight.T).float(), targets, ignore_index=ignore_index), but the logits exist only
    chunk_size rows at a time. Under autocast the matmuls run in the autocast dtype, the softmax in float32, as
    autocast does for a Linear followed by .float(). One difference: when every target is ignored the result is
    0 with zero gradients, where F.cross_entropy gives NaN (0/0); a micro-batch of prompt tokens only should add
    nothing to the step, not poison it.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.size(1) != weight.size(1):
        raise ValueError(f"need hidden (N, C) and weight (V, C), got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must have shape ({hidden.size(0)},), got {tuple(targets.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    dev = hidden.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
    total = ChunkedCrossEntropy.apply(hidden, weight, targets, chunk_size, ignore_index, dtype)
    return total / (targets != ignore_index).sum().clamp(min=1)
