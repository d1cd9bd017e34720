"""
Export one of our checkpoints as a transformers model directory (config.json + model.safetensors).

    python tools/export_hf.py out-sft-toy hf-sft-toy             # the newest checkpoint of a run
    python tools/export_hf.py out-sft-toy/ckpt_0000168 hf-sft-toy

The result loads with transformers.AutoModelForCausalLM.from_pretrained(out) as GPT2LMHeadModel,
LlamaForCausalLM, Qwen2ForCausalLM or Qwen3ForCausalLM, whichever the model's switches match. When the run used a
transformers tokenizer (hf:<dir>), its files are copied beside the weights, so the folder is complete.
"""
import argparse
import os
import shutil
import sys

from engine.checkpoint import CheckpointError, find_latest, load_checkpoint
from engine.data.tokenizers import HF_FILES
from model import GPT, ModelConfig


def export(src, out):
    path = src if os.path.isfile(os.path.join(src, "meta.pt")) else find_latest(src)[0]
    state = load_checkpoint(path)
    model = GPT(ModelConfig.from_dict({**state["model_config"], "loss_chunk_size": 0}))
    model.load_state_dict(state["model"])
    model.to_hf(out)
    tok = (state.get("config") or {}).get("tokenizer") or ""
    copied = []
    if tok.startswith("hf:"):
        for name in HF_FILES:
            if os.path.isfile(os.path.join(tok[3:], name)):
                shutil.copy(os.path.join(tok[3:], name), os.path.join(out, name))
                copied.append(name)
    return path, copied


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("src", help="a run's out_dir (its newest checkpoint) or one checkpoint folder")
    p.add_argument("out", help="the transformers directory to write")
    a = p.parse_args(argv)
    try:
        path, copied = export(a.src, a.out)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {path} to {a.out}" + (f" with tokenizer files {', '.join(copied)}" if copied else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
