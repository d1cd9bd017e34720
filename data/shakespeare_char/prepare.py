"""Shakespeare's works, one id per character: the demo `python train.py config/train_shakespeare_char.py`
trains on. 42 works, 4 of them (seeded) held out whole for val; see engine/data/corpus.py."""
import os

from engine.data.prepare import cli

HERE = os.path.dirname(os.path.abspath(__file__))


if __name__ == "__main__":
    cli(source="shakespeare", tokenizer="char", out_dir=HERE, val_fraction=0.1)
