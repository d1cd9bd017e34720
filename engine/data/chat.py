"""Chat formats: how a conversation becomes token ids, in one place for SFT, DPO, sampling and the dataset tools.

    fmt = chat_spec(tok, "qwen3", enable_thinking=False)   # or chat_spec(tok): the tokenizer's default format
    ids, mask = chat_ids(tok, messages, fmt)    # mask 1 on what SFT learns: each assistant reply and its turn's end
    ids, stop = chat_prompt(tok, messages, fmt) # the conversation, then what opens the assistant's reply; the ids
                                                # that end that reply
    chat_format(tok)                            # the tokenizer's default format's name

Messages are {"role": system | user | assistant, "content": str}, an assistant's optionally with "reasoning_content"
(its reasoning trace, which only qwen3 and a template that writes it render). Each format writes what its reference
writes, id for id (tests/test_chat_formats.py checks them against the references):
  llama3   Meta's ChatFormat (llama-models): <|begin_of_text|>, then per message <|start_header_id|>role
           <|end_header_id|>\\n\\ncontent<|eot_id|>; like Meta's, the role, the "\\n\\n" and the content are
           tokenized separately.                                                     Llama 3, 3.1, 3.2, 3.3 Instruct
  llama2   Meta's Llama 2 chat convention: per exchange <s>[INST] user [/INST] answer </s>, user and answer stripped,
           a system prompt as <<SYS>>\\n...\\n<</SYS>>\\n\\n before the first user message; roles alternate user,
           assistant.                                                                               Llama 2 Chat
  chatml   per message <|im_start|>role\\ncontent<|im_end|>\\n.                  Qwen3-*-Instruct-2507
  qwen2.5  chatml, with Qwen2.5's default system prompt when the conversation has none.           Qwen2.5 Instruct
  qwen3    Qwen3's hybrid-thinking template: the assistant reply after the last user message opens with a think
           block, <think>\\nreasoning\\n</think>\\n\\n (empty without a reasoning trace), earlier replies are
           written without their reasoning; enable_thinking decides the generation prompt (off: it ends with an
           empty think block).                                    Qwen3 base and hybrid checkpoints (Qwen3-8B ...)
  tulu     open-instruct's Tulu template: <|system|>\\n, <|user|>\\n, <|assistant|>\\n before each content, a newline
           after system and user contents, eos after each assistant content and a newline after that except at the
           end; the markers are ordinary text.           Tulu 2/3, OLMo 2 SFT; the default of tokenizers with no format
  template an hf: folder's own chat template (transformers' apply_chat_template)

Tokenization: the text between two special ids is tokenized as one string, as transformers tokenizes a rendered
template, so that newlines and spaces join across markup and content exactly as in the reference (a user message
ending in "\\n" before Tulu's "\\n" gives two "\\n" tokens, not one "\\n\\n"). llama3 tokenizes its pieces one by one
instead, as Meta's ChatFormat does. Special ids come only from the format's markup: special-token text inside a
message ("<|im_end|>" quoted by a user) stays text. The one exception is qwen3's reading of a reasoning trace written
inline, as its template reads it: an assistant content holding "</think>" is split there into reasoning and answer,
and the think block is written with the real <think> and </think> ids.

What is learned (mask 1): each assistant reply (its reasoning and content) and the markup that ends its turn, up to
and including the end token: <|eot_id|> (llama3); " answer </s>" whole (llama2: the reply follows [/INST]);
<|im_end|> (chatml, qwen2.5, qwen3); eos (tulu). With learn_newline also the newline the last four write after it
(TRL's training templates and open-instruct learn it; by default it is not learned, as generation stops at the end
token and never writes it). qwen3 with enable_thinking learns the think block as part of the reply (the model
writes it); with thinking off the empty think block is part of the prompt, and a reasoning trace there is an
error. A token that straddles the markup before a reply and the reply is learned, as transformers' assistant mask
marks it (TRL's training templates); in tulu it is not, as open-instruct's masking (by the lengths of the
renderings before each message) leaves it.

A template's learned tokens come from its structure, never from searching the text for the content (a reply "a" or
"assistant" also occurs in the markup): a template with {% generation %} blocks marks them itself (transformers'
assistant mask over its own tokenization of the text). Any other is rendered with each content (and reasoning
trace) replaced by a placeholder; the text between placeholders is the template's markup, its special tokens
recognised, each content is data; the first token after an assistant content ends its turn and is learned with it.
A template that changes or repeats a content cannot be cut so; it fails, asking for {% generation %} blocks.
"""
import functools
import re
from dataclasses import dataclass

