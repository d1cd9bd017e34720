"""A run's out_dir: checked before any work, and held by one training run at a time.

A training run holds an exclusive flock on <out_dir>/run.lock for its whole life. The kernel drops the lock when
the process ends, kill -9 included, so a crashed run never leaves the folder stuck; the file stays, holding the last
holder's identity for a refused run to name. Under torchrun rank 0 alone touches the folder and every rank learns
its verdict, so all ranks leave with the same error and none is left waiting in a collective.

eval_only runs take no lock: they write nothing a training run reads (only a run log under a name of their own),
they must work where nothing can be written (a read-only mount, where no lock file can be created either), and
evaluating the newest checkpoint of a run still in progress is a use, not a conflict.
"""
import fcntl
import json
import os
import socket
import sys
import time
from contextlib import contextmanager

from engine.config import ConfigError
from engine.distributed import all_gather_objects

LOCK = "run.lock"


class OutDirError(ConfigError):
    """out_dir cannot take this run; the message says why and what to do."""


@contextmanager
def claim(out_dir, d, read_only=False, warn=print):
    """Hold out_dir for the duration of a training run (nothing for read_only runs); raises OutDirError on every
    rank if rank 0 finds it unusable or held by another run."""
    if read_only:
        yield
        return
    f, err = None, None
    if d.master:
        try:
            f = _lock(out_dir, warn)
        except OutDirError as e:
            err = str(e)
    err = all_gather_objects(err)[0]
    if err:
        raise OutDirError(err)
    try:
        yield
    finally:
        if f:
            f.close()


def _lock(out_dir, warn):
    _make(out_dir)
    try:
        f = os.fdopen(os.open(os.path.join(out_dir, LOCK), os.O_RDWR | os.O_CREAT, 0o644), "r+")
    except OSError as e:
        raise OutDirError(f"out_dir {out_dir} is not writable ({e.strerror}); choose a folder you can write to with "
                          "--out_dir (--eval_only=True needs no write access)") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = f.read()
        f.close()
        raise OutDirError(f"out_dir {out_dir} is in use by another run ({_describe(holder)}); wait for it to end "
                          "or stop it, or choose another --out_dir") from None
    except OSError as e:  # a file system without flock (some network mounts): go on, but say what is not guarded
        warn(f"warning: cannot lock {out_dir} ({e.strerror}); make sure no other run uses this out_dir")
    try:
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.orig_argv)}))
        f.flush()
    except OSError as e:
        f.close()
        raise OutDirError(f"cannot write in out_dir {out_dir} ({e.strerror}); free space there or choose another "
                          "--out_dir") from None
    return f


def _make(out_dir):
    try:
        os.makedirs(out_dir, exist_ok=True)
    except FileExistsError:
        raise OutDirError(f"out_dir {out_dir} exists but is not a folder; move it away or choose another "
                          "--out_dir") from None
    except NotADirectoryError:
        above = os.path.dirname(os.path.abspath(out_dir))
        while not os.path.exists(above):
            above = os.path.dirname(above)
        raise OutDirError(f"out_dir {out_dir} lies under {above}, which is a file, not a folder; choose another "
                          "--out_dir") from None
    except OSError as e:
        raise OutDirError(f"cannot create out_dir {out_dir} ({e.strerror}); choose a folder you can write to with "
                          "--out_dir") from None


def _describe(holder):
    try:
        h = json.loads(holder)
        return f"pid {h['pid']} on {h['host']}, started {h['started']}: {h['command']}"
    except (ValueError, TypeError, KeyError):  # the holder has not written its identity yet
        return "a process that has just started"
