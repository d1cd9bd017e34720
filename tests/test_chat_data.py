"""engine/data/chat_data.py and engine/data/chat.py against independent references: transformers' own chat-template
rendering and assistant mask (Tulu and ChatML templates, GPT-2 files), Meta's Llama 3 chat format from llama-models,
sentencepiece's processor, hand-written ChatML strings and hand-built records, rows and batches."""
import importlib.util
import io
import json
import runpy
import shutil
import sys
import types

import pytest
import torch

from engine.data.chat import chat_format, chat_ids, chat_prompt
from engine.data.chat_data import (
    IGNORE,
    ChatDataError,
    collate,
    collate_pairs,
    dpo_messages,
    load_dpo,
    load_records,
    load_sft,
    make_toy_dpo,
    make_toy_sft,
    pack_sft,
    sft_messages,
    tokenize_all,
    tokenize_pair,
    tokenize_pairs,
    tokenize_sft,
    unpacked_rows,
)
from engine.data.tokenizers import FILES, get_tokenizer, tokenizer_file

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "Add 2 and 3."},
        {"role": "assistant", "content": "5"}]
END = {"gpt2": "<|endoftext|>", "llama3": "<|eot_id|>", "qwen3": "<|im_end|>"}
THINK = {"gpt2": "", "llama3": "", "qwen3": "<think>\n\n</think>\n\n"}  # an empty think block
# open-instruct's Tulu template, with transformers' generation tags marking what the model learns
TULU = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|assistant|>\n' }}"
        "{% generation %}{{ m['content'] + eos_token }}{% endgeneration %}{% if not loop.last %}{{ '\n' }}{% endif %}"
        "{% else %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '\n' }}{% endif %}"
        "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}{% endfor %}")
# ChatML as Qwen's templates write it; the second marks the assistant's part for transformers' assistant mask
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CHATML_GEN = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
              "{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}{% else %}"
              "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _tok(name):
    if importlib.util.find_spec(FILES[name].member.split("/")[0]) is None:
        pytest.skip(f"{FILES[name].dist} is not installed")
    return get_tokenizer(name)


def _hf_gpt2(folder, template=None, chatml=False):
    """GPT-2's files as a transformers tokenizer folder, with a chat template and ChatML's two special tokens."""
    from transformers import GPT2TokenizerFast

    src = tokenizer_file("gpt2")[0].parent  # encoder.json and vocab.bpe are transformers' vocab.json and merges.txt
    folder.mkdir(exist_ok=True)
    shutil.copy(src / "encoder.json", folder / "vocab.json")
    shutil.copy(src / "vocab.bpe", folder / "merges.txt")
    ref = GPT2TokenizerFast.from_pretrained(str(folder))
    if chatml:
        ref.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    ref.chat_template = template
    ref.save_pretrained(folder)
    return ref


def _learned(tok, ids, mask):
    return tok.decode([i for i, m in zip(ids, mask) if m])


def _runs(tok, ids, labels):
    """The learned target tokens, decoded one contiguous run at a time."""
    runs, prev = [], False
    for t, lab in enumerate(labels):
        if lab != IGNORE:
            assert t + 1 == len(ids) or lab == ids[t + 1]  # labels are the next tokens
            runs.append([lab]) if not prev else runs[-1].append(lab)
        prev = lab != IGNORE
    return [tok.decode(r) for r in runs]


def _write_jsonl(path, lines):
    path.write_text("".join(x if isinstance(x, str) else json.dumps(x) + "\n" for x in lines))
    return path


# ---- sources and record formats


def test_sft_formats_give_the_same_messages(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    want = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    records = [
        {"messages": want},
        {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"},
                           {"from": "gpt", "value": "A"}]},
        {"conversations": [{"from": "user", "value": "Q"}, {"from": "assistant", "value": "A"}], "system": "S"},
        {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}], "completion": "A"},
    ]
    _write_jsonl(tmp_path / "a.jsonl", records[:2] + ["\n"] + records[2:])  # a blank line is no record
    (tmp_path / "b.json").write_text(json.dumps(records))
    (tmp_path / "c.json").write_text(json.dumps({"data": records}))
    # one schema for the table, so the row without "system" holds a null there
    pq.write_table(pa.Table.from_pylist(records[1:3], schema=pa.Table.from_pylist(records[2:3]).schema),
                   tmp_path / "d.parquet")
    for src, n in (("a.jsonl", 4), ("b.json", 4), ("c.json", 4), ("d.parquet", 2)):
        assert load_sft(str(tmp_path / src)) == [want] * n, src
    assert sft_messages({"prompt": "Q", "completion": "A"}) == want[1:]
    where = [w for w, _ in load_records(str(tmp_path / "a.jsonl"))]
    assert where == [f"{tmp_path / 'a.jsonl'} line {i}" for i in (1, 2, 4, 5)]
    assert [w for w, _ in load_records(str(tmp_path / "d.parquet"))][1] == f"{tmp_path / 'd.parquet'} row 1"


