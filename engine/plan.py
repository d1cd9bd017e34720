"""Memory and throughput of a training step, per rank, worked out before anything runs (tools/plan.py).

    est = estimate(cfg, model, world=8, T=2048, dtype="bfloat16")   # model built on the meta device
    est["total"], est["parts"]                                       # bytes per rank, and their breakdown

What is counted, per rank:
- parameters, gradients and optimizer state, exactly as the engine holds them: float32 master weights and
  gradients (FSDP: this rank's dim-0 shard of each tensor; DDP: plus its separate bucket copy of the gradients),
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


def traced_bytes(config, B, T, dtype):
    """(bytes one block keeps for backward, bytes of a block's input, bytes the final norm and the output
    projection keep) on a micro-batch of B x T under the run's autocast: a forward on fake tensors (CPU kernels'
    choices; no memory is used) whose saved tensors are counted, each storage once, the weights excepted."""
    from model import GPT, rope_cache

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
        rope = rope_cache(config) if config.pos_encoding == "rope" else None
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            y = model.blocks[0](x, rope)
            block = sum(saved.values())
            saved.clear()
            model.lm_head(model.norm_f(y))
    return block, x.numel() * 4, sum(saved.values())


def loss_bytes(config, B, T, dtype, chunk=0):
    """The loss's peak beyond the activations: plain, the logits in the compute dtype, their float32 copy and its
    log-softmax at once (the backward's gradient then takes the copy's place); chunked, that of one chunk of rows
    plus the float32 gradient of the output matrix it accumulates."""
    e = 2 if dtype in ("bfloat16", "float16") else 4
    V, C = config.vocab_size, config.n_embd
    if chunk:
        rows = min(chunk, B * T)
        return rows * V * (e + 8) + 4 * V * C
    return B * T * V * (e + (8 if e == 2 else 4))


def estimate(cfg, model, world, T, dtype, batch_size=None, mode=None, activation_checkpointing=None,
             optimizer=None, device_type="cuda", rank=None):
    """The per-rank bytes of one training step: {"parts": {name: bytes}, "total": bytes, ...} for rank `rank`
    (default: the rank that holds the most; ZeRO-1's greedy partition and FSDP's chunks are uneven).
    model may live on the meta device; mode, batch, checkpointing and optimizer default to cfg's."""
    mode = mode or config_mode(cfg)
    B = batch_size or cfg.batch_size
    ac = cfg.activation_checkpointing if activation_checkpointing is None else activation_checkpointing
    opt = optimizer or cfg.optimizer
    mc = model.config
    ranks = state_bytes(model, mode, world, opt)
    state = ranks[rank if rank is not None else max(range(world), key=lambda r: sum(ranks[r].values()))]
    rows = B * (2 if cfg.objective == "dpo" else 1)  # DPO: chosen and rejected in one forward
    block, block_input, tail = traced_bytes(mc, rows, T, dtype)
    # kept from the forward to the backward; under activation checkpointing only the blocks' inputs, and one
    # block's full set again while it is recomputed
    acts = mc.n_layer * (block_input if ac else block) + tail
    parts = dict(state)
    if mode != "fsdp" and world > 1:
        parts["ddp_buckets"] = state["grads"]  # DDP's flat copy of the gradients beside .grad
    parts.update({"activations": acts, "recompute": block if ac else 0,
                  "loss": loss_bytes(mc, rows, T, dtype, cfg.loss_chunk_size if cfg.objective != "dpo" else 0)})
    if mode == "fsdp":
        pbytes = 2 if device_type == "cuda" and dtype == "bfloat16" else 4  # FSDP's bf16 parameter policy on CUDA
        blk = max(sum(p.numel() for p in b.parameters()) for b in model.blocks)
        root = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in model.blocks.parameters())
        parts["fsdp_gathered"] = (2 * blk + root) * pbytes
    if device_type == "cuda":
        parts["allowance"] = ALLOWANCE
    return {"mode": mode, "batch_size": B, "activation_checkpointing": ac, "optimizer": opt, "parts": parts,
            "total": sum(parts.values())}


def largest_batch(cfg, model, world, T, dtype, memory, margin=0.1, **kw):
    """The largest micro-batch whose estimate fits `memory` bytes less a margin, or 0: activations and the loss
    grow linearly in the batch, so two estimates give the line."""
    one, two = (estimate(cfg, model, world, T, dtype, batch_size=b, **kw)["total"] for b in (1, 2))
    per_row, fixed = two - one, 2 * one - two
    budget = memory * (1 - margin) - fixed
    return max(0, int(budget // per_row)) if per_row > 0 else 0
