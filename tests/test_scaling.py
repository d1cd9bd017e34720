import pytest
import torch

from engine.config import parse_args
from model import GPT, ModelConfig
from tools.scaling_law import candidates, chinchilla_loss, chinchilla_optimum, main, plan
from train import model_config

SEEDS = [  # preset, tokens, the published predicted loss
    ("full_llama3_1.5b_optimal", 101.9e9, 2.335),
    ("full_llama3_2.2b_chinchilla", 61.5e9, 2.351),
    ("full_qwen3_1.8b_optimal", 81.7e9, 2.340),
]


def meta_model(cfg):
    with torch.device("meta"):
        return GPT(cfg)


def test_published_figures_from_rounded_counts():
    assert round(chinchilla_loss(1.545e9, 101.9e9), 3) == 2.335
    assert round(chinchilla_loss(2.224e9, 61.5e9), 3) == 2.351
    assert round(chinchilla_loss(1.830e9, 81.7e9), 3) == 2.340


@pytest.mark.parametrize("preset,tokens,loss", SEEDS)
def test_published_figures_from_the_seed_models(preset, tokens, loss):
    n = meta_model(ModelConfig.from_preset(preset)).num_params()  # total parameters, embeddings included
    assert round(chinchilla_loss(n, tokens), 3) == loss


def test_fit_by_hand():
    assert chinchilla_loss(1e9, 1e10) == pytest.approx(1.69 + 406.4 / 1e9**0.34 + 410.7 / 1e10**0.28)


def test_closed_form_optimum_is_the_minimum_along_the_budget():
    C = 1e21
    N, D = chinchilla_optimum(C)
    assert 6 * N * D == pytest.approx(C)
    best = chinchilla_loss(N, D)
    for f in (0.8, 0.95, 1.05, 1.25):
        assert chinchilla_loss(N * f, C / (6 * N * f)) > best


def test_candidates_are_counted_by_model_py():
    cands = list(candidates("qwen3", seq_len=2048, widths=[2048], aspect=(64, 128)))
    assert [c["n_layer"] for c in cands] == list(range(16, 33))
    seed = next(c for c in cands if c["n_layer"] == 24)  # the full_qwen3_1.8b_optimal shape
    model = meta_model(ModelConfig.from_preset("full_qwen3_1.8b_optimal"))
    assert seed["params"] == model.num_params()
    assert seed["flops_per_token"] == model.flops_per_token(2048)
    gpt = next(iter(candidates("gpt2", seq_len=1024, widths=[768], head_dims=[64], aspect=(64, 64))))
    assert gpt["n_layer"] == 12 and gpt["params"] == meta_model(ModelConfig.from_preset("gpt2")).num_params()


def test_plan_spends_the_budget_and_ranks_by_loss():
    C = 1e21
    cands = list(candidates("llama3", widths=[1024, 2048, 3072]))
    rows = plan(C, cands)
    assert [r["loss"] for r in rows] == sorted(r["loss"] for r in rows)
    assert all(6 * r["params"] * r["tokens"] == pytest.approx(C) for r in rows)
    N_opt, _ = chinchilla_optimum(C)
    assert abs(rows[0]["params"] / N_opt - 1) < 0.1
    detailed = plan(C, cands, flop_count="detailed")
    assert all(r["flops_per_token"] * r["tokens"] == pytest.approx(C) for r in detailed)
    rule = plan(C, cands, chinchilla=True)
    assert all(r["tokens"] == 20 * r["params"] and r["flops"] <= C for r in rule)


def test_written_config_parses_and_builds_the_planned_model(tmp_path, capsys):
    out = tmp_path / "planned.py"
    main(["--flops=1e20", "--family=qwen3", "--chinchilla", f"--write_config={out}", "--top=3"])
    printed = capsys.readouterr().out
    assert "6 N D" in printed and f"wrote candidate 1 to {out}" in printed
    cfg = parse_args([str(out)])
    model = meta_model(model_config(cfg, data_vocab=cfg.vocab_size, backend="sdpa"))
    text = out.read_text()
    best = plan(1e20, candidates("qwen3"), chinchilla=True)[0]
    assert model.num_params() == best["params"] and model.config.n_layer == best["n_layer"]
    assert f"predicts loss {best['loss']:.4f}" in text
    assert cfg.max_iters * cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps >= best["tokens"]