def test_globs_lists_and_limit(tmp_path):
    for i in range(3):
        _write_jsonl(tmp_path / f"part{i}.jsonl", [{"prompt": f"q{i}{j}", "completion": "a"} for j in range(2)])
    recs = load_records(str(tmp_path / "part*.jsonl"))
    assert [r["prompt"] for _, r in recs] == ["q00", "q01", "q10", "q11", "q20", "q21"]
    assert [r["prompt"] for _, r in load_records(str(tmp_path / "part*.jsonl"), limit=3)] == ["q00", "q01", "q10"]
    both = f"{tmp_path / 'part2.jsonl'},{tmp_path / 'part0.jsonl'}"
    assert [r["prompt"] for _, r in load_records(both)] == ["q20", "q21", "q00", "q01"]
    with pytest.raises(ChatDataError, match="nope"):
        load_records(str(tmp_path / "nope*.jsonl"))
    with pytest.raises(ChatDataError, match="missing.jsonl"):
        load_records(str(tmp_path / "missing.jsonl"))


BAD_SFT = [
    ({"text": "hi"}, "has 'messages', 'conversations' or 'prompt' and 'completion'"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "user", "content": "Q"}, {"role": "bot", "content": "A"}]},
     r"messages\[1\] has role 'bot'"),
    ({"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "A"}]},
     r"conversations\[0\] content is int"),
    ({"messages": [{"role": "user", "content": "Q"}]}, "no assistant turn"),
    ({"prompt": "Q"}, "'prompt' and 'completion'"),
    ({"messages": ["hi"]}, "not a message object"),
    ([1, 2], "a record is a JSON object"),
    ('{"messages": [', "not valid JSON"),
]


@pytest.mark.parametrize("rec,match", BAD_SFT)
def test_malformed_sft_record_names_file_and_line(tmp_path, rec, match):
    good = {"prompt": "Q", "completion": "A"}
    bad = rec + "\n" if isinstance(rec, str) else rec
    path = _write_jsonl(tmp_path / "x.jsonl", [good, "\n", bad, good])
    with pytest.raises(ChatDataError, match=f"x.jsonl line 3: .*{match}"):
        load_sft(str(path))


