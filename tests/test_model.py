import math

import pytest
import torch
import torch.nn.functional as F

from engine.attention import resolve_backend
from model import GPT, PRESETS, ModelConfig, rope_frequencies

TINY = ["tiny_gpt2", "tiny_llama", "tiny_llama3", "tiny_qwen3"]


def meta_model(name, **kw):
    with torch.device("meta"):
        return GPT(ModelConfig.from_preset(name, **kw))


def hand_count(L, d, V, ffn, kv_dim, gpt2=False, tied=False, qk_norm_dim=0, block=1024):
    """Parameters of a pre-norm decoder written out by hand."""
    if gpt2:  # qkv, proj, fc, proj with biases; two LayerNorms with bias
        layer = d * 3 * d + 3 * d + d * d + d + d * ffn + ffn + ffn * d + d + 4 * d
        return L * layer + V * d + block * d + 2 * d
    layer = d * (d + 2 * kv_dim) + d * d + 3 * d * ffn + 2 * d + 2 * qk_norm_dim
    return L * layer + V * d * (1 if tied else 2) + d


@pytest.mark.parametrize("name,expected", [
    ("full_llama3_1.5b_optimal", 1.545e9),
    ("full_llama3_2.2b_chinchilla", 2.224e9),
    ("full_qwen3_1.8b_optimal", 1.830e9),
    ("gpt2", 124.44e6),
    ("gpt2-medium", 354.82e6),
    ("gpt2-large", 774.03e6),
    ("gpt2-xl", 1557.6e6),
])
def test_preset_parameter_counts(name, expected):
    n = meta_model(name).num_params()
    assert abs(n - expected) / expected < 0.01, (name, n)


def test_seed_presets_match_hand_counts():
    assert meta_model("full_llama_1.36b").num_params() == hand_count(18, 2304, 32000, 6144, 2304)
    assert meta_model("full_gpt2_1.36b").num_params() == hand_count(18, 2304, 50304, 4 * 2304, 2304, gpt2=True)
    assert meta_model("full_llama3_1.5b_optimal").num_params() == hand_count(18, 2048, 128256, 7168, 1024)
    assert meta_model("full_qwen3_1.8b_optimal").num_params() == hand_count(24, 2048, 151936, 6144, 1024,
                                                                            qk_norm_dim=128)


def test_flops_per_token_gpt2_by_hand():
    # GPT-2 124M at T=1024: per layer qkv 768x2304, proj 768x768, fc 768x3072, proj 3072x768; head 768x50304
    N = 12 * (768 * 2304 + 768 * 768 + 768 * 3072 * 2) + 768 * 50304
    assert N == 123_568_128
    expected = 6 * N + 12 * 12 * 12 * 64 * 1024
    assert meta_model("gpt2").flops_per_token(1024) == expected
    # untied LLaMA-3 1.5B: the output projection counts once, the embedding lookup not at all
    m = meta_model("full_llama3_1.5b_optimal")
    N = 18 * (2048 * 4096 + 2048 * 2048 + 3 * 2048 * 7168) + 2048 * 128256
    assert m.flops_per_token(2048) == 6 * N + 12 * 18 * 16 * 128 * 2048


@pytest.mark.parametrize("name", TINY)
def test_logits_shape_and_loss_matches_float64(name):
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset(name, vocab_size=97)).eval()
    idx = torch.randint(0, 97, (3, 19))
    targets = torch.randint(0, 97, (3, 19))
    targets[0, :5] = -100
    targets[2, -1] = -100
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 19, 97)
    lp = torch.log_softmax(logits.double(), dim=-1)
    keep = targets != -100
    ref = -lp[keep].gather(1, targets[keep][:, None]).mean()
    assert abs(loss.item() - ref.item()) < 1e-6
    logits2, loss2 = model(idx)
    assert loss2 is None and torch.equal(logits, logits2)


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_manual_and_sdpa_agree(n_kv_head):
    torch.manual_seed(0)
    kw = dict(vocab_size=101, n_kv_head=n_kv_head)
    ref = GPT(ModelConfig.from_preset("tiny_llama3", attention_backend="manual", **kw))
    fast = GPT(ModelConfig.from_preset("tiny_llama3", attention_backend="sdpa", **kw))
    fast.load_state_dict(ref.state_dict())
    idx = torch.randint(0, 101, (2, 33))
    (a, la), (b, lb) = ref(idx, idx), fast(idx, idx)
    assert (a - b).abs().max() < 1e-5
    la.backward()
    lb.backward()
    for (n, p), q in zip(ref.named_parameters(), fast.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5), n


