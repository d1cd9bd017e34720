"""
engine/hf.py against transformers itself. Random-initialised GPT-2, Llama, Qwen2 and Qwen3 models, perturbed so
that no norm sits at one and no bias at zero, must give our model their logits; our export must load back
into the matching transformers class with the same logits and the same tensors transformers itself writes.
"""
import json

import pytest
import torch

pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config, Qwen3Config  # noqa: E402

from model import GPT, ModelConfig  # noqa: E402

V = 301
SMALL = dict(hidden_size=96, num_attention_heads=6, num_hidden_layers=3, intermediate_size=200, vocab_size=V,
             max_position_embeddings=64)
# original context 16 with head_dim 16: every RoPE frequency but the fastest is scaled within 17 tokens
LLAMA31 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
               original_max_position_embeddings=16)
CASES = {
    "gpt2": (GPT2Config, dict(n_layer=3, n_embd=96, n_head=6, n_inner=200, vocab_size=V, n_positions=64,
                              bos_token_id=0, eos_token_id=0)),
    "llama2": (LlamaConfig, dict(SMALL, rms_norm_eps=1e-5)),
    "llama3": (LlamaConfig, dict(SMALL, num_key_value_heads=2, rope_theta=500000.0)),
    "llama3.1": (LlamaConfig, dict(SMALL, num_key_value_heads=2, rope_theta=500000.0, rope_scaling=LLAMA31)),
    "llama_biases": (LlamaConfig, dict(SMALL, num_key_value_heads=3, attention_bias=True, mlp_bias=True)),
    "qwen2": (Qwen2Config, dict(SMALL, num_key_value_heads=2, rope_theta=1e6)),
    "qwen3_tied": (Qwen3Config, dict(SMALL, num_key_value_heads=2, head_dim=24, tie_word_embeddings=True)),
    "qwen3_untied": (Qwen3Config, dict(SMALL, num_key_value_heads=2, head_dim=24, tie_word_embeddings=False)),
}
TOKENS = torch.randint(0, V, (2, 17), generator=torch.Generator().manual_seed(1))


def perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def reference(case):
    klass, kw = CASES[case]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(klass(**kw), attn_implementation="eager")
    return perturb(model).eval()


def saved(case, path, **save_kw):
    ref = reference(case)
    ref.save_pretrained(path, **save_kw)
    return ref, path


def logits(model, idx=TOKENS):
    model.eval()
    with torch.no_grad():
        out = model(idx)
    return out.logits if hasattr(out, "logits") else out[0]


