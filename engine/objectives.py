"""What the training loop trains on: one task per objective, each a deterministic batch source and a loss.

    batch(it, micro)         the batch of global micro-step `micro` of iteration `it`: a pure function of
                             (seed, it, micro), so resume and a change of world size see the same data
    loss(model, batch)       (mean loss over the batch, {metric: 0-d tensor})
    weight(batch)            what the batch's loss is a mean over: target tokens (pretraining, SFT) or pairs (DPO).
                             The loop averages micro-batches by weight, so the logged loss of an iteration is the mean
                             over all its tokens or pairs whatever the batch layout (packing, accumulation, ranks)
    tokens(batch)            the real (unpadded) tokens in the batch, a tensor, for throughput
    processed(batch)         the tokens the forward pass runs on, padding included (what the FLOPs are spent on)
    eval_splits              the splits there is something to evaluate on: "train", and "val" unless it is empty
    eval_batch(split, k)     the k-th fixed evaluation batch of one of eval_splits
    iters_per_epoch          for epoch-based schedules (SFT, DPO); None for pretraining
"""
import math
import os

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from engine import distributed as D
from engine.attention import cumulative_seqlens
from engine.config import ConfigError
from engine.data.bins import EVAL, BatchSampler
from engine.data.chat import chat_spec
from engine.data.chat_data import (
    IGNORE,
    collate,
    collate_pairs,
    load_dpo,
    load_sft,
    pack_sft,
    tokenize_all,
    tokenize_pairs,
    unpacked_rows,
)
from engine.dpo import (
    ReferenceCache,
    compute_reference,
    dpo_loss,
    label_index,
    reduce_logps,
    reference_key,
    sequence_logps,
)

SHUFFLE = 7  # stream tag of the per-epoch permutations
NO_VAL = "; none held out for val, so evaluations report no val loss (val_fraction > 0 gives one)"


class PretrainTask:
    metric_names = ()
    static_weights = True  # every micro-batch weighs B * T tokens
    eval_splits = ("train", "val")  # a dataset folder always has both (TokenDataset checks)

    def __init__(self, cfg, data, block_size):
        self.sampler = BatchSampler(data, cfg.batch_size, block_size, cfg.seed)
        self.longest = block_size  # tokens in a row of a batch, at most
        self.iters_per_epoch = None
        self.token_bytes = None if data.token_bytes is None else torch.from_numpy(data.token_bytes)

    def batch(self, it, micro):
        x, y = self.sampler.batch("train", it, micro)
        return {"input_ids": x, "labels": y}

    def eval_batch(self, split, k):
        x, y = self.sampler.batch(split, k, stream=EVAL if split == "train" else None)
        return {"input_ids": x, "labels": y}

    def loss(self, model, b):
        _, loss = model(b["input_ids"], b["labels"])
        return loss, {}

    def bpb_sums(self, model, b, loss):
        """tensor([summed cross-entropy in nats, summed UTF-8 bytes]) over the targets that are not special tokens,
        for bits per byte (nats / bytes / ln 2), which unlike the loss per token compares across tokenizers; `loss`
        is the batch's mean over all its targets. None when the data's token byte lengths are unknown."""
        if self.token_bytes is None:
            return None
        y = b["labels"]
        self.token_bytes = self.token_bytes.to(y.device)
        nbytes = self.token_bytes[y]
        keep = nbytes > 0
        n = keep.sum()
        # without logits (a chunked loss has none) the specials' share takes a forward pass with them ignored; every
        # rank runs it if any rank needs it, since under FSDP each forward pass is a collective
        if D.all_reduce_sum((~keep).sum()) > 0:
            _, loss = model(b["input_ids"], y.masked_fill(~keep, -100))
        return torch.stack([torch.where(n > 0, loss.float() * n, 0.0), nbytes.sum().float()])

    def weight(self, b):
        return b["labels"].numel()

    def tokens(self, b):
        return b["input_ids"].numel()

    def processed(self, b):
        return b["input_ids"].numel()


