"""
Generate text from one of our checkpoints or a local transformers model, with a key-value cache.

    python tools/sample.py --out_dir=out-shakespeare-char --prompt="ROMEO:" --num_samples=3 --max_new_tokens=300
    python tools/sample.py --init_from=path/to/hf_model --prompt_file=prompt.txt --temperature=0.7 --top_p=0.9
    python tools/sample.py --out_dir=out-sft-qwen --chat --prompt="Name three rivers."

The tokenizer is the one the run trained with: the tokenizer (and tokenizer_path) its checkpoint's config records,
else the one its dataset was made with (data/<dataset>/meta.json); for a transformers directory, its own tokenizer
files. --tokenizer overrides it with a name (gpt2, llama2, llama3, qwen3; --tokenizer_path for your own file),
hf:<dir>, or a dataset folder. Generation stops at the tokenizer's end-of-text token (in --chat mode, also at the
tokens that end the assistant's turn: <|eot_id|> and <|eom_id|> for Llama 3, <|im_end|> for Qwen).

--chat renders the prompt as a user turn in the chat format the run trained with (its config's chat_format and
enable_thinking), else the tokenizer's own; --chat_format and --enable_thinking override them (for qwen3,
--enable_thinking=false ends the prompt with an empty think block, Qwen3's no-think mode).
"""
import argparse
import os
import sys
import time
from contextlib import nullcontext

import torch

from engine.checkpoint import CheckpointError, find_latest, load_checkpoint
from engine.data.bins import DataError
from engine.data.chat import FORMATS, chat_prompt, chat_spec
from engine.data.tokenizers import resolve_tokenizer
from engine.generate import generate
from model import GPT, ModelConfig
from train import auto_dtype


def load_model(args):
    """(model, the config its run recorded or None, description) from --init_from or the newest checkpoint in
    --out_dir."""
    if args.init_from:
        return GPT.from_hf(args.init_from, attention_backend="sdpa"), None, args.init_from
    path, _ = find_latest(args.out_dir, warn=lambda m: print(m, file=sys.stderr))
    return checkpoint_model(path)


def checkpoint_model(path):
    """(model, the config its run recorded, description) of one of our checkpoints."""
    state = load_checkpoint(path)
    # sdpa runs everywhere; dropout is off for sampling whatever the run trained with
    model = GPT(ModelConfig.from_dict({**state["model_config"], "attention_backend": "sdpa", "dropout": 0.0}))
    model.load_state_dict(state["model"])
    return model, state.get("config") or {}, f"{path} (iteration {state['iter_num']})"


def chat_format_of(tok, args, saved):
    """The chat format --chat renders: --chat_format / --enable_thinking, else what the run recorded."""
    saved = saved or {}
    thinking = saved.get("enable_thinking", True) if args.enable_thinking is None else args.enable_thinking == "true"
    return chat_spec(tok, args.chat_format or saved.get("chat_format"), thinking)


def prompt_ids(tok, args, text, fmt=None):
    """The prompt's ids and the ids that end a sample."""
    if args.chat:
        return chat_prompt(tok, [{"role": "user", "content": text}], fmt)
    ids = tok.encode(text)
    if not ids:  # nothing to condition on: start as a document starts
        start = tok.bos_id if tok.bos_id is not None else tok.eot_id
        ids = [start] if start is not None else tok.encode("\n")
    return ids, {tok.eot_id} - {None}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--out_dir", default="out", help="our run's folder: its newest checkpoint is used")
    src.add_argument("--init_from", help="a local transformers checkpoint directory instead")
    p.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    p.add_argument("--prompt_file", help="read the prompt from this file")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn in the chat template")
    p.add_argument("--chat_format", choices=FORMATS, help="--chat: this format instead of the run's")
    p.add_argument("--enable_thinking", choices=("true", "false"), help="--chat with qwen3: false ends the prompt "
                                                                         "with an empty think block (no-think mode)")
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top_k", type=int, default=200, help="keep the k likeliest tokens; 0: off")
    p.add_argument("--top_p", type=float, default=1.0, help="keep the smallest set of mass p; 1: off")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="autocast dtype (auto: as train.py's, bfloat16 where the device computes it natively)")
    p.add_argument("--tokenizer", help="gpt2 | llama2 | llama3 | qwen3 | hf:<dir> | a dataset name or folder")
    p.add_argument("--tokenizer_path", help="your own tokenizer file, or a folder holding it, for --tokenizer")
    p.add_argument("--no_kv_cache", action="store_true", help="recompute the whole context every step")
    args = p.parse_args(argv)
    if args.num_samples < 1 or args.max_new_tokens < 1:
        p.error("--num_samples and --max_new_tokens must be at least 1")
    if args.temperature < 0 or args.top_k < 0 or not 0 < args.top_p <= 1:
        p.error("need --temperature >= 0, --top_k >= 0 and 0 < --top_p <= 1")
    if args.prompt_file and not os.path.isfile(args.prompt_file):
        p.error(f"prompt file {args.prompt_file} does not exist")
    if args.tokenizer_path and not args.tokenizer:
        p.error("--tokenizer_path goes with --tokenizer, the name of the tokenizer it is a file of")
    if args.init_from and not os.path.isdir(args.init_from):
        p.error(f"--init_from={args.init_from} is not a directory")
    text = open(args.prompt_file, encoding="utf-8").read() if args.prompt_file else args.prompt

    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    dev_type = torch.device(device).type
    dtype = args.dtype if args.dtype != "auto" else auto_dtype(dev_type)[0]
    ctx = nullcontext() if dtype == "float32" else torch.autocast(dev_type, dtype=getattr(torch, dtype))
    try:
        model, saved, where = load_model(args)
        r = resolve_tokenizer(args.tokenizer, args.tokenizer_path, hf_dir=args.init_from, saved=saved)
        tok = r.tok
        fmt = chat_format_of(tok, args, saved) if args.chat else None
        ids, stop = prompt_ids(tok, args, text, fmt)
    except (CheckpointError, DataError, ValueError, OSError, KeyError) as e:
        p.error(str(e))
    model.to(device).eval()
    block = model.config.block_size
    if len(ids) >= block:
        print(f"warning: the prompt has {len(ids)} tokens; the model sees the last {block}", file=sys.stderr)
    print(f"{where}: {model.num_params() / 1e6:.2f}M parameters, tokenizer {tok.name} (from {r.source}), "
          + (f"chat format {fmt}, " if fmt else "") + f"{len(ids)} prompt tokens", file=sys.stderr)

    gen = torch.Generator(device=device).manual_seed(args.seed)
    x = torch.tensor([ids], dtype=torch.long, device=device)
    for k in range(args.num_samples):
        t0 = time.time()
        with ctx:
            y = generate(model, x, args.max_new_tokens, args.temperature, args.top_k or None, args.top_p, stop,
                         use_cache=not args.no_kv_cache, generator=gen, vocab_size=tok.vocab_size)
        new = y[0, len(ids):].tolist()
        end = next((i for i, t in enumerate(new) if t in stop), len(new))
        dt = time.time() - t0
        print(f"[sample {k + 1}: {len(new)} tokens in {dt:.2f} s, {len(new) / dt:.1f} tokens/s]", file=sys.stderr)
        print(("" if args.chat else text) + tok.decode(new[:end]))
        print("-" * 40)


if __name__ == "__main__":
    main()
