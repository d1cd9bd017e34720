"""
Import and export of transformers checkpoints: GPT-2, Llama (2, 3, 3.1), Qwen2 and Qwen3.

Loading reads config.json as data and the weights with safetensors or torch.load(weights_only=True): nothing
stored in a checkpoint is ever executed. A family is two things: how its config.json maps onto ModelConfig,
and `layout`, the table that says which checkpoint tensors make up each of our parameters. Export walks the
same table backwards, so the two directions cannot drift apart.
"""
import inspect
import json
import re
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

ARCHS = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
         "qwen3": "Qwen3ForCausalLM"}
CONFIGS = {"gpt2": "GPT2Config", "llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# tensors of the body carry this prefix in a *ForCausalLM checkpoint; the original GPT-2 files lack it
PREFIX = {"gpt2": "transformer.", "llama": "model.", "qwen2": "model.", "qwen3": "model."}
# buffers, not weights, that older transformers releases saved: GPT-2's causal masks, Llama's RoPE frequencies
BUFFERS = {"gpt2": re.compile(r"transformer\.h\.\d+\.attn\.(masked_)?bias"),
           "llama": re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")}
BUFFERS["qwen2"] = BUFFERS["qwen3"] = BUFFERS["llama"]


# ----------------------------------------------------------------------------------------------------------
# config.json -> ModelConfig settings

def read_config(path):
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint directory at {path}: expected a folder with config.json and "
                                f"one of {', '.join(WEIGHT_FILES)}")
    file = path / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{path} has no config.json, so it is not a transformers checkpoint directory")
    try:
        hf = json.loads(file.read_bytes())
    except ValueError as e:  # not JSON, or not UTF-8
        raise ValueError(f"{file} is not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{file} holds a JSON {type(hf).__name__}, not a transformers config object")
    if "auto_map" in hf:
        raise ValueError(f"{file} has auto_map: the model needs its own remote code, which we never run")
    kind = hf.get("model_type")
    if kind not in ARCHS:
        raise ValueError(f"unsupported model_type {kind!r} in {file}; supported: {', '.join(ARCHS)}")
    archs = hf.get("architectures") or [ARCHS[kind]]
    if archs != [ARCHS[kind]]:
        raise ValueError(f"unsupported architectures {archs} in {file}; for model_type {kind} we load "
                         f"{ARCHS[kind]} only")
    return hf


def need(hf, key):
    if hf.get(key) is None:
        raise ValueError(f"config.json has no {key}")
    return hf[key]


def gpt2_settings(hf):
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"GPT-2 activation_function {act!r} is not supported: our gelu is the tanh "
                         "approximation (gelu_new, gelu_pytorch_tanh)")
    for key, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                      ("reorder_and_upcast_attn", False), ("add_cross_attention", False)):
        if hf.get(key, want) != want:
            raise ValueError(f"GPT-2 with {key}={hf[key]} is not supported")
    C = need(hf, "n_embd")
    return dict(norm="layernorm", mlp="gelu", pos_encoding="learned", bias=True,
                n_layer=need(hf, "n_layer"), n_head=need(hf, "n_head"), n_embd=C,
                intermediate_size=hf.get("n_inner") or 4 * C, vocab_size=need(hf, "vocab_size"),
                block_size=need(hf, "n_positions"), norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                tie_embeddings=hf.get("tie_word_embeddings", True))


def rope_settings(hf):
    # transformers 5 keeps everything in rope_parameters; older releases had a top-level rope_theta and a
    # rope_scaling dict whose kind was under "type" before it was "rope_type"
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if any(isinstance(v, dict) for v in rope.values()):
        raise ValueError("RoPE parameters that differ per layer type are not supported")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("partial_rotary_factor is not supported: we rotate the whole head")
    out = dict(rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))))
    if kind == "llama3":
        lacking = [k for k in ("factor", "low_freq_factor", "high_freq_factor") if k not in rope]
        if lacking:
            raise ValueError(f"llama3 RoPE scaling without {', '.join(lacking)}")
        out.update(rope_scaling_factor=float(rope["factor"]), rope_low_freq_factor=float(rope["low_freq_factor"]),
                   rope_high_freq_factor=float(rope["high_freq_factor"]),
                   rope_original_max_position=rope.get("original_max_position_embeddings",
                                                       need(hf, "max_position_embeddings")))
    elif kind != "default":
        raise ValueError(f"unsupported rope type {kind!r}; supported: default, llama3")
    return out