class EpochTask:
    """Examples drawn without replacement, epoch after epoch, in a seeded order per epoch; subclasses turn a list of
    their examples into a batch (_collate)."""

    static_weights = False  # tokens per batch vary (SFT)

    def __init__(self, cfg, train, val):
        if not train:
            raise ConfigError(f"{cfg.dataset}: no training examples left after tokenization and the val split")
        self.train, self.val, self.seed = train, val, cfg.seed
        # val_fraction=0, or too few examples to hold any out: no val loss, as TRL without an eval set
        self.eval_splits = ("train", "val") if val else ("train",)
        self.B, self.ga = cfg.batch_size, cfg.gradient_accumulation_steps
        self.iters_per_epoch = math.ceil(len(train) / (self.B * self.ga))
        self._perms = {}

    def _order(self, epoch):
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, SHUFFLE, epoch]).permutation(len(self.train))}
        return self._perms[epoch]

    def batch(self, it, micro):
        first = (it * self.ga + micro) * self.B
        n = len(self.train)
        return self._collate([self.train[int(self._order(p // n)[p % n])] for p in range(first, first + self.B)])

    def eval_batch(self, split, k):
        pool = self.val if split == "val" else self.train
        return self._collate([pool[i % len(pool)] for i in range(k * self.B, (k + 1) * self.B)])


def split_val(n, cfg):
    """Seeded held-out examples: (train indices, val indices)."""
    n_val = min(n - 1, max(1, round(cfg.val_fraction * n))) if cfg.val_fraction > 0 and n > 1 else 0
    order = np.random.default_rng([cfg.seed, SHUFFLE + 1]).permutation(n)  # a stream of its own
    return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())


def _tokenized(tokenize, tok, records, max_len, fmt):
    try:
        return tokenize(tok, records, max_len, fmt)
    except ValueError as e:  # a conversation the chat format cannot render (roles, a reasoning trace it has no
        raise ConfigError(f"{e} (chat format {fmt})") from None  # place for): the message says what to change


class SFTTask(EpochTask):
    """Next-token loss on the assistant tokens of chat data; rows optionally packed with per-example attention."""

    metric_names = ()

    def __init__(self, cfg, tok, max_len, log=print, fmt=None):
        convs = load_sft(cfg.dataset, limit=cfg.max_examples)
        self.chat = fmt = fmt or chat_spec(tok)  # engine/data/chat.py's ChatFormat; None: the tokenizer's own
        examples, dropped = _tokenized(tokenize_all, tok, convs, max_len, fmt)
        if dropped:
            log(f"sft: {dropped} of {len(convs)} conversations have no assistant token within max_seq_length="
                f"{max_len} and are left out")
        tr, va = split_val(len(examples), cfg)
        pick = lambda ids: [examples[i] for i in ids]  # noqa: E731
        rows = pack_sft if cfg.packing else lambda ex, _: unpacked_rows(ex)
        super().__init__(cfg, rows(pick(tr), max_len), rows(pick(va), max_len))
        self.pad, self.packing = tok.eot_id if tok.eot_id is not None else 0, cfg.packing
        self.longest = max(len(r["input_ids"]) for r in self.train + self.val)  # a batch pads to its longest row
        log(f"sft: {len(tr)} train and {len(va)} val conversations in {len(self.train)} + {len(self.val)} rows "
            f"({'packed' if cfg.packing else 'one per row'}), {self.iters_per_epoch} iterations per epoch"
            + ("" if va else NO_VAL))

    def _collate(self, rows):
        b = collate(rows, self.pad)
        if self.packing:  # flash_attn_2's form of the segments, worked out here on the host (engine/attention.py)
            b["cu_seqlens"] = cumulative_seqlens(b["segments"])
        return b

    def loss(self, model, b):
        extra = ({"pos": b["positions"], "seg": b["segments"], "cu_seqlens": b["cu_seqlens"]} if self.packing
                 else {})
        _, loss = model(b["input_ids"], b["labels"], **extra)
        return loss, {}

    def weight(self, b):
        return (b["labels"] != IGNORE).sum()

    def tokens(self, b):
        return (b["segments"] >= 0).sum()

    def processed(self, b):
        return b["input_ids"].numel()


class DPOTask(EpochTask):
    """DPO against the starting policy, whose log-probs are computed once and cached on disk."""

    static_weights = True  # every micro-batch is batch_size pairs

    metric_names = ("rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin", "logps/chosen",
                    "logps/rejected")

    def __init__(self, cfg, tok, max_len, log=print, fmt=None):
        triples = load_dpo(cfg.dataset, limit=cfg.max_examples, log=log)
        self.chat = fmt = fmt or chat_spec(tok)
        self.items, dropped = _tokenized(tokenize_pairs, tok, triples, max_len, fmt)
        if dropped:
            log(f"dpo: {dropped} of {len(triples)} pairs have no completion token within max_seq_length={max_len} "
                "and are left out")
        # such a pair's two log-probs are equal whatever the weights: its loss is a constant, its gradient zero
        same = sum((x["chosen_ids"], x["chosen_labels"]) == (x["rejected_ids"], x["rejected_labels"])
                   for x in self.items)
        if same:
            log(f"warning: dpo: chosen and rejected are the same tokens in {same} of {len(self.items)} pairs (within "
                f"max_seq_length={max_len}); " + ("there is no preference to learn: check which fields hold the "
                                                  "chosen and rejected answers" if same == len(self.items) else
                                                  "those pairs teach nothing"))
        tr, va = split_val(len(self.items), cfg)
        super().__init__(cfg, tr, va)
        self.cfg, self.tok, self.max_len, self.pad = cfg, tok, max_len, tok.eot_id if tok.eot_id is not None else 0
        self.ref, self.key = None, None
        self.longest = max(len(x[f"{k}_ids"]) for x in self.items for k in ("chosen", "rejected"))
        log(f"dpo: {len(tr)} train and {len(va)} val pairs, {self.iters_per_epoch} iterations per epoch"
            + ("" if va else NO_VAL))

    def reference(self, model, wrapped, device, ctx, dtype, saved_key=None, log=print):
        """Load or compute the reference log-probs of every pair. `model` is the starting policy before any
        wrapping (its weights enter the cache key); `wrapped` runs the forward passes. A resumed run passes the key
        its checkpoint recorded, since its weights are no longer the starting policy's."""
        self.key = saved_key
        if saved_key is None:  # hashed on rank 0, which gathers the full weights whatever the sharding
            weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            key = [reference_key(self.items, weights, self.tok, self.max_len, self.chat, dtype=dtype)
                   if weights else None]
            if dist.is_initialized():
                dist.broadcast_object_list(key, src=0)
            self.key = key[0]
        cache = ReferenceCache(self.cfg.reference_cache_dir or os.path.join(self.cfg.out_dir, "reference_cache"),
                               self.key)
        if saved_key is not None:
            self.ref = cache.load()  # raises, naming the file, if the starting policy's log-probs are gone
        else:
            self.ref = cache.load_or_compute(
                lambda: compute_reference(wrapped, self.items, self.cfg.batch_size, device, ctx), device, log)
        self.ref = {k: v.to(device) for k, v in self.ref.items()}

    def _collate(self, idx):
        items = [self.items[i] for i in idx]
        b = collate_pairs(items, self.pad)
        b["idx"] = torch.tensor(idx)
        b["n_tokens"] = torch.tensor(sum(len(it["chosen_ids"]) + len(it["rejected_ids"]) for it in items))
        b["label_index"] = label_index(torch.cat([b["chosen_labels"], b["rejected_labels"]]))
        return b

    def loss(self, model, b):
        kind, idx = self.cfg.dpo_loss_type, b["idx"]
        logits, _ = model(torch.cat([b["chosen_ids"], b["rejected_ids"]]))  # one (2B, T) forward
        labels = torch.cat([b["chosen_labels"], b["rejected_labels"]])
        pi_c, pi_r = reduce_logps(*sequence_logps(logits, labels, b["label_index"]), kind).chunk(2)
        ref_c = reduce_logps(self.ref["chosen_logps"][idx], self.ref["chosen_tokens"][idx], kind)
        ref_r = reduce_logps(self.ref["rejected_logps"][idx], self.ref["rejected_tokens"][idx], kind)
        loss, metrics = dpo_loss(pi_c, pi_r, ref_c, ref_r, self.cfg.dpo_beta, kind, self.cfg.dpo_label_smoothing)
        return loss, {k: v for k, v in metrics.items() if k != "loss"}

    def weight(self, b):
        return len(b["idx"])

    def tokens(self, b):
        return b["n_tokens"]

    def processed(self, b):
        return b["chosen_ids"].numel() + b["rejected_ids"].numel()
