"""Chat formats: how a conversation becomes token ids, in one place for SFT, DPO, sampling and the dataset tools.

    ids, mask = chat_ids(tok, messages)     # mask 1 on what SFT learns: each assistant content and its turn's end
    ids, stop = chat_prompt(tok, messages)  # the conversation, then the header of the assistant's reply; the ids
                                            # that end that reply
    chat_format(tok)                        # llama3 | chatml | llama2 | template | tulu

A tokenizer names its family's format in tok.chat_format; one with no format of its own (gpt2, char, an hf: folder
without a chat template) gets Tulu's, as open-instruct trains such models. The formats, as their templates write them:
  llama3    <|begin_of_text|>, then per message <|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>
  chatml    per message <|im_start|>role\\ncontent<|im_end|>\\n (Qwen); the newline after <|im_end|> is not learned
  llama2    <s>[INST] user [/INST] answer</s> per exchange, a system prompt folded into the first user turn
  tulu      <|system|>\\ncontent\\n, <|user|>\\ncontent\\n, <|assistant|>\\ncontent{eos}\\n, no newline after the last
            message; the markers are ordinary text, eos the tokenizer's end-of-text token
  template  an hf: folder's own chat template (transformers' apply_chat_template)
Each assistant content is tokenized on its own, so it starts and ends on a token edge, as the model writes it after
the header at inference.

A template's learned tokens come from its structure, never from searching the text for the content (a reply "a" or
"assistant" also occurs in the markup): a template with {% generation %} blocks marks them itself (transformers'
assistant mask over its own tokenization of the text). Any other is rendered with each message's content replaced by
a placeholder; the text between placeholders is the template's markup, tokenized as the template's text (its special
tokens recognised), each content as data (special-token text in it stays text); the first token after an assistant
content ends its turn and is learned with it. A template that changes, repeats or drops a content cannot be cut so;
it fails, asking for {% generation %} blocks.
"""
import re

_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")  # as transformers detects {% generation %} blocks
_PLACEHOLDER = "\ue000{}\ue001"  # private-use characters, which no template writes
_CUT = re.compile(r"\ue000(\d+)\ue001")


def chat_format(tok):
    return tok.chat_format or "tulu"


def chat_ids(tok, messages):
    """(ids, mask) of a conversation in the tokenizer's chat format; mask marks each assistant content and the
    token that ends its turn."""
    return _render(tok, messages)


def chat_prompt(tok, messages):
    """(ids, stop): a conversation and the header of the assistant's reply, as SFT renders them, and the ids that
    end the reply."""
    return _render(tok, messages, add_generation_prompt=True)[0], stop_ids(tok)


def stop_ids(tok):
    """The ids that end an assistant's reply: the token SFT learns at the end of each turn, where it is a special
    token (so it cannot occur inside a reply), and the tokenizer's end-of-text."""
    ids, mask = chat_ids(tok, [{"role": "user", "content": "?"}, {"role": "assistant", "content": "."}])
    end = ids[max(i for i, m in enumerate(mask) if m)]
    return {end} & set(tok.special_tokens.values()) | {tok.eot_id} - {None}


def _render(tok, messages, add_generation_prompt=False):
    fmt = chat_format(tok)
    if fmt != "template":
        header = _header(tok, fmt, "assistant") if add_generation_prompt else []
        return _encode(tok, [*_pieces(tok, fmt, messages), *((p, False) for p in header)])
    if _GENERATION.search(tok.tok.get_chat_template()):
        out = tok.tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                          return_dict=True, return_assistant_tokens_mask=True)
        return list(out["input_ids"]), list(out["assistant_masks"])
    return _encode_parts(tok, messages, _template_parts(tok, messages, add_generation_prompt))


def _encode(tok, pieces):
    ids, mask = [], []
    for piece, learn in pieces:
        new = [piece] if isinstance(piece, int) else tok.encode(piece)
        ids += new
        mask += [int(learn)] * len(new)
    return ids, mask


def _header(tok, fmt, role):
    """The pieces that open a turn of `role`."""
    sp = tok.special_tokens
    if fmt == "llama3":
        return [sp["<|start_header_id|>"], role, sp["<|end_header_id|>"], "\n\n"]
    if fmt == "chatml":
        return [sp["<|im_start|>"], role + "\n"]
    if fmt == "tulu":
        return [f"<|{role}|>\n"]
    return []  # llama2: the reply follows [/INST] directly


def _end(tok, fmt):
    """The id that ends a turn."""
    if fmt == "llama3":
        return tok.special_tokens["<|eot_id|>"]
    if fmt == "chatml":
        return tok.special_tokens["<|im_end|>"]
    return tok.eot_id


def _pieces(tok, fmt, messages):
    """(text or special id, learned?) of a conversation, in order."""
    if fmt == "llama2" and messages and messages[0]["role"] == "system":
        sys_text = f"<<SYS>>\n{messages[0]['content']}\n<</SYS>>\n\n"
        messages = [dict(messages[1], content=sys_text + messages[1]["content"]), *messages[2:]]
    if fmt == "tulu" and tok.eot_id is None:
        raise ValueError(f"the Tulu chat format ends assistant turns with an end-of-text token; {tok!r} has none")
    if fmt == "llama3":
        yield tok.bos_id, False
    for i, m in enumerate(messages):
        a = m["role"] == "assistant"
        if fmt == "llama2":
            if a:
                yield from ((m["content"].strip(), True), (_end(tok, fmt), True))
            else:
                yield from ((tok.bos_id, False), (f"[INST] {m['content'].strip()} [/INST]", False))
        elif fmt == "tulu" and not a:  # one piece, as the template's text is tokenized
            yield f"<|{m['role']}|>\n{m['content']}\n", False
        else:
            yield from ((p, False) for p in _header(tok, fmt, m["role"]))
            yield from ((m["content"], a), (_end(tok, fmt), a))
            if fmt == "chatml" or (fmt == "tulu" and i < len(messages) - 1):
                yield "\n", False


def _template_parts(tok, messages, add_generation_prompt=False):
    """The template's text of a conversation cut into (text, None) for markup and (content, i) for message i."""
    hf = tok.tok
    marked = [dict(m, content=_PLACEHOLDER.format(i)) for i, m in enumerate(messages)]
    cut = _CUT.split(hf.apply_chat_template(marked, tokenize=False, add_generation_prompt=add_generation_prompt))
    order = [int(i) for i in cut[1::2]]
    parts = [(cut[0], None)]
    for i, markup in zip(order, cut[2::2]):
        parts += [(messages[i]["content"], i), (markup, None)]
    whole = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    if order != list(range(len(messages))) or "".join(t for t, _ in parts) != whole:
        raise ValueError(f"the chat template of {tok.name} does not write each message's content once and as given "
                         f"(it changes, repeats or drops one), so the tokens to learn cannot be located; add "
                         f"{{% generation %}} blocks around the assistant's part of the template")
    return parts


def _encode_parts(tok, messages, parts):
    ids, mask, reply = [], [], False  # reply: an assistant content came last, its turn's end is still to come
    for text, i in parts:
        if i is None:  # markup: the template's own text, its special tokens recognised
            new = tok.tok.encode(text, add_special_tokens=False)
            mask += ([int(reply)] + [0] * (len(new) - 1)) if new else []
            reply = reply and not new
        else:  # content: data
            new = tok.encode(text)
            reply = messages[i]["role"] == "assistant"
            mask += [int(reply)] * len(new)
        ids += new
    return ids, mask