def gap(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("backend", ["manual", "sdpa"])
@pytest.mark.parametrize("case", CASES)
def test_load_matches_transformers(case, backend, tmp_path):
    ref, path = saved(case, tmp_path)
    ours = GPT.from_hf(path, attention_backend=backend)
    assert ours.config.tie_embeddings == ref.config.tie_word_embeddings
    assert gap(logits(ours), logits(ref)) < 1e-4


@pytest.mark.parametrize("case", CASES)
def test_export_round_trip(case, tmp_path):
    ref, path = saved(case, tmp_path / "in")
    GPT.from_hf(path).to_hf(tmp_path / "out")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
    assert type(back).__name__ == type(ref).__name__
    assert gap(logits(back), logits(ref)) < 1e-4
    theirs, ours = load_file(path / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


@pytest.mark.parametrize("preset, arch", [("tiny_gpt2", "GPT2LMHeadModel"), ("tiny_llama", "LlamaForCausalLM"),
                                          ("tiny_llama3", "LlamaForCausalLM"), ("tiny_qwen3", "Qwen3ForCausalLM")])
def test_export_of_our_presets(preset, arch, tmp_path):
    ours = perturb(GPT(ModelConfig.from_preset(preset, vocab_size=V)))
    ours.to_hf(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert type(back).__name__ == arch
    assert gap(logits(back), logits(ours)) < 1e-4


def test_export_qwen2_with_rope_scaling(tmp_path):
    cfg = ModelConfig.from_preset("tiny_llama3", vocab_size=V, qkv_bias=True, rope_scaling_factor=8.0,
                                  rope_original_max_position=16)
    ours = perturb(GPT(cfg))
    ours.to_hf(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert type(back).__name__ == "Qwen2ForCausalLM"
    assert gap(logits(back), logits(ours)) < 1e-4
    assert GPT.from_hf(tmp_path).config == cfg


def test_llama31_scaling_is_read_and_matters(tmp_path):
    ref, path = saved("llama3.1", tmp_path)
    scaled, plain = GPT.from_hf(path), GPT.from_hf(path, rope_scaling_factor=None)
    c = scaled.config
    assert (c.rope_scaling_factor, c.rope_low_freq_factor, c.rope_high_freq_factor) == (8.0, 1.0, 4.0)
    assert c.rope_original_max_position == 16 and c.rope_theta == 500000.0
    assert gap(logits(scaled), logits(plain)) > 1e-3


def test_legacy_rope_keys(tmp_path):
    """Configs written before transformers 5: top-level rope_theta, rope_scaling keyed by `type`."""
    ref, path = saved("llama3.1", tmp_path)
    hf = json.loads((path / "config.json").read_text())
    rope = hf.pop("rope_parameters")
    hf["rope_theta"] = rope.pop("rope_theta")
    rope["type"] = rope.pop("rope_type")
    hf["rope_scaling"] = rope
    (path / "config.json").write_text(json.dumps(hf))
    ours = GPT.from_hf(path)
    assert ours.config.rope_theta == 500000.0 and ours.config.rope_scaling_factor == 8.0
    assert gap(logits(ours), logits(ref)) < 1e-4


def test_pytorch_model_bin_with_tied_lm_head(tmp_path):
    ref = reference("qwen3_tied")
    ref.config.save_pretrained(tmp_path)
    state = ref.state_dict()
    assert "lm_head.weight" in state  # a tied checkpoint may still carry the head; it is ignored
    torch.save(state, tmp_path / "pytorch_model.bin")
    assert gap(logits(GPT.from_hf(tmp_path)), logits(ref)) < 1e-4


def test_original_gpt2_layout(tmp_path):
    """OpenAI's GPT-2 files: no `transformer.` prefix, and the causal mask buffers saved as tensors."""
    ref = reference("gpt2")
    ref.config.save_pretrained(tmp_path)
    state = {k.removeprefix("transformer."): v for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    for i in range(3):
        state[f"h.{i}.attn.bias"] = torch.ones(1, 1, 64, 64).tril()
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, tmp_path / "pytorch_model.bin")
    assert gap(logits(GPT.from_hf(tmp_path)), logits(ref)) < 1e-4


def test_sharded_safetensors(tmp_path):
    ref, path = saved("llama3", tmp_path, max_shard_size="200KB")
    assert (path / "model.safetensors.index.json").is_file()
    assert gap(logits(GPT.from_hf(path)), logits(ref)) < 1e-4


def test_overrides_and_dtype(tmp_path):
    ref, path = saved("gpt2", tmp_path)
    ours = GPT.from_hf(path, block_size=32, dropout=0.1, attention_backend="manual")
    c = ours.config
    assert (c.block_size, c.dropout, c.attention_backend) == (32, 0.1, "manual")
    assert ours.pos_emb.weight.shape == (32, 96)
    assert gap(logits(ours), logits(ref)) < 1e-4
    with pytest.raises(ValueError, match="wpe"):
        GPT.from_hf(path, block_size=128)
    with pytest.raises(ValueError, match="unknown model settings"):
        GPT.from_hf(path, n_lyer=2)

    _, path = saved("llama3", tmp_path / "llama3")
    half = GPT.from_hf(path, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert half.rope_cos.dtype == torch.float32


@pytest.mark.parametrize("case, edit, match", [
    ("llama3", {"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "mistral"),
    ("llama3", {"auto_map": {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}}, "auto_map"),
    ("llama3", {"architectures": ["LlamaForSequenceClassification"]}, "LlamaForSequenceClassification"),
    ("llama3", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "yarn"),
    ("llama3", {"hidden_act": "gelu"}, "hidden_act"),
    ("llama3", {"attention_bias": True}, "attention_bias"),
    ("llama3", {"mlp_bias": True}, "mlp_bias"),
    ("qwen2", {"use_sliding_window": True}, "use_sliding_window"),
    ("qwen3_tied", {"attention_bias": True}, "attention_bias"),
    ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ("gpt2", {"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn"),
    ("gpt2", {"activation_function": "relu"}, "relu"),
])
def test_refuses_unsupported_configs(case, edit, match, tmp_path):
    klass, kw = CASES[case]
    klass(**kw).save_pretrained(tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**hf, **edit}))
    with pytest.raises(ValueError, match=match):
        GPT.from_hf(tmp_path)


def test_refuses_hand_written_gpt_neox(tmp_path):
    hf = {"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"], "hidden_size": 64,
          "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": V}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match="gpt_neox"):
        GPT.from_hf(tmp_path)


def test_missing_directory_and_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        GPT.from_hf(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json"):
        GPT.from_hf(tmp_path)
    LlamaConfig(**CASES["llama3"][1]).save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        GPT.from_hf(tmp_path)


@pytest.mark.parametrize("change, match", [
    (lambda s: s.pop("model.layers.1.mlp.up_proj.weight"), "model.layers.1.mlp.up_proj.weight"),
    (lambda s: s.update({"model.layers.0.self_attn.extra.weight": torch.zeros(3)}),
     "model.layers.0.self_attn.extra.weight"),
    (lambda s: s.update({"model.layers.2.self_attn.k_proj.weight": torch.zeros(48, 96)}),
     r"model.layers.2.self_attn.k_proj.weight has shape \(48, 96\)"),
])
def test_refuses_checkpoint_that_does_not_fit(change, match, tmp_path):
    _, path = saved("llama3", tmp_path)
    state = load_file(path / "model.safetensors")
    change(state)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=match):
        GPT.from_hf(path)


def test_export_refuses_model_without_transformers_class(tmp_path):
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=V, block_size=16, pos_encoding="rope")
    with pytest.raises(ValueError, match="no transformers class"):
        GPT(cfg).to_hf(tmp_path)
