"""Downstream evaluation: multiple-choice tasks scored by log-likelihood, zero-shot, as lm-evaluation-harness scores
them, and a CORE-style mean over the tasks (docs/evals.md).

    tasks = {name: load_task(name, f"evals/{name}.jsonl") for name in ("hellaswag", "arc_easy")}
    results = evaluate_tasks(model, tok, tasks, "cuda", ctx=autocast)  # {"hellaswag": {"acc", "acc_norm", ...}, "core"}

An item becomes (context, continuation) text pairs, one per choice, joined by the harness's target delimiter " ".
Each pair scores the summed log-probability of its continuation tokens given the context; the prediction is the
choice of highest score (acc) and, where the harness reports acc_norm, of highest score per character of the choice
(acc_norm) and per UTF-8 byte of it (acc_bytes). Requests that share a context compute it once.
Winogrande scores partially: each option fills the blank, so the contexts differ and the continuation (the rest of
the sentence) is the same. LAMBADA's one pair is the text up to its last word and that word: right when greedy
decoding would have produced exactly the word's tokens.

Under torchrun each rank scores every world_size-th item and the correct counts are summed over ranks, so every rank
returns the numbers one process would.
"""
import difflib
import json
import math
import random
import re
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from engine.data.bins import DataError
from engine.distributed import all_gather_objects, all_reduce_sum, rank, world_size
from engine.generate import KVCache


def _hellaswag_text(text):
    """The harness's cleaning of HellaSwag: WikiHow's bracketed markers ([title], [step], ...) removed."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _hellaswag(d):
    context = d["activity_label"] + ": " + d["ctx_a"] + " " + d["ctx_b"].capitalize()
    return {"context": _hellaswag_text(context), "choices": [_hellaswag_text(e) for e in d["endings"]],
            "label": int(d["label"])}


def _arc(d):
    return {"context": f"Question: {d['question']}\nAnswer:", "choices": list(d["choices"]["text"]),
            "label": list(d["choices"]["label"]).index(d["answerKey"])}


def _piqa(d):
    return {"context": f"Question: {d['goal']}\nAnswer:", "choices": [d["sol1"], d["sol2"]], "label": int(d["label"])}


def _winogrande(d):
    return {"context": d["sentence"], "choices": [d["option1"], d["option2"]], "label": int(d["answer"]) - 1}


@dataclass(frozen=True)
class Task:
    hub: tuple  # (path, config, split) that lm-evaluation-harness loads
    chance: float  # accuracy of a uniform guess, CORE's baseline: 1 / number of choices, 0 for free text
    acc_norm: bool  # whether the harness reports acc_norm for it
    fields: tuple = ()  # the hub's field names
    read: object = None  # a hub row -> an item in our schema


TASKS = {
    "hellaswag": Task(("Rowan/hellaswag", None, "validation"), 1 / 4, True,
                      ("activity_label", "ctx_a", "ctx_b", "endings", "label"), _hellaswag),
    "arc_easy": Task(("allenai/ai2_arc", "ARC-Easy", "test"), 1 / 4, True, ("question", "choices", "answerKey"), _arc),
    "arc_challenge": Task(("allenai/ai2_arc", "ARC-Challenge", "test"), 1 / 4, True,
                          ("question", "choices", "answerKey"), _arc),
    "piqa": Task(("baber/piqa", None, "validation"), 1 / 2, True, ("goal", "sol1", "sol2", "label"), _piqa),
    "winogrande": Task(("allenai/winogrande", "winogrande_xl", "validation"), 1 / 2, False,
                       ("sentence", "option1", "option2", "answer"), _winogrande),
    "lambada": Task(("EleutherAI/lambada_openai", "default", "test"), 0.0, False),
}


def check_task(name):
    if name not in TASKS:
        close = difflib.get_close_matches(name, TASKS, n=1)
        raise ValueError(f"unknown task {name!r}" + (f"; did you mean {close[0]}?" if close else "")
                         + f" (tasks: {', '.join(TASKS)})")
    return TASKS[name]


# ----------------------------------------------------------------------------------------------------------
# items: our schema, or the hub's own fields

def _item(name, row):
    """The item a row describes, in our schema; raises ValueError saying what is wrong."""
    task = TASKS[name]
    if not isinstance(row, dict):
        raise ValueError(f"a row must be a JSON object, got {type(row).__name__}")
    if name == "lambada":
        if not isinstance(row.get("text"), str) or " " not in row["text"]:
            raise ValueError('lambada rows are {"text": str}: the passage, its last word after the last space')
        return {"text": row["text"]}
    if "context" not in row and all(f in row for f in task.fields):
        try:
            row = task.read(row)
        except (KeyError, ValueError, TypeError, AttributeError) as e:
            raise ValueError(f"cannot read it as a {name} row of the hub ({type(e).__name__}: {e})") from None
    c, choices, label = row.get("context"), row.get("choices"), row.get("label")
    if not (isinstance(c, str) and c.strip() and isinstance(choices, list) and len(choices) > 1
            and all(isinstance(x, str) and x for x in choices)
            and type(label) is int and 0 <= label < len(choices)):
        raise ValueError(f'{name} rows are {{"context": str, "choices": [str, ...], "label": int}} (at least two '
                         f"non-empty choices, label indexing them) or the hub's fields {', '.join(task.fields)}")
    if name == "winogrande" and "_" not in c:
        raise ValueError("a winogrande context marks the blank the options fill with _")
    return {"context": c, "choices": choices, "label": label}


def _read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield f"{path}:{n}", json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not valid JSON ({e})") from None


def _hub_rows(name):
    path, config, split = TASKS[name].hub
    try:
        import datasets
    except ImportError:
        raise DataError(f"{name}: no local file given, and reading {path} from the Hugging Face hub needs the "
                        "`datasets` package (pip install datasets)") from None
    try:
        rows = datasets.load_dataset(path, config, split=split)
    except Exception as e:  # offline, unknown name, ...: say what was asked and how to do without the hub
        raise DataError(f"{name}: could not load {path} ({config or 'default'}, split {split}) from the hub "
                        f"({type(e).__name__}: {e}); without a network, save it where there is one with "
                        f"datasets.load_dataset(...).to_json('{name}.jsonl') and pass that file") from None
    return ((f"{path} {split} row {i}", row) for i, row in enumerate(rows))


def load_task(name, source=None, max_examples=None, seed=0):
    """A task's items from `source`, a jsonl file (our schema or the hub's fields, row by row), or None: the hub split
    the harness uses, through `datasets`. max_examples: a subset of that size drawn with `seed`, in file order."""
    check_task(name)
    items = []
    for where, row in _read_jsonl(source) if source is not None else _hub_rows(name):
        try:
            items.append(_item(name, row))
        except ValueError as e:
            raise DataError(f"{where}: {e}") from None
    if not items:
        raise DataError(f"{source or TASKS[name].hub[0]}: no {name} items")
    if max_examples is not None and max_examples < len(items):
        items = [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), max_examples))]
    return items


# ----------------------------------------------------------------------------------------------------------
# scoring

def requests(name, item):
    """The (context, continuation) texts the harness scores for an item: one per choice, one for LAMBADA."""
    if name == "lambada":
        context, word = item["text"].rsplit(" ", 1)
        return [(context, " " + word)]
    c = item["context"]
    if name == "winogrande":
        blank = c.index("_")
        rest = " " + c[blank + 1:].strip()
        return [(c[:blank] + option, rest) for option in item["choices"]]
    return [(c, " " + choice) for choice in item["choices"]]


def encode_pair(tok, context, continuation):
    """(context ids, continuation ids) split as the harness splits them: the whole text is encoded at once, so that a
    token may span the boundary, and the continuation is what follows the context's own encoding. Trailing spaces of
    the context move to the continuation first, where BPE vocabularies attach them to the next word."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    ctx = tok.encode(context)
    return ctx, tok.encode(context + continuation)[len(ctx):]


