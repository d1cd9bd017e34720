"""Chat data for SFT and DPO: records from files or the hub -> messages -> token ids with labels -> padded batches.

    convs = load_sft("data/toy_chat/sft.jsonl")                       # [sft_messages(r, where) of each record]
    examples, dropped = tokenize_all(tok, convs, max_len)            # [(input_ids, labels)], count of empty ones
    batch = collate(pack_sft(examples, max_len), pad_id=tok.eot_id)  # input_ids, labels, positions, segments (B, T)
    logits, loss = model(batch["input_ids"], batch["labels"])

Sources (read by engine/data/records.py): local .jsonl, .json (a list of records, or {"data": [...]}) and .parquet
files, as files, folders, globs or a comma-separated list of them; `hub:NAME` or `hub:NAME:SPLIT` (default split
train) for a Hugging Face dataset, read with the `datasets` package (needs network or its local cache).

SFT records, one of: {"messages": [{"role", "content"}]} (OpenAI style), {"conversations": [{"from", "value"}]}
(ShareGPT; from is system/human/gpt, or user/assistant), or {"prompt", "completion"} (strings, or message lists).
A ShareGPT-style top-level "system" string becomes a leading system message. Roles are system, user, assistant.

DPO records, one of: {"prompt", "chosen", "rejected"} strings (a user turn and two assistant answers); or chosen and
rejected as whole conversations sharing their first turns (Tulu 3 and Dolci preference data: the shared turns are
the prompt, the turns after them the completions; a "prompt" string beside them is ignored, a "prompt" message list
is prepended to both, as TRL's conversational format writes it). A pair whose chosen equals its rejected, in either
format, has nothing to teach: load_dpo leaves it out and counts it.

Label convention, one for every objective: a sequence of n+1 tokens becomes input_ids = ids[:-1] and
labels = ids[1:], with labels[t] = -100 where token t+1 is not learned. labels are the model's targets as they
stand (the model does no shifting of its own): model(input_ids, labels) is the mean cross-entropy of logits[:, t]
against labels[:, t] over the learned tokens. max_len counts input_ids, so it is the model's T: truncation keeps the
first max_len + 1 tokens of a conversation. Learned tokens are what the chat format's mask marks: each assistant
message's content and the token that ends its turn; in DPO only those of the completion, never the prompt's.

Conversations are rendered by engine/data/chat.py (chat_ids) in the chat format asked for (train.py's chat_format),
else the tokenizer's own (llama3, qwen3, llama2, an hf: folder's chat template), else the Tulu format. An assistant
message may carry a "reasoning_content" string, its reasoning trace (the qwen3 format's think block).
"""
import itertools
import json
import random
from pathlib import Path

import torch

from engine.data import records
from engine.data.bins import DataError
from engine.data.chat import chat_ids, chat_spec, chat_text

IGNORE = -100
ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class ChatDataError(DataError):
    """A chat record or file that cannot be used; the message names the file and the row."""


# ----------------------------------------------------------------------------------------------------------------
# reading records


def load_records(source, limit=None):
    """[(where, record)] from a source (see the module docstring), in order, at most `limit`; `where` names the
    file and the line (.jsonl, counted from 1) or row (.json, .parquet, hub; counted from 0) for error messages."""
    try:
        return list(itertools.islice(_records(source, limit), limit))
    except (FileNotFoundError, ValueError) as e:  # RecordError among them
        raise ChatDataError(str(e)) from None


def _records(source, limit):
    if source.startswith("hub:"):
        name, _, split = source[4:].partition(":")
        split = split or "train"
        # streamed, only the first `limit` rows of a large mixture are read rather than all of it downloaded
        rows = records.hub_rows(records.hub_dataset(name, split, streaming=limit is not None), name, split)
    else:
        rows = (r for f in records.expand(source) for r in records.read_records(f))
    for where, rec in rows:
        if not isinstance(rec, dict):
            raise ChatDataError(f"{where}: a record is a JSON object, got {type(rec).__name__}")
        yield where, _present(rec)


