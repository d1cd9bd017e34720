"""Memory and throughput of a training step, per rank, worked out before anything runs (tools/plan.py).

    est = estimate(cfg, model, world=8, T=2048, dtype="bfloat16")   # model built on the meta device
    est["total"], est["parts"]                                       # bytes per rank, and their breakdown

What is counted, per rank:
- parameters, gradients and optimizer state, exactly as the engine holds them: float32 master weights and
  gradients (FSDP: this rank's dim-0 shard of each tensor; DDP's gradients are views into its all-reduce buckets),
  AdamW's two moments or Muon's one momentum, over the parameters this rank's optimizer holds (ZeRO-1: torch's
  greedy partition, largest tensors first, each to the rank holding the fewest elements so far);
- FSDP's gathered parameters: the largest block's and the root's (embeddings, head, final norm) in the parameter
  dtype, twice over for the block (the one computing and the one prefetched);
- activations: what autograd keeps for backward in one micro-batch, traced: one block's forward, and the final
  norm and output projection, run on fake tensors (no memory, no compute) under the run's autocast; every tensor
  autograd saves is counted once (the weights excepted), the block's count scaled by depth; with activation
  checkpointing each block keeps its input, and one block's full set lives again during its recompute
  ("recompute");
- the loss: the logits and what the cross-entropy makes of them at its peak (plain), or one chunk's worth plus the
  float32 gradient of the output matrix (loss_chunk_size);
- an allowance for the CUDA context and the caching allocator (ALLOWANCE, on CUDA only).
Not counted: kernels' scratch space, torch.compile's and CUDA graphs' own pools, NCCL buffers, fragmentation beyond
the allowance, batches prefetched ahead, and DPO's reference model pass (it holds no activations).
"""
import math
import os

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from engine.optim import muon_names

GB = 1e9
ALLOWANCE = 2.0 * GB  # the CUDA context (~0.5-1 GB) and the caching allocator's slack, on a GPU
MODES = ("ddp", "zero1", "fsdp")  # "ddp" is also one process: the same bytes per rank


def config_mode(cfg):
    """The data-parallel mode cfg runs in: fsdp, zero1, or ddp (one process included)."""
    return "fsdp" if cfg.use_fsdp else "zero1" if cfg.use_zero1 else "ddp"


def shard_rows(n, world, rank):
    """Rows of a dim of size n on `rank` when FSDP shards it in `world` near-equal chunks (torch.chunk's split)."""
    size = math.ceil(n / world)
    return max(0, min(n, (rank + 1) * size) - rank * size)


def zero1_partition(groups, world):
    """{tensor: rank} under one ZeroRedundancyOptimizer holding param groups of tensors given as {tensor: numel}
    dicts: within each group the largest first (stable), each to the rank with the fewest elements so far (the
    lowest such rank), the counts carrying over from group to group, as torch partitions them."""
    sizes, owner = [0] * world, {}
    for group in groups:
        for i in sorted(group, key=lambda i: -group[i]):
            r = sizes.index(min(sizes))
            owner[i] = r
            sizes[r] += group[i]
    return owner