@torch.no_grad()
def loglikelihoods(model, tok, name, items, device, ctx=None, batch_size=16):
    """For each item, a (log-likelihood, greedy) pair per request: the summed log-probability of the continuation's
    tokens given the context, and whether greedy decoding would produce exactly them.

    Items are batched, up to batch_size requests a batch (more when one item has more). A context is computed once
    however many requests share it: the batch's distinct contexts run first, left-padded, into a KV cache, which is
    then copied once per request and continued by the requests' continuations, right-padded. The model must take
    GPT.forward's kv_cache and pos. A sequence longer than block_size + 1 tokens loses its first ones, as the
    harness truncates. Under torchrun every rank must call this."""
    block = model.config.block_size
    reqs = []
    for i, item in enumerate(items):
        pairs = [encode_pair(tok, c, x) for c, x in requests(name, item)]
        if not all(c and 0 < len(x) <= block for c, x in pairs):
            raise ValueError(f"{name} item {i}: a context encodes to no tokens, or a continuation to none or to more "
                             f"than the model's block_size {block}")
        # the harness's left truncation: its inputs are the last block tokens of context + continuation[:-1]
        reqs.append([(tuple(c[max(0, len(c) + len(x) - block - 1):]), x) for c, x in pairs])

    # longest first, so that a batch pads to similar lengths
    order = sorted(range(len(reqs)), key=lambda i: -max(len(c) + len(x) for c, x in reqs[i]))
    batches = []
    for i in order:
        if not batches or sum(len(reqs[j]) for j in batches[-1]) + len(reqs[i]) > batch_size:
            batches.append([])
        batches[-1].append(i)

    # every rank calls the model equally often (twice a batch), since FSDP gathers parameters in each forward: a
    # rank with fewer batches runs empty ones, a one-token stand-in
    batches += [[] for _ in range(max(all_gather_objects(len(batches))) - len(batches))]
    scores = [None] * len(reqs)
    for batch in batches:
        rows = [(c, x) for i in batch for c, x in reqs[i]] or [((0,), [0])]
        contexts = list(dict.fromkeys(c for c, _ in rows))  # distinct, in order
        where = {c: r for r, c in enumerate(contexts)}
        Lc, Lx = max(map(len, contexts)), max(len(x) for _, x in rows)
        W = max(Lx - 1, 1)  # continuation inputs: all but the last token, and at least one column
        idx = torch.zeros(len(contexts), Lc, dtype=torch.long)
        pos = torch.zeros(len(contexts), Lc, dtype=torch.long)
        keep = torch.ones(len(contexts), Lc + W, dtype=torch.bool)
        for r, c in enumerate(contexts):
            idx[r, Lc - len(c):] = torch.tensor(c)
            pos[r, Lc - len(c):] = torch.arange(len(c))
            keep[r, :Lc - len(c)] = False
        cont = torch.zeros(len(rows), W, dtype=torch.long)
        for j, (_, x) in enumerate(rows):
            cont[j, :len(x) - 1] = torch.tensor(x[:-1])
        cont_pos = (torch.tensor([len(c) for c, _ in rows])[:, None] + torch.arange(W)).clamp(max=block - 1)
        cache = KVCache(model.config.n_layer, Lc + W, keep.to(device))
        with ctx or nullcontext():  # autocast, if given
            first, _ = model(idx.to(device), kv_cache=cache, pos=pos.to(device))  # (R, Lc, V)
            sel = torch.tensor([where[c] for c, _ in rows], device=device)
            rest, _ = model(cont.to(device), kv_cache=cache.select(sel), pos=cont_pos.to(device))  # (N, W, V)
        out = []
        for j, (c, x) in enumerate(rows):
            # a context's last position predicts its continuation's first token, continuation token t the next
            logits = torch.cat([first[where[c], -1:], rest[j, :len(x) - 1]])
            logp = logits.float().log_softmax(-1)
            target = torch.tensor(x, device=logp.device)
            out.append((logp.gather(1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all())))
        for i in batch:
            scores[i], out = out[:len(reqs[i])], out[len(reqs[i]):]
    return scores


