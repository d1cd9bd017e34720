"""Causal self-attention backends.

Every backend takes q (B, T, H, D) and k, v (B, T, KV, D) with H a multiple of KV (grouped-query attention)
and returns (B, T, H, D). With `seg` (B, T), the segment id of each position in rows that pack several examples,
a position attends only to earlier positions of its own segment.

flash_attn_2 takes the segments as cu_seqlens, the cumulative lengths of the runs of equal ids, row after row
(cumulative_seqlens(seg)); the data pipeline computes them on the host and passes them down, since finding them on
the GPU reads sizes back to the host. The other backends take seg and ignore cu_seqlens.

`manual` is the reference: an explicit masked softmax anyone can check by eye.
`sdpa` is torch's scaled_dot_product_attention, `flash_attn_2` is Tri Dao's flash-attn package (CUDA, half
precision only). A backend that cannot run where it was asked for fails with the reason and the fix; there is
no silent fallback. `auto` picks flash_attn_2 where it can run and sdpa otherwise, and says what it chose.
"""
import importlib.util
import math

import torch
import torch.nn.functional as F

BACKENDS = ("manual", "sdpa", "flash_attn_2")


def segment_mask(seg):
    """(B, 1, T, T) boolean: causal, and within one segment."""
    T = seg.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=seg.device).tril()
    return (causal & (seg[:, :, None] == seg[:, None, :]))[:, None]


def cumulative_seqlens(seg):
    """int32 (n + 1,): the offsets, in the flattened (B * T) positions of seg (B, T), at which each of its n runs of
    equal segment ids starts, and B * T; a run never continues from one row into the next. Padding's run is one
    sequence like the others (its outputs are never used)."""
    B, T = seg.shape
    flat = seg.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = (flat[1:] != flat[:-1]) | (torch.arange(1, B * T, device=seg.device) % T == 0)
    return torch.cat([starts.nonzero()[:, 0], torch.tensor([B * T], device=seg.device)]).to(torch.int32)


def manual_attention(q, k, v, dropout_p=0.0, seg=None, cu_seqlens=None):
    B, T, H, D = q.shape
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
    rep = H // k.size(1)
    if rep > 1:  # every group of `rep` query heads shares one key/value head
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(D))  # (B, nh, T, T)
    allowed = torch.ones(T, T, dtype=torch.bool, device=q.device).tril() if seg is None else segment_mask(seg)
    # -inf added where a position may not look: an addition passes its gradient through untouched, where
    # masked_fill would cost another full pass over the scores in backward
    att = att + torch.zeros(allowed.shape, dtype=att.dtype, device=q.device).masked_fill(~allowed, float("-inf"))
    att = F.softmax(att.float(), dim=-1).to(q.dtype)
    if dropout_p > 0.0:
        att = F.dropout(att, p=dropout_p)
    return (att @ v).transpose(1, 2)  # (B, T, nh, hs)


def sdpa_attention(q, k, v, dropout_p=0.0, seg=None, cu_seqlens=None):
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
    gqa = q.size(1) != k.size(1)
    if seg is None:
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=gqa)
    else:
        if gqa:  # with a mask, enable_gqa has only the math kernel on CUDA; shared heads let the efficient one run
            rep = q.size(1) // k.size(1)
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=segment_mask(seg), dropout_p=dropout_p)
    return y.transpose(1, 2)


def flash_attention(q, k, v, dropout_p=0.0, seg=None, cu_seqlens=None):
    if not q.is_cuda or q.dtype not in (torch.bfloat16, torch.float16):
        raise RuntimeError(
            f"attention_backend=flash_attn_2 needs CUDA tensors in bfloat16 or float16, got {q.device.type} "
            f"{q.dtype}; use --dtype=bfloat16 on a GPU, or --attention_backend=sdpa"
        )
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    if seg is None:
        return flash_attn_func(q, k, v, dropout_p=dropout_p, causal=True)  # GQA and (B, T, H, D) natively
    # packed rows: every run of equal segment ids (padding too) becomes one sequence of the varlen kernel
    B, T, H, D = q.shape
    cu = cumulative_seqlens(seg) if cu_seqlens is None else cu_seqlens  # on the GPU, the former syncs
    # the longest sequence only sizes the kernel's grid, whose blocks past a sequence's end return at once: T bounds
    # it with nothing read back, and is one value for every batch (no recompilation)
    y = flash_attn_varlen_func(q.reshape(B * T, H, D), k.reshape(B * T, -1, D), v.reshape(B * T, -1, D), cu, cu,
                               T, T, dropout_p=dropout_p, causal=True)
    return y.reshape(B, T, H, D)


ATTENTION_FNS = {"manual": manual_attention, "sdpa": sdpa_attention, "flash_attn_2": flash_attention}


def flash_attn_available():
    return importlib.util.find_spec("flash_attn") is not None


def resolve_backend(name, device_type, dtype):
    """Check at start-up that backend `name` can run on this device and dtype; resolve `auto`.

    Returns (backend, reason) where reason says why `auto` chose what it chose (None otherwise).
    `dtype` is the compute dtype: a torch.dtype or one of 'float32', 'bfloat16', 'float16'.
    """
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    half = dtype in ("bfloat16", "float16")
    if name == "auto":
        if device_type == "cuda" and half and flash_attn_available():
            return "flash_attn_2", "auto: flash-attn is installed and the run is CUDA in half precision"
        why = ("flash-attn is not installed" if not flash_attn_available()
               else "the run is not CUDA in bfloat16/float16")
        return "sdpa", f"auto: sdpa, because {why}"
    if name not in BACKENDS:
        raise ValueError(f"unknown attention_backend {name!r}; choose one of {', '.join(BACKENDS)} or auto")
    if name == "flash_attn_2":
        if not flash_attn_available():
            raise RuntimeError(
                "attention_backend=flash_attn_2 but the flash-attn package is not installed; "
                "install it with `pip install flash-attn --no-build-isolation` (needs CUDA and nvcc), "
                "or use --attention_backend=sdpa"
            )
        if device_type != "cuda":
            raise RuntimeError(
                f"attention_backend=flash_attn_2 runs only on CUDA, but device is {device_type}; "
                "use --attention_backend=sdpa"
            )
        if not half:
            raise RuntimeError(
                f"attention_backend=flash_attn_2 needs bfloat16 or float16, but dtype is {dtype}; "
                "use --dtype=bfloat16 or --attention_backend=sdpa"
            )
    return name, None