def state_bytes(model, mode, world, optimizer="adamw"):
    """[{"params", "grads", "optimizer"} bytes of each rank]: float32 weights, gradients and optimizer state."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    muon = set(muon_names(model)) if optimizer == "muon" else set()
    per_elem = [4 if n in muon else 8 for n, _ in named]  # Muon: one float32 momentum; AdamW: two moments
    numel = [p.numel() for _, p in named]
    # the optimizers' param groups as engine/optim.py builds them: Muon's one, then AdamW's decay and no-decay
    adam = [i for i, (n, _) in enumerate(named) if n not in muon]
    optimizers = [[[i for i, (n, _) in enumerate(named) if n in muon]],
                  [[i for i in adam if named[i][1].dim() >= 2], [i for i in adam if named[i][1].dim() < 2]]]
    owner = {}
    for groups in optimizers:  # under ZeRO-1 each optimizer partitions its own tensors
        owner.update(zero1_partition([{i: numel[i] for i in g} for g in groups], world))
    ranks = []
    for r in range(world):
        if mode == "fsdp":
            local = [shard_rows(p.shape[0], world, r) * (p.numel() // p.shape[0]) if p.dim() else p.numel()
                     for _, p in named]
            held = local
        else:
            local = numel
            held = [k if mode != "zero1" or owner[i] == r else 0 for i, k in enumerate(numel)]
        params = 4 * sum(local)
        ranks.append({"params": params, "grads": params, "optimizer": sum(h * e for h, e in zip(held, per_elem))})
    return ranks


_traced = {}


def traced_bytes(config, B, T, dtype):
    """(bytes one block keeps for backward, bytes of a block's input, bytes the final norm and the output
    projection keep) on a micro-batch of B x T under the run's autocast: a forward on fake tensors (CPU kernels'
    choices; no memory is used) whose saved tensors are counted, each storage once, the weights excepted."""
    from model import GPT, rope_cache

    memo = (repr(config), T, dtype)  # a plan asks for many batch sizes of one model
    if memo not in _traced:
        if len(_traced) >= 32:
            _traced.clear()
        # every tensor a block saves is per row, except autocast's copies of the weights: the bytes are linear in
        # B, so two traces give every batch size
        _traced[memo] = [_trace(GPT, rope_cache, config, b, T, dtype) for b in (1, 2)]
    one, two = _traced[memo]
    return tuple(a + (b - a) * (B - 1) for a, b in zip(one, two))


def _trace(GPT, rope_cache, config, B, T, dtype):
    amp = dtype in ("bfloat16", "float16")
    with FakeTensorMode():
        model = GPT(config)
        weights = {p.untyped_storage()._cdata for p in model.parameters()}
        saved = {}

        def pack(t):
            st = t.untyped_storage()
            if st._cdata not in weights:
                saved[st._cdata] = st.nbytes()
            return t

        x = torch.empty(B, T, config.n_embd, requires_grad=True)  # the residual stream stays float32
        rope = tuple(t[:T] for t in rope_cache(config)) if config.pos_encoding == "rope" else None  # as forward
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            y = model.blocks[0](x, rope)
            block = sum(saved.values())
            saved.clear()
            model.lm_head(model.norm_f(y))
    return block, x.numel() * 4, sum(saved.values())


def loss_bytes(config, B, T, dtype, chunk=0):
    """The loss's peak beyond the activations. Plain: the forward holds the logits in the compute dtype, their
    float32 copy and its log-softmax at once; the backward then holds the log-softmax, its gradient and the
    logits' float32 gradient (12 bytes an element, the larger of the two in either dtype). Chunked
    (engine/losses.py; bytes per element of one chunk's logits and of the output matrix, counted on CPU with
    TensorMemory): its backward is the peak, beside the gradient of the hidden states: in float32 the chunk's
    softmax, made in place of its logits (4), and the matrix's float32 gradient (4); in 16 bits the chunk's logits,
    turned into its gradient in their own buffer (2), float32 work on FLOAT32_ROWS of its rows at a time (4), and
    the matrix's 16-bit copy and float32 gradient (6). That is CUDA's, where the 16-bit products add into the
    gradient inside the matmul; elsewhere each goes through a 16-bit partial of the matrix, 2 bytes more an element
    of it once the float32 rows are gone."""
    from engine.losses import FLOAT32_ROWS

    e = 2 if dtype in ("bfloat16", "float16") else 4
    V, C = config.vocab_size, config.n_embd
    if chunk:
        rows = min(chunk, B * T)
        grad_h = B * T * C * 4  # the gradient of the hidden states the backward fills
        if e == 4:
            return rows * V * 4 + V * C * 4 + grad_h
        return rows * V * 2 + min(rows, FLOAT32_ROWS) * V * 4 + V * C * 6 + grad_h
    return B * T * V * max(e + (8 if e == 2 else 4), 12)


def estimate(cfg, model, world, T, dtype, batch_size=None, mode=None, activation_checkpointing=None,
             optimizer=None, device_type="cuda", rank=None, eval_only=None):
    """The per-rank bytes of one training step: {"parts": {name: bytes}, "total": bytes, ...} for rank `rank`
    (default: the rank that holds the most; ZeRO-1's greedy partition and FSDP's chunks are uneven).
    model may live on the meta device; mode, batch, checkpointing, optimizer and eval_only default to cfg's.
    eval_only: the weights and one forward's logits, without gradients, optimizer state or kept activations."""
    mode = mode or config_mode(cfg)
    B = batch_size or cfg.batch_size
    ac = cfg.activation_checkpointing if activation_checkpointing is None else activation_checkpointing
    opt = optimizer or cfg.optimizer
    eval_only = cfg.eval_only if eval_only is None else eval_only
    mc = model.config
    ranks = state_bytes(model, mode, world, opt)
    state = ranks[rank if rank is not None else max(range(world), key=lambda r: sum(ranks[r].values()))]
    pair = 2 if cfg.objective == "dpo" else 1  # DPO: chosen and rejected in one forward
    rows = B * pair
    # the rows a rank takes per optimizer step, whatever the micro-batch (accumulation keeps the global batch)
    step_rows = max(1, cfg.batch_size * cfg.gradient_accumulation_steps // world)
    chunk = mc.loss_chunk_size if cfg.objective != "dpo" else 0  # DPO's forward has no targets
    if eval_only:
        tail = 0
        parts = {"params": state["params"], "grads": 0, "optimizer": 0, "activations": 0, "recompute": 0,
                 "loss": loss_bytes(mc, rows, T, dtype, chunk) - (4 * mc.vocab_size * mc.n_embd if chunk else 0),
                 "batches": rows * T * 16}
    else:
        block, block_input, tail = traced_bytes(mc, rows, T, dtype)
        # kept from the forward to the backward; under activation checkpointing only the blocks' inputs, and one
        # block's full set again while it is recomputed
        acts = mc.n_layer * (block_input if ac else block) + tail
        parts = dict(state)
        # the step's int64 inputs and targets: all its micro-batches are taken at once
        parts.update({"activations": acts, "recompute": block if ac else 0,
                      "loss": loss_bytes(mc, rows, T, dtype, chunk), "batches": step_rows * pair * T * 16})
    if mode == "fsdp":
        pbytes = 2 if device_type == "cuda" and dtype == "bfloat16" else 4  # FSDP's bf16 parameter policy on CUDA
        blk = max(sum(p.numel() for p in b.parameters()) for b in model.blocks)
        root = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in model.blocks.parameters())
        parts["fsdp_gathered"] = (2 * blk + root) * pbytes
    if device_type == "cuda":
        parts["allowance"] = ALLOWANCE
    # The transient parts do not all peak at once. At the end of the forward: the activations and the loss's
    # tensors, and the gradients only if earlier micro-batches of the step left them (with one micro-batch a step
    # they are made in the backward as the activations are freed, and dropped after the update). In the backward:
    # the gradients, and under checkpointing the blocks' inputs and the block being recomputed (the loss's tensors
    # and the tail, what the final norm and output projection keep, are gone by then).
    accumulating = step_rows > B
    forward = parts["activations"] + parts["loss"] + (parts["grads"] if accumulating else 0)
    backward = parts["grads"] + (parts["activations"] - tail + parts["recompute"] if ac else 0)
    transient = ("activations", "loss", "grads", "recompute")
    total = sum(v for k, v in parts.items() if k not in transient) + max(forward, backward)
    return {"mode": mode, "batch_size": B, "activation_checkpointing": ac, "optimizer": opt, "eval_only": eval_only,
            "parts": parts, "total": total}