def test_malformed_rows_in_json_and_parquet(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    (tmp_path / "x.json").write_text(json.dumps([{"prompt": "Q", "completion": "A"}, {"prompt": "Q"}]))
    with pytest.raises(ChatDataError, match=r"x.json row 1: "):
        load_sft(str(tmp_path / "x.json"))
    (tmp_path / "y.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(ChatDataError, match=r"y.json: a .json source holds a list"):
        load_records(str(tmp_path / "y.json"))
    rows = [{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}] * 2
    rows.append({"messages": [{"role": "user", "content": "Q"}, {"role": "tool", "content": "A"}]})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "z.parquet")
    with pytest.raises(ChatDataError, match=r"z.parquet row 2: messages\[1\] has role 'tool'"):
        load_sft(str(tmp_path / "z.parquet"))


def test_hub_sources(monkeypatch):
    calls = []

    def load_dataset(name, config, split, streaming):
        calls.append((name, split, streaming))
        if name == "org/offline":
            raise ConnectionError("the hub cannot be reached")
        return iter([{"prompt": f"q{i}", "completion": "a"} for i in range(5)])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    recs = load_records("hub:org/sft:train_sft", limit=2)
    assert [r["prompt"] for _, r in recs] == ["q0", "q1"] and recs[1][0] == "hub:org/sft (train_sft) row 1"
    assert len(load_records("hub:org/sft")) == 5
    assert calls == [("org/sft", "train_sft", True), ("org/sft", "train", False)]
    with pytest.raises(ChatDataError, match="hub:org/offline split 'train' .*ConnectionError.*local files"):
        load_records("hub:org/offline")
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(ChatDataError, match="pip install datasets"):
        load_records("hub:org/sft")


def test_dpo_formats(tmp_path):
    u = lambda s: {"role": "user", "content": s}
    a = lambda s: {"role": "assistant", "content": s}
    assert dpo_messages({"prompt": "Q", "chosen": "good", "rejected": "bad"}) == ([u("Q")], [a("good")], [a("bad")])
    # Tulu 3 style: whole conversations, the prompt string beside them ignored; a multi-turn shared prefix
    rec = {"prompt": "ignored", "chosen": [u("Q"), a("x"), u("Q2"), a("good")],
           "rejected": [u("Q"), a("x"), u("Q2"), a("bad"), u("more?"), a("worse")]}
    assert dpo_messages(rec) == ([u("Q"), a("x"), u("Q2")], [a("good")], [a("bad"), u("more?"), a("worse")])
    # TRL conversational: the prompt as messages, the completions after it
    rec = {"prompt": [u("Q")], "chosen": [a("good")], "rejected": [a("bad")]}
    assert dpo_messages(rec) == ([u("Q")], [a("good")], [a("bad")])
    bad = [({"chosen": "x", "rejected": "y"}, "need a 'prompt'"),
           ({"prompt": "Q", "chosen": "x"}, "missing: rejected"),
           ({"chosen": [u("Q"), a("x")], "rejected": [u("P"), a("y")]}, "share no first turn"),
           ({"chosen": [u("Q"), a("x")], "rejected": [u("Q"), a("x"), u("more")]}, "must both go on after their 2"),
           ({"chosen": [u("Q"), a("x"), u("more")], "rejected": [u("Q"), a("y")]}, "chosen ends with a user turn"),
           ({"chosen": [u("Q"), a("x")], "rejected": "y"}, "both be strings or both message lists")]
    for rec, match in bad:
        path = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q", "chosen": "x", "rejected": "y"}, rec])
        with pytest.raises(ChatDataError, match=f"p.jsonl line 2: .*{match}"):
            load_dpo(str(path))


def test_identical_dpo_pairs_are_left_out_and_counted_in_both_formats(tmp_path):
    u = lambda s: {"role": "user", "content": s}
    a = lambda s: {"role": "assistant", "content": s}
    good = {"prompt": "Q", "chosen": "x", "rejected": "y"}
    same = [{"prompt": "Q", "chosen": "x", "rejected": "x"},
            {"chosen": [u("Q"), a("x")], "rejected": [u("Q"), a("x")]},
            {"prompt": [u("Q")], "chosen": [a("x")], "rejected": [a("x")]}]
    for rec in same:
        assert dpo_messages(rec) is None
    path = _write_jsonl(tmp_path / "p.jsonl", [good, *same, good])
    logged = []
    assert load_dpo(str(path), log=logged.append) == [([u("Q")], [a("x")], [a("y")])] * 2
    assert len(logged) == 1 and "the same in 3 of 5 records" in logged[0]
    path = _write_jsonl(tmp_path / "q.jsonl", same)
    assert load_dpo(str(path), log=logged.append) == [] and "check which fields" in logged[-1]


# ---- chat formats and the label mask


def test_tulu_matches_transformers_template_and_assistant_mask(tmp_path):
    ref = _hf_gpt2(tmp_path)
    tok = _tok("gpt2")
    assert chat_format(tok) == "tulu"
    for msgs in (CHAT, CHAT[1:3], CHAT[:4]):  # a trailing user turn too
        out = ref.apply_chat_template(msgs, chat_template=TULU, return_dict=True, return_assistant_tokens_mask=True)
        assert chat_ids(tok, msgs) == (out["input_ids"], out["assistant_masks"])
    prompt = ref.apply_chat_template(CHAT[:4], chat_template=TULU, add_generation_prompt=True, return_dict=True)
    assert chat_prompt(tok, CHAT[:4]) == (prompt["input_ids"], {50256})
    with pytest.raises(ValueError, match="needs an end-of-text token"):
        chat_ids(get_tokenizer("char", chars="abc"), CHAT)


def test_llama2_format_with_a_trained_sentencepiece_model(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    buf = io.BytesIO()
    text = [m["content"] for m in CHAT] + ["[INST] [/INST] <<SYS>> <</SYS>> the quick brown fox"]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text * 50), model_writer=buf, model_type="bpe",
                                   vocab_size=400, byte_fallback=True, minloglevel=2)
    (tmp_path / "tokenizer.model").write_bytes(buf.getvalue())
    ref = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    tok = get_tokenizer("llama2", path=tmp_path / "tokenizer.model")
    ids, mask = chat_ids(tok, CHAT)
    # Meta's llama chat format: each exchange <s>[INST] user [/INST] answer</s>, the system prompt in the first turn
    first = "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi there [/INST]"
    assert ids == [1, *ref.encode(first), *ref.encode("Hello! How can I help?"), 2,
                   1, *ref.encode("[INST] Add 2 and 3. [/INST]"), *ref.encode("5"), 2]
    assert _learned(tok, ids, mask) == "Hello! How can I help? 5"
    assert [i for i, m in zip(ids, mask) if m].count(2) == 2
    assert chat_prompt(tok, CHAT[:4]) == (ids[:-len(ref.encode("5")) - 1], {2})


