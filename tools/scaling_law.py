"""
Which model to train for a compute budget: the Chinchilla loss fit over candidate architectures.

    python tools/scaling_law.py --flops=1e21 --family=llama3
    python tools/scaling_law.py --flops=1e21 --family=qwen3 --chinchilla --write_config=config/qwen3_1e21.py
    python tools/scaling_law.py --flops=3e20 --family=gpt2 --flop_count=detailed --seq_len=1024 --top=20

Predicted loss (Hoffmann et al. 2022, approach 3): L(N, D) = E + A / N^alpha + B / D^beta, E = 1.69, A = 406.4,
B = 410.7, alpha = 0.34, beta = 0.28. N is the total parameter count, embeddings and an untied output head included:
that is the N that reproduces the seeds' figures (1.545B parameters on 101.9B tokens -> 2.335; without embeddings
the same model would predict 2.355).

A candidate is trained on the tokens the budget C pays for: D = C / (6 N) with --flop_count=6nd (the paper's C = 6ND,
the default), or D = C / F with --flop_count=detailed, F = model.py's flops_per_token at --seq_len (PaLM: 6 x matmul
weights + 12 L H Q T, attention included; the count our MFU uses). With --chinchilla, D = 20 N instead and only
candidates that fit the budget remain. Architectures follow each family's conventions (head size, KV heads, FFN
ratio) over widths, depths within an aspect-ratio band (width / layers); parameter and FLOP counts come from
model.py's GPT, built on the meta device.
"""
import argparse
import functools
import json
import math
import os

import torch

from model import GPT, ModelConfig

E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28
TOKENS_PER_PARAM = 20  # the Chinchilla rule of thumb, D = 20 N

# family -> the preset whose switches it shares (norms, MLP, positions, vocabulary, tying), head sizes, KV heads
# (query heads come in whole groups per KV head; fewer query heads than this: one KV head each; None: one per query
# head) and the FFN width as a multiple of the model width, rounded up to a multiple of 256
FAMILIES = {
    "gpt2": dict(preset="gpt2", head_dims=(64, 128), kv=None, ffn=(4.0,)),
    "llama": dict(preset="full_llama_1.36b", head_dims=(128,), kv=None, ffn=(8 / 3,)),
    "llama3": dict(preset="full_llama3_1.5b_optimal", head_dims=(64, 128), kv=8, ffn=(3.5,)),
    "qwen3": dict(preset="full_qwen3_1.8b_optimal", head_dims=(128,), kv=8, ffn=(3.0,)),
}
WIDTHS = range(256, 16384 + 1, 128)


def chinchilla_loss(N, D):
    return E + A / N**ALPHA + B / D**BETA


def chinchilla_optimum(flops):
    """(N, D) minimising L(N, D) subject to 6 N D = flops (the fit's closed form)."""
    G = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))
    N = G * (flops / 6) ** (BETA / (ALPHA + BETA))
    return N, flops / (6 * N)


def optimal_tokens(N):
    """The tokens D for which N parameters is the fit's compute-optimal size (chinchilla_optimum inverted)."""
    G = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))
    return (N / G) ** ((ALPHA + BETA) / BETA) / N


@functools.cache
def depth_counts(preset, **sizes):
    """(params, flops per token) at zero layers and per layer: both are linear in n_layer, so two meta-device
    models give them for every depth."""
    def count(L):
        with torch.device("meta"):
            m = GPT(ModelConfig.from_preset(preset, n_layer=L, **sizes))
        return m.num_params(), m.flops_per_token()

    (n1, f1), (n2, f2) = count(1), count(2)
    return n1 - (n2 - n1), f1 - (f2 - f1), n2 - n1, f2 - f1


