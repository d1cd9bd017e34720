"""Losses over the model's outputs.

chunked_cross_entropy is the cross-entropy of `hidden @ weight.T` against targets without the (N, V) logits: with a
128K-152K vocabulary those logits, their float32 copy and their gradient are the largest tensors of a training step
(8192 tokens x 151936 x 4 bytes = 5 GB each). It walks over chunks of rows, in forward for the loss and again in
backward, recomputing each chunk's logits, so at most one chunk's logits exist at a time. Under autocast they stay
in the 16-bit compute dtype, and the float32 softmax is worked out a few rows at a time, in as few passes over
memory as torch's eager ops allow: the loss is memory-bound (tools/bench_loss_memory.py --compare).
"""
import torch

IGNORE_INDEX = -100
# vocabularies from this size on (LLaMA-3's 128K, Qwen's 152K) get the chunked loss unless a run says otherwise: their
# logits, float32 copy and gradient would be a step's largest tensors
CHUNKED_FROM_VOCAB = 100_000
DEFAULT_CHUNK_SIZE = 1024


def loss_chunk_size(configured, vocab_size):
    """The rows per chunk a run uses: as configured (0: the plain loss), or by default (None) chunked for large
    vocabularies."""
    if configured is not None:
        return configured
    return DEFAULT_CHUNK_SIZE if vocab_size >= CHUNKED_FROM_VOCAB else 0


FLOAT32_ROWS = 256  # rows of a chunk whose float32 softmax exists at once


def _minus(x, shift):
    """x - shift in shift's precision: in place when x already has it, else one pass that reads x in its own dtype
    and writes a new tensor (a CUDA kernel converts as it reads; a CPU one makes a converted copy first)."""
    return torch.sub(x, shift, out=x if x.dtype == shift.dtype else None)


def _forward(hidden, weight, targets, chunk_size, ignore_index, dtype):
    """(summed cross-entropy over the non-ignored rows, log-sum-exp of every row's logits).

    Autocast is switched off inside and casts are explicit: backward can run under another autocast state than
    forward (or none), and the recomputed logits must be the same numbers forward saw."""
    valid = targets != ignore_index
    safe = targets.masked_fill(~valid, 0)  # any in-range id; the row's loss is masked out
    acc = torch.promote_types(dtype, torch.float32)  # softmax precision: float32, or float64 if given that
    lse = torch.empty(hidden.size(0), dtype=acc, device=hidden.device)
    total = torch.zeros((), dtype=acc, device=hidden.device)
    with torch.autocast(hidden.device.type, enabled=False):
        w = weight.to(dtype)
        for s in range(0, hidden.size(0), chunk_size):
            logits = hidden[s:s + chunk_size].to(dtype) @ w.T  # (n, V)
            picked = logits.gather(1, safe[s:s + chunk_size, None]).squeeze(1).to(acc)
            lse_c = lse[s:s + chunk_size]
            # torch.logsumexp's steps, FLOAT32_ROWS rows at a time in float32: logsumexp would want a float32 copy of
            # the whole chunk and make another one inside
            for r in range(0, logits.size(0), FLOAT32_ROWS):
                x = logits[r:r + FLOAT32_ROWS]
                m = x.amax(dim=1, keepdim=True).to(acc)  # the max is exact in any dtype
                lse_c[r:r + FLOAT32_ROWS] = m.squeeze(1) + _minus(x, m).exp_().sum(dim=1).log()
            total += ((lse_c - picked) * valid[s:s + chunk_size]).sum()
            del logits, x  # before the next chunk's are made (x views them): one chunk's at a time, not two
    return total, lse


