"""evaluate_tasks on a small seeded model and tests/data/evals, in one plain process or under torchrun; rank 0 writes
the results as JSON to argv[1]. With argv[2] == "fsdp" the model is sharded with FSDP2 first (per block and root, as
engine/distributed.py does), so that a rank with fewer forward batches than another would hang without the extra
forwards evaluate_tasks makes."""
import json
import os
import string
import sys

import torch
from torch.distributed.fsdp import fully_shard

from engine.data.tokenizers import CharTokenizer
from engine.distributed import cleanup, init_distributed
from engine.evals import TASKS, evaluate_tasks, load_task
from model import GPT, ModelConfig

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "evals")


def main(out, mode="plain"):
    d = init_distributed("cpu")
    tok = CharTokenizer("\n" + string.printable[:95])
    torch.manual_seed(0)  # the same weights on every rank
    # block_size 64: the longer items are left-truncated
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=tok.vocab_size, block_size=64))
    if mode == "fsdp":
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    tasks = {name: load_task(name, os.path.join(DATA, f"{name}.jsonl")) for name in TASKS}
    results = evaluate_tasks(model, tok, tasks, "cpu", batch_size=4)
    if d.master:
        with open(out, "w") as f:
            json.dump(results, f)
    cleanup(d)


if __name__ == "__main__":
    main(*sys.argv[1:])
