"""Shakespeare's works with a Llama-2-format sentencepiece tokenizer (32,000 ids, uint16; see
engine/data/tokenizers.py for which file). 4 of the 42 works held out for val."""
import os

from engine.data.prepare import cli

HERE = os.path.dirname(os.path.abspath(__file__))


if __name__ == "__main__":
    cli(source="shakespeare", tokenizer="llama2", out_dir=HERE, val_fraction=0.1)