FORMATS = ("llama3", "llama2", "chatml", "qwen2.5", "qwen3", "tulu", "template")
QWEN25_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
_NEEDS = {"llama3": ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
          "chatml": ("<|im_start|>", "<|im_end|>"), "qwen2.5": ("<|im_start|>", "<|im_end|>"),
          "qwen3": ("<|im_start|>", "<|im_end|>", "<think>", "</think>")}
_NEWLINE_AFTER_END = ("chatml", "qwen2.5", "qwen3", "tulu")
_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")  # as transformers detects {% generation %} blocks
_PLACEHOLDER = "\ue000{}\ue001"  # private-use characters, which no template writes
_CUT = re.compile(r"\ue000(\d+)\ue001")
FIRST = "first"  # a markup part whose first token is learned (a template's turn end after an assistant content)


@dataclass(frozen=True)
class ChatFormat:
    name: str
    enable_thinking: bool = True  # qwen3 (and a template that reads it): the reply opens with its think block
    learn_newline: bool = False  # chatml, qwen2.5, qwen3, tulu: learn the newline after each reply's end token

    def __str__(self):
        opts = ["enable_thinking=False"] * (not self.enable_thinking) + ["learn_newline=True"] * self.learn_newline
        return f"{self.name} ({', '.join(opts)})" if opts else self.name


def chat_format(tok):
    """The name of the tokenizer's own format: its family's, else Tulu's (as open-instruct trains such models)."""
    return tok.chat_format or "tulu"


def chat_spec(tok, name=None, enable_thinking=True, learn_newline=False):
    """A ChatFormat for `tok`, checked: the format exists, the tokenizer has the tokens it writes, the options
    apply to it. name None: the tokenizer's own; a ChatFormat already made is returned as it is."""
    if isinstance(name, ChatFormat):
        return name
    name = name or chat_format(tok)
    if name not in FORMATS:
        raise ValueError(f"unknown chat format {name!r}: choose {', '.join(FORMATS)}")
    missing = _missing(tok, name)
    if missing:
        can = [f for f in FORMATS if not _missing(tok, f)]
        raise ValueError(f"chat format {name} needs {missing}, which the {tok.name} tokenizer does not have; it can "
                         f"render {', '.join(can) or 'no chat format'} (its own: {chat_format(tok)})")
    if not enable_thinking and name not in ("qwen3", "template"):
        raise ValueError(f"enable_thinking=False applies to the qwen3 chat format (and templates that read it), not "
                         f"to {name}")
    if learn_newline and name not in _NEWLINE_AFTER_END:
        raise ValueError(f"learn_newline applies to {', '.join(_NEWLINE_AFTER_END)}, whose turns end with a newline "
                         f"after the end token; {name} writes none")
    return ChatFormat(name, enable_thinking, learn_newline)


def _missing(tok, name):
    if name in _NEEDS:
        return ", ".join(s for s in _NEEDS[name] if s not in tok.special_tokens)
    if name == "llama2":
        return "" if tok.bos_id is not None and tok.eot_id is not None else "a begin- and an end-of-text token"
    if name == "tulu":
        return "" if tok.eot_id is not None else "an end-of-text token"
    return "" if getattr(tok, "tok", None) is not None and tok.tok.chat_template else "an hf: folder's chat template"


def chat_ids(tok, messages, fmt=None, learn_from=0):
    """(ids, mask) of a conversation; mask marks each assistant reply and its turn's end (see the module
    docstring), of messages[learn_from:] only (DPO learns the completion, not the prompt's earlier answers)."""
    return _render(tok, chat_spec(tok, fmt), messages, learn_from=learn_from)


def chat_prompt(tok, messages, fmt=None):
    """(ids, stop): a conversation and the opening of the assistant's reply, as SFT renders them, and the ids that
    end the reply."""
    fmt = chat_spec(tok, fmt)
    return _render(tok, fmt, messages, add_generation_prompt=True)[0], stop_ids(tok, fmt)


def chat_text(tok, messages, fmt=None, add_generation_prompt=False):
    """The rendered conversation as one string, special ids written as their text (for comparing renderings)."""
    fmt = chat_spec(tok, fmt)
    if fmt.name == "template":
        return tok.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                           enable_thinking=fmt.enable_thinking)
    names = {i: s for s, i in tok.special_tokens.items()}
    names.update({tok.bos_id: names.get(tok.bos_id, "<s>"), tok.eot_id: names.get(tok.eot_id, "</s>")})
    return "".join(names[p] if isinstance(p, int) else p
                   for p, _ in _parts(tok, fmt, _checked(fmt, messages), add_generation_prompt, 0))


