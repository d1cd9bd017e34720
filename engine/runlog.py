"""MFU accounting and the JSON run log.

MFU follows the PaLM convention: training FLOPs per token = 6N + 12*L*H*Q*T (model.flops_per_token), against the
dense bf16 peak of one device. The run log is one JSON document that is valid whenever it is read: it is rewritten
to a temporary name, synced and renamed, and rewrites are spaced so that they cost under 1% of the run's time. A run
writes only its own log inside its own out_dir.
"""
import contextlib
import itertools
import json
import math
import os
import resource
import subprocess
import sys
import time

import torch

from engine.checkpoint import fsync_dir

MFU_CONVENTION = "PaLM: flops/token = 6*N + 12*L*H*Q*T; N = matmul weights incl. output projection; per device"

# Dense bf16 tensor-core peaks, FLOP/s, matched against the device name (first match wins, most specific first).
PEAK_FLOPS = [  # matched in order, the most specific name first ("H200 NVL" before "H200")
    ("GH200", 989e12),
    ("H200 NVL", 835e12),  # the PCIe card at its lower power: the H100 NVL's dense bf16
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("B200", 2250e12),
    ("B100", 1750e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("A10G", 125e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),
]


def device_name(device):
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def lookup_peak_flops(name):
    for key, flops in PEAK_FLOPS:
        if key.lower() in name.lower():
            return flops
    return None


def mfu(flops_per_token, tokens_per_sec, peak):
    return None if not peak else flops_per_token * tokens_per_sec / peak


def git_state():
    """(commit, dirty) of the code that runs, or (None, None) outside a git checkout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=10).stdout
        return commit, (bool(status.strip()) if commit else None)
    except (OSError, subprocess.SubprocessError):
        return None, None


RECORDS = ("training_iterations", "evals", "task_evals", "gradient_norms", "health")


class RunLog:
    """The run's JSON log: config, environment, training_iterations (also as training_progress), evals, task_evals,
    gradient_norms, health, summary.
    Everything entering it passes finite_or_none, so that no NaN or Inf can make it unwritable."""

    MIN_INTERVAL = 5.0  # seconds between routine rewrites
    BUDGET = 0.01  # fraction of wall time rewrites may take

    def __init__(self, path, config, environment, previous=None, resume_iter=None, warn=print):
        self.path, self.warn = path, warn
        self.doc = {"config": finite_or_none(config), "environment": finite_or_none(environment),
                    "training_iterations": [], "evals": [], "task_evals": [], "gradient_norms": [], "health": [],
                    "summary": None}
        if previous is not None:  # continue the resumed run's log, dropping what came after the checkpoint
            for k in RECORDS:
                self.doc[k] = [r for r in previous.get(k, []) if r.get("iter", 0) <= resume_iter]
            self.doc["environment"]["resumes"] = previous["environment"].get("resumes", []) + [
                {"iter": resume_iter, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}]
        # the same rows under the name other engines' analysis scripts read (data.get("training_progress")): one
        # list, so they cannot disagree; the file holds it twice
        self.doc["training_progress"] = self.doc["training_iterations"]
        self._last_write, self._write_cost = 0.0, 0.0
        self.flush()

    @staticmethod
    def read(path):
        with open(path) as f:
            return json.load(f)

    def add(self, kind, record):
        self.doc[kind].append(finite_or_none(record))
        # wait at least MIN_INTERVAL and long enough that the last write's cost stays within BUDGET
        if time.monotonic() - self._last_write > max(self.MIN_INTERVAL, self._write_cost / self.BUDGET):
            self.flush()

    def flush(self):
        """Rewrite the log. A failed write (a full disk) keeps the previous file whole and the records in memory
        for the next try, and is reported rather than ending the run; the temporary file never stays behind."""
        t0 = time.monotonic()
        tmp = f"{self.path}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(self.doc, f, allow_nan=False, default=str)  # what JSON lacks (a torch.dtype) as text
                f.flush()
                os.fsync(f.fileno())  # the data is on disk before the name points at it, even after a power cut
            os.replace(tmp, self.path)
            fsync_dir(os.path.dirname(self.path) or ".")
        except Exception as e:  # whatever it is, the log is a record of the run and must not be what ends it
            self.warn(f"warning: could not write the run log {self.path} ({e}); the previous version is intact and "
                      "the records are kept in memory for the next write")
        finally:
            with contextlib.suppress(OSError):  # gone already when the rename succeeded
                os.remove(tmp)
        self._last_write = time.monotonic()
        self._write_cost = self._last_write - t0

    def finish(self, summary):
        self.doc["summary"] = finite_or_none(summary)
        self.flush()


def process_memory():
    """(resident bytes now, peak resident bytes) of this process: what the run log reports as memory on CPU, where
    there is no device allocator to ask. Linux reads /proc; elsewhere both are the peak (getrusage)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        return rss, max(rss, peak)  # the kernel updates its high-water mark lazily
    except (OSError, ValueError, IndexError):
        return peak, peak


def new_log_path(out_dir, prefix="run_", suffix=".json"):
    """A fresh run_<time>.json (or another prefix and suffix) in out_dir, created here so that no other run can
    take the name: two runs started in the same second get a suffix."""
    stamp = time.strftime("%Y%m%d_%H%M%S")
    for i in itertools.count():
        path = os.path.join(out_dir, f"{prefix}{stamp}{f'_{i}' if i else ''}{suffix}")
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            return path
        except FileExistsError:
            continue


def log_to_continue(out_dir, stored, warn=print):
    """(path, doc) of the log a resumed run continues, or (None, None) to start a new one. The checkpoint names the
    log (older checkpoints by its full path); only that name is looked up, in out_dir itself, so that resuming a
    copied folder never writes into the original's log. A missing or damaged log is reported and left as it is."""
    if not stored:
        return None, None
    path = os.path.join(out_dir, os.path.basename(stored))
    if not os.path.isfile(path):
        warn(f"warning: the checkpoint's run log {path} is not in out_dir; starting a new run log")
        return None, None
    try:
        doc = RunLog.read(path)
        if not (isinstance(doc, dict) and isinstance(doc.get("environment"), dict)
                and all(isinstance(doc.get(k, []), list) and all(isinstance(r, dict) for r in doc.get(k, []))
                        for k in RECORDS)):
            raise ValueError("not a run log")
    except (OSError, ValueError) as e:
        warn(f"warning: the run log {path} is damaged ({e}); it is left as it is and a new run log is started")
        return None, None
    return path, doc


def finite_or_none(x):
    """JSON has no NaN or Inf: such values, anywhere in x, are logged as null."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: finite_or_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite_or_none(v) for v in x]
    return x