def _add_matmul(acc, a, b):
    """acc += a @ b, with acc in float32 and a, b possibly in 16 bits."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    elif a.is_cuda:  # cuBLAS adds the 16-bit product into the float32 matrix itself (torch >= 2.10)
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:  # no mixed-dtype matmul elsewhere: a 16-bit partial the size of acc, then its addition
        acc += a @ b


def _backward(grad_total, hidden, weight, targets, lse, chunk_size, ignore_index, dtype, need_h=True, need_w=True):
    """(d total / d hidden, d total / d weight) times grad_total, each None when not needed."""
    valid = targets != ignore_index
    safe = targets.masked_fill(~valid, 0)
    scale = grad_total * valid  # each row's factor: 0 on ignored rows
    cs = chunk_size
    grad_h = torch.empty_like(hidden) if need_h else None
    # accumulated in the softmax precision whatever the compute dtype: adding chunks' bfloat16 partial sums in
    # bfloat16 would round away what the later chunks add
    grad_w = torch.zeros_like(weight, dtype=lse.dtype) if need_w else None
    with torch.autocast(hidden.device.type, enabled=False):
        w = weight.to(dtype)
        for s in range(0, hidden.size(0), cs):
            logits = hidden[s:s + cs].to(dtype) @ w.T  # (n, V)
            t, lse_c, sc = safe[s:s + cs], lse[s:s + cs], scale[s:s + cs]
            # the targets' p - 1 from float32: p rounded to 16 bits first would lose it when p is near 1
            g_t = ((logits.gather(1, t[:, None]).squeeze(1).to(lse.dtype) - lse_c).exp() - 1) * sc.abs()
            # d(sum of losses)/d(logits) = (softmax - onehot) * scale, rounded once to the compute dtype as the plain
            # path rounds its float32 gradient, into the logits' own buffer. The scale's size goes into the exponent,
            # exp(logits - lse + log|scale|), so that one float32 pass makes it, FLOAT32_ROWS rows at a time; its
            # sign, +-1 and exact, goes on the (n, C) operands below.
            shift = (lse_c - sc.abs().log())[:, None]
            for r in range(0, logits.size(0), FLOAT32_ROWS):
                x = logits[r:r + FLOAT32_ROWS]
                torch.exp(_minus(x, shift[r:r + FLOAT32_ROWS]), out=x)
            g = logits  # (n, V), the gradient now
            g[torch.arange(g.size(0), device=g.device), t] = g_t.to(g.dtype)
            sign = sc.sign()[:, None]
            if need_h:
                torch.mul(g @ w, sign, out=grad_h[s:s + cs])
            if need_w:
                _add_matmul(grad_w, g.T, (hidden[s:s + cs] * sign).to(dtype))  # (V, C)
            del logits, x, g  # before the next chunk's are made
    return grad_h, grad_w.to(weight.dtype) if need_w else None


class ChunkedCrossEntropy(torch.autograd.Function):
    """Eager autograd: the summed loss; its backward recomputes each chunk's logits. `loops` are the chunk loops
    (tools/bench_loss_memory.py passes an earlier version's to compare them)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, ignore_index, dtype, loops=(_forward, _backward)):
        total, lse = loops[0](hidden, weight, targets, chunk_size, ignore_index, dtype)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.args, ctx.backward_loop = (chunk_size, ignore_index, dtype), loops[1]
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, targets, lse = ctx.saved_tensors
        grads = ctx.backward_loop(grad_total, hidden, weight, targets, lse, *ctx.args, *ctx.needs_input_grad[:2])
        return *grads, None, None, None, None, None


# Under torch.compile the two loops are custom operators, which the compiler calls as opaque units: traced as plain
# ops, it would see that backward recomputes forward's chunk logits and keep forward's instead, all (N, V) of them.
# Eager runs keep the autograd.Function, whose ops (the chunk logits included) stay visible to dispatch modes such
# as the memory count of tools/bench.py.

@torch.library.custom_op("engine::chunked_ce_forward", mutates_args=())
def _forward_op(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int,
                ignore_index: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(hidden, weight, targets, chunk_size, ignore_index, dtype)


@_forward_op.register_fake
def _(hidden, weight, targets, chunk_size, ignore_index, dtype):
    acc = torch.promote_types(dtype, torch.float32)
    return hidden.new_empty((), dtype=acc), hidden.new_empty(hidden.size(0), dtype=acc)


@torch.library.custom_op("engine::chunked_ce_backward", mutates_args=())
def _backward_op(grad_total: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                 lse: torch.Tensor, chunk_size: int, ignore_index: int,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return _backward(grad_total, hidden, weight, targets, lse, chunk_size, ignore_index, dtype)


@_backward_op.register_fake
def _(grad_total, hidden, weight, targets, lse, chunk_size, ignore_index, dtype):
    return torch.empty_like(hidden), torch.empty_like(weight)


def _setup_op(ctx, inputs, output):
    hidden, weight, targets, chunk_size, ignore_index, dtype = inputs
    ctx.save_for_backward(hidden, weight, targets, output[1])
    ctx.args = chunk_size, ignore_index, dtype


def _op_grads(ctx, grad_total, _grad_lse):
    hidden, weight, targets, lse = ctx.saved_tensors
    return *_backward_op(grad_total, hidden, weight, targets, lse, *ctx.args), None, None, None, None


_forward_op.register_autograd(_op_grads, setup_context=_setup_op)


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
    if torch.compiler.is_compiling():
        total, _ = _forward_op(hidden, weight, targets, chunk_size, ignore_index, dtype)
    else:
        total = ChunkedCrossEntropy.apply(hidden, weight, targets, chunk_size, ignore_index, dtype)
    return total / (targets != ignore_index).sum().clamp(min=1)
