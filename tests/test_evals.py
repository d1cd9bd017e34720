"""
engine/evals.py and tools/eval.py against references built here: log-likelihoods recomputed in float64 from the
model's logits, hand-made models whose answers are known, transformers' own forward, one process against two gloo
ranks, and the harness's preprocessing of each data set written out by hand.
"""
import io
import json
import math
import os
import re
import shutil
import string
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT
from torch import nn

from engine.data.bins import DataError
from engine.data.tokenizers import CharTokenizer, get_tokenizer
from engine.evals import TASKS, encode_pair, evaluate_tasks, load_task, loglikelihoods, requests
from model import GPT, ModelConfig
from tools import eval as eval_tool

DATA = os.path.join(ROOT, "tests", "data", "evals")
CHARS = CharTokenizer("\n" + string.printable[:95] + "\u00e9")


def split(tok, context, continuation):
    """The harness's split, written out: the context's trailing spaces go to the continuation; the continuation's ids
    are what the whole text's encoding holds after the context's own."""
    bare = context.rstrip()
    whole, ctx = tok.encode(context + continuation), tok.encode(bare)
    assert whole[:len(ctx)] == ctx
    return ctx, whole[len(ctx):]


def reference(model, tok, context, continuation, block):
    """(log-likelihood, greedy) in float64, one sequence at a time, left-truncated to block + 1 tokens."""
    ctx, cont = split(tok, context, continuation)
    seq = (ctx + cont)[-(block + 1):]
    with torch.no_grad():
        logp = model(torch.tensor([seq[:-1]]))[0][0].double().log_softmax(-1)[-len(cont):]
    picked = [logp[i, t].item() for i, t in enumerate(cont)]
    return sum(picked), all(logp[i].argmax().item() == t for i, t in enumerate(cont))


def tiny_gpt(vocab_size, block_size=32, seed=0):
    torch.manual_seed(seed)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=vocab_size, block_size=block_size))
    with torch.no_grad():  # sharper than the 0.02-std init, so that choices differ clearly
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape))
    return model.eval()


# ----------------------------------------------------------------------------------------------------------
# log-likelihoods

MC_ITEMS = [
    {"context": "Question: What do cows eat?\nAnswer: ", "choices": ["grass", "rocks and stones", "nothing"],
     "label": 0},
    {"context": "The cat sat on the", "choices": [" mat", "mat.", "dog", "roof of the house"], "label": 0},
    {"context": "A long context that runs past the block size of the model, so that only its last tokens are kept "
                "when the choices are scored: the harness truncates from the left. The answer is",
     "choices": ["yes", "no"], "label": 1},
]


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_loglikelihoods_equal_a_float64_recomputation(batch_size):
    tok = get_tokenizer("gpt2")  # BPE: a token may span the context's end, and "Answer: " ends with a space
    model = tiny_gpt(tok.vocab_size)
    scores = loglikelihoods(model, tok, "arc_easy", MC_ITEMS, "cpu", batch_size=batch_size)
    model64 = tiny_gpt(tok.vocab_size).double()
    for item, got in zip(MC_ITEMS, scores):
        want = [reference(model64, tok, item["context"], " " + c, 32) for c in item["choices"]]
        assert [g for _, g in got] == [g for _, g in want]
        assert max(abs(a[0] - b[0]) for a, b in zip(got, want)) < 1e-4, (got, want)
    assert len(tok.encode(MC_ITEMS[2]["context"])) > 32  # the truncation was exercised


def test_a_shared_context_is_computed_once():
    model = tiny_gpt(CHARS.vocab_size, block_size=64)
    shapes = []
    model.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
    # one 4-choice item: its context runs once (one row), then four continuations from copies of its cache
    loglikelihoods(model, CHARS, "hellaswag", [{"context": "A man is", "choices": ["a", "bb", "ccc", "dd"],
                                                "label": 0}], "cpu")
    assert shapes == [(1, len("A man is")), (4, 3)]
    # Winogrande's contexts differ by option, so each is its own row; its shared suffix is continued from both
    shapes.clear()
    loglikelihoods(model, CHARS, "winogrande", [{"context": "It was _ so.", "choices": ["aa", "b"], "label": 0}],
                   "cpu")
    assert shapes == [(2, len("It was aa")), (2, len(" so.") - 1)]


