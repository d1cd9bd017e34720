"""
Extra memory of the loss: plain cross-entropy on full logits vs engine.losses.chunked_cross_entropy.

    python tools/bench_loss_memory.py                       # CUDA: Qwen3 1.8B's head, V=151936, C=2048, 4 x 2048, bf16
    python tools/bench_loss_memory.py --chunk_sizes=512,1024,2048

Both paths start from the final norm's output h (N, C), float32 as under autocast, and the float32 (V, C) output
projection; the plain path is model.py's (Linear under autocast, .float(), F.cross_entropy) and keeps the logits
alive as GPT.forward returns them. Extra memory = peak during forward + backward minus what was allocated before
(h, weight, targets); both include the weight's float32 gradient. On CUDA the peak is torch.cuda.max_memory_allocated;
without CUDA a smaller head runs in float32 on CPU and the peak is the tensor bytes that TensorMemory counts.
Target (issue #6): chunked extra <= 1/4 of plain extra.
"""
import argparse
import statistics
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from engine.losses import chunked_cross_entropy
from tools.bench import TensorMemory

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


if __name__ == "__main__":
    main()
