"""
Extra memory of the loss: plain cross-entropy on full logits vs engine.losses.chunked_cross_entropy.

    python tools/bench_loss_memory.py                       # CUDA: Qwen3 1.8B's head, V=151936, C=2048, 4 x 2048, bf16
    python tools/bench_loss_memory.py --chunk_sizes=512,1024,2048
    python tools/bench_loss_memory.py --compare             # bytes moved, time, memory: the chunked loss now and before

Both paths start from the final norm's output h (N, C), float32 as under autocast, and the float32 (V, C) output
projection; the plain path is model.py's (Linear under autocast, .float(), F.cross_entropy) and keeps the logits
alive as GPT.forward returns them. Extra memory = peak during forward + backward minus what was allocated before
(h, weight, targets); both include the weight's float32 gradient. On CUDA the peak is torch.cuda.max_memory_allocated;
without CUDA a smaller head runs in float32 on CPU and the peak is the tensor bytes that TensorMemory counts.
Target (issue #6): chunked extra <= 1/4 of plain extra.

--compare puts the chunked loss beside its previous version (reference_v1 below) at each chunk size, in float32 and
in bfloat16 autocast: bytes moved by BytesMoved's model, extra memory, time (the rows alternating, medians) and the
errors against float64. The byte counts, fitted over small shapes, extrapolate to LLaMA-3 1.5B's head at batch
8 x 2048 (issue #21); on CUDA that head is the default shape, on CPU N=4096, C=512, V=32768.
"""
import argparse
import statistics
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from engine.losses import ChunkedCrossEntropy, chunked_cross_entropy
from tools.bench import TensorMemory, measure

GB = 1e9


def plain_loss(h, w, t):
    logits = F.linear(h, w)  # (N, V), in the autocast dtype
    return logits, F.cross_entropy(logits.float(), t)


def chunked_loss(chunk_size):
    return lambda h, w, t: (None, chunked_cross_entropy(h, w, t, chunk_size=chunk_size))


def run_once(fn, h, w, t, ctx):
    h.grad = w.grad = None
    with ctx:
        logits, loss = fn(h, w, t)
    loss.backward()
    return loss.detach(), logits


def extra_memory(fn, h, w, t, ctx):
    """(extra bytes, largest single tensor in bytes or None, loss)."""
    h.grad = w.grad = None
    if h.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss, logits = run_once(fn, h, w, t, ctx)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, None, loss
    with TensorMemory() as mem:
        loss, logits = run_once(fn, h, w, t, ctx)
        # the weight's gradient was allocated under the mode and is counted; h, w and t were not
    return mem.peak, mem.largest, loss


def median_ms(fn, h, w, t, ctx, repeats):
    times = []
    for _ in range(repeats):
        if h.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        run_once(fn, h, w, t, ctx)
        if h.is_cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main(argv=None, out=print):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--width", type=int, default=2048 if cuda else 128)
    p.add_argument("--batch", type=int, default=4 if cuda else 1)
    p.add_argument("--seq", type=int, default=2048 if cuda else 512)
    p.add_argument("--chunk_sizes", default="1024,2048" if cuda else "64,128")
    p.add_argument("--repeats", type=int, default=5 if cuda else 2)
    a = p.parse_args(argv)
    device = "cuda" if cuda else "cpu"
    N, C, V = a.batch * a.seq, a.width, a.vocab
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    g = torch.Generator(device).manual_seed(0)
    h = torch.randn(N, C, device=device, generator=g).requires_grad_()
    w = (torch.randn(V, C, device=device, generator=g) * 0.02).requires_grad_()
    t = torch.randint(0, V, (N,), device=device, generator=g)
    if not cuda:
        out("no CUDA here: a reduced head in float32 on CPU; peak = tensor bytes counted by TensorMemory "
            "(the GPU figure needs: python tools/bench_loss_memory.py on a CUDA machine)")
    out(f"# {torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"
        f", N={a.batch}x{a.seq}={N}, C={C}, V={V}, {'bfloat16 autocast' if cuda else 'float32'}")
    out("| loss | extra GB | largest tensor GB | ms fwd+bwd | extra vs plain | loss - plain |")
    out("|---|---|---|---|---|---|")
    rows = [("plain", plain_loss)] + [(f"chunked {c}", chunked_loss(int(c))) for c in a.chunk_sizes.split(",")]
    results = []
    for name, fn in rows:
        extra, largest, loss = extra_memory(fn, h, w, t, ctx)
        ms = median_ms(fn, h, w, t, ctx, a.repeats)
        results.append((name, extra, largest, loss))
        ref_extra, ref_loss = results[0][1], results[0][3]
        out(f"| {name} | {extra / GB:.3f} | {'-' if largest is None else f'{largest / GB:.3f}'} | {ms:.1f} | "
            f"{extra / ref_extra:.3f} | {(loss - ref_loss).item():+.2e} |")
    return results


