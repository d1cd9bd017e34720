"""Checkpoints: sharded with torch.distributed.checkpoint (DCP), written atomically, checksummed, read as data only.

A checkpoint is a folder <out_dir>/ckpt_<iter>/ holding
    DCP files       the model's and optimizer's tensors, keyed by parameter name ("model.<name>",
                    "optim.<name>.exp_avg", ...). Each rank writes its own shards; any world size can read them back,
                    because DCP re-slices by name and shape on load. One format serves one process, DDP, ZeRO-1 and
                    FSDP alike.
    meta.pt         everything else (iteration, its val loss, best val loss, RNG states, data position, config),
                    plain data.
    checksums.json  the size and CRC-32 of every other file, hashed as the bytes were written (each rank its own
                    shards), so that a file damaged later on disk or in transit is caught when it is read.
It is written under a temporary name and renamed when complete, so a kill at any moment leaves the earlier
checkpoints intact and nothing half-written under a checkpoint's name. Reading never runs code: meta.pt goes
through torch.load(weights_only=True), tensors are raw bytes, and DCP's pickled index is read by an unpickler that
admits only the classes DCP's index is made of. Checkpoints written before checksums existed load unverified.
state_tensors() takes a rank's tensors from the model and optimizer whatever wraps them (DDP, ZeRO-1, FSDP);
load_state() and load_model_state() put them back.
"""
import dataclasses
import enum
import io
import json
import math
import os
import pickle
import re
import shutil
import warnings
import zlib
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.optim import ZeroRedundancyOptimizer

from engine.distributed import all_gather_objects, barrier, rank, world_size
from engine.optim import parts

PATTERN = re.compile(r"ckpt_(\d+)$")
META = "meta.pt"
CHECKSUMS = "checksums.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names it."""


class DamagedCheckpoint(CheckpointError):
    """A checkpoint whose files are damaged or unreadable; an older one may still serve."""


# ----------------------------------------------------------------------------------------------------------
# reading DCP's index without unpickling arbitrary objects

# the modules whose dataclasses and enums make up the index of a FileSystemWriter checkpoint
_INDEX_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
# Python 3.13 pickles paths from pathlib._local; the index keeps the path only for information, so any of them is
# read back as a PurePosixPath, which touches no file system and exists on every version
_PATHS = {(m, n) for m in ("pathlib", "pathlib._local") for n in ("Path", "PosixPath", "PurePosixPath")}


class _IndexUnpickler(pickle.Unpickler):
    def __init__(self, f):
        super().__init__(f)
        self.enums = []

    def find_class(self, module, name):
        if module in _INDEX_MODULES:
            obj = super().find_class(module, name)
            if isinstance(obj, type) and obj.__module__ == module and issubclass(obj, enum.Enum):
                self.enums.append(obj)
                return obj
            if isinstance(obj, type) and obj.__module__ == module and dataclasses.is_dataclass(obj):
                return obj
        if (module, name) in (("torch", "Size"), ("torch.serialization", "_get_layout"),
                              ("collections", "OrderedDict")):
            return super().find_class(module, name)
        if (module, name) in _PATHS:
            return PurePosixPath
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) == ("builtins", "getattr"):  # Python 3.11.0-3.11.x pickles an enum member by name this way
            return self._enum_member
        raise pickle.UnpicklingError(f"checkpoint index refers to {module}.{name}, which a checkpoint never "
                                     "needs; refusing to load it")

    def _enum_member(self, cls, name):
        if any(cls is e for e in self.enums) and isinstance(name, str) and name in cls.__members__:
            return cls[name]
        raise pickle.UnpicklingError(f"checkpoint index asks for getattr({cls!r:.80}, {name!r:.80}), which is not "
                                     "a member of one of DCP's enums; refusing to load it")


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
# checksums, computed on the bytes as DCP writes them

class _HashingStream:
    """A file being written that keeps the size and CRC-32 of everything written to it."""

    def __init__(self, f, fs):
        self.f, self.fs, self.size, self.crc = f, fs, 0, 0

    def write(self, b):
        try:
            n = self.f.write(b)
        except OSError as e:  # torch's zip writer swallows it and reports only "unexpected pos": keep the cause
            self.fs.error = self.fs.error or e
            raise
        self.crc = zlib.crc32(b, self.crc)
        self.size += memoryview(b).nbytes
        return n

    def __getattr__(self, name):  # tell, flush, fileno, close
        return getattr(self.f, name)


