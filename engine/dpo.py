"""DPO: completion log-probs, the loss, and a file cache of the frozen reference model's log-probs.

    items, dropped = tokenize_pairs(tok, load_dpo(source), max_len)             # engine/data/chat_data.py
    key = reference_key(items, ref_model, tok, max_len, dtype=dtype)
    ref = ReferenceCache(cache_dir, key).load_or_compute(
        lambda: compute_reference(ref_model, items, batch_size, device, ctx), device)
    # a step, over items[i] for i in idx:
    b = collate_pairs([items[i] for i in idx], pad_id)
    logits, _ = model(torch.cat([b["chosen_ids"], b["rejected_ids"]]))          # one (2B, T) batch
    pi = reduce_logps(*sequence_logps(logits, torch.cat([b["chosen_labels"], b["rejected_labels"]])), loss_type)
    ref_c = reduce_logps(ref["chosen_logps"][idx], ref["chosen_tokens"][idx], loss_type)    # ref_r alike
    loss, metrics = dpo_loss(*pi.chunk(2), ref_c, ref_r, beta, loss_type, label_smoothing)

Labels follow engine/data/chat_data.py's convention: labels[:, t] is the target of logits[:, t] (no shift here), -100
where nothing is learned (the prompt, padding).

Losses, with Δ = (π_c − ref_c) − (π_r − ref_r) the difference of the policy's and the reference's log-ratios of
chosen over rejected:
  sigmoid   −log σ(βΔ) on summed completion log-probs (Rafailov et al. 2023). With label smoothing ε, the
            conservative form −(1−ε)·log σ(βΔ) − ε·log σ(−βΔ) (cDPO, as open-instruct writes it, and TRL's
            "sigmoid" up to 0.28; from TRL 0.29 its "sigmoid" ignores label_smoothing).
  dpo_norm  the same on per-token average log-probs, policy and reference alike (open-instruct's Tulu 3 recipe),
            which removes the pull towards longer completions that summed log-probs give.

The reference cache is keyed by everything the reference log-probs depend on: the tokenized pairs themselves (so
the data, its order and limit, the tokenizer, chat format and max_len all enter through the ids), the reference
weights, plus the tokenizer name and file hash, chat format and max_len spelled out so a mismatch says what changed.
"""
import hashlib
import json
import os
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from engine import distributed as D
from engine.data.chat import chat_format
from engine.data.chat_data import IGNORE, collate_pairs

LOSS_TYPES = ("sigmoid", "dpo_norm")
COLUMNS = ("chosen_logps", "chosen_tokens", "rejected_logps", "rejected_tokens")


def label_index(labels):
    """The flat (B * T) positions of labels' labelled tokens, in order: what sequence_logps gathers. Found where the
    batch is built, on the host: on the GPU the number of positions would have to be read back."""
    return (labels.reshape(-1) != IGNORE).nonzero()[:, 0]


