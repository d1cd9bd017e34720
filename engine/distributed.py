"""Running under torchrun: process groups, collectives that also work in one plain process, and wrapping the model
(DDP / ZeRO-1 / FSDP2).

The model itself never changes. parallelize() applies, in torchtitan's order, activation checkpointing, then
torch.compile, then sharding (FSDP2 fully_shard on each block and the root) or replication (DDP). ZeRO-1 is DDP's
replicated parameters with torch's ZeroRedundancyOptimizer sharding the AdamW state.
"""
import ctypes
import datetime
import os
import signal
import sys
import threading
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel as DDP

from engine.optim import parts


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    heartbeat: "Heartbeat | None" = field(default=None, repr=False)

    @property
    def master(self):
        return self.rank == 0

    @property
    def enabled(self):
        return dist.is_initialized()


def init_distributed(device_type, timeout_minutes=30):
    """Join the process group torchrun describes (NCCL on CUDA, gloo on CPU); one plain process otherwise.
    `timeout_minutes` bounds every collective until set_timeout() changes it."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Dist()
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    follow_launcher()
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes),
                            device_id=torch.device("cuda", local_rank) if device_type == "cuda" else None)
    d = Dist(rank, local_rank, world)
    d.heartbeat = Heartbeat(d)
    return d


def set_timeout(minutes):
    """From now on a collective that waits longer than this for another rank fails (and names it, see explain)."""
    if dist.is_initialized():
        dist.distributed_c10d._set_pg_timeout(datetime.timedelta(minutes=minutes))


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier():
    if dist.is_initialized():
        dist.barrier()


def cleanup(d=None):
    if d is not None and d.heartbeat is not None:
        d.heartbeat.close()
    if dist.is_initialized():
        dist.destroy_process_group()


def follow_launcher():
    """torchrun starts each worker in a session of its own, so a launcher killed outright (kill -9, the OOM killer)
    would leave its workers training on as orphans that nobody waits for. Ask the kernel for a SIGTERM when the
    launcher dies: the worker then stops at the end of its step with a checkpoint, as on preemption, and the ranks on
    other nodes stop with it."""
    global _launcher
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    _launcher = os.getppid()
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if launcher_gone():  # it died before the request was in place
        os.kill(os.getpid(), signal.SIGTERM)


_launcher = None


def launcher_gone():
    """Whether the torchrun launcher that started this worker has died."""
    return _launcher is not None and os.getppid() != _launcher


# ----------------------------------------------------------------------------------------------------------
# naming the rank that stopped answering

class RankFailure(RuntimeError):
    """The job cannot go on because other ranks stopped answering or lost their launcher; the message names them.
    `everywhere`: every rank raises the same one."""

    def __init__(self, message, everywhere=False):
        super().__init__(message)
        self.everywhere = everywhere


class Heartbeat:
    """A daemon thread that counts up this rank's beat in the job's rendezvous store every second, with the
    step the rank is in. A rank that is stopped (SIGSTOP), killed or cut off stops beating; a rank that is only
    slow keeps beating. When a collective fails, explain() reads every rank's beat twice and names the ranks whose
    beat did not move, so the message says who stopped answering rather than only that a wait timed out.
    It costs one store write per rank per second and nothing in the step."""

    INTERVAL = 1.0

    def __init__(self, d):
        self.d, self.step, self.beats = d, 0, 0  # step: the optimizer step this rank is in, counted from 1
        self.store = dist.distributed_c10d._get_default_store().clone()  # a connection of its own for the thread
        self.keys = [f"engine/heartbeat/{r}" for r in range(d.world_size)]
        self._beat()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self.thread.start()

    def _beat(self):
        self.beats += 1
        self.store.set(self.keys[self.d.rank], f"{self.beats} {self.step}")

    def _run(self):
        while not self.stopping.wait(self.INTERVAL):
            try:
                self._beat()
            except Exception:  # the store's host is gone; the failing collective reports the rest
                return

    def read(self, store):
        return [tuple(int(x) for x in v.decode().split()) for v in store.multi_get(self.keys)]

    def silent_ranks(self):
        """[(rank, the step it was in at its last beat)] of the other ranks whose beat stood still for three
        intervals."""
        store = self.store.clone()
        store.set_timeout(datetime.timedelta(seconds=10))
        first = self.read(store)
        time.sleep(3 * self.INTERVAL)
        second = self.read(store)
        return [(r, step) for r, ((a, _), (b, step)) in enumerate(zip(first, second)) if a == b and r != self.d.rank]

    def close(self):
        self.stopping.set()
        self.thread.join(timeout=2 * self.INTERVAL)  # a write to a store whose host is gone may hang; it is a daemon


def from_collective(e):
    """Whether `e` is a collective failing (a timeout, a peer gone) rather than an error of this rank's own."""
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    if not isinstance(e, RuntimeError):
        return False
    text = str(e)
    return ("gloo/" in text or "NCCL" in text or
            any(f.filename.endswith("distributed_c10d.py") for f in traceback.extract_tb(e.__traceback__)))