def test_the_split_follows_the_harness(tmp_path):
    gpt2 = get_tokenizer("gpt2")  # the context's trailing space moves onto the continuation, not a token of its own
    assert encode_pair(gpt2, "Answer: ", " grass") == (gpt2.encode("Answer:"), gpt2.encode("  grass"))
    # sentencepiece as Llama 2 configures it encodes " grass" alone as "\u2581", "\u2581grass", but "\u2581grass"
    # after "Answer:": the continuation is cut from the whole text's encoding, the tokens the model reads there
    spm = pytest.importorskip("sentencepiece")
    buf = io.BytesIO()
    lines = ["Question: Is grass green?", "Answer: grass", "Answer: yes, green grass", "The grass is green."] * 20
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, model_type="bpe", vocab_size=60,
                                   hard_vocab_limit=False, remove_extra_whitespaces=False,
                                   normalization_rule_name="identity", minloglevel=2)
    (tmp_path / "tokenizer.model").write_bytes(buf.getvalue())
    sp = get_tokenizer("llama2", path=tmp_path)
    assert [sp.sp.id_to_piece(i) for i in sp.encode(" grass")] == ["\u2581", "\u2581grass"]
    ctx, cont = encode_pair(sp, "Answer: ", "grass")
    assert [[sp.sp.id_to_piece(i) for i in ids] for ids in (ctx, cont)] == [["\u2581Answer", ":"], ["\u2581grass"]]


class Oracle(nn.Module):
    """Knows the gold sequences: wherever the input so far is a prefix of one, it puts its mass on that sequence's next
    token; elsewhere it is uniform. It reads "the input so far" from the KV cache it is given: its one layer caches
    token ids in place of keys, so that it sees the padding, context copies and continuations loglikelihoods makes."""

    def __init__(self, golds, vocab_size):
        super().__init__()
        self.config = SimpleNamespace(block_size=512, n_layer=1)
        self.vocab_size = vocab_size
        self.next = {tuple(g[:t + 1]): g[t + 1] for g in golds for t in range(len(g) - 1)}

    def forward(self, idx, kv_cache, pos):
        assert not self.training and not torch.is_grad_enabled()
        B, T = idx.shape
        ids, _ = kv_cache.layers[0].update(idx[..., None, None].double(), idx[..., None, None].double())
        S = ids.size(1)
        logits = torch.zeros(B, T, self.vocab_size)
        for b in range(B):
            for t in range(T):
                slot = S - T + t
                if not kv_cache.keep[b, slot]:
                    continue  # left padding
                prefix = tuple(int(i) for i, k in zip(ids[b, :slot + 1, 0, 0].tolist(), kv_cache.keep[b].tolist()) if k)
                assert pos[b, t] == len(prefix) - 1  # positions count the tokens, not the padding
                nxt = self.next.get(prefix)
                if nxt is not None:
                    logits[b, t, nxt] = 30.0
        return logits, None


def gold_text(name, item):
    if name == "lambada":
        return item["text"]
    if name == "winogrande":
        return item["context"].replace("_", item["choices"][item["label"]])
    return item["context"] + " " + item["choices"][item["label"]]


def test_a_model_that_knows_the_answers_scores_one():
    tasks = {name: load_task(name, os.path.join(DATA, f"{name}.jsonl")) for name in TASKS}
    model = Oracle([CHARS.encode(gold_text(n, it)) for n, items in tasks.items() for it in items], CHARS.vocab_size)
    model.train()
    res = evaluate_tasks(model, CHARS, tasks, "cpu", batch_size=5)
    assert model.training  # restored
    for name in TASKS:
        assert res[name]["acc"] == 1.0 and res[name].get("acc_norm", 1.0) == 1.0 == res[name].get("acc_bytes", 1.0)
        assert res[name]["centered"] == 1.0
        assert res[name]["n"] == len(tasks[name])
    assert ("acc_norm" in res["hellaswag"], "acc_norm" in res["winogrande"], "acc_norm" in res["lambada"]) == \
        (True, False, False)
    assert res["core"] == 1.0 and res["lambada"]["ppl"] < 1.01


