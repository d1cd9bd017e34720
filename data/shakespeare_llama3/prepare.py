"""Shakespeare's works with the Llama 3 tokenizer (128,256 ids, uint32). 4 of the 42 works held out for val."""
import os

from engine.data.prepare import cli

HERE = os.path.dirname(os.path.abspath(__file__))


if __name__ == "__main__":
    cli(source="shakespeare", tokenizer="llama3", out_dir=HERE, val_fraction=0.1)
