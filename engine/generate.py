"""Text generation: a key-value cache, next-token sampling (temperature, top-k, top-p) and the decoding loop.

With the cache, the prompt is run once (prefill) and each new token costs one position of compute; without it,
every step reruns the whole context. Within the model's block_size both give the same tokens. Past it, the uncached
loop slides its window one token at a time, while the cached loop starts a fresh cache from the latest half block
whenever the cache fills (so refills stay rare); from there on the two may differ.
"""
import torch


class LayerCache:
    """One layer's keys and values, (B, max_len, KV, hs), allocated at the first update in that call's dtype.

    keep (B, max_len) bool, shared by the layers of one KVCache, marks the positions that hold tokens; None: all do.
    """

    def __init__(self, max_len, keep=None):
        self.max_len = max_len
        self.keep = keep
        self.k = self.v = None
        self.len = 0  # positions filled

    def update(self, k, v):
        """Append k, v (B, T, KV, hs); return the keys and values of every position so far, (B, len, KV, hs)."""
        if self.k is None:
            B, _, KV, D = k.shape
            self.k = k.new_zeros(B, self.max_len, KV, D)
            self.v = v.new_zeros(B, self.max_len, KV, D)
        end = self.len + k.size(1)
        if end > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} positions; {end} were asked for")
        self.k[:, self.len:end] = k
        self.v[:, self.len:end] = v
        self.len = end
        return self.k[:, :end], self.v[:, :end]


class KVCache:
    """The cache GPT.forward(idx, kv_cache=...) reads and extends: one LayerCache per block.

    With keep (B, max_len) bool, rows may hold sequences of different lengths, left-padded: a query attends only to
    positions marked True (and to itself, so that a padding query has a key and stays finite). The caller then passes
    each row's own positions to GPT.forward as pos.
    """

    def __init__(self, n_layer, max_len, keep=None):
        self.keep = keep
        self.layers = [LayerCache(max_len, keep) for _ in range(n_layer)]

    @property
    def pos(self):
        """How many positions the cache holds: where the next tokens go."""
        return self.layers[0].len

    def select(self, rows):
        """A new cache whose row i copies row rows[i] of this one (rows: LongTensor): one prefix computed once,
        then continued several ways."""
        new = KVCache(0, 0, None if self.keep is None else self.keep[rows])
        for layer in self.layers:
            copy = LayerCache(layer.max_len, new.keep)
            if layer.k is not None:
                copy.k, copy.v, copy.len = layer.k[rows], layer.v[rows], layer.len
            new.layers.append(copy)
        return new


def filter_logits(logits, top_k=None, top_p=None):
    """Set to -inf every logit (B, V) outside the top_k largest, then outside the nucleus of mass top_p.

    The nucleus is the smallest set of most likely tokens whose probability reaches top_p (the likeliest token always
    stays); it is taken over the distribution that top-k left.
    """
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        probs, order = logits.softmax(-1).sort(-1, descending=True)
        before = probs.cumsum(-1) - probs  # mass of the tokens more likely than each one
        drop = torch.zeros_like(before, dtype=torch.bool).scatter(-1, order, before >= top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """The next token (B, 1) from the last position's logits (B, V); temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop_ids=(), use_cache=True,
             generator=None, vocab_size=None):
    """Continue idx (B, T) by up to max_new_tokens tokens; returns (B, T + n).

    Stops early once every row has produced one of stop_ids; rows that stopped sooner keep being extended, so cut
    each at its first stop token. With vocab_size (the tokenizer's), ids at or above it, rows a model pads its
    vocabulary with, are never drawn.
    """
    block = model.config.block_size
    cache = KVCache(model.config.n_layer, block) if use_cache else None
    todo = idx  # the tokens the cache has not seen yet
    stop = torch.tensor(list(stop_ids), dtype=idx.dtype, device=idx.device)
    done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens):
        if cache is None:
            logits, _ = model(idx[:, -block:])
        else:
            if cache.pos + todo.size(1) > block:  # full: start again from the latest half block
                cache = KVCache(model.config.n_layer, block)
                todo = idx[:, -max(1, block // 2):]
            logits, _ = model(todo, kv_cache=cache)
        nxt = sample_next(logits[:, -1, :vocab_size], temperature, top_k, top_p, generator)  # (B, 1)
        idx = torch.cat((idx, nxt), dim=1)
        todo = nxt
        done |= torch.isin(nxt[:, 0], stop)
        if done.all():
            break
    return idx