def _present(d):
    # a table (parquet, hub) gives every row every column, null where the record has none
    return {k: v for k, v in d.items() if v is not None}


# ----------------------------------------------------------------------------------------------------------------
# records -> messages


def _messages(turns, where, field):
    if not isinstance(turns, list) or not turns:
        raise ChatDataError(f"{where}: {field!r} must be a non-empty list of messages")
    out = []
    for j, m in enumerate(turns):
        if not isinstance(m, dict):
            raise ChatDataError(f"{where}: {field}[{j}] is {type(m).__name__}, not a message object")
        m = _present(m)
        role, content = m.get("role", m.get("from")), m.get("content", m.get("value"))
        if role not in ROLES:
            raise ChatDataError(f"{where}: {field}[{j}] has role {role!r}; roles are {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ChatDataError(f"{where}: {field}[{j}] content is {type(content).__name__}, not a string")
        out.append({"role": ROLES[role], "content": content})
        reasoning = m.get("reasoning_content")
        if reasoning is not None:
            if ROLES[role] != "assistant" or not isinstance(reasoning, str):
                raise ChatDataError(f"{where}: {field}[{j}] has a reasoning_content, which is a string on an "
                                    f"assistant message (its reasoning trace)")
            out[-1]["reasoning_content"] = reasoning
    return out


def _text_or_messages(value, role, where, field):
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return _messages(value, where, field)


def _need_assistant_end(msgs, where, what):
    if msgs[-1]["role"] != "assistant":
        raise ChatDataError(f"{where}: {what} ends with a {msgs[-1]['role']} turn, not an assistant one")


def sft_messages(rec, where="record"):
    """The conversation of an SFT record (any format of the module docstring) as [{role, content}]."""
    if "messages" in rec:
        msgs = _messages(rec["messages"], where, "messages")
    elif "conversations" in rec:
        msgs = _messages(rec["conversations"], where, "conversations")
    elif "prompt" in rec and "completion" in rec:
        msgs = (_text_or_messages(rec["prompt"], "user", where, "prompt")
                + _text_or_messages(rec["completion"], "assistant", where, "completion"))
    else:
        raise ChatDataError(f"{where}: an SFT record has 'messages', 'conversations' or 'prompt' and 'completion' "
                            f"(this one has: {', '.join(rec) or 'nothing'})")
    if isinstance(rec.get("system"), str) and rec["system"] and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": rec["system"]})
    if not any(m["role"] == "assistant" for m in msgs):
        raise ChatDataError(f"{where}: the conversation has no assistant turn, so nothing to learn")
    return msgs


def dpo_messages(rec, where="record"):
    """(prompt, chosen, rejected) message lists of a DPO record (see the module docstring); None when chosen and
    rejected are the same, a pair with no preference in it."""
    missing = [k for k in ("chosen", "rejected") if k not in rec]
    if missing:
        raise ChatDataError(f"{where}: a DPO record has 'chosen' and 'rejected' (missing: {', '.join(missing)})")
    c, r, p = rec["chosen"], rec["rejected"], rec.get("prompt")
    if isinstance(c, str) and isinstance(r, str):
        if p is None:
            raise ChatDataError(f"{where}: string 'chosen' and 'rejected' need a 'prompt'")
        prompt, c, r = (_text_or_messages(p, "user", where, "prompt"), [{"role": "assistant", "content": c}],
                        [{"role": "assistant", "content": r}])
        return None if c == r else (prompt, c, r)
    if isinstance(c, str) or isinstance(r, str):
        raise ChatDataError(f"{where}: 'chosen' and 'rejected' must both be strings or both message lists")
    c, r = _messages(c, where, "chosen"), _messages(r, where, "rejected")
    if isinstance(p, list):
        pm = _messages(p, where, "prompt")
        c, r = pm + c, pm + r
    if c == r:
        return None
    k = 0
    while k < min(len(c), len(r)) and c[k] == r[k]:
        k += 1
    if k == 0:
        raise ChatDataError(f"{where}: chosen and rejected share no first turn, so there is no common prompt")
    if k == len(c) or k == len(r):
        raise ChatDataError(f"{where}: chosen and rejected must both go on after their {k} shared turns")
    _need_assistant_end(c, where, "chosen")
    _need_assistant_end(r, where, "rejected")
    return c[:k], c[k:], r[k:]


def load_sft(source, limit=None):
    """The conversations of an SFT source."""
    return [sft_messages(r, where) for where, r in load_records(source, limit)]


def load_dpo(source, limit=None, log=print):
    """The (prompt, chosen, rejected) message lists of a DPO source; pairs whose chosen equals rejected are left
    out, with a warning to `log` saying how many."""
    triples = [dpo_messages(r, where) for where, r in load_records(source, limit)]
    same = triples.count(None)
    if same:
        log(f"warning: dpo: chosen and rejected are the same in {same} of {len(triples)} records of {source}; they "
            f"teach nothing and are left out" + (": check which fields hold the chosen and rejected answers"
                                                 if same == len(triples) else ""))
    return [t for t in triples if t is not None]


# ----------------------------------------------------------------------------------------------------------------
# tokenizing


def _shift(ids, mask, max_len):
    # the convention of the module docstring; None when truncation left nothing to learn
    ids, mask = ids[:max_len + 1], mask[:max_len + 1]
    labels = [t if m else IGNORE for t, m in zip(ids[1:], mask[1:])]
    return (ids[:-1], labels) if any(m for m in mask[1:]) else None


def tokenize_sft(tok, messages, max_len, fmt=None):
    """(input_ids, labels) of one conversation, at most max_len long; None if no learned token survives truncation.
    fmt: a chat format (engine/data/chat.py's chat_spec, or its name); None: the tokenizer's own."""
    return _shift(*chat_ids(tok, messages, fmt), max_len)


def tokenize_pair(tok, prompt, chosen, rejected, max_len, fmt=None):
    """{chosen_ids, chosen_labels, rejected_ids, rejected_labels} of one preference pair, labels on the completion
    only; None if truncation leaves either completion without a learned token. Each sequence is the rendering of
    prompt + completion, tokenized as a whole (as SFT renders it); the prompt's rendering with the generation prompt
    must be the start of it, as TRL requires."""
    fmt = chat_spec(tok, fmt)
    head = chat_text(tok, prompt, fmt, add_generation_prompt=True)
    out = {}
    for name, completion in (("chosen", chosen), ("rejected", rejected)):
        if not chat_text(tok, prompt + completion, fmt).startswith(head):
            raise ValueError(f"the {fmt} chat format of {tok.name} renders the prompt differently alone than before "
                             f"its completion, so the prompt tokens cannot be told apart")
        seq = _shift(*chat_ids(tok, prompt + completion, fmt, learn_from=len(prompt)), max_len)
        if seq is None:
            return None
        out[f"{name}_ids"], out[f"{name}_labels"] = seq
    return out


def tokenize_all(tok, convs, max_len, fmt=None):
    """SFT examples of many conversations, and how many were dropped for having nothing left to learn."""
    fmt = chat_spec(tok, fmt)
    seqs = list(_each(lambda m: tokenize_sft(tok, m, max_len, fmt), convs, "conversation"))
    return [s for s in seqs if s is not None], sum(s is None for s in seqs)


def tokenize_pairs(tok, triples, max_len, fmt=None):
    """DPO items of many (prompt, chosen, rejected), and how many were dropped for having nothing left to learn."""
    fmt = chat_spec(tok, fmt)
    items = list(_each(lambda t: tokenize_pair(tok, *t, max_len, fmt), triples, "pair"))
    return [x for x in items if x is not None], sum(x is None for x in items)


def _each(fn, items, what):
    for i, x in enumerate(items):
        try:
            yield fn(x)
        except ValueError as e:  # which record cannot be rendered, and why
            raise ValueError(f"{what} {i} (counted from 0, in the order read): {e}") from None


# ----------------------------------------------------------------------------------------------------------------
# rows and batches


def _add(row, ids, labels):
    seg = row["segments"][-1] + 1 if row["segments"] else 0
    row["input_ids"] += ids
    row["labels"] += labels
    row["positions"] += range(len(ids))
    row["segments"] += [seg] * len(ids)
    return row


def _row():
    return {"input_ids": [], "labels": [], "positions": [], "segments": []}


def pack_sft(examples, max_len):
    """Rows of several examples each, at most max_len tokens, filled greedily in order. positions restart at 0 and
    segments count up from 0 at each example, for a model that keeps attention and RoPE within an example."""
    rows = []
    for ids, labels in examples:
        if len(ids) > max_len:
            raise ValueError(f"an example of {len(ids)} tokens does not fit max_len={max_len}")
        if not rows or len(rows[-1]["input_ids"]) + len(ids) > max_len:
            rows.append(_row())
        _add(rows[-1], ids, labels)
    return rows


def unpacked_rows(examples):
    """One example a row, in the structure pack_sft gives (one segment)."""
    return [_add(_row(), ids, labels) for ids, labels in examples]


def _pad(seqs, T, fill):
    out = torch.full((len(seqs), T), fill, dtype=torch.long)
    for b, s in enumerate(seqs):
        out[b, :len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def collate(rows, pad_id):
    """LongTensors (B, T) of rows, right-padded to the longest row: input_ids with pad_id, labels with -100,
    positions with 0, segments with -1."""
    T = max(len(r["input_ids"]) for r in rows)
    fills = {"input_ids": pad_id, "labels": IGNORE, "positions": 0, "segments": -1}
    return {k: _pad([r[k] for r in rows], T, v) for k, v in fills.items()}


def collate_pairs(items, pad_id):
    """LongTensors (B, T) of DPO items, chosen and rejected padded to one T, so that
    torch.cat([chosen_ids, rejected_ids]) is a single (2B, T) batch."""
    T = max(len(x[f"{k}_ids"]) for x in items for k in ("chosen", "rejected"))
    return {f"{k}_{part}": _pad([x[f"{k}_{part}"] for x in items], T, pad_id if part == "ids" else IGNORE)
            for k in ("chosen", "rejected") for part in ("ids", "labels")}


# ----------------------------------------------------------------------------------------------------------------
# toy data: tasks a small model learns in minutes on a CPU, with answers that can be checked


SYSTEMS = ["You are a helpful assistant.", "Answer with the result only."]
WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "green", "north", "candle", "mirror", "sugar"]


def _task(rng):
    """(question, answer, a wrong answer) of one random task."""
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.randrange(10, 100), rng.randrange(10, 100)
        wrong = a + b + rng.choice([-10, -2, -1, 1, 2, 10])
        return f"What is {a} + {b}?", str(a + b), str(wrong)
    w = rng.choice(WORDS) if rng.random() < 0.5 else "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=5))
    if kind == 1:
        # wrong: the reversal with two neighbouring letters swapped, close to right but never right
        r = w[::-1]
        i = rng.choice([j for j in range(len(r) - 1) if r[j] != r[j + 1]] or [None])
        return f"Reverse the word: {w}", r, r[:-1] if i is None else r[:i] + r[i + 1] + r[i] + r[i + 2:]
    return f"Uppercase: {w}", w.upper(), w


def make_toy_sft(n, seed=0):
    """n SFT records, alternately OpenAI-style `messages` and ShareGPT `conversations`; some with a system prompt,
    some with two question-answer turns."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        msgs = [{"role": "system", "content": rng.choice(SYSTEMS)}] if rng.random() < 0.3 else []
        for _ in range(2 if rng.random() < 0.25 else 1):
            q, a, _ = _task(rng)
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        if i % 2:
            who = {"system": "system", "user": "human", "assistant": "gpt"}
            records.append({"conversations": [{"from": who[m["role"]], "value": m["content"]} for m in msgs]})
        else:
            records.append({"messages": msgs})
    return records


def make_toy_dpo(n, seed=0):
    """n preference records {prompt, chosen, rejected}: chosen is always the right answer, rejected a near miss."""
    rng = random.Random(seed)
    return [dict(zip(("prompt", "chosen", "rejected"), _task(rng))) for _ in range(n)]


def write_jsonl(records, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)