def llama_settings(hf):
    """Llama, Qwen2 and Qwen3 share one layout and differ in biases and the q/k norm."""
    kind = hf["model_type"]
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{kind} hidden_act {hf['hidden_act']!r} is not supported: our SwiGLU uses silu")
    if hf.get("use_sliding_window"):
        raise ValueError(f"{kind} with use_sliding_window=True is not supported: our attention sees the whole "
                         "causal context")
    layer_types = set(hf.get("layer_types") or ["full_attention"])
    if layer_types != {"full_attention"}:
        raise ValueError(f"layer_types {sorted(layer_types)} are not supported: every layer must be full_attention")
    attn_bias, mlp_bias = hf.get("attention_bias", False), hf.get("mlp_bias", False)
    if kind == "llama" and attn_bias != mlp_bias:
        raise ValueError(f"Llama with attention_bias={attn_bias} and mlp_bias={mlp_bias} is not supported: our "
                         "bias switch puts biases on q, k, v, o and the MLP together")
    if kind == "qwen3" and attn_bias:
        raise ValueError("Qwen3 with attention_bias=True is not supported: it biases q, k, v and o, but not the "
                         "MLP, which no switch of ours reproduces")
    C, H = need(hf, "hidden_size"), need(hf, "num_attention_heads")
    return dict(norm="rmsnorm", mlp="swiglu", pos_encoding="rope", bias=kind == "llama" and attn_bias,
                qkv_bias=kind == "qwen2", qk_norm=kind == "qwen3",
                n_layer=need(hf, "num_hidden_layers"), n_head=H, n_kv_head=hf.get("num_key_value_heads") or H,
                n_embd=C, head_dim=hf.get("head_dim") or C // H, intermediate_size=need(hf, "intermediate_size"),
                vocab_size=need(hf, "vocab_size"), block_size=need(hf, "max_position_embeddings"),
                norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=hf.get("tie_word_embeddings", False),
                **rope_settings(hf))


# ----------------------------------------------------------------------------------------------------------
# The name table

def layout(cfg, kind):
    """Rows (our name, checkpoint names, rows of each piece or None, transposed) covering every parameter.

    Several checkpoint names mean our tensor is their concatenation along dim 0 (fused q|k|v, gate|up);
    `transposed` marks GPT-2's Conv1D weights, stored (in, out) where nn.Linear keeps (out, in).
    """
    rows = []
    add = lambda ours, theirs, sizes=None, transposed=False: rows.append((ours, theirs, sizes, transposed))
    if kind == "gpt2":
        add("tok_emb.weight", ["transformer.wte.weight"])
        add("pos_emb.weight", ["transformer.wpe.weight"])
        for i in range(cfg.n_layer):
            o, h = f"blocks.{i}.", f"transformer.h.{i}."
            for ours, theirs, conv in (("norm1", "ln_1", False), ("attn.qkv", "attn.c_attn", True),
                                       ("attn.proj", "attn.c_proj", True), ("norm2", "ln_2", False),
                                       ("mlp.fc", "mlp.c_fc", True), ("mlp.proj", "mlp.c_proj", True)):
                add(f"{o}{ours}.weight", [f"{h}{theirs}.weight"], transposed=conv)
                add(f"{o}{ours}.bias", [f"{h}{theirs}.bias"])
        add("norm_f.weight", ["transformer.ln_f.weight"])
        add("norm_f.bias", ["transformer.ln_f.bias"])
    else:
        add("tok_emb.weight", ["model.embed_tokens.weight"])
        qkv = [cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim]
        for i in range(cfg.n_layer):
            o, h = f"blocks.{i}.", f"model.layers.{i}."
            add(f"{o}norm1.weight", [f"{h}input_layernorm.weight"])
            for w in ["weight"] + ["bias"] * (cfg.bias or cfg.qkv_bias):
                add(f"{o}attn.qkv.{w}", [f"{h}self_attn.{p}_proj.{w}" for p in "qkv"], qkv)
            if cfg.qk_norm:
                add(f"{o}attn.q_norm.weight", [f"{h}self_attn.q_norm.weight"])
                add(f"{o}attn.k_norm.weight", [f"{h}self_attn.k_norm.weight"])
            add(f"{o}norm2.weight", [f"{h}post_attention_layernorm.weight"])
            for w in ["weight"] + ["bias"] * cfg.bias:
                add(f"{o}attn.proj.{w}", [f"{h}self_attn.o_proj.{w}"])
                add(f"{o}mlp.fc.{w}", [f"{h}mlp.gate_proj.{w}", f"{h}mlp.up_proj.{w}"], [cfg.intermediate_size] * 2)
                add(f"{o}mlp.proj.{w}", [f"{h}mlp.down_proj.{w}"])
        add("norm_f.weight", ["model.norm.weight"])
    if not cfg.tie_embeddings:
        add("lm_head.weight", ["lm_head.weight"])
    return rows


