"""Training configuration: one typed schema, Python config files of plain assignments, --key=value overrides.

Config files run in a namespace of their own (never the trainer's globals); every public name they leave behind
must be a known key of the right type. Command-line values are converted to the declared type. A typo gets a
did-you-mean, a wrong type names the key, the value and the type wanted.
"""
import difflib
import math
import os
import re
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, replace

from engine.data.chat import FORMATS as CHAT_FORMATS


class ConfigError(ValueError):
    """A configuration problem the user can fix; the message says how."""


def key(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # I/O and run control
    out_dir: str = key("out", "where checkpoints, the resolved config and JSON run logs go")
    dataset: str = key("shakespeare_char", "data/<dataset>/ folder (or a path) with train.bin, val.bin, meta.json")
    init_from: str = key("scratch", "scratch | resume (newest checkpoint in out_dir) | a local transformers dir")
    eval_only: bool = key(False, "evaluate train and val loss once, then exit")
    objective: str = key("pretrain", "pretrain | sft | dpo")
    max_iters: int = key(5000, "optimizer steps in the whole run")
    eval_interval: int = key(250, "evaluate (and checkpoint) every this many steps")
    eval_iters: int = key(200, "batches per split in each evaluation")
    eval_tasks: str | None = key(None, "downstream tasks scored in the loop, comma-separated: hellaswag, arc_easy, "
                                       "arc_challenge, piqa, winogrande, lambada (docs/evals.md)")
    eval_tasks_interval: int | None = key(None, "steps between downstream evaluations; None: eval_interval")
    eval_tasks_max_examples: int | None = key(None, "a fixed seeded subset of each task's items; None: all")
    eval_tasks_dir: str | None = key(None, "folder of <task>.jsonl files; None: the Hugging Face hub (needs datasets)")
    log_interval: int = key(10, "console line and run-log record every this many steps")
    gradient_log_interval: int = key(100, "per-layer gradient norms into the run log every this many steps; 0: off")
    always_save_checkpoint: bool = key(True, "checkpoint at every evaluation, not only when val loss improves")
    keep_last_n_checkpoints: int = key(3, "delete older checkpoints beyond this many (the one with the best val "
                                            "loss is always kept); 0 keeps all")
    # post-training (objective sft or dpo): `dataset` is then chat data (local .jsonl/.json/.parquet, or hub:NAME)
    tokenizer: str | None = key(None, "gpt2 | llama2 | llama3 | qwen3 | hf:<dir>; None: init_from's (hf dir) or the "
                                      "checkpoint's")
    tokenizer_path: str | None = key(None, "your own tokenizer file for the tokenizer named")
    chat_format: str | None = key(None, "SFT/DPO: llama3 | llama2 | chatml | qwen2.5 | qwen3 | tulu | template (the "
                                        "table in docs/post_training.md); None: the tokenizer's own")
    enable_thinking: bool = key(True, "chat_format=qwen3: the reply opens with its think block, learned (Qwen3's "
                                      "thinking mode); False: an empty think block ends the prompt (no-think mode)")
    chat_learn_newline: bool = key(False, "SFT/DPO: also learn the newline after each reply's end token (chatml, "
                                          "qwen2.5, qwen3, tulu), as TRL's training templates do")
    max_seq_length: int | None = key(None, "SFT/DPO: tokens per example after truncation; None: block_size")
    packing: bool = key(False, "SFT: pack several examples per row, each attending only to itself")
    num_train_epochs: float | None = key(None, "SFT/DPO: run length in epochs; sets max_iters")
    val_fraction: float = key(0.02, "SFT/DPO: fraction of examples held out for val (seeded)")
    max_examples: int | None = key(None, "SFT/DPO: read at most this many records")
    dpo_beta: float = key(0.1, "DPO: beta")
    dpo_loss_type: str = key("sigmoid", "DPO: sigmoid (summed log-probs) | dpo_norm (per-token averages)")
    dpo_label_smoothing: float = key(0.0, "DPO: label smoothing (conservative DPO)")
    reference_cache_dir: str | None = key(None, "DPO: where reference log-probs are cached; None: out_dir/"
                                                "reference_cache")
    # batch
    batch_size: int = key(12, "sequences per micro-batch (per device)")
    gradient_accumulation_steps: int = key(1, "micro-batches per optimizer step")
    block_size: int | None = key(None, "sequence length; None: the model's block_size")
    # numerics and speed
    device: str = key("auto", "auto | cpu | cuda | cuda:N | mps")
    dtype: str = key("auto", "auto | float32 | bfloat16 | float16 (auto: bfloat16 autocast on CUDA and on CPUs with "
                                 "AMX or AVX512-BF16, float32 elsewhere)")
    compile: bool = key(False, "torch.compile the model")
    attention_backend: str = key("auto", "auto | manual | sdpa | flash_attn_2")
    flash_attn: bool | None = key(None, "the older spelling: True means attention_backend=flash_attn_2, False sdpa")
    loss_chunk_size: int | None = key(None, "rows per chunk of a cross-entropy that never forms the full logits; "
                                            "0: plain loss on the logits; None: chunked for vocabularies of "
                                            "100,000 or more, plain below")
    use_zero1: bool = key(False, "shard AdamW state across ranks (ZeRO-1: ZeroRedundancyOptimizer over DDP)")
    use_fsdp: bool = key(False, "FSDP2 fully_shard on each block and the root (bf16 params, fp32 reduce on CUDA)")
    fsdp_reshard_after_forward: bool = key(True, "FSDP: free gathered parameters after forward (less memory)")
    dist_timeout_minutes: float = key(10.0, "torchrun: a collective that waits longer than this for a rank ends the "
                                            "job, naming the ranks that stopped answering (from the second step on)")
    dist_init_timeout_minutes: float = key(30.0, "torchrun: the same limit until the first step is done (start-up, "
                                                 "loading, reference log-probs, compilation)")
    use_cuda_graphs: bool = key(False, "CUDA only: capture forward and backward as CUDA graphs and replay them "
                                       "(torch.compile's reduce-overhead mode; implies compile; needs one "
                                       "micro-step per rank)")
    activation_checkpointing: bool = key(False, "recompute each block's activations in backward")
    defer_step_stats: bool = key(True, "read each step's loss, gradient norm and stop flags once the next step is "
                                       "launched, so the host does not wait for the GPU every step (the numbers "
                                       "logged and checked are the same); False: read them at once")
    allow_tf32: bool = key(True, "CUDA, float32 matmuls and convolutions: TF32 tensor cores (10-bit mantissa inputs, "
                                 "float32 accumulation); False: full float32. No effect in bfloat16/float16")
    ddp_bucket_cap_mb: float = key(0.0, "DDP gradient bucket size in MB; 0: torch's 25 eagerly, 100 under "
                                        "torch.compile, whose DDP optimizer makes each bucket a graph of its own")
    skip_memory_check: bool = key(False, "start even when engine/plan.py's memory estimate of a step exceeds what "
                                         "the device has free (the estimate is still logged)")
    use_dataloader: bool = key(False, "feed batches through a torch DataLoader with workers and pinned memory")
    dataloader_num_workers: int = key(2, "DataLoader worker processes when use_dataloader=True")
    peak_flops: float | None = key(None, "peak FLOP/s per device for MFU; None: look the device up (none on CPU)")
    # optimizer and schedule
    learning_rate: float = key(6e-4, "peak learning rate")
    min_lr: float = key(6e-5, "learning rate at the end of decay")
    warmup_iters: int = key(100, "linear warm-up steps")
    warmup_ratio: float | None = key(None, "warm-up as a fraction of max_iters; overrides warmup_iters when set")
    lr_decay_iters: int | None = key(None, "step at which decay reaches min_lr; None: max_iters")
    lr_schedule: str = key("cosine", "cosine | linear | constant | wsd (warmup-stable-decay)")
    wsd_decay_ratio: float = key(0.2, "wsd: fraction of lr_decay_iters spent in the final linear decay")
    optimizer: str = key("adamw", "adamw | muon (torch.optim.Muon on the blocks' 2-D weights, AdamW on the rest)")
    muon_lr: float = key(0.02, "optimizer=muon: Muon's peak learning rate (the schedule scales it as learning_rate)")
    muon_momentum: float = key(0.95, "optimizer=muon: Muon's momentum (Nesterov)")
    muon_weight_decay: float = key(0.0, "optimizer=muon: Muon's decoupled weight decay on the block matrices")
    weight_decay: float = key(0.1, "AdamW decay on matrices and embeddings (never on norms and biases)")
    beta1: float = key(0.9, "AdamW beta1")
    beta2: float = key(0.95, "AdamW beta2")
    grad_clip: float = key(1.0, "clip the global gradient norm to this; 0: off")
    seed: int = key(1337, "seed of initialisation, data order and dropout")
    # model: a preset, then any of its settings overridden
    preset: str | None = key(None, "named model preset from model.py (e.g. gpt2, full_llama3_1.5b_optimal)")
    n_layer: int | None = key(None, "transformer blocks")
    n_head: int | None = key(None, "query heads")
    n_kv_head: int | None = key(None, "key/value heads (GQA); None: the preset's, or n_head")
    n_embd: int | None = key(None, "model width")
    head_dim: int | None = key(None, "width of one head; None: n_embd // n_head")
    intermediate_size: int | None = key(None, "MLP hidden width")
    vocab_size: int | None = key(None, "vocabulary rows; None: the preset's, or the dataset's rounded up to 64")
    dropout: float | None = key(None, "dropout on attention and residual paths")
    bias: bool | None = key(None, "biases in linear layers and LayerNorm")
    qkv_bias: bool | None = key(None, "biases on q, k, v only (Qwen2)")
    norm: str | None = key(None, "layernorm | rmsnorm")
    norm_eps: float | None = key(None, "norm epsilon")
    mlp: str | None = key(None, "gelu | swiglu")
    pos_encoding: str | None = key(None, "learned | rope")
    rope_theta: float | None = key(None, "RoPE base")
    rope_scaling_factor: float | None = key(None, "Llama-3.1 RoPE scaling factor")
    qk_norm: bool | None = key(None, "RMSNorm on query and key heads (Qwen3)")
    tie_embeddings: bool | None = key(None, "share the token table with the output projection")


MODEL_KEYS = ("n_layer", "n_head", "n_kv_head", "n_embd", "head_dim", "intermediate_size", "vocab_size",
              "dropout", "bias", "qkv_bias", "norm", "norm_eps", "mlp", "pos_encoding", "rope_theta",
              "rope_scaling_factor", "qk_norm", "tie_embeddings")
CHOICES = {"init_from": None, "objective": ("pretrain", "sft", "dpo"), "device": None,
           "dpo_loss_type": ("sigmoid", "dpo_norm"),
           "dtype": ("auto", "float32", "bfloat16", "float16"),
           "attention_backend": ("auto", "manual", "sdpa", "flash_attn_2"),
           "lr_schedule": ("cosine", "linear", "constant", "wsd"),
           "optimizer": ("adamw", "muon")}
FIELDS = {f.name: f for f in fields(TrainConfig)}
DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
AT_LEAST_1 = ("at least 1", lambda v: v >= 1)
POSITIVE = ("positive", lambda v: v > 0)
FRACTION = ("in [0, 1)", lambda v: 0 <= v < 1)
# Every numeric key must be finite and not negative (a key added later included); these are narrower. NaN fails
# every comparison, so each test refuses it too.
RANGES = {
    **dict.fromkeys(("max_iters", "eval_interval", "eval_iters", "eval_tasks_interval", "eval_tasks_max_examples",
                     "log_interval", "batch_size",
                     "gradient_accumulation_steps", "block_size", "max_seq_length", "max_examples", "n_layer", "n_head",
                     "n_kv_head", "n_embd", "head_dim", "intermediate_size", "vocab_size"), AT_LEAST_1),
    **dict.fromkeys(("learning_rate", "muon_lr", "num_train_epochs", "dpo_beta", "peak_flops", "norm_eps", "rope_theta",
                     "rope_scaling_factor"), POSITIVE),
    **dict.fromkeys(("val_fraction", "warmup_ratio", "beta1", "beta2", "dropout", "muon_momentum"), FRACTION),
    "wsd_decay_ratio": ("in (0, 1]", lambda v: 0 < v <= 1),
    "dpo_label_smoothing": ("in [0, 0.5)", lambda v: 0 <= v < 0.5),
    "seed": ("in [0, 2**63)", lambda v: 0 <= v < 2 ** 63),  # numpy seeds only non-negative integers
    # 0 would fail every collective at once; beyond a year (in minutes) timedelta overflows
    **dict.fromkeys(("dist_timeout_minutes", "dist_init_timeout_minutes"),
                    ("in (0, 525600], a year at most", lambda v: 0 < v <= 525600)),
}
NOT_NEGATIVE = ("0 or more", lambda v: v >= 0)


def type_name(tp):
    args = typing.get_args(tp)
    if args:
        return " or ".join("None" if a is type(None) else a.__name__ for a in args)
    return tp.__name__


def coerce(name, value, tp, from_text=True):
    """Convert `value` to type `tp`: a string from the command line is parsed (from_text), a Python value from a
    config file must already be of the type (an int is accepted for a float)."""
    args = typing.get_args(tp) if isinstance(tp, types.UnionType) else (tp,)
    if not from_text and isinstance(value, str) and str not in args:
        raise ConfigError(f"{name}={value!r} is not a valid {type_name(tp)}")
    if value is None or (from_text and value == "None"):
        if type(None) in args:
            return None
        raise ConfigError(f"{name}=None is not allowed: expected {type_name(tp)}")
    base = next(a for a in args if a is not type(None))
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            raise ValueError
        if base is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, int):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, str):
                v = float(value) if any(c in value for c in ".eE") else int(value, 10)
                if isinstance(v, float) and not v.is_integer():
                    raise ValueError
                return int(v)
            raise ValueError
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, (int, float)):
                return float(value)
            if isinstance(value, str):
                return float(value)
            raise ValueError
        if base is str:
            if isinstance(value, str):
                return value
            raise ValueError
    except (ValueError, OverflowError):  # OverflowError: an int beyond any float, e.g. 10**400 in a config file
        pass
    raise ConfigError(f"{name}={value!r} is not a valid {type_name(tp)}")