def test_llama3_rendering_matches_meta_chat_format():
    tok = _tok("llama3")
    try:
        from llama_models.datatypes import RawMessage
        from llama_models.llama3.chat_format import ChatFormat
        from llama_models.llama3.tokenizer import Tokenizer
    except ImportError as e:
        pytest.skip(f"llama-models' chat format needs its dependencies: {e}")
    fmt = ChatFormat(Tokenizer(tokenizer_file("llama3")[0]))
    ref = fmt.encode_dialog_prompt([RawMessage(role=m["role"], content=m["content"]) for m in CHAT]).tokens
    ids, labels = tokenize_sft(tok, CHAT, 1000)
    assert ids + [labels[-1]] == ref[:-4]  # Meta's ends with the header that asks for the next turn
    assert _runs(tok, ids, labels) == _expected_runs("llama3", CHAT)


def _expected_runs(name, msgs):
    """What SFT learns of each answer: qwen3's default format (thinking on) opens the last with its think block."""
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    return [(THINK[name] if i == last else "") + m["content"] + END[name] for i, m in enumerate(msgs)
            if m["role"] == "assistant"]


@pytest.mark.parametrize("name", ["gpt2", "llama3", "qwen3"])
def test_sft_labels_are_the_assistant_tokens(name):
    tok = _tok(name)
    for msgs in (CHAT, CHAT[1:3]):
        ids, labels = tokenize_sft(tok, msgs, 1000)
        assert len(ids) == len(labels) and ids[0] == chat_ids(tok, msgs)[0][0]
        assert _runs(tok, ids, labels) == _expected_runs(name, msgs)
    if name == "qwen3":  # ChatML ends each turn with a newline, which is not learned
        ids, labels = tokenize_sft(tok, CHAT[1:3], 1000, "chatml")
        assert labels[-1] == IGNORE and tok.decode(ids) == (
            "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello! How can I help?<|im_end|>")


REPLIES = ["a", "t", "start", "assistant", "im_end", "Hello! How can I help?"]  # the first five occur in the markup


@pytest.mark.parametrize("reply", REPLIES)
def test_template_learns_the_reply_wherever_it_also_occurs_in_the_markup(tmp_path, reply):
    gen = _hf_gpt2(tmp_path / "gen", CHATML_GEN, chatml=True)
    _hf_gpt2(tmp_path / "plain", CHATML, chatml=True)
    tok = get_tokenizer(f"hf:{tmp_path / 'plain'}")
    msgs = [*CHAT[:2], {"role": "assistant", "content": reply}, CHAT[3], {"role": "assistant", "content": reply}]
    ids, mask = chat_ids(tok, msgs)
    # transformers' own assistant mask of the same template with {% generation %} blocks is the reference
    out = gen.apply_chat_template(msgs, return_dict=True, return_assistant_tokens_mask=True)
    assert (ids, mask) == (out["input_ids"], out["assistant_masks"])
    assert _learned(tok, ids, mask) == (reply + "<|im_end|>") * 2
    x = tokenize_sft(tok, msgs, 1000)
    assert x is not None and _runs(tok, *x) == [reply + "<|im_end|>"] * 2
    item = tokenize_pair(tok, msgs[:4], [msgs[4]], [{"role": "assistant", "content": "no"}], 1000)
    assert item is not None and _runs(tok, item["chosen_ids"], item["chosen_labels"]) == [reply + "<|im_end|>"]
    # a template with {% generation %} blocks marks its part itself
    tok = get_tokenizer(f"hf:{tmp_path / 'gen'}")
    assert chat_ids(tok, msgs) == (ids, mask) and _learned(tok, *chat_ids(tok, msgs)) == (reply + "<|im_end|>") * 2