def candidates(family, seq_len=2048, vocab_size=None, widths=WIDTHS, head_dims=None, kv_heads=None, ffn=None,
               aspect=(32, 128), max_layers=128):
    """Architectures of a family: dicts of model settings plus params and flops_per_token (at seq_len)."""
    fam = FAMILIES[family]
    V = vocab_size or ModelConfig.from_preset(fam["preset"]).vocab_size
    for C in widths:
        for hd in head_dims or fam["head_dims"]:
            if C % hd:
                continue
            H = C // hd
            for kv in kv_heads or [min(fam["kv"] or H, H)]:
                if kv > H or H % kv:
                    continue
                for mult in ffn or fam["ffn"]:
                    ff = 256 * math.ceil(mult * C / 256)
                    sizes = dict(n_embd=C, n_head=H, n_kv_head=kv, head_dim=hd, intermediate_size=ff,
                                 vocab_size=V, block_size=seq_len)
                    n0, f0, dn, df = depth_counts(fam["preset"], **sizes)
                    for L in range(max(1, math.ceil(C / aspect[1])), min(max_layers, math.floor(C / aspect[0])) + 1):
                        yield dict(family=family, preset=fam["preset"], n_layer=L, **sizes,
                                   params=n0 + L * dn, flops_per_token=f0 + L * df)


def plan(flops, cands, flop_count="6nd", chinchilla=False):
    """Candidates with the tokens the budget buys, the FLOPs spent and the predicted loss; best first."""
    rows = []
    for c in cands:
        per_token = 6 * c["params"] if flop_count == "6nd" else c["flops_per_token"]
        D = TOKENS_PER_PARAM * c["params"] if chinchilla else flops / per_token
        if per_token * D <= flops * (1 + 1e-9):
            rows.append({**c, "tokens": D, "flops": per_token * D, "loss": chinchilla_loss(c["params"], D)})
    return sorted(rows, key=lambda r: (r["loss"], r["params"]))


def fmt(n):
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3f}{suffix}"
    return f"{n:.0f}"


def table(rows, budget):
    head = f"{'#':>3} {'layers':>6} {'width':>6} {'heads':>5} {'kv':>3} {'hdim':>4} {'ffn':>6} {'params':>9} " \
           f"{'tokens':>9} {'tok/param':>9} {'budget':>7} {'loss':>7}"
    lines = [head, "-" * len(head)]
    for i, r in enumerate(rows, 1):
        lines.append(f"{i:>3} {r['n_layer']:>6} {r['n_embd']:>6} {r['n_head']:>5} {r['n_kv_head']:>3} "
                     f"{r['head_dim']:>4} {r['intermediate_size']:>6} {fmt(r['params']):>9} {fmt(r['tokens']):>9} "
                     f"{r['tokens'] / r['params']:>9.1f} {r['flops'] / budget:>7.1%} {r['loss']:>7.4f}")
    return "\n".join(lines)


def config_text(r, args):
    tokens_per_iter = args.batch_size * r["block_size"] * args.gradient_accumulation_steps
    iters = math.ceil(r["tokens"] / tokens_per_iter)
    other = "detailed count with attention" if args.flop_count == "6nd" else "6ND"
    other_flops = r["flops_per_token"] * r["tokens"] if args.flop_count == "6nd" else 6 * r["params"] * r["tokens"]
    flags = f"--flops={args.flops:g} --family={r['family']} --flop_count={args.flop_count}" + \
        (" --chinchilla" if args.chinchilla else "")
    head = [
        f"# {r['family']}: {fmt(r['params'])} parameters (total, embeddings included) on {fmt(r['tokens'])} tokens,",
        f"# chosen by tools/scaling_law.py {flags}.",
        f"# Chinchilla approach 3 predicts loss {r['loss']:.4f}; {r['flops']:.3g} FLOPs by {args.flop_count},",
        f"# {other_flops:.3g} by the {other}.",
        "# gradient_accumulation_steps counts the whole job's micro-batches of an optimizer step: "
        f"{args.batch_size} x {r['block_size']}",
        f"# x {args.gradient_accumulation_steps} = {tokens_per_iter:,} tokens per step, and {iters:,} steps make "
        f"{fmt(iters * tokens_per_iter)} tokens.",
    ]
    values = dict(out_dir=f"out-{r['family']}-{fmt(r['params']).lower()}-{args.flops:.0e}".replace("+", ""),
                  dataset=args.dataset or f"slimpajama_6b_{r['family']}", preset=r["preset"],
                  n_layer=r["n_layer"], n_head=r["n_head"], n_kv_head=r["n_kv_head"], n_embd=r["n_embd"],
                  head_dim=r["head_dim"], intermediate_size=r["intermediate_size"], vocab_size=r["vocab_size"],
                  block_size=r["block_size"], batch_size=args.batch_size,
                  gradient_accumulation_steps=args.gradient_accumulation_steps, max_iters=iters,
                  lr_decay_iters=iters, dtype="bfloat16", compile=True)
    lines = [f"{k} = {json.dumps(v)}" if isinstance(v, str) else f"{k} = {v!r}" for k, v in values.items()]
    return "\n".join(head + lines) + "\n"