def sequence_logps(logits, labels, index=None):
    """Summed log-probs of the labelled tokens of each sequence, and their count: (B,) float32, (B,) int64.

    logits (B, T, V) in any dtype, labels (B, T), index label_index(labels) (found here if not given). Only the
    labelled positions are gathered and cast to float32, so the prompt and the padding cost no float32 copy of
    their logits.
    """
    if index is None:
        index = label_index(labels)
    lg = logits.reshape(-1, logits.size(-1)).index_select(0, index).float()  # (N, V)
    lp = lg.gather(1, labels.reshape(-1).index_select(0, index)[:, None]).squeeze(1) - torch.logsumexp(lg, dim=-1)
    sums = torch.zeros(labels.size(0), dtype=torch.float32, device=logits.device)
    return sums.index_add(0, index // labels.size(1), lp), (labels != IGNORE).sum(1)


def reduce_logps(sums, n, loss_type):
    """What dpo_loss takes: the sums for sigmoid, per-token averages for dpo_norm."""
    _check(loss_type)
    return sums if loss_type == "sigmoid" else sums / n.clamp(min=1)


def _check(loss_type):
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; choose {' or '.join(LOSS_TYPES)}")


def dpo_loss(pi_c, pi_r, ref_c, ref_r, beta, loss_type="sigmoid", label_smoothing=0.0):
    """The mean DPO loss over a batch of pairs, and metrics as detached 0-d float32 tensors (float() to log them;
    they are this process's batch means, not reduced across ranks).

    Inputs are (B,) log-probs as reduce_logps gives them for loss_type; the two loss types differ only there.
    Rewards are β·(policy − reference) log-probs; accuracy is the fraction of pairs whose chosen reward is higher.
    """
    _check(loss_type)
    pi_c, pi_r, ref_c, ref_r = (x.float() for x in (pi_c, pi_r, ref_c, ref_r))
    z = beta * ((pi_c - ref_c) - (pi_r - ref_r))
    loss = (-(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)).mean()
    rc, rr = (beta * (pi_c - ref_c)).detach(), (beta * (pi_r - ref_r)).detach()
    metrics = {"loss": loss.detach(), "rewards/chosen": rc.mean(), "rewards/rejected": rr.mean(),
               "rewards/accuracy": (rc > rr).float().mean(), "rewards/margin": (rc - rr).mean(),
               "logps/chosen": pi_c.detach().mean(), "logps/rejected": pi_r.detach().mean()}
    return loss, metrics


# ----------------------------------------------------------------------------------------------------------------
# the reference model's log-probs, computed once


@torch.no_grad()
def compute_reference(model, items, batch_size, device, ctx=None):
    """The frozen model's log-probs of every pair: {chosen_logps, rejected_logps} (N,) float32 sums and
    {chosen_tokens, rejected_tokens} (N,) int64 counts, on the CPU. Under torch.distributed every rank runs pairs
    rank, rank + world, ... and all ranks end with the whole table. ctx: the forward's autocast context, if any."""
    rank, world = D.rank(), D.world_size()
    mine = range(rank, len(items), world)
    share = -(-len(items) // world)  # all_gather needs equal sizes: every share padded to the largest
    part = torch.zeros(share, 4, dtype=torch.float64, device=device)
    training = model.training
    model.eval()
    for s in range(0, share, batch_size):  # the same number of forwards on every rank (FSDP's collectives)
        idx = list(mine[s:s + batch_size])
        k = len(idx)
        idx += [0] * (min(batch_size, share - s) - k)  # a rank with fewer pairs runs fillers it then drops
        b = collate_pairs([items[i] for i in idx], pad_id=0)  # any valid id: padding carries no label
        x = torch.cat([b["chosen_ids"], b["rejected_ids"]]).to(device)
        y = torch.cat([b["chosen_labels"], b["rejected_labels"]])
        index = label_index(y).to(device)
        with ctx or nullcontext():
            logits, _ = model(x)
        lp, n = sequence_logps(logits, y.to(device), index)
        m = len(idx)
        part[s:s + k] = torch.stack([lp[:k], n[:k], lp[m:m + k], n[m:m + k]], 1).double()
    model.train(training)
    parts = [part]
    if world > 1:
        parts = [torch.empty_like(part) for _ in range(world)]
        dist.all_gather(parts, part)
    table = torch.empty(len(items), 4, dtype=torch.float64)
    for r, p in enumerate(parts):
        table[r::world] = p[:len(range(r, len(items), world))].cpu()
    return {name: table[:, j].float() if j % 2 == 0 else table[:, j].long() for j, name in enumerate(COLUMNS)}


def items_hash(items):
    """sha256 of tokenized DPO pairs, ids and labels, in order."""
    h = hashlib.sha256()
    for x in items:
        for k in ("chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels"):
            a = np.asarray(x[k], dtype=np.int64)
            h.update(len(a).to_bytes(8, "little") + a.tobytes())
    return h.hexdigest()


def weights_hash(model):
    """sha256 of a model's (or a state dict's) tensors: names, dtypes, shapes and bytes. Names are taken without
    the prefixes torch.compile and DDP add, so a wrapped model hashes as the plain one."""
    sd = model.state_dict() if isinstance(model, torch.nn.Module) else model
    h = hashlib.sha256()
    for name in sorted(sd, key=_plain):
        t = sd[name].detach().reshape(-1).contiguous().cpu()
        h.update(f"{_plain(name)}|{t.dtype}|{tuple(sd[name].shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()


def _plain(name):
    return name.replace("_orig_mod.", "").replace("module.", "")


def reference_key(items, model, tok, max_len, fmt=None, **extra):
    """What the reference log-probs of `items` depend on, as a JSON-able dict; `fmt` is the chat format the pairs
    were rendered in (None: the tokenizer's own); `extra` adds settings of the caller that change the numbers (the
    autocast dtype, say)."""
    return {"format": 1, "pairs": len(items), "data": items_hash(items), "weights": weights_hash(model),
            "tokenizer": tok.name, "tokenizer_sha256": tok.file_sha256,
            "chat_format": str(fmt) if fmt is not None else chat_format(tok), "max_len": max_len, **extra}


class ReferenceCacheError(ValueError):
    """A cache file that cannot be used: built for another key, or damaged."""


def _checksum(tensors):
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode() + b"\0" + tensors[k].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class ReferenceCache:
    """Reference log-probs in <cache_dir>/ref_logps_<digest of key>.safetensors, with the key and a checksum of
    the tensors in the file's metadata. A file is used only when its key is this key, whole, and its tensors
    match their checksum and the pair count."""

    def __init__(self, cache_dir, key):
        self.key = json.loads(json.dumps(key))  # as it reads back from the file: tuples become lists
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()
        self.path = Path(cache_dir) / f"ref_logps_{digest[:16]}.safetensors"

    def load(self):
        """The cached tensors, or None when there is no file; ReferenceCacheError for a file that cannot be used."""
        if not self.path.is_file():
            return None
        try:
            with safe_open(str(self.path), "pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            key = json.loads(meta["key"])
        except (SafetensorError, OSError, KeyError, ValueError) as e:
            raise ReferenceCacheError(f"{self.path} is damaged ({type(e).__name__}: {e})") from None
        if key != self.key:
            diff = sorted(k for k in {*key, *self.key} if key.get(k) != self.key.get(k))
            raise ReferenceCacheError(f"{self.path} was built for other {', '.join(diff)}; not using it")
        n = self.key["pairs"]
        if sorted(tensors) != sorted(COLUMNS) or any(t.shape != (n,) for t in tensors.values()) \
                or meta.get("sha256") != _checksum(tensors):
            raise ReferenceCacheError(f"{self.path} is damaged: its tensors do not match their checksum and shapes")
        return tensors

    def save(self, tensors):
        tensors = {k: tensors[k].contiguous().cpu() for k in COLUMNS}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        save_file(tensors, str(tmp), metadata={"key": json.dumps(self.key, sort_keys=True),
                                               "sha256": _checksum(tensors)})
        tmp.replace(self.path)

    def load_or_compute(self, compute, device="cpu", log=print):
        """The cached tensors, or compute() (saved by rank 0) when any rank lacks a usable file: all ranks then
        compute together, as compute_reference's all_gather needs. device: where the agreement's flag lives (the
        device of the process group's backend)."""
        try:
            tensors = self.load()
        except ReferenceCacheError as e:
            log(f"reference cache: {e}; computing it again")
            tensors = None
        have = torch.tensor(int(tensors is not None), device=device)
        if D.world_size() > 1:
            dist.all_reduce(have, op=dist.ReduceOp.MIN)
        if have.item():
            return tensors
        tensors = compute()
        if D.rank() == 0:
            self.save(tensors)
        return tensors
