"""Checkpoints: written atomically, loaded as data (weights_only), pruned to the newest few.

Files are <out_dir>/ckpt_<iter>.pt. A checkpoint is written to a temporary name, flushed to disk and renamed, so a
kill at any moment leaves every earlier checkpoint intact and no half-written file under a checkpoint's name.
"""
import glob
import os
import re

import torch

PATTERN = re.compile(r"ckpt_(\d+)\.pt$")
WRAPPER_PREFIXES = ("_orig_mod.", "module.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file."""


def clean_state_dict(sd):
    """Strip the prefixes torch.compile, DDP and FSDP wrappers add, so keys match the bare model."""
    out = {}
    for k, v in sd.items():
        changed = True
        while changed:
            changed = False
            for p in WRAPPER_PREFIXES:
                k2 = k.replace(p, "")
                if k2 != k:
                    k, changed = k2, True
        out[k] = v
    return out


def checkpoint_path(out_dir, iteration):
    return os.path.join(out_dir, f"ckpt_{iteration:07d}.pt")


def list_checkpoints(out_dir):
    """Checkpoint paths in out_dir, oldest first."""
    found = []
    for p in glob.glob(os.path.join(out_dir, "ckpt_*.pt")):
        m = PATTERN.search(os.path.basename(p))
        if m:
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def atomic_save(obj, path):
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def save_checkpoint(state, out_dir, iteration, keep_last_n=0):
    """Write state as ckpt_<iteration>.pt, then delete all but the newest keep_last_n (0: keep all)."""
    os.makedirs(out_dir, exist_ok=True)
    path = checkpoint_path(out_dir, iteration)
    atomic_save(state, path)
    if keep_last_n > 0:
        for old in list_checkpoints(out_dir)[:-keep_last_n]:
            os.remove(old)
    return path


def load_checkpoint(path, map_location="cpu"):
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); it is truncated, "
                              "corrupt, or not a plain-data checkpoint") from e
    if not isinstance(state, dict) or "model" not in state or "iter_num" not in state:
        raise CheckpointError(f"checkpoint {path} lacks the model or iter_num entries; it was not written by "
                              "this engine")
    return state


def load_latest(out_dir, map_location="cpu", warn=print):
    """The newest readable checkpoint in out_dir as (path, state); unreadable newer ones are reported and skipped."""
    paths = list_checkpoints(out_dir)
    if not paths:
        raise CheckpointError(f"init_from=resume but {out_dir} holds no ckpt_*.pt checkpoint; "
                              "start with --init_from=scratch or point --out_dir at the run to resume")
    for path in reversed(paths):
        try:
            return path, load_checkpoint(path, map_location)
        except CheckpointError as e:
            warn(f"warning: {e}; trying an older checkpoint")
    raise CheckpointError(f"no checkpoint in {out_dir} could be read: {', '.join(paths)}")