def explain(e, d):
    """A RankFailure naming the ranks that stopped answering, when `e` is a collective failing on their account;
    None otherwise (the error is this rank's own, or every rank is still alive)."""
    if d.heartbeat is None or not from_collective(e):
        return None
    first = str(e).strip().splitlines()[0][:300]
    try:
        silent = d.heartbeat.silent_ranks()
    except Exception:
        return RankFailure(f"rank {d.rank}: a collective failed in step {d.heartbeat.step} ({first}) and "
                           "the job's rendezvous store cannot be reached either: the first node's launcher is gone; "
                           "resume with --init_from=resume once every node is back")
    if not silent:
        return None
    who = ", ".join(f"rank {r} (last heard in step {step})" for r, step in silent)
    return RankFailure(f"rank {d.rank} waited in step {d.heartbeat.step}: {who} stopped answering "
                       f"(stopped, killed, or its host unreachable; {first}); the job ends here, resume with "
                       "--init_from=resume")


def all_reduce_sum(t):
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_objects(x):
    """[x from rank 0, x from rank 1, ...]"""
    if not dist.is_initialized():
        return [x]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, x)
    return out


# ----------------------------------------------------------------------------------------------------------
# wrapping

def parallelize(model, cfg, d: Dist, device_type, dtype):
    """(model to call, model that owns the parameters). The second is what optimizers and checkpoints see."""
    if cfg.activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for i, block in enumerate(model.blocks):
            model.blocks[i] = checkpoint_wrapper(block, preserve_rng_state=True)
    if cfg.use_fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if cfg.compile:  # per block, as torchtitan does, so FSDP's hooks stay outside the compiled graphs
            fullgraph = one_graph(model, cfg, ddp=False)
            for block in model.blocks:
                block.compile(fullgraph=fullgraph)
        mp = MixedPrecisionPolicy()
        if device_type == "cuda" and dtype == "bfloat16":
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in model.blocks:
            fully_shard(block, mp_policy=mp, reshard_after_forward=cfg.fsdp_reshard_after_forward)
        fully_shard(model, mp_policy=mp, reshard_after_forward=cfg.fsdp_reshard_after_forward)
        return model, model
    owner = model
    if d.world_size > 1:
        # the gradients are views into DDP's all-reduce buckets instead of a second copy of them; the buffers (the
        # RoPE tables) are constants computed alike on every rank, so they are not broadcast before every forward
        model = DDP(model, device_ids=[d.local_rank] if device_type == "cuda" else None,
                    gradient_as_bucket_view=True, broadcast_buffers=False,
                    bucket_cap_mb=ddp_bucket_mb(cfg))
    if cfg.compile or cfg.use_cuda_graphs:
        # use_cuda_graphs: every step has the same shapes, so captured graphs are replayed instead of launching
        # kernels one by one
        mode = "reduce-overhead" if cfg.use_cuda_graphs else None
        model = torch.compile(model, mode=mode, fullgraph=one_graph(owner, cfg, ddp=d.world_size > 1))
    return model, owner


def ddp_bucket_mb(cfg):
    """DDP's bucket size: as configured, or torch's 25 MB eagerly and 100 MB under compile, where the compiled
    backward is split into one graph per bucket (so that each bucket's all-reduce starts as its graph ends): fewer,
    larger buckets keep more of the backward in one graph, and four or more of them still overlap the all-reduce
    with the backward in a model of 0.5 GB of gradients or more."""
    return cfg.ddp_bucket_cap_mb or (100.0 if cfg.compile or cfg.use_cuda_graphs else 25.0)


def one_graph(model, cfg, ddp):
    """Whether torch.compile must capture the model whole (fullgraph=True, so that a graph break is an error rather
    than a silent slowdown). Two things break the graph: DDP (dynamo splits its graph at the gradient buckets) and
    flash-attn's variable-length kernel for packed rows (another package's kernel, whose number of sequences changes
    from batch to batch)."""
    return not ddp and not (model.config.attention_backend == "flash_attn_2" and cfg.packing)


def grad_sync(model, sync):
    """Context for one micro-step's backward. DDP all-reduces only on the last micro-step (`sync`): its gradients
    are full-size on every rank anyway. FSDP reduce-scatters after every micro-step: skipping that would keep every
    gradient unsharded (in float32 under bf16 mixed precision) for the whole accumulation, which defeats sharding."""
    inner = getattr(model, "_orig_mod", model)
    if isinstance(inner, DDP) and not sync:
        return inner.no_sync()
    return nullcontext()


def local(t):
    """This rank's part of `t`: the local shard of an FSDP DTensor, the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


def local_bytes(tensors):
    """Bytes this rank holds of `tensors`."""
    return sum(local(t).numel() * local(t).element_size() for t in tensors)


def optimizer_state_bytes(optimizer):
    opts = [o.optim if isinstance(o, ZeroRedundancyOptimizer) else o for o in parts(optimizer)]
    return local_bytes(v for o in opts for s in o.state.values() for v in s.values()
                       if torch.is_tensor(v) and v.dim() > 0)
