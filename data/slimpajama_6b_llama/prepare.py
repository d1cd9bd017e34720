"""SlimPajama-6B from the Hugging Face hub with the Llama 2 sentencepiece tokenizer (uint16). Needs network and
`datasets`; --source=<local files> reads a downloaded copy, --tokenizer_path=<Meta's tokenizer.model> gives
Llama 2's own ids."""
import os

from engine.data.prepare import cli

HERE = os.path.dirname(os.path.abspath(__file__))


if __name__ == "__main__":
    cli(source="hub:DKYoon/SlimPajama-6B", tokenizer="llama2", out_dir=HERE)
