"""MFU accounting and the JSON run log.

MFU follows the PaLM convention: training FLOPs per token = 6N + 12*L*H*Q*T (model.flops_per_token), against the
dense bf16 peak of one device. The run log is one JSON document that is valid whenever it is read: it is rewritten
to a temporary name and renamed, and rewrites are spaced so that they cost under 1% of the run's time.
"""
import json
import os
import subprocess
import time

import torch

MFU_CONVENTION = "PaLM: flops/token = 6*N + 12*L*H*Q*T; N = matmul weights incl. output projection; per device"

# Dense bf16 tensor-core peaks, FLOP/s, matched against the device name (first match wins, most specific first).
PEAK_FLOPS = [
    ("GH200", 989e12),
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


class RunLog:
    """The run's JSON log: config, environment, training_iterations, evals, gradient_norms, health, summary."""

    MIN_INTERVAL = 5.0  # seconds between routine rewrites
    BUDGET = 0.01  # fraction of wall time rewrites may take

    def __init__(self, path, config, environment, previous=None, resume_iter=None, warn=print):
        self.path, self.warn = path, warn
        self.doc = {"config": config, "environment": environment, "training_iterations": [], "evals": [],
                    "gradient_norms": [], "health": [], "summary": None}
        if previous is not None:  # continue the resumed run's log, dropping what came after the checkpoint
            for k in ("training_iterations", "evals", "gradient_norms", "health"):
                self.doc[k] = [r for r in previous.get(k, []) if r.get("iter", 0) <= resume_iter]
            self.doc["environment"]["resumes"] = previous["environment"].get("resumes", []) + [
                {"iter": resume_iter, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}]
        self._last_write, self._write_cost = 0.0, 0.0
        self.flush()

    @staticmethod
    def read(path):
        with open(path) as f:
            return json.load(f)

    def add(self, kind, record):
        self.doc[kind].append(record)
        # wait at least MIN_INTERVAL and long enough that the last write's cost stays within BUDGET
        if time.monotonic() - self._last_write > max(self.MIN_INTERVAL, self._write_cost / self.BUDGET):
            self.flush()

    def flush(self):
        """Rewrite the log. A failed write (a full disk) keeps the previous file whole and the records in memory
        for the next try, and is reported rather than ending the run."""
        t0 = time.monotonic()
        tmp = f"{self.path}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(self.doc, f, allow_nan=False, default=_json_default)
            os.replace(tmp, self.path)
        except OSError as e:
            if os.path.exists(tmp):
                os.remove(tmp)
            self.warn(f"warning: could not write the run log {self.path} ({e}); the previous version is intact and "
                      "the records are kept in memory for the next write")
        self._last_write = time.monotonic()
        self._write_cost = self._last_write - t0

    def finish(self, summary):
        self.doc["summary"] = summary
        self.flush()


def _json_default(x):
    if isinstance(x, torch.dtype):
        return str(x)
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def finite_or_none(x):
    """JSON has no NaN or Inf: such values are logged as null."""
    return x if x is None or x == x and abs(x) != float("inf") else None