# ----------------------------------------------------------------------------------------------------------
# --compare: bytes moved by the chunked loss, against its previous version

aten = torch.ops.aten
# ops that touch only the elements an index names: which argument is the index (index_put_'s, a list of them)
INDEXED = {aten.gather.default: 2, aten.scatter_.src: 2, aten.scatter_.value: 2, aten.scatter_add_.default: 2,
           aten.index.Tensor: 1, aten.index_put_.default: 1}
OVERWRITES = (aten.copy_.default, aten.fill_.Scalar, aten.zero_.default)


class BytesMoved(TorchDispatchMode):
    """Bytes read and written by the aten ops run while the mode is on, summed. A model of memory traffic that
    counts each op's operands once, not a hardware measurement: an op reads each tensor input once and writes each
    tensor output once (an in-place op's tensor both), as a kernel that streams its operands through memory would.
    - views and metadata ops (view, t, transpose, slice, select, expand, as_strided, detach, alias) move nothing;
    - a tensor passed as out= is written, not read, and copy_, fill_ and zero_ do not read what they overwrite;
    - gather, scatter_, scatter_add_, index and index_put_ touch the elements an index names, not the tensor;
    - aten.logsumexp counts the passes its kernel makes out of the mode's sight (ReduceOps.cpp
      logsumexp_out_impl: amax, a subtraction into a new tensor, exp_ in place, sum: 6 times its input's bytes);
    - an op on operands of two dtypes counts as a CUDA kernel runs it, converting as it reads and writes; a CPU
      kernel first makes converted copies (TensorIterator), which are left out;
    - what a kernel re-reads from cache counts once: a matmul's operands, a row that a reduction revisits."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not func.is_view and func is not aten._unsafe_view.default:
            self.bytes += self._moved(func, args, kwargs, out)
        return out

    @staticmethod
    def _moved(func, args, kwargs, out):
        size = lambda ts: sum(t.numel() * t.element_size() for t in tree_flatten(ts)[0]  # noqa: E731
                              if isinstance(t, torch.Tensor))
        if func in INDEXED:  # the index and any values read; the elements it names read and written
            index = [i for i in tree_flatten(args[INDEXED[func]])[0] if isinstance(i, torch.Tensor)]
            return size(args[1:]) + 2 * max(i.numel() for i in index) * args[0].element_size()
        if func is aten.logsumexp.default:
            return 6 * size(args[0]) + size(out)
        values = dict(zip((a.name for a in func._schema.arguments), args)) | kwargs
        read = 0
        for a in func._schema.arguments:
            written = a.alias_info is not None and a.alias_info.is_write
            if a.name in values and not (written and (a.kwarg_only or func in OVERWRITES)):
                read += size(values[a.name])
        return read + size(out)


# The previous version of engine/losses.py's chunk loops (commit 053d579), kept here only for --compare's side by
# side: its float32 copy of each chunk's logits, logsumexp, in-place passes and (V, C) partial of the weight gradient
# are what the present version removed. Its eager path only, which computed what its custom operators did.

def _forward_v1(hidden, weight, targets, chunk_size, ignore_index, dtype):
    valid = targets != ignore_index
    safe = targets.masked_fill(~valid, 0)
    acc = torch.promote_types(dtype, torch.float32)
    lse = torch.empty(hidden.size(0), dtype=acc, device=hidden.device)
    total = torch.zeros((), dtype=acc, device=hidden.device)
    with torch.autocast(hidden.device.type, enabled=False):
        w = weight.to(dtype)
        for s in range(0, hidden.size(0), chunk_size):
            logits = (hidden[s:s + chunk_size].to(dtype) @ w.T).to(acc)
            lse[s:s + chunk_size] = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, safe[s:s + chunk_size, None]).squeeze(1)
            total += ((lse[s:s + chunk_size] - picked) * valid[s:s + chunk_size]).sum()
            del logits, picked
    return total, lse


def _backward_v1(grad_total, hidden, weight, targets, lse, chunk_size, ignore_index, dtype, need_h, need_w):
    valid = targets != ignore_index
    safe = targets.masked_fill(~valid, 0)
    cs = chunk_size
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = torch.zeros_like(weight, dtype=lse.dtype) if need_w else None
    with torch.autocast(hidden.device.type, enabled=False):
        w = weight.to(dtype)
        for s in range(0, hidden.size(0), cs):
            h = hidden[s:s + cs].to(dtype)
            g = (h @ w.T).to(lse.dtype).sub_(lse[s:s + cs, None]).exp_()
            g.scatter_add_(1, safe[s:s + cs, None], -torch.ones_like(lse[s:s + cs, None]))
            g.mul_((grad_total * valid[s:s + cs])[:, None])
            g = g.to(dtype)
            if need_h:
                grad_h[s:s + cs] = g @ w
            if need_w and grad_w.dtype == dtype:
                grad_w.addmm_(g.T, h)
            elif need_w:
                grad_w += g.T @ h
            del g
    return grad_h, grad_w.to(weight.dtype) if need_w else None


def reference_v1(hidden, weight, targets, chunk_size, ignore_index=-100):
    dev = hidden.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
    total = ChunkedCrossEntropy.apply(hidden, weight, targets, chunk_size, ignore_index, dtype,
                                      (_forward_v1, _backward_v1))
    return total / (targets != ignore_index).sum().clamp(min=1)


# the contestants, and what CUDA changes in their bytes per weight per chunk in 16 bits: the present version adds
# each chunk's weight-gradient product into the float32 sum inside the matmul (_add_matmul), without the CPU's 16-bit
# (V, C) partial written and read back
CONTESTANTS = {"previous": (reference_v1, 0), "now": (chunked_cross_entropy, -4)}
# small shapes (N, C, V, chunk) over which the counts are fitted to fit_terms
FIT_SHAPES = [(64, 8, 96, 16), (64, 16, 128, 32), (96, 8, 160, 32), (128, 24, 96, 64), (80, 16, 200, 16),
              (120, 8, 128, 40), (64, 24, 256, 64), (100, 16, 112, 25), (72, 12, 180, 24), (128, 16, 64, 128)]
LLAMA3 = (8 * 2048, 2048, 128256)  # LLaMA-3 1.5B's head at batch 8 x 2048: N, C, V


def fit_terms(N, C, V, chunk):
    """What the bytes moved are linear in: per logit, per weight per chunk, per weight, per hidden element, per row,
    per chunk and once."""
    k = -(-N // chunk)  # chunks
    return torch.tensor([N * V, k * V * C, V * C, N * C, N, k, 1], dtype=torch.float64)


def problem(N, C, V, device="cpu", seed=0):
    g = torch.Generator(device).manual_seed(seed)
    h = torch.randn(N, C, device=device, generator=g).requires_grad_()
    w = (torch.randn(V, C, device=device, generator=g) * 0.02).requires_grad_()
    t = torch.randint(0, V, (N,), device=device, generator=g)
    t[::7] = -100  # some ignored rows, as an SFT batch has
    return h, w, t


def autocast(device, dtype):
    return torch.autocast(device, dtype=dtype) if dtype != torch.float32 else nullcontext()


def as_loss(fn, chunk):
    return lambda h, w, t: (None, fn(h, w, t, chunk))


def counted_bytes(fn, chunk, h, w, t, dtype):
    h.grad = w.grad = None
    with BytesMoved() as moved:
        run_once(as_loss(fn, chunk), h, w, t, autocast(h.device.type, dtype))
    return moved.bytes


def fitted(fn, dtype, device="cpu"):
    """The coefficients of fit_terms in fn's bytes moved, fitted over FIT_SHAPES (exactly: the ops are the same at
    every shape), and the largest residual in bytes."""
    A = torch.stack([fit_terms(*shape) for shape in FIT_SHAPES])
    b = torch.tensor([float(counted_bytes(fn, c, *problem(N, C, V, device), dtype)) for N, C, V, c in FIT_SHAPES],
                     dtype=torch.float64)
    coef = torch.linalg.lstsq(A, b[:, None]).solution.squeeze(1)
    return coef, (A @ coef - b).abs().max().item()


def float64_reference(h, w, t, rows=512):
    """Plain cross-entropy in float64, a block of rows at a time (all the float64 logits need not fit at once):
    (loss, grad h, grad w)."""
    h64, w64 = h.detach().double(), w.detach().double().requires_grad_()
    count = (t != -100).sum()
    loss, gh, gw = 0.0, torch.empty_like(h64), torch.zeros_like(w64)
    for s in range(0, h.size(0), rows):
        hs = h64[s:s + rows].clone().requires_grad_()
        part = F.cross_entropy(hs @ w64.T, t[s:s + rows], reduction="sum", ignore_index=-100) / count
        dh, dw = torch.autograd.grad(part, (hs, w64))
        loss, gh[s:s + rows], gw = loss + part.item(), dh, gw + dw
    return loss, gh, gw


class Turn:
    """One contestant's forward and backward, as tools.bench.measure times a step."""

    def __init__(self, fn, chunk, h, w, t, dtype):
        self.step = lambda: run_once(as_loss(fn, chunk), h, w, t, autocast(h.device.type, dtype))