def test_template_content_is_data_and_prompt_is_the_training_prefix(tmp_path):
    _hf_gpt2(tmp_path, CHATML, chatml=True)
    tok = get_tokenizer(f"hf:{tmp_path}")
    assert chat_format(tok) == "template"
    reply = {"role": "assistant", "content": "write <|im_end|> to end"}  # special-token text in data stays text
    ids, mask = chat_ids(tok, [CHAT[1], reply])
    assert ids.count(tok.special_tokens["<|im_end|>"]) == 2
    assert _learned(tok, ids, mask) == "write <|im_end|> to end<|im_end|>"
    prompt, stop = chat_prompt(tok, [CHAT[1]])
    assert tok.decode(prompt) == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    assert ids[:len(prompt)] == prompt and stop == {tok.special_tokens["<|im_end|>"], tok.eot_id}
    # a template that changes the content (trims it) cannot be cut at placeholders: it fails, asking for markers
    _hf_gpt2(tmp_path / "trim", CHATML.replace("m['content']", "(m['content'] | trim)"), chatml=True)
    trim = get_tokenizer(f"hf:{tmp_path / 'trim'}")
    assert chat_ids(trim, [CHAT[1], {"role": "assistant", "content": "a"}]) == chat_ids(
        tok, [CHAT[1], {"role": "assistant", "content": "a"}])
    with pytest.raises(ValueError, match="generation"):
        chat_ids(trim, [CHAT[1], {"role": "assistant", "content": " a\n"}])


@pytest.mark.parametrize("name", ["gpt2", "llama3", "qwen3"])
def test_chat_prompt_is_the_training_prefix(name):
    tok = _tok(name)
    prompt, stop = chat_prompt(tok, CHAT[:4])
    ids, mask = chat_ids(tok, CHAT)
    assert ids[:len(prompt)] == prompt and mask[len(prompt) - 1] == 0 and mask[len(prompt)] == 1
    assert _learned(tok, ids[len(prompt):], mask[len(prompt):]) == THINK[name] + "5" + END[name]
    assert tok.special_tokens[END[name]] in stop and tok.eot_id in stop


def test_hf_template_tokenizer(tmp_path):
    _hf_gpt2(tmp_path / "tulu", TULU)
    tok = get_tokenizer(f"hf:{tmp_path / 'tulu'}")
    assert chat_format(tok) == "template"
    ids, labels = tokenize_sft(tok, CHAT, 1000)
    assert _runs(tok, ids, labels) == _expected_runs("gpt2", CHAT)
    gpt2 = _tok("gpt2")
    assert tokenize_sft(gpt2, CHAT, 1000) == (ids, labels)  # our Tulu rendering, tokenized piece by piece
    pair = (CHAT[:4], [{"role": "assistant", "content": "5"}], [{"role": "assistant", "content": "six"}])
    assert tokenize_pair(tok, *pair, 1000) == tokenize_pair(gpt2, *pair, 1000)
    _hf_gpt2(tmp_path / "plain")
    assert chat_format(get_tokenizer(f"hf:{tmp_path / 'plain'}")) == "tulu"
    # a template that closes the whole conversation, not each turn: the prompt alone is no prefix of prompt + answer
    _hf_gpt2(tmp_path / "closing", "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
                                    "{{ eos_token }}")
    with pytest.raises(ValueError, match="renders the prompt differently alone"):
        tokenize_pair(get_tokenizer(f"hf:{tmp_path / 'closing'}"), *pair, 1000)