def unknown_key(name):
    close = difflib.get_close_matches(name, FIELDS, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else "; `python train.py --help` lists every key"
    return ConfigError(f"unknown config key {name!r}{hint}")


def load_config_file(path):
    """Run a config file in its own namespace and return its public assignments. The file is Python and runs with
    the trainer's rights, as nanoGPT's do: only trusted config files may be run."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    with open(path) as f:
        source = f.read()
    namespace = {"__file__": os.path.abspath(path)}
    try:
        exec(compile(source, path, "exec"), namespace)
    except SystemExit as e:  # would otherwise end the run with status 0, having trained nothing
        raise ConfigError(f"config file {path} called exit ({e.code!r}) instead of only assigning settings; remove "
                          "the exit call") from None
    except Exception as e:
        raise ConfigError(f"config file {path} failed to run: {type(e).__name__}: {e}") from e
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and not isinstance(v, (types.ModuleType, types.FunctionType, type))}


def parse_args(argv):
    """Config files and --key=value overrides, applied left to right over the defaults."""
    values = {}
    sources = []
    for arg in argv:
        if arg.startswith("--"):
            name, eq, raw = arg[2:].partition("=")
            if not eq:
                raise ConfigError(f"override {arg!r} has no value; write --{name}=VALUE")
            name = name.replace("-", "_")
            if name not in FIELDS:
                raise unknown_key(name)
            values[name] = coerce(name, raw, FIELDS[name].type)
        else:
            sources.append(arg)
            for name, v in load_config_file(arg).items():
                if name not in FIELDS:
                    raise ConfigError(f"in {arg}: {unknown_key(name)}")
                try:
                    values[name] = coerce(name, v, FIELDS[name].type, from_text=False)
                except ConfigError as e:
                    raise ConfigError(f"in {arg}: {e}") from None
    cfg = TrainConfig(**values)
    validate(cfg)
    return spell_out(cfg)


def validate(cfg):
    for name, allowed in CHOICES.items():
        if allowed and getattr(cfg, name) not in allowed:
            raise ConfigError(f"{name}={getattr(cfg, name)!r} is not one of {', '.join(allowed)}")
    if not DEVICE.fullmatch(cfg.device):
        raise ConfigError(f"device={cfg.device!r} is not a device this engine runs on: use auto, cpu, cuda, cuda:N "
                          "(N a GPU's index) or mps")
    check_numbers(cfg)
    if cfg.use_zero1 and cfg.use_fsdp:
        raise ConfigError("use_zero1 and use_fsdp are exclusive: FSDP already shards optimizer state")
    if cfg.optimizer == "muon" and cfg.use_fsdp:
        raise ConfigError("optimizer=muon needs each block matrix whole to orthogonalise its update, and FSDP shards "
                          "them across ranks; use DDP (the default under torchrun) or use_zero1=True, which shards "
                          "Muon's state by whole matrices")
    if cfg.use_cuda_graphs and cfg.use_fsdp:
        raise ConfigError("use_cuda_graphs cannot capture FSDP's collectives; use it with DDP, ZeRO-1 or one GPU")
    if cfg.use_cuda_graphs and cfg.objective != "pretrain":
        raise ConfigError(f"use_cuda_graphs needs static shapes, but objective={cfg.objective} pads each batch to "
                          "its longest row; use compile=True without graphs")
    if cfg.min_lr > cfg.learning_rate:
        raise ConfigError(f"min_lr={cfg.min_lr} exceeds learning_rate={cfg.learning_rate}: the schedule decays from "
                          "learning_rate down to min_lr, so lower min_lr")
    if cfg.num_train_epochs is not None and cfg.objective == "pretrain":
        raise ConfigError("num_train_epochs is for objective=sft or dpo; pretraining runs max_iters steps")
    if cfg.packing and cfg.objective != "sft":
        raise ConfigError("packing=True is for objective=sft")
    if cfg.chat_format is not None and cfg.chat_format not in CHAT_FORMATS:
        raise ConfigError(f"chat_format={cfg.chat_format!r} is not one of {', '.join(CHAT_FORMATS)} (or None: the "
                          f"tokenizer's own)")


def spell_out(cfg):
    """Older spellings as the keys that now say the same (the run log records both)."""
    if cfg.flash_attn is None:
        return cfg
    backend = "flash_attn_2" if cfg.flash_attn else "sdpa"
    if cfg.attention_backend not in ("auto", backend):
        raise ConfigError(f"flash_attn={cfg.flash_attn} means attention_backend={backend}, but attention_backend="
                          f"{cfg.attention_backend} is set too; keep one of the two")
    return replace(cfg, attention_backend=backend)


def check_numbers(cfg):
    """Every int and float key against its range; None stands for "not set" where a key allows it."""
    for name, f in FIELDS.items():
        v = getattr(cfg, name)
        if v is None or not {int, float} & set(typing.get_args(f.type) or (f.type,)):
            continue
        text, ok = RANGES.get(name, NOT_NEGATIVE)
        if isinstance(v, float) and not math.isfinite(v):
            text = "a finite number"  # inf passes every lower bound
        elif ok(v):
            continue
        raise ConfigError(f"{name} must be {text}, got {v!r} ({f.metadata['help']}; default {f.default!r})")


def config_dict(cfg):
    return asdict(cfg)


def help_text():
    lines = ["usage: python train.py [config.py ...] [--key=value ...]",
             "Config files and overrides apply left to right over these defaults:", ""]
    width = max(len(n) for n in FIELDS)
    for f in fields(TrainConfig):
        default = f.default if f.default is not MISSING else None
        lines.append(f"  --{f.name:<{width}} {default!r:<18} {f.metadata['help']}")
    return "\n".join(lines)