def _argmax(xs):
    return max(range(len(xs)), key=xs.__getitem__)  # the first of equals, as numpy's argmax


def _tally(name, item, scores):
    """(correct, correct by acc_norm, correct by acc_bytes, log-likelihood of LAMBADA's word) of one item."""
    lls = [ll for ll, _ in scores]
    if name == "lambada":
        return scores[0][1], 0, 0, lls[0]
    # acc_norm divides by the choice's length in characters, as the harness does (its len(choice)); acc_bytes by
    # its UTF-8 bytes, as the harness's acc_bytes does. The two differ only on text beyond ASCII.
    per_char = [ll / len(choice) for ll, choice in zip(lls, item["choices"])]
    per_byte = [ll / len(choice.encode("utf-8")) for ll, choice in zip(lls, item["choices"])]
    label = item["label"]
    return _argmax(lls) == label, _argmax(per_char) == label, _argmax(per_byte) == label, 0.0


def evaluate_tasks(model, tok, tasks, device, ctx=None, batch_size=16):
    """{task: {"acc", "acc_norm" and "acc_bytes" where the harness reports acc_norm, "ppl" for LAMBADA, "centered",
    "n"}, "core": mean
    centered accuracy} for tasks {name: items}. The model runs in eval mode without gradients; its mode is restored.
    Under torchrun every rank calls this with the same tasks and gets the same numbers."""
    if not tasks:
        raise ValueError("no tasks to evaluate")
    for name, items in tasks.items():
        check_task(name)
        if not items:
            raise ValueError(f"task {name} has no items")
    r, w = rank(), world_size()
    sums = torch.zeros(len(tasks), 5, dtype=torch.float64)  # correct: plain, acc_norm, acc_bytes; items; LAMBADA ll
    training = model.training
    model.eval()
    try:
        for k, (name, items) in enumerate(tasks.items()):
            mine = items[r::w]
            for item, scores in zip(mine, loglikelihoods(model, tok, name, mine, device, ctx, batch_size)):
                acc, norm, per_byte, ll = _tally(name, item, scores)
                sums[k] += torch.tensor([acc, norm, per_byte, 1, ll], dtype=torch.float64)
    finally:
        model.train(training)
    sums = all_reduce_sum(sums.to(device)).cpu().tolist()
    results = {}
    for (name, _), (acc, norm, per_byte, n, ll) in zip(tasks.items(), sums):
        task = TASKS[name]
        res = {"acc": acc / n}
        if task.acc_norm:
            res["acc_norm"] = norm / n
            res["acc_bytes"] = per_byte / n
        if name == "lambada":  # the harness's perplexity: exp of the mean negative log-likelihood of the word
            res["ppl"] = math.exp(-ll / n) if -ll / n < 700 else math.inf  # beyond float64, for a model far off
        res["centered"] = (res["acc"] - task.chance) / (1 - task.chance)
        res["n"] = int(n)
        results[name] = res
    results["core"] = sum(results[name]["centered"] for name in tasks) / len(tasks)
    return results
