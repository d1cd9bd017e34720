"""train.py with rank 1 raising at its third step: how a broken rank must bring a torchrun job down."""
import os
import sys

import train
from engine.objectives import PretrainTask

calls = {"n": 0}
real = PretrainTask.loss


def breaks_on_rank1(self, model, batch):
    calls["n"] += model.training
    if os.environ.get("RANK") == "1" and calls["n"] == 3:
        raise RuntimeError("injected failure on rank 1")
    return real(self, model, batch)


PretrainTask.loss = breaks_on_rank1
sys.exit(train.cli())
