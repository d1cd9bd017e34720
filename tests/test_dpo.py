"""engine/dpo.py against hand-written recomputations: the DPO losses and metrics in plain Python math, log-probs
in float64, reference log-probs from one unpadded sequence at a time, and the cache's refusals."""
import math
import os
import shutil

import pytest
import torch
import torch.multiprocessing as mp

from engine.data.chat import ChatFormat
from engine.data.chat_data import collate_pairs, dpo_messages, make_toy_dpo, tokenize_pairs
from engine.dpo import (
    ReferenceCache,
    ReferenceCacheError,
    compute_reference,
    dpo_loss,
    reduce_logps,
    reference_key,
    sequence_logps,
    weights_hash,
)
from model import GPT, ModelConfig

# four pairs: policy and reference log-probs of chosen and rejected, summed, and completion token counts
PI_C, PI_R = [-12.0, -30.5, -8.25, -20.0], [-15.0, -28.0, -9.0, -26.5]
REF_C, REF_R = [-13.0, -29.0, -8.0, -22.0], [-14.0, -29.5, -10.5, -25.0]
N_C, N_R = [4, 10, 3, 8], [5, 9, 3, 11]


def _sig(x):
    return 1 / (1 + math.exp(-x))


def _expected(pc, pr, rc, rr, beta, eps):
    z = [beta * ((a - b) - (c - d)) for a, c, b, d in zip(pc, pr, rc, rr)]
    loss = sum(-(1 - eps) * math.log(_sig(x)) - eps * math.log(_sig(-x)) for x in z) / len(z)
    rew_c = [beta * (a - b) for a, b in zip(pc, rc)]
    rew_r = [beta * (a - b) for a, b in zip(pr, rr)]
    mean = lambda v: sum(v) / len(v)
    return {"loss": loss, "rewards/chosen": mean(rew_c), "rewards/rejected": mean(rew_r),
            "rewards/accuracy": mean([float(a > b) for a, b in zip(rew_c, rew_r)]),
            "rewards/margin": mean([a - b for a, b in zip(rew_c, rew_r)]), "logps/chosen": mean(pc),
            "logps/rejected": mean(pr)}


@pytest.mark.parametrize("loss_type", ["sigmoid", "dpo_norm"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_dpo_loss_and_metrics(loss_type, eps):
    beta = 0.1 if loss_type == "sigmoid" else 5.0
    t = lambda v: torch.tensor(v, dtype=torch.float32)
    n_c, n_r = torch.tensor(N_C), torch.tensor(N_R)
    args = [reduce_logps(t(v), n, loss_type) for v, n in ((PI_C, n_c), (PI_R, n_r), (REF_C, n_c), (REF_R, n_r))]
    pi_c = args[0].clone().requires_grad_()
    loss, metrics = dpo_loss(pi_c, *args[1:], beta, loss_type, eps)
    if loss_type == "sigmoid":
        want = _expected(PI_C, PI_R, REF_C, REF_R, beta, eps)
    else:  # per-token averages, policy and reference alike
        avg = lambda v, n: [a / b for a, b in zip(v, n)]
        want = _expected(avg(PI_C, N_C), avg(PI_R, N_R), avg(REF_C, N_C), avg(REF_R, N_R), beta, eps)
    assert set(metrics) == set(want)
    for k, v in want.items():
        assert metrics[k].dim() == 0 and not metrics[k].requires_grad
        assert float(metrics[k]) == pytest.approx(v, rel=1e-5, abs=1e-6), k
    assert loss.item() == pytest.approx(want["loss"], rel=1e-5)
    assert 0 < want["rewards/accuracy"] < 1  # the numbers exercise both outcomes
    loss.backward()
    # d loss / d pi_c_i = -beta/B * ((1-eps) * sigmoid(-z_i) - eps * sigmoid(z_i))
    for i, g in enumerate(pi_c.grad.tolist()):
        z = beta * ((args[0][i] - args[2][i]) - (args[1][i] - args[3][i])).item()
        assert g == pytest.approx(-beta / 4 * ((1 - eps) * _sig(-z) - eps * _sig(z)), rel=1e-4, abs=1e-7)


def test_dpo_loss_at_the_reference_is_log2_and_rejects_unknown_types():
    x = torch.tensor([-3.0, -7.0])
    loss, m = dpo_loss(x, x - 1, x, x - 1, beta=0.5)
    assert loss.item() == pytest.approx(math.log(2)) and float(m["rewards/accuracy"]) == 0.0
    with pytest.raises(ValueError, match="unknown DPO loss_type 'ipo'"):
        dpo_loss(x, x, x, x, 0.1, "ipo")
    with pytest.raises(ValueError, match="unknown DPO loss_type"):
        reduce_logps(x, torch.ones(2), "hinge")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sequence_logps_matches_float64(dtype):
    g = torch.Generator().manual_seed(0)
    B, T, V = 3, 7, 11
    logits = (torch.randn(B, T, V, generator=g) * 3).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = -100
    labels[1, 5:] = -100
    labels[2] = -100  # nothing learned: sum 0 over 0 tokens
    sums, n = sequence_logps(logits, labels)
    assert sums.dtype == torch.float32 and n.tolist() == [4, 5, 0]
    for b in range(B):
        want = 0.0
        for t in range(T):
            if labels[b, t] != -100:
                row = [float(v) for v in logits[b, t].detach().double()]
                want += row[labels[b, t]] - math.log(sum(math.exp(v) for v in row))
        assert sums[b].item() == pytest.approx(want, rel=1e-5, abs=1e-5)
    sums.sum().backward()
    assert logits.grad[2].abs().sum() == 0 and logits.grad[0, :3].abs().sum() == 0


# ---- reference log-probs


def _model(seed=0, vocab=64):
    torch.manual_seed(seed)
    return GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=vocab, block_size=32))