def stop_ids(tok, fmt=None):
    """The ids that end an assistant's reply: the format's end-of-turn token(s) and the tokenizer's end-of-text.
    Llama 3 stops at <|eot_id|>, <|eom_id|> and <|end_of_text|>, as Meta's generation does."""
    fmt = chat_spec(tok, fmt)
    sp = tok.special_tokens
    if fmt.name == "llama3":
        return {sp[s] for s in ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>") if s in sp} | {tok.eot_id} - {None}
    if fmt.name in _NEEDS:
        return {sp["<|im_end|>"], tok.eot_id} - {None}
    if fmt.name != "template":
        return {tok.eot_id}
    # a template's: the token learned at the end of a reply, where it is a special token (so no reply holds it)
    ids, mask = chat_ids(tok, [{"role": "user", "content": "?"}, {"role": "assistant", "content": "."}], fmt)
    end = ids[max(i for i, m in enumerate(mask) if m)]
    return {end} & set(sp.values()) | {tok.eot_id} - {None}


# ----------------------------------------------------------------------------------------------------------------
# rendering: a conversation as parts, (text or special id, learned?)


def _render(tok, fmt, messages, add_generation_prompt=False, learn_from=0):
    messages = _checked(fmt, messages)
    if fmt.name == "template" and _GENERATION.search(tok.tok.get_chat_template()):
        out = tok.tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                          return_dict=True, return_assistant_tokens_mask=True,
                                          enable_thinking=fmt.enable_thinking)
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
        if learn_from:  # the learned tokens of the first messages end where the rendering of those messages ends
            head = tok.tok.apply_chat_template(messages[:learn_from], tokenize=True, return_dict=True,
                                               enable_thinking=fmt.enable_thinking)["input_ids"]
            mask[:len(head)] = [0] * min(len(head), len(mask))
        return ids, mask
    parts = _parts(tok, fmt, messages, add_generation_prompt, learn_from)
    return _tokenize(tok, parts, pieces=fmt.name == "llama3", straddle=fmt.name != "tulu")


def _checked(fmt, messages):
    """The messages, with a reasoning trace only where the format writes one."""
    for m in messages:
        if m.get("reasoning_content") and fmt.name not in ("qwen3", "template"):
            raise ValueError(f"an assistant message has a reasoning_content, which the {fmt.name} chat format has no "
                             f"place for; use chat_format=qwen3 (its think block), or leave the trace out of the data")
    return messages


def _parts(tok, fmt, messages, gen, learn_from):
    if fmt.name == "template":
        return _template_parts(tok, fmt, messages, gen, learn_from)
    render = {"llama3": _llama3, "llama2": _llama2, "chatml": _chatml, "qwen2.5": _chatml, "qwen3": _qwen3,
              "tulu": _tulu}[fmt.name]
    return list(render(tok, fmt, messages, gen, learn_from))


def _llama3(tok, fmt, messages, gen, learn_from):
    sp = tok.special_tokens

    def header(role):
        return [(sp["<|start_header_id|>"], False), (role, False), (sp["<|end_header_id|>"], False), ("\n\n", False)]

    yield sp["<|begin_of_text|>"], False
    for i, m in enumerate(messages):
        learn = m["role"] == "assistant" and i >= learn_from
        yield from header(m["role"])
        yield from ((m["content"], learn), (sp["<|eot_id|>"], learn))
    if gen:
        yield from header("assistant")