@pytest.mark.parametrize("preset", ["tiny_qwen3", "tiny_llama3"])
def test_attention_gets_the_autocast_dtype(preset):
    """Under bf16 autocast q, k and v reach the attention kernel in bf16, q/k norms (float32 weights) included:
    flash-attn refuses anything else."""
    model = GPT(ModelConfig.from_preset(preset, vocab_size=64))
    seen = []

    def spy(attend):
        def recorded(q, k, v, **kw):
            seen.append((q.dtype, k.dtype, v.dtype))
            return attend(q, k, v, **kw)
        return recorded

    for block in model.blocks:
        block.attn.attend = spy(block.attn.attend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randint(0, 64, (2, 8)))
    assert seen == [(torch.bfloat16,) * 3] * 2


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("backend", ["manual", "sdpa"])
def test_causality(name, backend):
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset(name, vocab_size=50, attention_backend=backend)).eval()
    idx = torch.randint(0, 50, (1, 24))
    changed = idx.clone()
    changed[0, 15:] = (changed[0, 15:] + 7) % 50
    a, _ = model(idx)
    b, _ = model(changed)
    assert torch.equal(a[:, :15], b[:, :15])
    assert not torch.allclose(a[:, 15:], b[:, 15:])


def test_llama31_rope_scaling_piecewise():
    cfg = ModelConfig.from_preset("tiny_llama3", head_dim=None, rope_scaling_factor=8.0, rope_low_freq_factor=1.0,
                                  rope_high_freq_factor=4.0, rope_original_max_position=64)
    got = rope_frequencies(cfg)
    d = cfg.head_dim
    for i, f in enumerate(got.tolist()):  # the piecewise rule as Meta's paper code states it, element by element
        base = 1.0 / cfg.rope_theta ** (2 * i / d)
        wavelen = 2 * math.pi / base
        if wavelen < 64 / 4.0:
            want = base
        elif wavelen > 64 / 1.0:
            want = base / 8.0
        else:
            s = (64 / wavelen - 1.0) / (4.0 - 1.0)
            want = (1 - s) * base / 8.0 + s * base
        assert math.isclose(f, want, rel_tol=1e-5), (i, f, want)
    plain = rope_frequencies(ModelConfig.from_preset("tiny_llama3"))
    assert not torch.allclose(got, plain)  # the test's sizes put components in every band


def test_tied_and_untied():
    tied = GPT(ModelConfig.from_preset("tiny_gpt2", vocab_size=64))
    assert tied.lm_head.weight is tied.tok_emb.weight
    untied = GPT(ModelConfig.from_preset("tiny_llama", vocab_size=64))
    assert untied.lm_head.weight is not untied.tok_emb.weight


def test_residual_projection_init_scaled_by_depth():
    torch.manual_seed(0)
    m = GPT(ModelConfig.from_preset("tiny_gpt2", n_layer=8, n_embd=256, vocab_size=64))
    std = m.blocks[0].attn.proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(16)) < 0.001
    assert abs(m.blocks[0].attn.qkv.weight.std().item() - 0.02) < 0.001