def _items(n=5, seed=0, vocab=64):
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        p = torch.randint(0, vocab, (3 + i % 3,), generator=g).tolist()
        x = {}
        for k in ("chosen", "rejected"):
            c = torch.randint(0, vocab, (2 + (i + len(k)) % 4,), generator=g).tolist()
            ids = p + c
            x[f"{k}_ids"], x[f"{k}_labels"] = ids[:-1], [-100] * (len(p) - 1) + c
        items.append(x)
    return items


def _one_by_one(model, items):
    """Each sequence alone, unpadded: float64 log-softmax summed over its labelled positions."""
    out = {k: [] for k in ("chosen_logps", "chosen_tokens", "rejected_logps", "rejected_tokens")}
    with torch.no_grad():
        for x in items:
            for k in ("chosen", "rejected"):
                logp = torch.log_softmax(model(torch.tensor([x[f"{k}_ids"]]))[0][0].double(), -1)
                labs = x[f"{k}_labels"]
                out[f"{k}_logps"].append(sum(logp[t, y].item() for t, y in enumerate(labs) if y != -100))
                out[f"{k}_tokens"].append(sum(y != -100 for y in labs))
    return out


def test_compute_reference_matches_one_sequence_at_a_time():
    model, items = _model(), _items(5)
    model.train()
    ref = compute_reference(model, items, batch_size=2, device="cpu")
    assert model.training  # its mode is given back
    want = _one_by_one(model, items)
    assert ref["chosen_tokens"].tolist() == want["chosen_tokens"] and ref["chosen_tokens"].dtype == torch.int64
    assert ref["rejected_tokens"].tolist() == want["rejected_tokens"]
    for k in ("chosen_logps", "rejected_logps"):
        assert ref[k].dtype == torch.float32
        torch.testing.assert_close(ref[k].double(), torch.tensor(want[k], dtype=torch.float64), rtol=1e-5, atol=1e-5)


def _ranks(rank, world, init_file, out):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    ref = compute_reference(_model(), _items(7), batch_size=2, device="cpu")
    torch.save(ref, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


@pytest.mark.distributed
def test_compute_reference_on_two_ranks_gives_every_rank_the_whole_table(tmp_path):
    mp.spawn(_ranks, args=(2, str(tmp_path / "init"), str(tmp_path / "ref")), nprocs=2)
    alone = compute_reference(_model(), _items(7), batch_size=2, device="cpu")
    for r in range(2):
        got = torch.load(tmp_path / f"ref.{r}", weights_only=True)
        for k, v in alone.items():
            torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-6)


class _Tok:
    name, file_sha256, chat_format = "gpt2", "ab" * 32, None


