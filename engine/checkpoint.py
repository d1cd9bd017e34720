"""Checkpoints: sharded with torch.distributed.checkpoint (DCP), written atomically, read as data only.

A checkpoint is a folder <out_dir>/ckpt_<iter>/ holding
    DCP files   the model's and optimizer's tensors, keyed by parameter name ("model.<name>",
                "optim.<name>.exp_avg", ...). Each rank writes its own shards; any world size can read them back,
                because DCP re-slices by name and shape on load. One format serves one process, DDP, ZeRO-1 and
                FSDP alike.
    meta.pt     everything else (iteration, best val loss, RNG states, data position, config), plain data.
It is written under a temporary name and renamed when complete, so a kill at any moment leaves the earlier
checkpoints intact and nothing half-written under a checkpoint's name. Reading never runs code: meta.pt goes
through torch.load(weights_only=True), tensors are raw bytes, and DCP's pickled index is read by an unpickler that
admits only DCP's own metadata classes.
"""
import os
import pickle
import re
import shutil
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

PATTERN = re.compile(r"ckpt_(\d+)$")
META = "meta.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names it."""


# ----------------------------------------------------------------------------------------------------------
# reading DCP's index without unpickling arbitrary objects

class _IndexUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module.startswith("torch.distributed.checkpoint.") or (module, name) in (
                ("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                ("pathlib", "PurePosixPath"), ("collections", "OrderedDict")):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"checkpoint index refers to {module}.{name}, which a checkpoint never "
                                     "needs; refusing to load it")


class SafeReader(dcp.FileSystemReader):
    def read_metadata(self, *args, **kwargs):
        with open(os.path.join(self.path, ".metadata"), "rb") as f:
            metadata = _IndexUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = None
        if metadata.storage_meta is not None:
            metadata.storage_meta.load_id = self.load_id
        return metadata


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():  # DCP warns that one process without a process group is "assumed"
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        warnings.filterwarnings("ignore", message=".*assuming the intent is to.*")
        return fn(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# paths

def checkpoint_path(out_dir, iteration):
    return os.path.join(out_dir, f"ckpt_{iteration:07d}")


def list_checkpoints(out_dir):
    """Checkpoint folders in out_dir, oldest first."""
    found = []
    if os.path.isdir(out_dir):
        for name in os.listdir(out_dir):
            m = PATTERN.fullmatch(name)
            if m and os.path.isdir(os.path.join(out_dir, name)):
                found.append((int(m.group(1)), os.path.join(out_dir, name)))
    return [p for _, p in sorted(found)]


def _rank():
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier():
    if dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------------------------------------
# save

def save_checkpoint(tensors, meta, out_dir, iteration, keep_last_n=0):
    """Collective: every rank passes its tensors {"model": {...}, "optim": {...}}; rank 0 also writes `meta`.
    Returns the checkpoint folder. Older checkpoints beyond the newest keep_last_n are deleted (0: keep all)."""
    final = checkpoint_path(out_dir, iteration)
    tmp = final + ".tmp"
    if _rank() == 0:
        os.makedirs(out_dir, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    try:
        _quiet(dcp.save, tensors, storage_writer=dcp.FileSystemWriter(tmp, sync_files=True))
        if _rank() == 0:
            with open(os.path.join(tmp, META), "wb") as f:
                torch.save(meta, f)
                f.flush()
                os.fsync(f.fileno())
            if os.path.exists(final):  # re-saving the same iteration (e.g. after a resume)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(out_dir)
            if keep_last_n > 0:
                for old in list_checkpoints(out_dir)[:-keep_last_n]:
                    shutil.rmtree(old)
    except OSError as e:
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write checkpoint {final} ({e}); the earlier checkpoints in {out_dir} are "
                              "intact; free disk space (or point --out_dir elsewhere) and resume") from e
    except BaseException:
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _barrier()
    return final


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------------------
# load

def load_meta(path):
    """The plain-data part of a checkpoint; raises CheckpointError naming the folder if it is unusable."""
    meta_file = os.path.join(path, META)
    if not os.path.isfile(meta_file) or not os.path.isfile(os.path.join(path, ".metadata")):
        raise CheckpointError(f"checkpoint {path} is incomplete: it lacks {META} or DCP's .metadata")
    try:
        meta = torch.load(meta_file, map_location="cpu", weights_only=True)
        index = SafeReader(path).read_metadata()
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); it is truncated, "
                              "corrupt, or not a plain-data checkpoint") from e
    needed = {}  # every shard file must reach past the last byte the index points into
    for info in index.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in needed.items():
        file = os.path.join(path, name)
        have = os.path.getsize(file) if os.path.isfile(file) else None
        if have is None or have < size:
            raise CheckpointError(f"checkpoint {path} is truncated: {name} has {have or 0} bytes, its index needs "
                                  f"{size}")
    if not isinstance(meta, dict) or "iter_num" not in meta or "model_config" not in meta:
        raise CheckpointError(f"checkpoint {path} lacks iter_num or model_config; it was not written by this engine")
    return meta


def load_tensors(path, tensors):
    """Fill `tensors` (a nested dict shaped like the saved one, or a subset of it) in place from the folder."""
    try:
        _quiet(dcp.load, tensors, storage_reader=SafeReader(path))
    except Exception as e:
        raise CheckpointError(f"checkpoint {path}: its tensors do not fit this model and optimizer or cannot be "
                              f"read ({type(e).__name__}: {str(e)[:500]})") from e


def stored_shapes(path, prefix="model."):
    """{name: (shape, dtype)} of the tensors saved under `prefix`."""
    md = SafeReader(path).read_metadata()
    return {k[len(prefix):]: (tuple(v.size), v.properties.dtype) for k, v in md.state_dict_metadata.items()
            if k.startswith(prefix) and isinstance(v, TensorStorageMetadata)}


def load_checkpoint(path):
    """One process, no model at hand: meta plus the full model state dict, {"model": {...}, **meta}."""
    meta = load_meta(path)
    model = {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in stored_shapes(path).items()}
    load_tensors(path, {"model": model})
    return {**meta, "model": model}


def find_latest(out_dir, warn=print):
    """The newest usable checkpoint in out_dir as (path, meta); unusable newer ones are reported and skipped."""
    paths = list_checkpoints(out_dir)
    if not paths:
        raise CheckpointError(f"init_from=resume but {out_dir} holds no ckpt_<iter> checkpoint; start with "
                              "--init_from=scratch or point --out_dir at the run to resume")
    for path in reversed(paths):
        try:
            return path, load_meta(path)
        except CheckpointError as e:
            warn(f"warning: {e}; trying an older checkpoint")
    raise CheckpointError(f"no checkpoint in {out_dir} could be read: {', '.join(paths)}")