def parse_list(text, kind, name):
    try:
        return tuple(kind(x) for x in text.split(",")) if text else None
    except ValueError:
        raise argparse.ArgumentTypeError(f"--{name} must be comma-separated numbers, got {text!r}") from None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--flops", type=float, required=True, help="training compute budget in FLOPs, e.g. 1e21")
    p.add_argument("--family", default="llama3", choices=FAMILIES)
    p.add_argument("--flop_count", default="6nd", choices=("6nd", "detailed"),
                   help="6nd: C = 6 N D (default); detailed: C = model.py's flops_per_token(seq_len) x D")
    p.add_argument("--chinchilla", action="store_true", help="train every candidate on D = 20 N tokens")
    p.add_argument("--seq_len", type=int, default=2048, help="training sequence length (block_size)")
    p.add_argument("--vocab_size", type=int, help="vocabulary rows; default: the family preset's")
    p.add_argument("--head_dim", help="comma-separated head sizes to try; default: the family's")
    p.add_argument("--n_kv_head", help="comma-separated KV head counts to try; default: the family's")
    p.add_argument("--ffn_mult", help="comma-separated FFN widths, as multiples of the model width, to try")
    p.add_argument("--aspect", default="32,128",
                   help="width / layers band the candidates keep (default 32,128: GPT-2 to LLaMA-3 8B)")
    p.add_argument("--top", type=int, default=10, help="how many candidates to list")
    p.add_argument("--write_config", help="write the best candidate as a train.py config file here")
    p.add_argument("--dataset", help="dataset of the written config (default slimpajama_6b_<family>)")
    p.add_argument("--batch_size", type=int, default=24, help="micro-batch of the written config")
    p.add_argument("--gradient_accumulation_steps", type=int, default=64, help="of the written config")
    args = p.parse_args(argv)
    try:
        aspect = parse_list(args.aspect, float, "aspect")
        lists = dict(head_dims=parse_list(args.head_dim, int, "head_dim"),
                     kv_heads=parse_list(args.n_kv_head, int, "n_kv_head"),
                     ffn=parse_list(args.ffn_mult, float, "ffn_mult"))
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    if args.flops <= 0 or args.seq_len < 1 or args.top < 1 or len(aspect) != 2 or not 0 < aspect[0] <= aspect[1]:
        p.error("need --flops > 0, --seq_len >= 1, --top >= 1 and --aspect=LOW,HIGH with 0 < LOW <= HIGH")

    rows = plan(args.flops, candidates(args.family, args.seq_len, args.vocab_size, aspect=aspect, **lists),
                args.flop_count, args.chinchilla)
    N, D = chinchilla_optimum(args.flops)
    print(f"budget {args.flops:.3g} FLOPs, counted as "
          + ("6 N D" if args.flop_count == "6nd" else f"flops_per_token(T={args.seq_len}) x D (attention included)")
          + f"; tokens {'= 20 N' if args.chinchilla else 'fill the budget'}")
    print(f"the fit's own optimum under C = 6ND: N = {fmt(N)}, D = {fmt(D)} ({D / N:.1f} tokens per parameter), "
          f"loss {chinchilla_loss(N, D):.4f}")
    if not rows:
        p.error(f"no {args.family} candidate fits {args.flops:g} FLOPs; raise --flops or widen --aspect")
    shapes = {}  # the best depth of each width and head layout: the fit is flat around the optimum, so the choice
    for r in rows:  # that matters is the shape, not one layer more or less
        shapes.setdefault((r["n_embd"], r["head_dim"], r["n_kv_head"], r["intermediate_size"]), r)
    best = list(shapes.values())[:args.top]
    print(f"{len(rows):,} {args.family} candidates; the best depth of the {len(best)} best shapes "
          "(N = total parameters):")
    print(table(best, args.flops))
    if args.write_config:
        if os.path.dirname(args.write_config):
            os.makedirs(os.path.dirname(args.write_config), exist_ok=True)
        with open(args.write_config, "w") as f:
            f.write(config_text(rows[0], args))
        print(f"wrote candidate 1 to {args.write_config}")


if __name__ == "__main__":
    main()