def test_reference_cache_round_trip_and_refusals(tmp_path):
    model, items = _model(), _items(5)
    key = reference_key(items, model, _Tok(), max_len=16, dtype="float32")
    cache = ReferenceCache(tmp_path, key)
    assert cache.load() is None
    calls = []

    def compute():
        calls.append(1)
        return compute_reference(model, items, 2, "cpu")

    ref = cache.load_or_compute(compute, log=lambda s: None)
    again = ReferenceCache(tmp_path, dict(key)).load_or_compute(compute)
    assert len(calls) == 1 and all(torch.equal(ref[k], again[k]) for k in ref)

    # whatever the logps depend on changes the key, and so the file
    other = _model(seed=1)
    changed = {"data": reference_key(_items(5, seed=1), model, _Tok(), 16, dtype="float32"),
               "weights": reference_key(items, other, _Tok(), 16, dtype="float32"),
               "max_len": reference_key(items, model, _Tok(), 17, dtype="float32"),
               "dtype": reference_key(items, model, _Tok(), 16, dtype="bfloat16"),
               "chat_format": reference_key(items, model, _Tok(), 16, ChatFormat("tulu", learn_newline=True),
                                            dtype="float32")}
    for what, k in changed.items():
        assert [n for n in k if k[n] != key[n]] == [what], what
        stale = ReferenceCache(tmp_path, k)
        assert stale.path != cache.path and stale.load() is None
        # a file found under another key's name (copied, or a digest clash) is refused, saying what differs
        shutil.copy(cache.path, stale.path)
        with pytest.raises(ReferenceCacheError, match=f"built for other .*{what}"):
            stale.load()

    # damage: a truncated file, and a flipped byte in the tensor data
    data = cache.path.read_bytes()
    cache.path.write_bytes(data[:len(data) // 2])
    with pytest.raises(ReferenceCacheError, match="damaged"):
        cache.load()
    flipped = bytearray(data)
    flipped[-3] ^= 0x40
    cache.path.write_bytes(bytes(flipped))
    with pytest.raises(ReferenceCacheError, match="damaged"):
        cache.load()
    logged = []
    fixed = cache.load_or_compute(compute, log=logged.append)
    assert len(calls) == 2 and "damaged" in logged[0] and all(torch.equal(ref[k], fixed[k]) for k in ref)
    assert cache.load() is not None and not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_weights_hash():
    model = _model()
    sd = model.state_dict()
    h = weights_hash(model)
    assert weights_hash({f"_orig_mod.{k}": v for k, v in reversed(sd.items())}) == h  # compiled names, any order
    assert weights_hash({f"module.{k}": v.clone() for k, v in sd.items()}) == h
    name = next(iter(sd))
    bumped = dict(sd)
    bumped[name] = sd[name].clone()
    bumped[name].view(-1)[0] += 1e-3
    assert weights_hash(bumped) != h
    assert weights_hash({k: v.to(torch.bfloat16) for k, v in sd.items()}) != h


def test_toy_preferences_are_learnable():
    """A few DPO steps on the toy data lift the policy's preference for the right answers, end to end: gpt2
    tokens, Tulu format, reference log-probs, the loss."""
    from engine.data.tokenizers import get_tokenizer

    try:
        tok = get_tokenizer("gpt2")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    items, dropped = tokenize_pairs(tok, [dpo_messages(r) for r in make_toy_dpo(32, seed=0)], max_len=32)
    assert dropped == 0
    # the few hundred gpt2 ids in use renumbered from 0, for a small output layer; -100 stays
    used = sorted({i for x in items for v in x.values() for i in v} - {-100})
    new = {-100: -100, **{i: j for j, i in enumerate(used)}}
    items = [{k: [new[i] for i in v] for k, v in x.items()} for x in items]
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=len(used), block_size=32))
    ref = compute_reference(model, items, batch_size=16, device="cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    b = collate_pairs(items, pad_id=0)
    x = torch.cat([b["chosen_ids"], b["rejected_ids"]])
    y = torch.cat([b["chosen_labels"], b["rejected_labels"]])
    history = []
    for _ in range(12):
        pi_c, pi_r = sequence_logps(model(x)[0], y)[0].chunk(2)
        loss, m = dpo_loss(pi_c, pi_r, ref["chosen_logps"], ref["rejected_logps"], beta=0.1)
        history.append((float(m["loss"]), float(m["rewards/accuracy"])))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert history[0][0] == pytest.approx(math.log(2), abs=1e-4)  # the policy starts as the reference
    assert history[-1][0] < 0.5 and history[-1][1] > 0.9