@pytest.mark.parametrize("name", ["gpt2", "llama3", "qwen3"])
def test_truncation_keeps_the_start(name):
    tok = _tok(name)
    # qwen3's template writes an answer differently when it is the last: checked on its ChatML
    fmt = "chatml" if name == "qwen3" else None
    full, mask = chat_ids(tok, CHAT, fmt)
    second = max(i for i, m in enumerate(mask) if m and not mask[i - 1])  # first token of the last answer
    ids, labels = tokenize_sft(tok, CHAT, second, fmt)  # the cut leaves the last answer's first token only
    assert ids == full[:second] and len(labels) == second
    assert _runs(tok, ids, labels) == [CHAT[2]["content"] + END[name], tok.decode([full[second]])]
    first = mask.index(1)
    assert tokenize_sft(tok, CHAT, first - 1, fmt) is None  # nothing learned is left
    examples, dropped = tokenize_all(tok, [CHAT, CHAT[:3], CHAT[:2]], first, fmt)  # CHAT[:2] has no answer at all
    assert examples == [tokenize_sft(tok, CHAT, first, fmt)] * 2 and dropped == 1


def test_model_loss_with_labels_is_the_assistant_cross_entropy():
    from model import GPT, ModelConfig

    tok = _tok("gpt2")
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=50304, block_size=128))
    ids, labels = tokenize_sft(tok, CHAT, 1000)
    _, loss = model(torch.tensor([ids]), torch.tensor([labels]))
    # independently: every token of the rendering that chat_ids marks, predicted from all the tokens before it
    full, mask = chat_ids(tok, CHAT)
    logits, _ = model(torch.tensor([full]))
    logp = torch.log_softmax(logits[0].double(), -1)
    want = -sum(logp[p - 1, full[p]] for p in range(1, len(full)) if mask[p]) / sum(mask)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)


# ---- DPO pairs


@pytest.mark.parametrize("name", ["gpt2", "llama3", "qwen3"])
def test_dpo_pair_masks_the_prompt(name):
    tok = _tok(name)
    prompt = CHAT[:4]  # a prompt with an assistant turn of its own: not learned here
    good, bad = [{"role": "assistant", "content": "5"}], [{"role": "assistant", "content": "It is six."}]
    x = tokenize_pair(tok, prompt, good, bad, 1000)
    for k, completion in (("chosen", good), ("rejected", bad)):
        ids, labels = x[f"{k}_ids"], x[f"{k}_labels"]
        assert ids == chat_ids(tok, prompt + completion)[0][:-1]
        assert _runs(tok, ids, labels) == _expected_runs(name, completion)
    # the cut keeps the rejected answer's first token only: the pair stays, with that one token learned
    full, mask = chat_ids(tok, prompt + bad)
    first = mask.index(1, len(chat_ids(tok, prompt)[0]))
    cut = tokenize_pair(tok, prompt, good, bad, first)
    assert cut["rejected_ids"] == full[:first] and _runs(tok, cut["rejected_ids"], cut["rejected_labels"]) == [
        tok.decode(full[first:first + 1])]
    assert cut["chosen_ids"] == x["chosen_ids"][:first]
    assert tokenize_pair(tok, prompt, good, bad, first - 1) is None  # no completion token survives the cut
    assert tokenize_pairs(tok, [(prompt, good, bad)] * 2, first) == ([cut, cut], 0)
    assert tokenize_pairs(tok, [(prompt, good, bad)] * 2, first - 1) == ([], 2)


def test_collate_pairs_pads_to_one_length():
    items = [{"chosen_ids": [1, 2, 3], "chosen_labels": [-100, 3, 4], "rejected_ids": [1, 2],
              "rejected_labels": [-100, 5]},
             {"chosen_ids": [7], "chosen_labels": [8], "rejected_ids": [1, 2, 3, 4, 5],
              "rejected_labels": [-100, -100, 4, 5, 6]}]
    b = collate_pairs(items, pad_id=0)
    assert {k: v.tolist() for k, v in b.items()} == {
        "chosen_ids": [[1, 2, 3, 0, 0], [7, 0, 0, 0, 0]],
        "chosen_labels": [[-100, 3, 4, -100, -100], [8, -100, -100, -100, -100]],
        "rejected_ids": [[1, 2, 0, 0, 0], [1, 2, 3, 4, 5]],
        "rejected_labels": [[-100, 5, -100, -100, -100], [-100, -100, 4, 5, 6]]}
    assert all(v.dtype == torch.long for v in b.values())


# ---- rows and batches