class Bigram(nn.Module):
    """log p(next | current) from a hand-written table; the mass left in a row is spread over the other tokens."""

    def __init__(self, tok, table):
        super().__init__()
        self.config = SimpleNamespace(block_size=64, n_layer=0)
        V = tok.vocab_size
        p = torch.zeros(V, V, dtype=torch.float64)
        for a in range(V):
            row = table.get(tok.decode([a]), {})
            rest = [b for b in range(V) if tok.decode([b]) not in row]
            p[a, rest] = (1 - sum(row.values())) / len(rest)
            for b, q in row.items():
                p[a, tok.encode(b)[0]] = q
        self.register_buffer("logp", p.log())

    def forward(self, idx, kv_cache=None, pos=None):  # one token of context: nothing to cache
        return self.logp[idx], None


E = math.exp


@pytest.mark.parametrize("choices, table, acc_norm", [
    # " a": log .9 - 2 = -2.105; " bbbb": log .9 - 4 * .6 = -2.505, per character -0.63: the sum picks "a", the
    # per-character score "bbbb"
    (["a", "bbbb"], {" ": {"a": E(-2), "b": E(-.6)}, "b": {"b": E(-.6)}}, 1),
    # " c": -1.605; " ddd": -0.105 - 2.5 - 2 * 0.6975 = -4.0. Per character of the choice (1, 3): -1.605 < -1.333
    # picks "ddd"; per character of the continuation with its space (2, 4): -0.80 > -1.0 would pick "c"
    (["c", "ddd"], {" ": {"c": E(-1.5), "d": E(-2.5)}, "d": {"d": E(-.6975)}}, 1),
])
def test_acc_norm_divides_by_the_choice_length(choices, table, acc_norm):
    model = Bigram(CHARS, {"Q": {" ": .9}, **table})
    res = evaluate_tasks(model, CHARS, {"arc_easy": [{"context": "Q", "choices": choices, "label": 1}]}, "cpu")
    assert (res["arc_easy"]["acc"], res["arc_easy"]["acc_norm"]) == (0.0, acc_norm)
    assert res["core"] == res["arc_easy"]["centered"] == pytest.approx((0 - 1 / 4) / (1 - 1 / 4))


def test_acc_norm_counts_characters_and_acc_bytes_bytes():
    # " \u00e9\u00e9": log .9 - 1.2 - 1.5 = -2.805 over 2 characters (4 UTF-8 bytes); " ff": -1.905 over 2. Per
    # character "ff" wins as by sum (-0.95 > -1.40); per byte "\u00e9\u00e9" does (-0.70 > -0.95)
    model = Bigram(CHARS, {"Q": {" ": .9}, " ": {"\u00e9": E(-1.2), "f": E(-.8)}, "\u00e9": {"\u00e9": E(-1.5)},
                           "f": {"f": E(-1)}})
    res = evaluate_tasks(model, CHARS, {"piqa": [{"context": "Q", "choices": ["\u00e9\u00e9", "ff"], "label": 1}]},
                         "cpu")
    assert (res["piqa"]["acc"], res["piqa"]["acc_norm"], res["piqa"]["acc_bytes"]) == (1.0, 1.0, 0.0)


