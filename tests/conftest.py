import json
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_dataset(folder, vocab_size=61, n_train=40_000, n_val=8_000, dtype="uint16", seed=0):
    """A learnable token stream (a noisy repeating ramp) as train.bin / val.bin / meta.json."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    ramp = np.arange(n_train + n_val) % min(vocab_size, 50)
    noise = rng.random(ramp.size) < 0.1
    ramp[noise] = rng.integers(0, vocab_size, noise.sum())
    tokens = ramp.astype(dtype)
    tokens[:n_train].tofile(os.path.join(folder, "train.bin"))
    tokens[n_train:].tofile(os.path.join(folder, "val.bin"))
    meta = {"format": 1, "tokenizer": "synthetic", "vocab_size": vocab_size, "dtype": dtype, "eot_id": 0,
            "bos_id": None, "splits": {"train": {"files": ["train.bin"], "tokens": n_train, "documents": 1},
                                       "val": {"files": ["val.bin"], "tokens": n_val, "documents": 1}}}
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(meta, f)
    return folder


def run_log(out_dir):
    """The one JSON run log a run wrote in out_dir."""
    [name] = [p for p in os.listdir(out_dir) if p.startswith("run_") and p.endswith(".json")]
    with open(os.path.join(out_dir, name)) as f:
        return json.load(f)


def logged_losses(out_dir):
    """{iteration: loss} of the run log in out_dir."""
    return {r["iter"]: r["loss"] for r in run_log(out_dir)["training_iterations"]}


@pytest.fixture
def dataset(tmp_path):
    return write_dataset(str(tmp_path / "data"))


def skip_outside_ci(reason):
    """Skip a test whose data could not be fetched, except in CI (CI=true, as .ci/run sets), where the install
    path must have fetched it: there the missing data is a failure, not a quiet skip."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI: {reason}")
    pytest.skip(reason)