@pytest.mark.parametrize("kw,msg", [
    (dict(n_embd=100, n_head=3), "divisible by n_head"),
    (dict(n_head=4, n_kv_head=3), "divisible by n_kv_head"),
    (dict(head_dim=15, pos_encoding="rope"), "head_dim must be even"),
    (dict(norm="batchnorm"), "norm="),
    (dict(attention_backend="flash3"), "attention_backend="),
    (dict(n_layer=0), "n_layer"),
    (dict(dropout=1.5), "dropout"),
])
def test_config_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        ModelConfig(**kw)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match="full_llama3_1.5b_optimal"):
        ModelConfig.from_preset("llama9")


def test_sequence_longer_than_block_size():
    m = GPT(ModelConfig.from_preset("tiny_gpt2", block_size=8, vocab_size=32))
    with pytest.raises(ValueError, match="block_size"):
        m(torch.zeros(1, 9, dtype=torch.long))


def test_flash_backend_refused_on_cpu_with_reason():
    with pytest.raises(RuntimeError, match="sdpa"):
        resolve_backend("flash_attn_2", "cpu", "float32")
    backend, why = resolve_backend("auto", "cpu", "float32")
    assert backend == "sdpa" and "auto" in why
    with pytest.raises(ValueError, match="unknown attention_backend"):
        resolve_backend("xformers", "cpu", "float32")


def test_every_preset_is_valid():
    for name in PRESETS:
        ModelConfig.from_preset(name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["sdpa", "flash_attn_2"])
@pytest.mark.parametrize("preset", ["tiny_llama3", "tiny_qwen3"])  # GQA; and q/k norms
def test_cuda_bf16_backends_match_manual(backend, preset):
    if backend == "flash_attn_2":
        pytest.importorskip("flash_attn")
    torch.manual_seed(0)
    ref = GPT(ModelConfig.from_preset(preset, vocab_size=256, attention_backend="manual")).cuda()
    fast = GPT(ModelConfig.from_preset(preset, vocab_size=256, attention_backend=backend)).cuda()
    fast.load_state_dict(ref.state_dict())
    idx = torch.randint(0, 256, (2, 128), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a, _ = ref(idx)
        b, _ = fast(idx)
    assert (a.float() - b.float()).abs().max() < 5e-2
    assert F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0) > 0.999


@pytest.mark.parametrize("preset", ["tiny_gpt2", "tiny_llama", "tiny_llama3", "tiny_qwen3"])
def test_buffers_are_constants_that_training_leaves_alone(preset):
    """What lets DDP skip broadcasting buffers before every forward (broadcast_buffers=False): a model's buffers
    are the same on a freshly built copy and after a training step."""
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset(preset, vocab_size=64))
    before = {n: b.clone() for n, b in model.named_buffers()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 64, (2, 16))
    model(x, x)[1].backward()
    opt.step()
    torch.manual_seed(1)
    fresh = dict(GPT(ModelConfig.from_preset(preset, vocab_size=64)).named_buffers())
    for n, b in model.named_buffers():
        assert torch.equal(b, before[n]) and torch.equal(b, fresh[n]), n


def test_cumulative_seqlens_are_the_runs_of_each_row():
    """flash_attn_2's cu_seqlens, as the data pipeline computes them: a sequence per run of equal segment ids (the
    padding's -1 too), never continuing into the next row, even where the next row starts with the same id."""
    from engine.attention import cumulative_seqlens

    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        B, T = torch.randint(1, 5, (2,), generator=g).tolist()
        T += 3
        seg = torch.randint(-1, 3, (B, T), generator=g).sort(dim=1).values  # runs, as packed rows have them
        seg[1:, 0] = seg[:-1, -1]  # each row starts with the id the row before ends with
        want, pos = [0], 0
        for row in seg.tolist():
            for t in range(1, T + 1):
                if t == T or row[t] != row[t - 1]:
                    want.append(pos + t)
            pos += T
        got = cumulative_seqlens(seg)
        assert got.dtype == torch.int32 and got.tolist() == want, (seg, got, want)
