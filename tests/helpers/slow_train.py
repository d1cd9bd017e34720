"""train.py slowed down so that a test can interrupt it at a chosen point.

SLOW_STEP=seconds sleeps in every micro-step; HANG_CHECKPOINT=N stops for good inside the write of checkpoint N,
after its tensors are on disk and before it is complete, as a kill -9 during a checkpoint write would find it.
"""
import os
import sys
import time

import engine.checkpoint as C
import train
from engine.objectives import PretrainTask

real_loss, real_save = PretrainTask.loss, C.torch.save


def slow_loss(self, model, batch):
    time.sleep(float(os.environ.get("SLOW_STEP", "0")))
    return real_loss(self, model, batch)


def hanging_save(obj, f, *args, **kwargs):
    if isinstance(obj, dict) and obj.get("iter_num") == int(os.environ.get("HANG_CHECKPOINT", "-1")):
        print("hanging inside checkpoint write", flush=True)
        time.sleep(3600)
    return real_save(obj, f, *args, **kwargs)


PretrainTask.loss = slow_loss
C.torch.save = hanging_save
sys.exit(train.cli())
