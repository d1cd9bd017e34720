"""Shakespeare's works, one id per character: the demo `python train.py config/train_shakespeare_char.py`
trains on. 42 works, 4 of them (seeded) held out whole for val; see engine/corpus.py."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))  # the repository root, whatever the working directory

from engine.prepare import cli  # noqa: E402

if __name__ == "__main__":
    cli(source="shakespeare", tokenizer="char", out_dir=HERE, val_fraction=0.1)