def compare(a, out=print):
    """Both versions at each chunk size, in float32 and in bfloat16 autocast: a table each; returns its rows."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    N, C, V = a.batch * a.seq, a.width, a.vocab
    chunks = [int(c) for c in a.chunk_sizes.split(",")]
    h, w, t = problem(N, C, V, device)
    ref_loss, ref_h, ref_w = float64_reference(h, w, t)
    out(f"# {torch.cuda.get_device_name() if device == 'cuda' else f'cpu, {torch.get_num_threads()} threads'}, "
        f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}; N={N}, C={C}, V={V}, every 7th target ignored; "
        f"forward + backward. GB moved: BytesMoved's model; B per logit, B per weight per chunk: its coefficients of "
        f"N*V and of chunks*V*C, fitted over small shapes, which give the LLaMA-3 1.5B head's figure at N, C, V = "
        f"{LLAMA3} in the same dtype (on CUDA: run on CPU, with CUDA's weight-gradient sums, 4 B per weight per "
        f"chunk fewer in 16 bits); extra GB: "
        f"{'max_memory_allocated' if device == 'cuda' else 'TensorMemory'}'s peak; ms: median of {a.repeats}, the "
        f"rows taking turns in alternating order; errors: against float64, of the loss and of the largest gradient "
        f"element relative to the largest float64 one")
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        runs = [(name, c) for c in chunks for name in CONTESTANTS]
        ms = measure([Turn(CONTESTANTS[name][0], c, h, w, t, dtype) for name, c in runs], 1, 1, a.repeats, device)
        fits = {name: fitted(fn, dtype, device) for name, (fn, _) in CONTESTANTS.items()}
        out(f"\n{dtype}{' autocast' if dtype != torch.float32 else ''}")
        out("| loss | chunk | GB moved | B per logit | B per weight per chunk | LLaMA-3 GB | LLaMA-3 GB on CUDA | "
            "extra GB | ms | loss err | grad h err | grad w err |")
        out("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for (name, c), sec in zip(runs, ms):
            fn, cuda_per_weight = CONTESTANTS[name]
            coef, residual = fits[name]
            moved = counted_bytes(fn, c, h, w, t, dtype)
            assert residual < 1 and abs(moved - fit_terms(N, C, V, c) @ coef) < 1, f"{name}: the terms do not fit"
            cuda = coef.clone()
            cuda[1] += cuda_per_weight if dtype != torch.float32 and device == "cpu" else 0
            extra, _, loss = extra_memory(as_loss(fn, c), h, w, t, autocast(device, dtype))
            r = {"dtype": dtype, "loss": name, "chunk": c, "moved": moved, "per_logit": coef[0].item(),
                 "per_weight_chunk": coef[1].item(), "llama3": (fit_terms(*LLAMA3, c) @ coef).item(),
                 "llama3_cuda": (fit_terms(*LLAMA3, c) @ cuda).item(), "extra": extra, "ms": sec * 1000,
                 "loss_err": abs(loss.item() - ref_loss),
                 "grad_h_err": ((h.grad - ref_h).abs().max() / ref_h.abs().max()).item(),
                 "grad_w_err": ((w.grad - ref_w).abs().max() / ref_w.abs().max()).item()}
            rows.append(r)
            out(f"| {name} | {c} | {moved / GB:.2f} | {r['per_logit']:.0f} | {r['per_weight_chunk']:.0f} | "
                f"{r['llama3'] / GB:.0f} | {r['llama3_cuda'] / GB:.0f} | {extra / GB:.3f} | {r['ms']:.0f} | "
                f"{r['loss_err']:.1e} | {r['grad_h_err']:.1e} | {r['grad_w_err']:.1e} |")
    return rows


def main_compare(argv=None, out=print):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description="bytes moved by the chunked loss, now and in its previous version")
    p.add_argument("--compare", action="store_true")
    p.add_argument("--vocab", type=int, default=128256 if cuda else 32768)  # CUDA: LLaMA-3 1.5B's head itself
    p.add_argument("--width", type=int, default=2048 if cuda else 512)
    p.add_argument("--batch", type=int, default=8 if cuda else 2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--chunk_sizes", default="1024,2048,4096")
    p.add_argument("--repeats", type=int, default=3)
    return compare(p.parse_args(argv), out)


if __name__ == "__main__":
    import sys

    main_compare() if "--compare" in sys.argv[1:] else main()
