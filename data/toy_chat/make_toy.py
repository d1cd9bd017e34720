"""Write the toy chat data: sft.jsonl (arithmetic, reversing and uppercasing words, some with a system prompt, some
with two turns; half ShareGPT, half OpenAI-style messages) and dpo.jsonl (prompt, chosen = the right answer,
rejected = a near miss). Deterministic: the same --seed writes the same bytes.

    python data/toy_chat/make_toy.py [--sft=2000] [--dpo=1000] [--seed=0]
"""
import argparse
import os

from engine.data.chat_data import make_toy_dpo, make_toy_sft, write_jsonl

HERE = os.path.dirname(os.path.abspath(__file__))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sft", type=int, default=2000, help="SFT conversations")
    p.add_argument("--dpo", type=int, default=1000, help="preference pairs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out_dir", default=HERE)
    a = p.parse_args()
    # a seed apart, so the preference prompts are not the SFT questions over again in the same order
    write_jsonl(make_toy_sft(a.sft, a.seed), os.path.join(a.out_dir, "sft.jsonl"))
    write_jsonl(make_toy_dpo(a.dpo, a.seed + 1), os.path.join(a.out_dir, "dpo.jsonl"))
    print(f"wrote {a.sft} SFT conversations and {a.dpo} preference pairs to {a.out_dir}")