EXAMPLES = [([1, 2, 3, 4, 5], [-100, 3, 4, 5, 6]), ([7, 8, 9, 10], [-100, -100, 10, 11]),
            ([11, 12, 13, 14, 15, 16], [12, 13, -100, 15, 16, 17]), ([20, 21, 22], [-100, 22, 23])]


def test_packing_restarts_positions_and_counts_segments():
    rows = pack_sft(EXAMPLES, 10)  # 5 + 4 fit, 6 does not go on top of them, 6 + 3 fit
    assert rows == [
        {"input_ids": [1, 2, 3, 4, 5, 7, 8, 9, 10], "labels": [-100, 3, 4, 5, 6, -100, -100, 10, 11],
         "positions": [0, 1, 2, 3, 4, 0, 1, 2, 3], "segments": [0, 0, 0, 0, 0, 1, 1, 1, 1]},
        {"input_ids": [11, 12, 13, 14, 15, 16, 20, 21, 22], "labels": [12, 13, -100, 15, 16, 17, -100, 22, 23],
         "positions": [0, 1, 2, 3, 4, 5, 0, 1, 2], "segments": [0, 0, 0, 0, 0, 0, 1, 1, 1]}]
    assert pack_sft(EXAMPLES, 18) == [{"input_ids": [1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 20, 21, 22],
                                       "labels": sum((lab for _, lab in EXAMPLES), []),
                                       "positions": [*range(5), *range(4), *range(6), *range(3)],
                                       "segments": [0] * 5 + [1] * 4 + [2] * 6 + [3] * 3}]
    with pytest.raises(ValueError, match="does not fit max_len=5"):
        pack_sft(EXAMPLES, 5)
    single = unpacked_rows(EXAMPLES)
    assert [r["input_ids"] for r in single] == [ids for ids, _ in EXAMPLES]
    assert [r["positions"] for r in single] == [list(range(len(ids))) for ids, _ in EXAMPLES]
    assert [set(r["segments"]) for r in single] == [{0}] * 4


def test_collate_pads_rows():
    b = collate(pack_sft(EXAMPLES[:3], 10), pad_id=99)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16, 99, 99, 99]]
    assert b["labels"].tolist()[1] == [12, 13, -100, 15, 16, 17, -100, -100, -100]
    assert b["positions"].tolist()[1] == [0, 1, 2, 3, 4, 5, 0, 0, 0]
    assert b["segments"].tolist()[1] == [0, 0, 0, 0, 0, 0, -1, -1, -1]
    assert all(v.dtype == torch.long and v.shape == (2, 9) for v in b.values())


# ---- toy data


def test_toy_sft():
    recs = make_toy_sft(200, seed=3)
    assert recs == make_toy_sft(200, seed=3) and recs != make_toy_sft(200, seed=4)
    assert {next(iter(r)) for r in recs} == {"messages", "conversations"}
    convs = [sft_messages(r) for r in recs]
    assert any(c[0]["role"] == "system" for c in convs) and any(len(c) >= 4 for c in convs)
    for c in convs:
        for q, a in zip(c, c[1:]):
            if q["role"] == "user":
                assert a["content"] == _answer(q["content"])


def _answer(q):
    if q.startswith("What is "):
        x, y = q[8:-1].split(" + ")
        return str(int(x) + int(y))
    if q.startswith("Reverse the word: "):
        return q.split(": ")[1][::-1]
    return q.split(": ")[1].upper()


def test_toy_dpo_prefers_the_right_answer():
    recs = make_toy_dpo(300, seed=1)
    assert recs == make_toy_dpo(300, seed=1)
    kinds = {r["prompt"].split(" ")[0] for r in recs}
    assert kinds == {"What", "Reverse", "Uppercase:"}
    for r in recs:
        assert r["chosen"] == _answer(r["prompt"]) != r["rejected"]
        dpo_messages(r)


def test_make_toy_script(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["make_toy.py", "--sft=30", "--dpo=20", "--seed=5", f"--out_dir={tmp_path}"])
    runpy.run_path("data/toy_chat/make_toy.py", run_name="__main__")
    assert [r for _, r in load_records(str(tmp_path / "sft.jsonl"))] == make_toy_sft(30, 5)
    assert [r for _, r in load_records(str(tmp_path / "dpo.jsonl"))] == make_toy_dpo(20, 6)
    assert not list(tmp_path.glob("*.tmp"))