def listing(names, most=10):
    names = sorted(names)
    more = f" ... and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(names[:most]) + more


# ----------------------------------------------------------------------------------------------------------
# Loading

def load_bin(file):
    """A pytorch_model.bin through torch's weights-only unpickler, which builds tensors and plain containers and
    refuses anything else: a pickle asking for more may run code, so it is never loaded another way."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's note on the pickle protocol; the refusal below says what matters
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError, EOFError, UnicodeDecodeError...: torch raises many kinds
        code = re.search(r"GLOBAL ([\w.]+)", str(e))  # what the refused pickle asked for, e.g. posix.system
        why = f"it asks for {code[1]}" if code else type(e).__name__
        raise ValueError(f"{file} is refused as unsafe or damaged ({why}): it is not a plain pickle of tensors; use "
                         "safetensors weights (model.safetensors, which save_pretrained writes by default) from a "
                         "source you trust") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{file} does not hold a dict of named tensors; use safetensors weights (model.safetensors)")
    return state


def read_weights(path):
    file = next((path / name for name in WEIGHT_FILES if (path / name).is_file()), None)
    if file is None:
        raise FileNotFoundError(f"{path} holds no weights: expected one of {', '.join(WEIGHT_FILES)}")
    files = [file]
    if file.name.endswith(".index.json"):
        try:
            shards = sorted(set(json.loads(file.read_bytes())["weight_map"].values()))
            outside = any(Path(s).name != s for s in shards)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{file} is damaged: it holds no weight_map of tensor names to shard files ({e!r}); "
                             "download or save it again") from None
        if outside:
            raise ValueError(f"{file} names shards outside its directory")
        files = [path / s for s in shards]
    tensors = {}
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f} is missing (listed in {file.name})")
        if f.name.endswith(".safetensors"):
            try:
                tensors.update(load_file(f))
            except SafetensorError as e:
                raise ValueError(f"{f} is damaged ({e}); download or save it again") from None
        else:
            tensors.update(load_bin(f))
    return tensors


def load_hf(cls, config_cls, path, dtype=torch.float32, **overrides):
    """Build `cls` (GPT) from a local transformers checkpoint directory; overrides go to its `config_cls`
    (ModelConfig). Both come from the caller, model.py, which imports this module.

    Parameters come out in `dtype` whatever the checkpoint stores; the RoPE tables stay float32.
    """
    path = Path(path)
    hf = read_config(path)
    kind = hf["model_type"]
    settings = gpt2_settings(hf) if kind == "gpt2" else llama_settings(hf)
    cfg = config_cls.from_dict({**settings, **overrides})
    prefix = PREFIX[kind]
    tensors = {k if k.startswith(prefix) or k == "lm_head.weight" else prefix + k: v
               for k, v in read_weights(path).items()}

    rows = layout(cfg, kind)
    missing = [n for _, theirs, _, _ in rows for n in theirs if n not in tensors]
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} tensor(s) that {ARCHS[kind]} needs: {listing(missing)}")
    model = cls(cfg)
    params = dict(model.named_parameters())  # a tied lm_head.weight is listed once, as tok_emb.weight
    with torch.no_grad():
        for ours, theirs, sizes, transposed in rows:
            p = params.pop(ours)
            pieces = []
            for name, n in zip(theirs, sizes or [p.shape[0]]):
                t = tensors.pop(name)
                shape = tuple(t.shape)
                t = t.t() if transposed else t
                if ours == "pos_emb.weight":
                    t = t[:n]  # a block_size below the checkpoint's keeps the first positions
                if tuple(t.shape) != (n, *p.shape[1:]):
                    raise ValueError(f"{path}: {name} has shape {shape}, but our {ours} needs "
                                     f"{(n, *p.shape[1:])}{' transposed (Conv1D)' if transposed else ''}")
                pieces.append(t)
            p.copy_(torch.cat(pieces))
    if params:
        raise ValueError(f"no checkpoint tensor fills our {listing(params)}")
    ignored = BUFFERS[kind].fullmatch
    unused = [k for k in tensors if not ignored(k) and not (k == "lm_head.weight" and cfg.tie_embeddings)]
    if unused:
        raise ValueError(f"{path} has {len(unused)} tensor(s) our model does not use: {listing(unused)}")
    if dtype != torch.float32:
        model.to(dtype)
        model.init_rope()
    return model


# ----------------------------------------------------------------------------------------------------------
# Export

def family(cfg):
    """The transformers family that computes exactly what `cfg` does."""
    arch = (cfg.pos_encoding, cfg.norm, cfg.mlp)
    if arch == ("learned", "layernorm", "gelu"):
        if cfg.bias and not cfg.qk_norm and cfg.n_kv_head == cfg.n_head and cfg.n_head * cfg.head_dim == cfg.n_embd:
            return "gpt2"
    elif arch == ("rope", "rmsnorm", "swiglu"):
        if cfg.qk_norm:
            if not (cfg.bias or cfg.qkv_bias):
                return "qwen3"
        elif cfg.qkv_bias and not cfg.bias:
            return "qwen2"
        else:
            return "llama"
    raise ValueError(
        f"no transformers class computes this model (pos_encoding={cfg.pos_encoding}, norm={cfg.norm}, "
        f"mlp={cfg.mlp}, bias={cfg.bias}, qkv_bias={cfg.qkv_bias}, qk_norm={cfg.qk_norm}, n_head={cfg.n_head}, "
        f"n_kv_head={cfg.n_kv_head}, head_dim={cfg.head_dim}): GPT-2 is learned + layernorm + gelu with biases "
        "and plain multi-head attention of head_dim n_embd/n_head; Llama, Qwen2 and Qwen3 are rope + rmsnorm + "
        "swiglu, with qkv_bias for Qwen2 and qk_norm without biases for Qwen3")


def hf_config(cfg, kind, dtype):
    import transformers

    klass = getattr(transformers, CONFIGS[kind])  # by name: Qwen3 needs transformers 4.51, the others do not
    accepts = inspect.signature(klass.__init__).parameters
    # our config knows no tokenizer, so no bos/eos ids rather than the class defaults' guesses
    kw = dict(vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings, bos_token_id=None,
              eos_token_id=None)
    if kind == "gpt2":
        kw.update(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, n_inner=cfg.intermediate_size,
                  n_positions=cfg.block_size, layer_norm_epsilon=cfg.norm_eps, activation_function="gelu_new",
                  resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout)
    else:
        kw.update(num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
                  hidden_size=cfg.n_embd, head_dim=cfg.head_dim, intermediate_size=cfg.intermediate_size,
                  max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps, hidden_act="silu",
                  attention_dropout=cfg.dropout)
        if kind == "llama":
            kw.update(attention_bias=cfg.bias, mlp_bias=cfg.bias)
        scaling = None
        if cfg.rope_scaling_factor is not None:
            scaling = dict(rope_type="llama3", factor=cfg.rope_scaling_factor,
                           low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                           original_max_position_embeddings=cfg.rope_original_max_position)
        if "rope_parameters" in accepts:  # transformers 5
            kw["rope_parameters"] = dict(scaling or {"rope_type": "default"}, rope_theta=cfg.rope_theta)
        else:
            kw.update(rope_theta=cfg.rope_theta, rope_scaling=scaling)
    # transformers 5 renamed torch_dtype to dtype
    kw["dtype" if "dtype" in accepts else "torch_dtype"] = dtype
    hf = klass(**kw)
    hf.architectures = [ARCHS[kind]]
    return hf


def save_hf(model, out_dir):
    """Write config.json and model.safetensors that transformers loads as the matching *ForCausalLM."""
    cfg = model.config
    kind = family(cfg)
    params = dict(model.named_parameters())
    state = {}
    for ours, theirs, sizes, transposed in layout(cfg, kind):
        p = params[ours].detach().cpu()
        for name, t in zip(theirs, p.split(sizes) if sizes else [p]):
            # a copy of its own for each tensor: safetensors refuses views that share storage
            state[name] = (t.t() if transposed else t).clone(memory_format=torch.contiguous_format)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = str(params["tok_emb.weight"].dtype).removeprefix("torch.")
    hf_config(cfg, kind, dtype).save_pretrained(out)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