def test_winogrande_scores_the_suffix_only():
    item = {"context": "The cup fell off the table because the _ was  wobbly. ", "choices": ["cup", "table"],
            "label": 1}
    assert requests("winogrande", item) == [("The cup fell off the table because the cup", " was  wobbly."),
                                            ("The cup fell off the table because the table", " was  wobbly.")]
    model = tiny_gpt(CHARS.vocab_size, block_size=64)
    model64 = tiny_gpt(CHARS.vocab_size, block_size=64).double()
    got = loglikelihoods(model, CHARS, "winogrande", [item], "cpu")[0]
    for (ll, _), option in zip(got, item["choices"]):
        want, _ = reference(model64, CHARS, f"The cup fell off the table because the {option}", " was  wobbly.", 64)
        assert abs(ll - want) < 1e-4
    assert abs(got[0][0] - got[1][0]) > 1e-3  # the options condition the same scored tokens differently


def test_lambada_is_right_only_when_greedy_decoding_gives_the_word():
    # after "x": " " .9, "s" .6, "a" .7, then "t" .5 (the greedy choice) or "p" .4
    model = Bigram(CHARS, {"x": {" ": .9}, " ": {"s": .6}, "s": {"a": .7}, "a": {"t": .5, "p": .4}})
    items = [{"text": "x sat"}, {"text": "x sap"}]
    scores = loglikelihoods(model, CHARS, "lambada", items, "cpu")
    assert [s[0][1] for s in scores] == [True, False]
    assert abs(scores[1][0][0] - math.log(.9 * .6 * .7 * .4)) < 1e-6
    res = evaluate_tasks(model, CHARS, {"lambada": items}, "cpu")["lambada"]
    assert res["acc"] == 0.5 and res["centered"] == 0.5
    assert res["ppl"] == pytest.approx((.9 * .6 * .7) ** -1 * (.5 * .4) ** -.5, rel=1e-6)  # float32 log-softmax


# ----------------------------------------------------------------------------------------------------------
# transformers: tools/eval.py against transformers' own forward

LONG = ("Question: A farmer walks past a red barn, three grey horses, an old oak tree, a muddy pond full of frogs, "
        "a broken fence and a field of yellow wheat on her way to town. Which of these things is blue?\nAnswer:")