def _llama2(tok, fmt, messages, gen, learn_from):
    # Meta's chat_completion: each exchange is tokenized as f"[INST] {user} [/INST] {answer} " between <s> and </s>
    if messages and messages[0]["role"] == "system":
        first = messages[1]["content"] if len(messages) > 1 and messages[1]["role"] == "user" else None
        if first is None:
            raise ValueError("the llama2 chat format puts the system prompt into the first user message; this "
                             "conversation has no user message after its system prompt")
        messages = [{"role": "user", "content": f"<<SYS>>\n{messages[0]['content']}\n<</SYS>>\n\n{first}"},
                    *messages[2:]]
        learn_from = max(0, learn_from - 1)
    roles = [m["role"] for m in messages]
    if roles != ["user", "assistant"] * (len(roles) // 2) + ["user"] * (len(roles) % 2):
        raise ValueError(f"the llama2 chat format (Meta's) needs roles alternating user, assistant, ... after an "
                         f"optional system prompt; this conversation has {', '.join(roles)}")
    for i, m in enumerate(messages):
        if m["role"] == "user":
            yield from ((tok.bos_id, False), (f"[INST] {m['content'].strip()} [/INST]", False))
        else:
            learn = i >= learn_from
            # the reply the model writes after [/INST] is " answer " and </s>: all of it learned
            yield from ((" ", learn), (m["content"].strip(), learn), (" ", learn), (tok.eot_id, learn))


def _chatml(tok, fmt, messages, gen, learn_from):
    sp = tok.special_tokens
    if fmt.name == "qwen2.5" and (not messages or messages[0]["role"] != "system"):
        yield from ((sp["<|im_start|>"], False), (f"system\n{QWEN25_SYSTEM}", False), (sp["<|im_end|>"], False),
                    ("\n", False))
    for i, m in enumerate(messages):
        learn = m["role"] == "assistant" and i >= learn_from
        yield from ((sp["<|im_start|>"], False), (m["role"] + "\n", False), (m["content"], learn),
                    (sp["<|im_end|>"], learn), ("\n", learn and fmt.learn_newline))
    if gen:
        yield from ((sp["<|im_start|>"], False), ("assistant\n", False))


def _qwen3(tok, fmt, messages, gen, learn_from):
    # Qwen3's template, statement for statement (the tool branches aside: our roles are system, user, assistant)
    sp = tok.special_tokens
    start, end, think, unthink = (sp[s] for s in ("<|im_start|>", "<|im_end|>", "<think>", "</think>"))
    last_query = len(messages) - 1
    for i in reversed(range(len(messages))):
        c = messages[i]["content"]
        if messages[i]["role"] == "user" and not (c.startswith("<tool_response>") and c.endswith("</tool_response>")):
            last_query = i
            break
    for i, m in enumerate(messages):
        content = m["content"]
        if m["role"] == "user" or (m["role"] == "system" and i == 0):
            yield from ((start, False), (f"{m['role']}\n", False), (content, False), (end, False), ("\n", False))
            continue
        if m["role"] == "system":  # a later system message is written as a user one is
            yield from ((start, False), ("system\n", False), (content, False), (end, False), ("\n", False))
            continue
        learn = i >= learn_from
        reasoning = m.get("reasoning_content")
        if not isinstance(reasoning, str):
            reasoning = ""
            if "</think>" in content:  # a trace written inline: split off as the template does
                reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
                content = content.split("</think>")[-1].lstrip("\n")
        yield from ((start, False), ("assistant\n", False))
        if i > last_query and (i == len(messages) - 1 or reasoning):
            reasoning = reasoning.strip("\n")
            if reasoning and learn and not fmt.enable_thinking:
                raise ValueError("an assistant reply has a reasoning trace, but with enable_thinking=False the "
                                 "think block belongs to the prompt and is not learned; train it with "
                                 "enable_thinking=True, or leave the trace out of the data")
            in_reply = learn and fmt.enable_thinking
            yield from ((think, in_reply), ("\n", in_reply), (reasoning, in_reply), ("\n", in_reply),
                        (unthink, in_reply), ("\n\n", in_reply), (content.lstrip("\n"), learn))
        else:
            yield content, learn
        yield from ((end, learn), ("\n", learn and fmt.learn_newline))
    if gen:
        yield from ((start, False), ("assistant\n", False))
        if not fmt.enable_thinking:
            yield from ((think, False), ("\n\n", False), (unthink, False), ("\n\n", False))


def _tulu(tok, fmt, messages, gen, learn_from):
    for i, m in enumerate(messages):
        yield f"<|{m['role']}|>\n", False
        if m["role"] != "assistant":
            yield from ((m["content"], False), ("\n", False))
            continue
        learn = i >= learn_from
        yield from ((m["content"], learn), (tok.eot_id, learn))
        if i < len(messages) - 1:
            yield "\n", learn and fmt.learn_newline
    if gen and messages:
        yield "<|assistant|>\n", False


def _template_parts(tok, fmt, messages, gen, learn_from):
    """The template's text cut into markup (its special tokens as ids) and the messages' contents and traces."""
    hf = tok.tok
    marked = [dict(m, content=_PLACEHOLDER.format(2 * i), **(
        {"reasoning_content": _PLACEHOLDER.format(2 * i + 1)} if isinstance(m.get("reasoning_content"), str) else {}))
        for i, m in enumerate(messages)]
    kw = dict(tokenize=False, add_generation_prompt=gen, enable_thinking=fmt.enable_thinking)
    cut = _CUT.split(hf.apply_chat_template(marked, **kw))
    order = [int(k) for k in cut[1::2]]
    parts, texts = _markup(tok, cut[0], False), [cut[0]]
    for k, markup in zip(order, cut[2::2]):
        i, field = divmod(k, 2)
        text = messages[i]["reasoning_content" if field else "content"]
        learn = messages[i]["role"] == "assistant" and i >= learn_from
        parts += [(text, learn), *_markup(tok, markup, learn and not field)]
        texts += [text, markup]
    contents = [k // 2 for k in order if k % 2 == 0]
    if (order != sorted(set(order)) or contents != list(range(len(messages)))
            or "".join(texts) != hf.apply_chat_template(messages, **kw)):
        raise ValueError(f"the chat template of {tok.name} does not write each message's content once and as given "
                         f"(it changes, repeats or drops one), so the tokens to learn cannot be located; add "
                         f"{{% generation %}} blocks around the assistant's part of the template")
    return parts


def _markup(tok, text, ends_reply):
    """A template's markup text as parts: its added tokens as ids, the text between them as text; after an assistant
    content (ends_reply) its first token is learned."""
    if not text:
        return []
    split = _splitter(tuple(tok.special_tokens))
    pieces = [p for p in split.split(text) if p] if split else [text]
    out = [(tok.special_tokens[p], False) if p in tok.special_tokens else (p, False) for p in pieces]
    if ends_reply:
        out[0] = (out[0][0], True if isinstance(out[0][0], int) else FIRST)
    return out


@functools.lru_cache(maxsize=8)
def _splitter(specials):
    """A pattern that cuts text at (and keeps) the special tokens, the longest first; None when there are none."""
    if not specials:
        return None
    return re.compile("(" + "|".join(map(re.escape, sorted(specials, key=len, reverse=True))) + ")")


# ----------------------------------------------------------------------------------------------------------------
# tokenizing parts


def _tokenize(tok, parts, pieces=False, straddle=True):
    """ids and mask of parts: each special id as it is; the text between two of them as one string (or, with
    pieces, each text on its own), a token learned when it spells a byte of a learned part (straddle), or when it
    starts in one. A FIRST part's learned token is the first that starts in it, or the next one after it."""
    ids, mask, run = [], [], []
    pending = False  # a FIRST part gave no token of its own: the next token is the one

    def flush():
        nonlocal pending
        if run:
            pending = _encode_run(tok, run, ids, mask, straddle, pending, pieces)
        run.clear()

    for p, learn in parts:
        if isinstance(p, int):
            flush()
            ids.append(p)
            mask.append(int(bool(learn) or pending))
            pending = False
        elif p:
            run.append((p, learn))
    flush()
    return ids, mask


def _encode_run(tok, run, ids, mask, straddle, pending, pieces=False):
    """Appends the tokens of one run of text parts and their mask; True when a FIRST part is still owed its
    token. pieces: each part tokenized on its own (also for a tokenizer without offsets)."""
    if not pieces:
        texts = [tok.normalize(t) for t, _ in run]
        try:
            new, spans = tok.encode_offsets("".join(texts))
        except NotImplementedError:
            pieces = True
    if pieces:
        for text, learn in run:
            piece = tok.encode(text)
            learned = [int(learn is not FIRST and bool(learn))] * len(piece)
            if piece and (pending or learn is FIRST):
                learned[0] = 1
            pending = (pending or learn is FIRST) and not piece
            ids.extend(piece)
            mask.extend(learned)
        return pending
    learned = [0] * len(new)
    if pending and new:
        learned[0], pending = 1, False
    at = 0
    for text, (_, learn) in zip(texts, run):
        a, b = at, at + len(text.encode())
        at = b
        if learn is FIRST:
            k = next((k for k, (s, _) in enumerate(spans) if s >= a), None)
            if k is None:
                pending = True
            else:
                learned[k] = 1
        elif learn:
            for k, (s, e) in enumerate(spans):
                if s < b and (max(e, s + 1) > a if straddle else s >= a):
                    learned[k] = 1
    ids.extend(new)
    mask.extend(learned)
    return pending
