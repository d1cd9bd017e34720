"""SlimPajama-6B from the Hugging Face hub with the GPT-2 tokenizer (uint16). Needs network and `datasets`;
--source=<local jsonl/parquet files> reads a downloaded copy instead."""
import os

from engine.data.prepare import cli

HERE = os.path.dirname(os.path.abspath(__file__))


if __name__ == "__main__":
    cli(source="hub:DKYoon/SlimPajama-6B", tokenizer="gpt2", out_dir=HERE)
