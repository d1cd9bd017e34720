"""Does torch's scaled_dot_product_attention run the flash kernel for the attention our LLaMA-3 presets train with?

    python tools/sdpa_probe.py            # on a CUDA machine: exit 0 only if flash serves it and is chosen

The case: bfloat16, causal, GQA (16 query heads over 8 key/value heads, enable_gqa=True, as engine/attention.py
calls it), batch 8, T=2048, head dim 128, forward and backward. Two checks:
1. flash alone (sdpa_kernel(SDPBackend.FLASH_ATTENTION)): torch raises if the flash kernel cannot serve the case;
2. the default dispatch, what a run gets: which backend's operator ran (aten::_scaled_dot_product_flash_attention,
   _efficient_, _cudnn_, or the math fallback) and the CUDA kernels whose names contain "flash", from torch.profiler.
Exit 0 when both say flash; 1 when either does not; 2 without CUDA (nothing to probe; the message says so).
"""
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

B, H, KV, T, D = 8, 16, 8, 2048, 128
OPS = {b: f"aten::_scaled_dot_product_{b}_attention" for b in ("flash", "efficient", "cudnn")}
OPS["math"] = "aten::_scaled_dot_product_attention_math"


def attention(q, k, v):
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    y.float().square().mean().backward()
    torch.cuda.synchronize()


def main(out=print):
    if not torch.cuda.is_available():
        print("sdpa_probe.py needs CUDA: it checks which attention kernel a GPU runs; nothing was probed here",
              file=sys.stderr)
        return 2
    out(f"torch {torch.__version__}, {torch.cuda.get_device_name()}: B={B}, {H} query heads over {KV} key/value "
        f"heads, T={T}, head dim {D}, bfloat16, causal, enable_gqa=True, forward and backward")
    gen = torch.Generator("cuda").manual_seed(0)
    q = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, generator=gen, requires_grad=True)
    k, v = (torch.randn(B, KV, T, D, device="cuda", dtype=torch.bfloat16, generator=gen, requires_grad=True)
            for _ in range(2))
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            attention(q, k, v)
        forced = True
        out("flash alone: runs")
    except RuntimeError as e:
        forced = False
        out(f"flash alone: FAILS: {str(e).strip().splitlines()[0]}")
    attention(q, k, v)  # warm-up of the default dispatch
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        attention(q, k, v)
    names = {e.key for e in prof.key_averages()}
    chosen = [b for b, op in OPS.items() if op in names]
    kernels = sorted(n for n in names if "flash" in n.lower() and not n.startswith("aten::"))
    out(f"default dispatch: {', '.join(chosen) or 'none of ' + ', '.join(OPS)}")
    out("flash kernels: " + ("; ".join(k[:100] for k in kernels) if kernels else "none"))
    ok = forced and chosen == ["flash"] and bool(kernels)
    out("PASS: flash serves it and is chosen" if ok else "FAIL: flash is not what this case runs")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