def byte_level_bpe(texts):
    """A GPT-2-style byte-level BPE of 400 ids trained on `texts`: merges span word boundaries as GPT-2's do, with a
    vocabulary small enough for fast models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_tool_matches_transformers(family, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    data = tmp_path / "evals"
    shutil.copytree(DATA, data)
    with open(data / "arc_easy.jsonl", "a") as f:  # longer than the 48 positions: left-truncated
        f.write(json.dumps({"context": LONG, "choices": ["the sky", "grass"], "label": 0}) + "\n")
    names = ["arc_easy", "winogrande", "lambada"]
    tasks = {name: load_task(name, data / f"{name}.jsonl") for name in names}
    hf = tmp_path / "hf"
    hf_tok = byte_level_bpe([c + x for name, items in tasks.items() for it in items for c, x in requests(name, it)])
    hf_tok.save_pretrained(hf)
    V, P = len(hf_tok), 48
    assert len(hf_tok(LONG)["input_ids"]) > P
    torch.manual_seed(0)
    if family == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=V, n_positions=P)
    else:
        cfg = transformers.LlamaConfig(hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                                       num_hidden_layers=2, intermediate_size=64, vocab_size=V,
                                       max_position_embeddings=P)
    ref = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():  # no norm at one, no bias at zero
        for p in ref.parameters():
            p.add_(0.3 * torch.randn(p.shape))
    ref.save_pretrained(hf)
    ref = ref.double().eval()

    out = tmp_path / "res.json"
    eval_tool.main([f"--init_from={hf}", f"--data_dir={data}", f"--tasks={','.join(names)}", "--device=cpu",
                    "--dtype=float32", "--batch_size=3", f"--json={out}"])
    assert "| arc_easy | 6 |" in capsys.readouterr().out
    got = json.loads(out.read_text())["results"]

    def encode(text):
        return hf_tok(text, add_special_tokens=False)["input_ids"]

    hf_encoder = SimpleNamespace(encode=encode)
    ours = GPT.from_hf(hf)
    tok = get_tokenizer(f"hf:{hf}")
    for name, items in tasks.items():
        scores = loglikelihoods(ours, tok, name, items, "cpu", batch_size=3)
        acc = acc_norm = 0
        for item, mine in zip(items, scores):
            lls = [reference(lambda x: (ref(x).logits, None), hf_encoder, c, x, P) for c, x in requests(name, item)]
            assert max(abs(a[0] - b[0]) for a, b in zip(lls, mine)) < 1e-4
            if name == "lambada":
                acc += lls[0][1]
                continue
            ll = [a for a, _ in lls]
            acc += ll.index(max(ll)) == item["label"]
            norm = [a / len(c) for a, c in zip(ll, item["choices"])]
            acc_norm += norm.index(max(norm)) == item["label"]
        assert got[name]["acc"] == acc / len(items)
        if TASKS[name].acc_norm:
            assert got[name]["acc_norm"] == acc_norm / len(items)


# ----------------------------------------------------------------------------------------------------------
# two gloo ranks

@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_give_the_single_process_numbers(tmp_path):
    helper = os.path.join(ROOT, "tests", "helpers", "eval_ranks.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    results = {}
    for label, nproc, mode in (("one", 0, "plain"), ("two", 2, "plain"), ("fsdp", 2, "fsdp")):
        cmd = [sys.executable, helper, str(tmp_path / f"{label}.json"), mode]
        if nproc:
            cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        results[label] = json.loads((tmp_path / f"{label}.json").read_text())
    ppl = {label: r["lambada"].pop("ppl") for label, r in results.items()}
    assert results["one"]["arc_easy"]["n"] == 5  # 3 items on rank 0, 2 on rank 1: unequal numbers of forwards
    for label in ("two", "fsdp"):
        assert results[label] == results["one"], label
        assert ppl[label] == pytest.approx(ppl["one"], rel=1e-6)  # a float sum, taken in another order


# ----------------------------------------------------------------------------------------------------------
# the hub's field names, read as the harness reads them

HUB_ROWS = {
    "hellaswag": (
        {"ind": 7, "activity_label": "Home and Garden", "ctx": "unused",
         "ctx_a": "[header] How to water a garden [title] Check the soil first.",
         "ctx_b": "PUSH a finger into the ground", "label": "2",
         "endings": ["[step] If it is dry, water it.", "Eat the soil.", "Plant a [substeps] tree  there.", "Go."]},
        {"context": "Home and Garden: How to water a garden. Check the soil first. Push a finger into the ground",
         "choices": [" If it is dry, water it.", "Eat the soil.", "Plant a tree there.", "Go."], "label": 2}),
    "arc_easy": (
        {"id": "x", "question": "Which is a gas?", "answerKey": "3",
         "choices": {"text": ["ice", "rock", "steam"], "label": ["1", "2", "3"]}},
        {"context": "Question: Which is a gas?\nAnswer:", "choices": ["ice", "rock", "steam"], "label": 2}),
    "arc_challenge": (
        {"question": "Q?", "answerKey": "B", "choices": {"text": ["a", "b", "c", "d", "e"],
                                                         "label": ["A", "B", "C", "D", "E"]}},
        {"context": "Question: Q?\nAnswer:", "choices": ["a", "b", "c", "d", "e"], "label": 1}),
    "piqa": (
        {"goal": "To open a jar,", "sol1": "twist the lid.", "sol2": "eat the lid.", "label": 0},
        {"context": "Question: To open a jar,\nAnswer:", "choices": ["twist the lid.", "eat the lid."], "label": 0}),
    "winogrande": (
        {"qID": "q", "sentence": "Anna lent Bea a pen because _ had two.", "option1": "Anna", "option2": "Bea",
         "answer": "1"},
        {"context": "Anna lent Bea a pen because _ had two.", "choices": ["Anna", "Bea"], "label": 0}),
    "lambada": ({"text": "He opened the door and saw the  dog"}, {"text": "He opened the door and saw the  dog"}),
}
REQUESTS = {
    "hellaswag": [("Home and Garden: How to water a garden. Check the soil first. Push a finger into the ground",
                   "  If it is dry, water it."), (None, " Eat the soil."), (None, " Plant a tree there."),
                  (None, " Go.")],
    "arc_easy": [("Question: Which is a gas?\nAnswer:", " ice"), (None, " rock"), (None, " steam")],
    "piqa": [("Question: To open a jar,\nAnswer:", " twist the lid."), (None, " eat the lid.")],
    "winogrande": [("Anna lent Bea a pen because Anna", " had two."), ("Anna lent Bea a pen because Bea", " had two.")],
    "lambada": [("He opened the door and saw the ", " dog")],
}


@pytest.mark.parametrize("name", TASKS)
def test_hub_rows_are_read_as_the_harness_reads_them(name, tmp_path):
    row, want = HUB_ROWS[name]
    path = tmp_path / f"{name}.jsonl"
    path.write_text(json.dumps(row) + "\n" + json.dumps(want) + "\n")  # a hub row, then the same in our schema
    items = load_task(name, path)
    assert items == [want, want]
    if name in REQUESTS:
        first = REQUESTS[name][0][0]
        assert requests(name, items[0]) == [(c or first, x) for c, x in REQUESTS[name]]


# ----------------------------------------------------------------------------------------------------------
# loading and the tool's errors

def test_subsets_are_seeded_and_keep_file_order():
    full = load_task("hellaswag", os.path.join(DATA, "hellaswag.jsonl"))
    a, b = (load_task("hellaswag", os.path.join(DATA, "hellaswag.jsonl"), max_examples=3, seed=s) for s in (0, 1))
    assert a == load_task("hellaswag", os.path.join(DATA, "hellaswag.jsonl"), max_examples=3, seed=0)
    assert len(a) == 3 and a != b
    assert [full.index(x) for x in a] == sorted(full.index(x) for x in a)


def test_the_hub_splits_are_the_harness_ones(monkeypatch):
    asked = []

    def load_dataset(path, config, split):
        asked.append((path, config, split))
        if path == "baber/piqa":
            raise ConnectionError("no network")
        return [HUB_ROWS["arc_easy"][0]]

    monkeypatch.setitem(sys.modules, "datasets", SimpleNamespace(load_dataset=load_dataset))
    assert load_task("arc_challenge") == [HUB_ROWS["arc_easy"][1]]
    with pytest.raises(DataError, match=r"baber/piqa \(default, split validation\).*ConnectionError: no network.*"
                                        r"to_json\('piqa.jsonl'\)"):
        load_task("piqa")
    assert asked == [("allenai/ai2_arc", "ARC-Challenge", "test"), ("baber/piqa", None, "validation")]
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(DataError, match="baber/piqa.*needs the `datasets` package"):
        load_task("piqa")


@pytest.mark.parametrize("edit, args, message", [
    (None, ["--tasks=hellaswag,arc_esay"], "unknown task 'arc_esay'; did you mean arc_easy?"),
    (None, ["--tasks=piqa", "--data_dir=nowhere"], r"nowhere/piqa.jsonl does not exist"),
    ('{"goal": "g", "sol1": "a", "label": 0}', ["--tasks=piqa"], r"piqa.jsonl:2: piqa rows are"),
    ("{not json", ["--tasks=piqa"], r"piqa.jsonl:2: not valid JSON"),
    ('{"context": "c", "choices": ["a", "b"], "label": 2}', ["--tasks=piqa"], r"piqa.jsonl:2: .*label indexing"),
    ('{"context": "no blank", "choices": ["a", "b"], "label": 0}', ["--tasks=winogrande"],
     r"winogrande.jsonl:2: .*blank"),
    ('{"question": "q", "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "B"}', ["--tasks=arc_easy"],
     r"arc_easy.jsonl:2: cannot read it as a arc_easy row"),
])
def test_tool_errors_name_the_problem(edit, args, message, tmp_path, capsys):
    data = tmp_path / "evals"
    shutil.copytree(DATA, data)
    if edit:
        task = args[0].split("=")[1]
        lines = (data / f"{task}.jsonl").read_text().splitlines()
        (data / f"{task}.jsonl").write_text("\n".join([lines[0], edit, *lines[1:]]) + "\n")
    args = [a if a != "--data_dir=nowhere" else f"--data_dir={tmp_path / 'nowhere'}" for a in args]
    with pytest.raises(SystemExit) as e:
        eval_tool.main([*args, *([] if any(a.startswith("--data_dir") for a in args) else [f"--data_dir={data}"]),
                        f"--out_dir={tmp_path / 'no_run'}"])
    assert e.value.code == 2
    assert re.search(message, capsys.readouterr().err)


# ----------------------------------------------------------------------------------------------------------
# in the training loop

def test_the_loop_scores_tasks_as_the_tool_scores_its_checkpoint(tmp_path, capsys):
    from conftest import run_log, write_dataset

    import train
    from engine.config import parse_args

    data = write_dataset(str(tmp_path / "data"), vocab_size=50257)  # ids of gpt2's vocabulary
    out = tmp_path / "out"
    lines = []
    train.main(parse_args([
        f"--dataset={data}", f"--out_dir={out}", "--tokenizer=gpt2", "--device=cpu", "--dtype=float32",
        "--n_layer=1", "--n_head=2",
        "--n_embd=32", "--block_size=64", "--batch_size=2", "--max_iters=3", "--eval_interval=3", "--eval_iters=1",
        "--log_interval=1", "--eval_tasks=arc_easy, winogrande", f"--eval_tasks_dir={DATA}",
        "--eval_tasks_interval=2", "--eval_tasks_max_examples=3"]), log=lines.append)
    doc = run_log(out)
    rows = doc["task_evals"]
    assert [r["iter"] for r in rows] == [0, 2, 3]
    assert all(r["arc_easy"]["n"] == 3 and r["winogrande"]["n"] == 3 for r in rows)
    assert doc["summary"]["final_task_evals"] == rows[-1]
    assert any(line.startswith("task evals at iter 3: arc_easy ") for line in lines)

    res = tmp_path / "tool.json"  # the same tasks, scored from the final checkpoint by the tool
    eval_tool.main([f"--out_dir={out}", f"--data_dir={DATA}", "--tasks=arc_easy,winogrande", "--max_examples=3",
                    "--seed=1337",  # the subset the run drew with its seed
                    "--device=cpu", "--dtype=float32", f"--json={res}"])
    tool = json.loads(res.read_text())["results"]
    final = {k: v for k, v in rows[-1].items() if k != "iter"}
    assert tool.keys() == final.keys()
    for name in ("arc_easy", "winogrande"):
        assert tool[name] == pytest.approx(final[name], abs=1e-9)
    ckpt, = [p for p in out.iterdir() if p.name.startswith("ckpt_")]  # that checkpoint named on its own
    eval_tool.main([f"--checkpoint={ckpt}", f"--data_dir={DATA}", "--tasks=arc_easy,winogrande", "--max_examples=3",
                    "--seed=1337", "--device=cpu", "--dtype=float32", f"--json={res}"])
    assert json.loads(res.read_text())["results"] == tool


def test_the_loop_refuses_unknown_tasks_before_training(tmp_path):
    from conftest import write_dataset

    import train
    from engine.config import ConfigError, parse_args

    data = write_dataset(str(tmp_path / "data"), vocab_size=50257)
    with pytest.raises(ConfigError, match="unknown task 'hellaswg'; did you mean hellaswag"):
        train.main(parse_args([f"--dataset={data}", f"--out_dir={tmp_path / 'o'}", "--tokenizer=gpt2",
                               "--device=cpu", "--dtype=float32", "--n_layer=1", "--n_head=2", "--n_embd=32",
                               "--block_size=64",
                               "--eval_tasks=hellaswg"]), log=lambda *a: None)
