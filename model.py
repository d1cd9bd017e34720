"""
One decoder-only transformer for GPT-2, LLaMA-2, LLaMA-3 and Qwen2/Qwen3.

The families differ only in switches of ModelConfig (norm, positional encoding, MLP kind, KV heads, QK-norm,
biases, tying); each switch is a single `if` where it is used. Read top to bottom:
ModelConfig -> presets -> norms -> RoPE -> Attention -> MLP -> Block -> GPT.
The model holds no distributed code and no loss other than plain cross-entropy.
"""
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.attention import ATTENTION_FNS, BACKENDS
from engine.hf import load_hf, save_hf
from engine.losses import chunked_cross_entropy


@dataclass
class ModelConfig:
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # None: as many as n_head (plain multi-head attention)
    n_embd: int = 768
    head_dim: int | None = None  # None: n_embd // n_head (Qwen3 checkpoints may set it apart)
    intermediate_size: int | None = None  # None: 4 * n_embd for gelu, LLaMA's 8/3 * n_embd rule for swiglu
    vocab_size: int = 50304
    block_size: int = 1024
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    mlp: str = "gelu"  # gelu (tanh approximation, GPT-2) | swiglu
    pos_encoding: str = "learned"  # learned | rope
    rope_theta: float = 10000.0
    rope_scaling_factor: float | None = None  # Llama-3.1 frequency scaling; None: off
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    qk_norm: bool = False  # Qwen3: RMSNorm on each query and key head before RoPE
    bias: bool = True  # biases in every linear layer and LayerNorm (GPT-2)
    qkv_bias: bool = False  # biases in the q, k, v projections only (Qwen2)
    tie_embeddings: bool = True
    dropout: float = 0.0
    attention_backend: str = "sdpa"  # manual | sdpa | flash_attn_2 (resolve `auto` before building)
    loss_chunk_size: int = 0  # > 0: with targets, the loss never forms the (B, T, V) logits (engine/losses.py)

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}), "
                                 "or give head_dim explicitly")
            self.head_dim = self.n_embd // self.n_head
        if self.intermediate_size is None:
            if self.mlp == "swiglu":  # 2/3 of 4d, rounded up to a multiple of 256 as LLaMA does
                self.intermediate_size = 256 * math.ceil(int(8 * self.n_embd / 3) / 256)
            else:
                self.intermediate_size = 4 * self.n_embd
        self.validate()

    def validate(self):
        for name in ("n_layer", "n_head", "n_kv_head", "n_embd", "head_dim", "intermediate_size",
                     "vocab_size", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"model setting {name} must be a positive integer, got {value!r}")
        choices = {"norm": ("layernorm", "rmsnorm"), "mlp": ("gelu", "swiglu"),
                   "pos_encoding": ("learned", "rope"), "attention_backend": BACKENDS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"model setting {name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head}) "
                             "so that each key/value head serves a whole group of query heads")
        if self.pos_encoding == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE rotates pairs of dimensions, so head_dim must be even, got {self.head_dim}")
        if not isinstance(self.loss_chunk_size, int) or self.loss_chunk_size < 0:
            raise ValueError(f"loss_chunk_size must be 0 (off) or a positive row count, got {self.loss_chunk_size!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.norm_eps <= 0 or self.rope_theta <= 0:
            raise ValueError("norm_eps and rope_theta must be positive")
        if self.rope_scaling_factor is not None:
            if self.pos_encoding != "rope":
                raise ValueError("rope_scaling_factor is set but pos_encoding is not rope")
            if self.rope_high_freq_factor <= self.rope_low_freq_factor:
                raise ValueError("rope_high_freq_factor must exceed rope_low_freq_factor")

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model settings {unknown}")
        return cls(**d)

    @classmethod
    def from_preset(cls, name, **overrides):
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


# ----------------------------------------------------------------------------------------------------------
# Presets. Each family's switches once, then the sizes.

GPT2 = dict(norm="layernorm", mlp="gelu", pos_encoding="learned", bias=True, tie_embeddings=True,
            vocab_size=50304, block_size=1024)  # 50257 padded up to a multiple of 64
LLAMA2 = dict(norm="rmsnorm", norm_eps=1e-5, mlp="swiglu", pos_encoding="rope", rope_theta=10000.0,
              bias=False, tie_embeddings=False, vocab_size=32000, block_size=2048)
LLAMA3 = dict(LLAMA2, rope_theta=500000.0, vocab_size=128256)
QWEN3 = dict(LLAMA2, norm_eps=1e-6, rope_theta=1e6, qk_norm=True, vocab_size=151936)

PRESETS = {
    "gpt2": dict(GPT2, n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(GPT2, n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(GPT2, n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(GPT2, n_layer=48, n_head=25, n_embd=1600),  # 1.5B
    "full_gpt2_1.36b": dict(GPT2, n_layer=18, n_head=18, n_embd=2304),
    "full_llama_1.36b": dict(LLAMA2, n_layer=18, n_head=18, n_kv_head=18, n_embd=2304, intermediate_size=6144),
    "full_llama3_1.5b_optimal": dict(LLAMA3, n_layer=18, n_head=16, n_kv_head=8, n_embd=2048,
                                     intermediate_size=7168),
    "full_llama3_2.2b_chinchilla": dict(LLAMA3, n_layer=30, n_head=16, n_kv_head=8, n_embd=2048,
                                        intermediate_size=7168),
    "full_qwen3_1.8b_optimal": dict(QWEN3, n_layer=24, n_head=16, n_kv_head=8, n_embd=2048,
                                    intermediate_size=6144),
    # tiny members of each family, for CPU tests and demos; they keep their family's vocabulary
    "tiny_gpt2": dict(GPT2, n_layer=2, n_head=4, n_embd=64, block_size=256),
    "tiny_llama": dict(LLAMA2, n_layer=2, n_head=4, n_kv_head=4, n_embd=64, intermediate_size=176,
                       block_size=256),
    "tiny_llama3": dict(LLAMA3, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=176,
                        block_size=256),
    "tiny_qwen3": dict(QWEN3, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=160,
                       block_size=256),
}


# ----------------------------------------------------------------------------------------------------------
# Norms

class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 whatever the input dtype."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        # in x's dtype: a float32 weight times a bfloat16 q or k (under autocast) would otherwise hand float32 to
        # the attention kernel
        return (self.weight * xf.to(x.dtype)).to(x.dtype)


def make_norm(cfg, dim):
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.bias)


# ----------------------------------------------------------------------------------------------------------
# Rotary position embedding (RoPE), in the rotate-half layout that transformers' checkpoints use.

def rope_frequencies(cfg):
    """The inverse frequency of each rotated pair of dimensions, (head_dim/2,), float32."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    if cfg.rope_scaling_factor is not None:
        # Llama 3.1: slow (long-wavelength) components are divided by the factor, fast ones kept, and the band
        # between them blends the two linearly in (original context / wavelength).
        factor, lo, hi = cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        ctx = cfg.rope_original_max_position
        wavelen = 2 * math.pi / inv_freq
        blend = ((ctx / wavelen - lo) / (hi - lo)).clamp(0.0, 1.0)  # 0: long wavelengths, 1: short ones
        inv_freq = (1 - blend) * inv_freq / factor + blend * inv_freq
    return inv_freq


def rope_cache(cfg, device=None):
    """cos and sin tables of shape (block_size, head_dim), float32."""
    inv_freq = rope_frequencies(cfg).to(device)
    t = torch.arange(cfg.block_size, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (T, hs/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, hs)
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    """Rotate x (B, T, nh, hs) by position; cos, sin are (T, hs), or (B, T, hs) for per-row positions. Done in
    float32."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    return (xf * cos + rotated * sin).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------
# The transformer

class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        q_dim, kv_dim = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
        # one fused projection for q, k and v: rows [q | k | v]
        self.qkv = nn.Linear(cfg.n_embd, q_dim + 2 * kv_dim, bias=cfg.bias or cfg.qkv_bias)
        self.proj = nn.Linear(q_dim, cfg.n_embd, bias=cfg.bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.attend = ATTENTION_FNS[cfg.attention_backend]
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, rope=None, cache=None, seg=None, cu_seqlens=None):
        B, T, _ = x.shape
        H, KV, D = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.qkv(x).split([H * D, KV * D, KV * D], dim=-1)
        q, k, v = q.view(B, T, H, D), k.view(B, T, KV, D), v.view(B, T, KV, D)  # (B, T, nh, hs)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, S, KV, hs): this layer's keys and values of every position so far
            y = cached_attention(q, k, v, cache.keep)
        else:
            y = self.attend(q, k, v, dropout_p=self.dropout if self.training else 0.0, seg=seg,
                            cu_seqlens=cu_seqlens)  # (B, T, nh, hs)
        return self.resid_dropout(self.proj(y.reshape(B, T, H * D)))


def cached_attention(q, k, v, keep=None):
    """Generation: T new queries (B, T, nh, hs) over S >= T keys and values, the queries being the last T positions.

    The backends assume T == S; here query i sees keys 0 .. S - T + i. With keep (B, >= S) bool, it sees only the
    keys marked True among those, and itself (left padding: a padding query gets a finite value nobody reads).
    """
    T, S = q.size(1), k.size(1)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, nh, T or S, hs)
    mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    if keep is not None:
        me = torch.arange(S, device=q.device) == torch.arange(S - T, S, device=q.device)[:, None]  # (T, S)
        mask = (mask & (keep[:, None, :S] | me))[:, None]  # (B, 1, T, S)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.size(1) != k.size(1))
    return y.transpose(1, 2)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        hidden = cfg.intermediate_size
        # for SwiGLU one fused projection gives [gate | up]
        self.fc = nn.Linear(cfg.n_embd, 2 * hidden if self.swiglu else hidden, bias=cfg.bias)
        self.proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        if self.swiglu:
            gate, up = self.fc(x).chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(self.fc(x), approximate="tanh")
        return self.dropout(self.proj(h))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm1 = make_norm(cfg, cfg.n_embd)
        self.attn = Attention(cfg)
        self.norm2 = make_norm(cfg, cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x, rope=None, cache=None, seg=None, cu_seqlens=None):
        x = x + self.attn(self.norm1(x), rope, cache, seg, cu_seqlens)
        x = x + self.mlp(self.norm2(x))
        return x


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos_encoding == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.norm_f = make_norm(cfg, cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.init_weights()

    def init_weights(self):
        """GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer), norms at one."""
        cfg = self.config
        resid_std = 0.02 / math.sqrt(2 * cfg.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = resid_std if name.endswith((".attn.proj", ".mlp.proj")) else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        self.init_rope()

    def init_rope(self):
        if self.config.pos_encoding == "rope":
            self.rope_cos, self.rope_sin = rope_cache(self.config, device=self.tok_emb.weight.device)

    def forward(self, idx, targets=None, kv_cache=None, pos=None, seg=None, cu_seqlens=None):
        """idx (B, T) token ids -> (logits (B, T, vocab_size), loss or None).

        With targets (B, T), loss is the mean cross-entropy over positions whose target is not -100; with
        config.loss_chunk_size > 0 it is computed chunk by chunk and the logits come back as None.
        With kv_cache (engine.generate.KVCache), idx continues the sequence the cache holds: its positions start
        at kv_cache.pos (or are pos (B, T), for rows the cache holds left-padded), and every layer appends its keys
        and values to the cache.
        With pos and seg (B, T), rows pack several examples: pos restarts at each example and a position attends
        only within its segment, so each example is computed exactly as it would be alone. cu_seqlens is seg in
        flash_attn_2's form (engine/attention.py's cumulative_seqlens), which the data pipeline works out on the
        host so that the kernel needs nothing read back from the GPU; without it flash_attn_2 derives it from seg.
        """
        B, T = idx.shape
        start = kv_cache.pos if kv_cache is not None else 0
        if pos is None and start + T > self.config.block_size:  # given positions are the caller's to keep in range
            raise ValueError(f"sequence length {start + T} exceeds the model's block_size {self.config.block_size}")
        x = self.tok_emb(idx)  # (B, T, C)
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(start, start + T, device=idx.device) if pos is None else pos)
        elif pos is None:
            rope = (self.rope_cos[start:start + T], self.rope_sin[start:start + T])  # (T, hs)
        else:
            rope = (self.rope_cos[pos], self.rope_sin[pos])  # (B, T, hs)
        x = self.drop(x)
        caches = kv_cache.layers if kv_cache is not None else [None] * len(self.blocks)
        for block, cache in zip(self.blocks, caches):
            x = block(x, rope, cache, seg, cu_seqlens)
        x = self.norm_f(x)
        if targets is not None and self.config.loss_chunk_size:
            # 128K-152K vocabularies make the logits the step's largest tensors: the loss goes chunk by chunk
            loss = chunked_cross_entropy(x.reshape(-1, x.size(-1)), self.lm_head.weight, targets.reshape(-1),
                                         chunk_size=self.config.loss_chunk_size)
            return None, loss
        logits = self.lm_head(x)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    # ------------------------------------------------------------------------------------------------------
    # Counting

    def num_params(self, exclude_embeddings=False):
        """Distinct parameters; with exclude_embeddings, without the token and position tables
        (the output projection still counts when it is tied to the token table)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.tok_emb.weight.numel()
            if self.pos_emb is not None:
                n -= self.pos_emb.weight.numel()
            if self.config.tie_embeddings:
                n += self.lm_head.weight.numel()
        return n

    def num_matmul_params(self):
        """N of the PaLM FLOP count: weights of every matrix multiply, the output projection included (tied
        or not); embedding lookups, norms and biases excluded."""
        return sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))

    def flops_per_token(self, T=None):
        """Training FLOPs per token, PaLM convention: 6N + 12 * L * H * Q * T (forward + backward)."""
        cfg = self.config
        T = cfg.block_size if T is None else T
        return 6 * self.num_matmul_params() + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * T

    # ------------------------------------------------------------------------------------------------------
    # transformers interoperability (engine/hf.py holds the mappings)

    @classmethod
    def from_hf(cls, path, **overrides):
        """Load a local transformers checkpoint directory (GPT-2, Llama, Qwen2, Qwen3) into a GPT."""
        return load_hf(cls, ModelConfig, path, **overrides)

    def to_hf(self, out_dir):
        """Write config.json and model.safetensors that transformers loads as the matching class."""
        save_hf(self, out_dir)