class _HashingFileSystem(FileSystem):
    def __init__(self):
        super().__init__()
        self.sums, self.error = {}, None

    @contextmanager
    def create_stream(self, path, mode):
        with super().create_stream(path, mode) as f:
            stream = _HashingStream(f, self)
            yield stream
        self.sums[Path(path).name] = [stream.size, stream.crc]

    def rename(self, path, new_path):  # DCP writes its index as .metadata.tmp, then renames it
        super().rename(path, new_path)
        self.sums[Path(new_path).name] = self.sums.pop(Path(path).name)


class _Writer(dcp.FileSystemWriter):
    def __init__(self, path):
        super().__init__(path, sync_files=True)
        self.fs = _HashingFileSystem()


@contextmanager
def _torch_crc_off():
    """torch.save computes a CRC-32 of each record it writes, which torch.load never checks; the writer's CRC-32
    covers the same bytes and is checked, so theirs would only double the hashing time."""
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(before)


def _crc32(file):
    crc, buf = 0, bytearray(16 << 20)
    view = memoryview(buf)
    with open(file, "rb") as f:
        while n := f.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
    return crc


def verify(path, part=0, parts=1):
    """Check the checkpoint's files against the checksums written with it: the small files always, the tensor
    shards numbered part, part + parts, ... (so that the ranks of a job can share the reading). Raises
    DamagedCheckpoint naming the file. A checkpoint without checksums passes here; load_meta refuses one whose
    meta.pt says it was written with them."""
    manifest = os.path.join(path, CHECKSUMS)
    if not os.path.isfile(manifest):
        return
    try:
        with open(manifest) as f:
            sums = json.load(f)["crc32"]
        sums = {str(name): (int(size), int(crc)) for name, (size, crc) in sums.items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DamagedCheckpoint(f"checkpoint {path} is corrupt: its {CHECKSUMS} cannot be read ({e})") from e
    names = sorted(sums)
    shards = [n for n in names if n not in (META, ".metadata")]
    for name in names:  # sizes first: a stat each, and a truncated file is told apart from a damaged one
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise DamagedCheckpoint(f"checkpoint {path} is incomplete: {name} is missing")
        have, want = os.path.getsize(file), sums[name][0]
        if have != want:
            how = "truncated" if have < want else "corrupt"
            raise DamagedCheckpoint(f"checkpoint {path} is {how}: {name} has {have} bytes, {want} were written")
    for name in [META, ".metadata"] + shards[part::parts]:
        if name in sums and (got := _crc32(os.path.join(path, name))) != sums[name][1]:
            raise DamagedCheckpoint(f"checkpoint {path} is corrupt: {name} does not match the checksum written with "
                                    f"it (crc32 {got:08x}, written {sums[name][1]:08x})")


# ----------------------------------------------------------------------------------------------------------
# paths

def checkpoint_path(out_dir, iteration):
    return os.path.join(out_dir, f"ckpt_{iteration:07d}")


def iteration_of(path):
    return int(PATTERN.fullmatch(os.path.basename(path)).group(1))


def list_checkpoints(out_dir):
    """Checkpoint folders in out_dir, oldest first."""
    found = []
    if os.path.isdir(out_dir):
        for name in os.listdir(out_dir):
            m = PATTERN.fullmatch(name)
            if m and os.path.isdir(os.path.join(out_dir, name)):
                found.append((int(m.group(1)), os.path.join(out_dir, name)))
    return [p for _, p in sorted(found)]


# ----------------------------------------------------------------------------------------------------------
# save

def save_checkpoint(tensors, meta, out_dir, iteration, keep_last_n=0):
    """Collective: every rank passes its tensors {"model": {...}, "optim": {...}}; rank 0 also writes `meta` (with
    "val_loss", the val loss of this checkpoint's weights, when known). Returns the checkpoint folder. Of the older
    checkpoints, those beyond the newest keep_last_n are deleted (0: keep all), except the one with the best val
    loss. A write that fails for want of space (or any OSError) raises CheckpointError; nothing is left behind."""
    final = checkpoint_path(out_dir, iteration)
    tmp = final + ".tmp"
    writer = None
    try:
        if rank() == 0:
            os.makedirs(out_dir, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        barrier()
        writer = _Writer(tmp)
        with _torch_crc_off():
            _quiet(dcp.save, tensors, storage_writer=writer)
        sums = {k: v for part in all_gather_objects(writer.fs.sums) for k, v in part.items()}
        if rank() == 0:
            buf = io.BytesIO()
            torch.save({**meta, "checksums": "crc32"}, buf)
            _write(os.path.join(tmp, META), buf.getvalue())
            sums[META] = [buf.tell(), zlib.crc32(buf.getbuffer())]
            _write(os.path.join(tmp, CHECKSUMS), json.dumps({"crc32": sums}).encode())
            fsync_dir(tmp)
            if os.path.exists(final):  # re-saving the same iteration (e.g. after a resume)
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(out_dir)
    except BaseException as e:
        if rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        why = _storage_failure(e, writer)
        if why is None:
            raise
        raise CheckpointError(f"could not write checkpoint {final} ({why}); the earlier checkpoints in {out_dir} are "
                              "intact; free disk space (or point --out_dir elsewhere) and resume") from e
    if rank() == 0 and keep_last_n > 0:
        _prune(out_dir, iteration, keep_last_n)
    barrier()
    return final


def _write(file, data):
    with open(file, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _storage_failure(e, writer):
    """Why writing failed, when storage refused it (full disk, quota, file-size limit, I/O error); else None.
    DCP hands every rank's failure to every rank wrapped in a CheckpointException, and torch's zip writer turns the
    OSError of a short write into "unexpected pos"; the OSError this rank's stream saw is the clearest cause."""
    if writer is not None and writer.fs.error is not None:
        return str(writer.fs.error)
    causes = [exc for exc, _ in e.failures.values()] if isinstance(e, CheckpointException) else [e]
    for exc in causes:
        if isinstance(exc, OSError):
            return str(exc)
        if isinstance(exc, RuntimeError) and "unexpected pos" in str(exc):
            return f"a write stopped short: {str(exc).strip()}"
    return None


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def saved_val_loss(path):
    """The val loss of the weights in checkpoint `path`, None where unknown (not evaluated, older checkpoints)."""
    try:
        v = torch.load(os.path.join(path, META), map_location="cpu", weights_only=True).get("val_loss")
    except Exception:  # an unreadable meta.pt: nothing known, and load_meta reports why when it matters
        return None
    return v if isinstance(v, float) and math.isfinite(v) else None


def best_checkpoint(out_dir, upto=None):
    """(path, val loss) of the checkpoint with the lowest val loss (the newest of equals) up to iteration `upto`;
    None if none has one."""
    scored = [(v, -iteration_of(p), p) for p in list_checkpoints(out_dir)
              if (upto is None or iteration_of(p) <= upto) and (v := saved_val_loss(p)) is not None]
    return (min(scored)[2], min(scored)[0]) if scored else None


def _prune(out_dir, iteration, keep_last_n):
    """Keep the newest keep_last_n checkpoints up to `iteration` and the best one. Newer ones than `iteration` are
    those a resume skipped as damaged: this run overwrites them when it gets there."""
    paths = [p for p in list_checkpoints(out_dir) if iteration_of(p) <= iteration]
    best = best_checkpoint(out_dir, upto=iteration)
    for old in paths[:-keep_last_n]:
        if best is None or old != best[0]:
            shutil.rmtree(old, ignore_errors=True)  # one left behind costs disk space, never a checkpoint


# ----------------------------------------------------------------------------------------------------------
# load

def load_meta(path, part=0, parts=1):
    """The plain-data part of a checkpoint, after checking its files against their checksums (the tensor shards
    numbered part, part + parts, ...: all of them by default). Raises CheckpointError naming the folder and why it
    is unusable (DamagedCheckpoint if its files are damaged)."""
    meta_file = os.path.join(path, META)
    if not os.path.isfile(meta_file) or not os.path.isfile(os.path.join(path, ".metadata")):
        raise DamagedCheckpoint(f"checkpoint {path} is incomplete: it lacks {META} or DCP's .metadata")
    verify(path, part, parts)
    try:
        meta = torch.load(meta_file, map_location="cpu", weights_only=True)
        index = SafeReader(path).read_metadata()
    except Exception as e:
        raise DamagedCheckpoint(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); it is truncated, "
                                "corrupt, or not a plain-data checkpoint") from e
    if isinstance(meta, dict) and meta.get("checksums") and not os.path.isfile(os.path.join(path, CHECKSUMS)):
        raise DamagedCheckpoint(f"checkpoint {path} is incomplete: it was written with checksums but its "
                                f"{CHECKSUMS} is missing")
    needed = {}  # every shard file must reach past the last byte the index points into
    for info in index.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in needed.items():
        file = os.path.join(path, name)
        have = os.path.getsize(file) if os.path.isfile(file) else None
        if have is None or have < size:
            raise DamagedCheckpoint(f"checkpoint {path} is truncated: {name} has {have or 0} bytes, its index needs "
                                    f"{size}")
    if not isinstance(meta, dict) or "iter_num" not in meta or "model_config" not in meta:
        raise CheckpointError(f"checkpoint {path} lacks iter_num or model_config; it was not written by this engine")
    return meta


def load_tensors(path, tensors):
    """Fill `tensors` (a nested dict shaped like the saved one, or a subset of it) in place from the folder."""
    try:
        _quiet(dcp.load, tensors, storage_reader=SafeReader(path))
    except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
        cause = next(iter(e.failures.values()))[0] if isinstance(e, CheckpointException) else e
        raise DamagedCheckpoint(f"checkpoint {path}: its tensors do not fit this model and optimizer or cannot be "
                                f"read ({type(cause).__name__}: {str(cause)[:500]})") from e


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


def find_latest(out_dir, warn=print, before=None):
    """The newest usable checkpoint in out_dir (older than iteration `before`, if given) as (path, meta), its files
    checked against their checksums; unusable newer ones are reported with the reason and skipped. Collective under
    torchrun: each rank checks a share of the shards, and all ranks take the same checkpoint."""
    paths = [p for p in list_checkpoints(out_dir) if before is None or iteration_of(p) < before]
    if not paths:
        raise CheckpointError(f"init_from=resume but {out_dir} holds no ckpt_<iter> checkpoint"
                              + (f" older than iteration {before}" if before is not None else "")
                              + "; start with --init_from=scratch or point --out_dir at the run to resume")
    part, parts = rank(), world_size()
    for path in reversed(paths):
        try:
            meta, problem = load_meta(path, part, parts), None
        except CheckpointError as e:
            problem = str(e)
        problems = [p for p in all_gather_objects(problem) if p]
        if not problems:
            return path, meta
        warn(f"warning: {problems[0]}; trying an older checkpoint")
    raise CheckpointError(f"no checkpoint in {out_dir} could be read: {', '.join(paths)}")


# ----------------------------------------------------------------------------------------------------------
# the model's and optimizer's state, keyed by parameter name whatever the wrapping

def _name(n):
    return n.replace("_checkpoint_wrapped_module.", "")


def state_tensors(owner, optimizer):
    """{"model": {name: tensor}, "optim": {name: {exp_avg, exp_avg_sq, step} or {momentum_buffer}}} of this rank
    (shards under FSDP, the owned partition under ZeRO-1). With several optimizers (Muon and AdamW) each parameter's
    state comes from the one that holds it."""
    opts = parts(optimizer)
    if isinstance(opts[0], ZeroRedundancyOptimizer):
        names = {p: _name(n) for n, p in owner.named_parameters()}
        optim = {names[p]: s for o in opts for p, s in o.optim.state.items()}
        return {"model": get_model_state_dict(owner), "optim": optim}
    msd, osd = get_state_dict(owner, opts)
    return {"model": msd, "optim": osd["state"]}


def init_optimizer_state(optimizer):
    """Create the optimizers' state tensors with a step at learning rate zero, so a checkpoint can be loaded into
    them."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    lrs = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = 0.0
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"] = lr


def check_model_keys(path, model_state):
    """A checkpoint of another architecture fails here, naming the keys and shapes that differ."""
    stored = stored_shapes(path)
    want = {k: tuple(v.shape) for k, v in model_state.items()}
    missing = sorted(set(want) - set(stored))
    extra = sorted(set(stored) - set(want))
    shapes = sorted(f"{k}: checkpoint {stored[k][0]} vs model {want[k]}" for k in set(want) & set(stored)
                    if stored[k][0] != want[k])
    if missing or extra or shapes:
        parts = [f"{label} {items[:8]}{' ...' if len(items) > 8 else ''}" for label, items in
                 (("missing from the checkpoint:", missing), ("not in the model:", extra),
                  ("shape mismatches:", shapes)) if items]
        raise CheckpointError(f"checkpoint {path} does not fit this model's architecture; " + "; ".join(parts))


def load_model_state(path, owner):
    """Weights only (fine-tuning from a checkpoint): the optimizer starts fresh."""
    target = {"model": get_model_state_dict(owner)}
    check_model_keys(path, target["model"])
    load_tensors(path, target)
    set_model_state_dict(owner, target["model"])


def load_state(path, owner, optimizer):
    init_optimizer_state(optimizer)
    target = state_tensors(owner, optimizer)
    check_model_keys(path, target["model"])
    load_tensors(path, target)
    opts = parts(optimizer)
    if isinstance(opts[0], ZeroRedundancyOptimizer):  # the optimizers' own tensors were filled in place
        set_model_state_dict(owner, target["model"])
        return
    _, osd = get_state_dict(owner, opts)
    set_state_dict(owner, opts, model_state_dict=target["model"],
                   optim_state_dict={"state": target["optim"], "param_groups": osd["param_groups"]})