def largest_batch(cfg, model, world, T, dtype, memory, margin=0.1, **kw):
    """The largest micro-batch whose estimate fits `memory` bytes less a margin, or 0 (the estimate grows with the
    batch, though not on one line: its forward and backward peaks grow at different rates)."""
    budget = memory * (1 - margin)
    fits = lambda b: estimate(cfg, model, world, T, dtype, batch_size=b, **kw)["total"] <= budget  # noqa: E731
    if not fits(1):
        return 0
    hi = 2
    while fits(hi) and hi < 2 ** 40:
        hi *= 2
    lo = hi // 2  # fits(lo), and not fits(hi) unless at the cap
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return hi if fits(hi) else lo


def keep_global_batch(global_rows, largest, world):
    """(batch_size, gradient_accumulation_steps): the largest micro-batch up to `largest` that keeps `global_rows`
    rows per optimizer step over `world` ranks (the accumulation, as train.py counts it, a multiple of the world),
    or (None, None)."""
    for b in range(largest, 0, -1):
        if global_rows % b == 0 and (global_rows // b) % world == 0:
            return b, global_rows // b
    return None, None


def free_memory(device):
    """Bytes still free on `device`: the GPU's free memory, or the host's MemAvailable (what it can allocate without
    swapping; os.sysconf's free pages where there is no /proc); None where neither can be read (MPS, macOS)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(torch.device(device))[0]
    if torch.device(device).type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None
