"""Checkpoints that must still serve, or be refused for a stated reason: indexes pickled by another Python, bytes
damaged on disk (checksums, fallback to an intact checkpoint), and a run blowing up (pruning keeps the best one).
docs/reliability.md tabulates what each test shows."""
import enum
import io
import json
import os
import pickle
import re
import resource
import shutil
import signal
import subprocess
import sys
import zlib

import pytest
import torch
from conftest import ROOT, run_log, write_dataset
from conftest import logged_losses as losses
from test_reliability import ARGS, assert_same, ckpt_iters

import train
from engine.checkpoint import (
    CHECKSUMS,
    CheckpointError,
    _IndexUnpickler,
    list_checkpoints,
    load_checkpoint,
    load_tensors,
    save_checkpoint,
    stored_shapes,
)
from engine.config import parse_args
from engine.health import TrainingDiverged

RUN = ARGS + ["--max_iters=16", "--keep_last_n_checkpoints=0"]  # checkpoints at 4, 8, 12 and 16


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("integrity") / "data"))


@pytest.fixture(scope="module")
def run16(data, tmp_path_factory):
    """An uninterrupted run: its out_dir (copy it before changing anything) and its losses."""
    out = tmp_path_factory.mktemp("run16")
    train.main(parse_args(RUN + [f"--dataset={data}", f"--out_dir={out}"]), log=lambda *a: None)
    return out, losses(out)


def copy_run(run16, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run16[0], out)
    return out


def resume(out_dir, data, *extra):
    said = []
    train.main(parse_args(RUN + [f"--dataset={data}", f"--out_dir={out_dir}", "--init_from=resume", *extra]),
               log=lambda *a: said.append(" ".join(map(str, a))))
    return said


def flip(file, offset, n=4):
    """Invert n bytes in place: the size stays what it was."""
    with open(file, "r+b") as f:
        f.seek(offset)
        b = f.read(n)
        f.seek(offset)
        f.write(bytes(x ^ 0xFF for x in b))


def item(ckpt, key):
    """(shard file, offset, length) of one saved tensor, from DCP's index."""
    md = pickle.load(open(os.path.join(ckpt, ".metadata"), "rb"))  # our own test's file: a plain load is fine
    [(index, info)] = [(i, s) for i, s in md.storage_data.items() if i.fqn == key]
    return os.path.join(ckpt, info.relative_path), info.offset, info.length


def rewrite(ckpt, name, data):
    """Replace a file of a checkpoint, and its checksum, as if the checkpoint had been written with it."""
    with open(os.path.join(ckpt, name), "wb") as f:
        f.write(data)
    sums = json.load(open(os.path.join(ckpt, CHECKSUMS)))
    sums["crc32"][name] = [len(data), zlib.crc32(data)]
    json.dump(sums, open(os.path.join(ckpt, CHECKSUMS), "w"))


def as_before_checksums(ckpt):
    """What a checkpoint written before checksums existed looks like."""
    os.remove(os.path.join(ckpt, CHECKSUMS))
    meta = torch.load(os.path.join(ckpt, "meta.pt"), weights_only=True)
    del meta["checksums"]
    torch.save(meta, os.path.join(ckpt, "meta.pt"))


# ----------------------------------------------------------------------------------------------------------
# DCP's index as Python 3.11.0-3.11.x pickles it

class EnumsByName(pickle.Pickler):
    """Python 3.11.0-3.11.x (Debian 12's 3.11.2 among them): Enum.__reduce_ex__ returned (getattr, (cls, name))."""

    def reducer_override(self, obj):
        if isinstance(obj, enum.Enum):
            return getattr, (type(obj), obj.name)
        return NotImplemented


def test_index_pickled_by_python_3_11_2_resumes(data, run16, tmp_path):
    out = copy_run(run16, tmp_path)
    shutil.rmtree(out / "ckpt_0000016")
    ckpt = str(out / "ckpt_0000012")
    index = pickle.load(open(os.path.join(ckpt, ".metadata"), "rb"))
    buf = io.BytesIO()
    EnumsByName(buf).dump(index)
    assert b"builtins" in buf.getvalue() and b"getattr" in buf.getvalue()  # the pickling path under test
    rewrite(ckpt, ".metadata", buf.getvalue())
    assert load_checkpoint(ckpt)["iter_num"] == 12
    resume(out, data)
    assert_same(losses(out), run16[1])


MARKER = "/tmp/engine_index_payload_ran"


def glob(module, name):
    return f"c{module}\n{name}\n".encode()


def text(s):
    return f"V{s}\n".encode()


def call(fn, *args):
    return fn + b"(" + b"".join(args) + b"tR"


GETATTR = glob("builtins", "getattr")
MEMFMT = glob("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING")
TOUCH = text(f"touch {MARKER}")


@pytest.mark.parametrize("payload", [
    call(call(GETATTR, glob("torch.distributed.checkpoint.metadata", "os"), text("system")), TOUCH),
    call(call(GETATTR, call(glob("builtins", "__import__"), text("os")), text("system")), TOUCH),
    call(call(GETATTR, glob("torch.distributed.checkpoint.metadata", "Metadata"), text("__init__")), TOUCH),
    call(GETATTR, MEMFMT, text("__class__")),
    call(GETATTR, MEMFMT, text("_missing_")),
    call(GETATTR, call(GETATTR, MEMFMT, text("TORCH_CONTIGUOUS_FORMAT")), text("__class__")),
    call(GETATTR, glob("torch.distributed.checkpoint.planner", "WriteItemType"), text("TENSOR")),
    call(glob("torch.distributed.checkpoint.format_utils", "torch_save_to_dcp"), text("/tmp/x.pt"), text("/tmp/y")),
    call(glob("posix", "system"), TOUCH),
    b"\x80\x04" + call(glob("torch.distributed.checkpoint.metadata", "os.system"), TOUCH),  # a dotted name
    call(glob("torch.distributed.checkpoint.filesystem", "FileSystemWriter"), text(MARKER)),  # a class, not data
], ids=["getattr-os-system", "import-os", "getattr-dataclass-init", "getattr-enum-class", "getattr-enum-method",
        "getattr-on-member", "enum-of-another-module", "dcp-function", "posix-system", "dotted-os-system",
        "dcp-writer"])
def test_index_refuses_code_even_through_getattr(payload):
    if os.path.exists(MARKER):
        os.remove(MARKER)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        _IndexUnpickler(io.BytesIO(payload + b".")).load()
    assert not os.path.exists(MARKER)
    member = _IndexUnpickler(io.BytesIO(call(GETATTR, MEMFMT, text("TORCH_CONTIGUOUS_FORMAT")) + b".")).load()
    assert member.name == "TORCH_CONTIGUOUS_FORMAT"  # what the index needs stays admitted


# ----------------------------------------------------------------------------------------------------------
# writes the storage refuses

def test_write_refused_inside_torchs_writer_names_the_cause(tmp_path):
    """torch's zip writer swallows the OSError of a large record's write and says only "unexpected pos"; the error
    names the real cause. (tests/test_reliability.py -k full_disk runs train.py itself out of space.)"""
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, limit[1]))
    try:
        with pytest.raises(CheckpointError, match=r"ckpt_0000001 \(\[Errno 27\] File too large\); the earlier"):
            save_checkpoint({"model": {"w": torch.zeros(512, 1024)}}, {"iter_num": 1}, str(tmp_path), 1)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, handler)
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------------------------------
# damaged bytes

def test_damaged_bytes_are_caught_and_resume_falls_back(data, run16, tmp_path):
    out = copy_run(run16, tmp_path)
    shard, offset, length = item(out / "ckpt_0000016", "model.tok_emb.weight")
    flip(shard, offset + length // 2)  # inside the tensor's bytes
    stored = {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in stored_shapes(out / "ckpt_0000016").items()}
    load_tensors(out / "ckpt_0000016", {"model": stored})  # DCP alone takes the damage for weights
    intact = load_checkpoint(run16[0] / "ckpt_0000016")["model"]["tok_emb.weight"]
    assert not torch.equal(stored["tok_emb.weight"], intact)
    flip(out / "ckpt_0000012" / ".metadata", os.path.getsize(out / "ckpt_0000012" / ".metadata") // 2)
    flip(out / "ckpt_0000008" / "meta.pt", os.path.getsize(out / "ckpt_0000008" / "meta.pt") // 2)
    said = resume(out, data)
    skipped = [s for s in said if "trying an older checkpoint" in s]
    assert len(skipped) == 3
    for s, (ckpt, name) in zip(skipped, [(16, "__0_0.distcp"), (12, ".metadata"), (8, "meta.pt")]):
        assert f"ckpt_{ckpt:07d} is corrupt: {name} does not match the checksum" in s, s
    assert any(s.startswith("resuming from") and "ckpt_0000004" in s for s in said)
    assert_same(losses(out), run16[1])


def test_unreadable_tensors_without_checksums_fall_back_at_load(data, run16, tmp_path):
    out = copy_run(run16, tmp_path)
    for ckpt in list_checkpoints(out):
        as_before_checksums(ckpt)
    shard, offset, length = item(out / "ckpt_0000016", "model.tok_emb.weight")
    with open(shard, "rb") as f:
        f.seek(offset)
        record = f.read(length)
    flip(shard, offset + record.find(b"PK\x01\x02") + 8, 1)  # a zip directory entry now claims encryption
    said = resume(out, data)
    assert any("ckpt_0000016" in s and "encryption" in s and "trying an older checkpoint" in s for s in said), said
    assert any(s.startswith("resuming from") and "ckpt_0000012" in s for s in said)
    assert_same(losses(out), run16[1])


# ----------------------------------------------------------------------------------------------------------
# a run blowing up

def test_blow_up_keeps_the_best_checkpoint_and_flags_the_rise(data, run16, tmp_path):
    out = copy_run(run16, tmp_path)
    said = []
    with pytest.raises(TrainingDiverged) as stop:  # the learning rate raised far too high, and no clipping
        train.main(parse_args(RUN + [f"--dataset={data}", f"--out_dir={out}", "--init_from=resume", "--max_iters=60",
                                     "--learning_rate=30", "--lr_schedule=constant", "--grad_clip=0",
                                     "--keep_last_n_checkpoints=1"]), log=said.append)
    doc = run_log(out)
    val = {e["iter"]: e["val_loss"] for e in doc["evals"] if e["iter"] > 0}  # each of these was checkpointed
    best = min(val, key=val.get)
    limit = val[best] + max(0.5, 0.25 * val[best])
    risen = [i for i in sorted(val) if i > best and val[i] > limit]
    assert risen and all(val[i] < 1e30 for i in risen)  # a finite blow-up came before the NaN
    newest = max(val)
    assert ckpt_iters(out) == [best, newest]  # keep_last_n_checkpoints=1, and the best
    assert load_checkpoint(list_checkpoints(out)[0])["val_loss"] == val[best]
    assert f"ckpt_{newest:07d} (val loss {val[newest]:.4f})" in str(stop.value)
    assert f"the best {out}/ckpt_{best:07d} (val loss {val[best]:.4f})" in str(stop.value)
    flag = next(h for h in doc["health"] if h["kind"] == "val_loss_rising")
    assert flag["iter"] == risen[0] and flag["best_val_loss"] == val[best]
    assert any(f"health warning at iter {risen[0]}: val loss" in s for s in said)


def launch(cmd, timeout=300):
    """(exit code, output) of a torchrun job; a job that hangs is killed whole, its workers included."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise


@pytest.mark.distributed
@pytest.mark.slow
def test_ranks_share_the_checking_and_take_the_same_checkpoint(data, tmp_path):
    """Under torchrun each rank checks a share of the shards: only rank 1 reads the damaged one, and both ranks must
    still leave the newest checkpoint aside together."""
    layout = ["--gradient_accumulation_steps=2", "--batch_size=2", f"--dataset={data}"]
    ref = tmp_path / "ref"
    train.main(parse_args(RUN + layout + [f"--out_dir={ref}", "--max_iters=12"]), log=lambda *a: None)
    out = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                os.path.join(ROOT, "train.py"), *RUN, *layout, f"--out_dir={out}"]
    code, said = launch([*torchrun, "--max_iters=8"])
    assert code == 0, said[-3000:]
    md = pickle.load(open(out / "ckpt_0000008" / ".metadata", "rb"))
    key = next(i.fqn for i, s in md.storage_data.items() if s.relative_path == "__1_0.distcp")
    shard, offset, length = item(out / "ckpt_0000008", key)
    flip(shard, offset + length // 2)
    code, said = launch([*torchrun, "--max_iters=12", "--init_from=resume"])
    assert code == 0, said[-3000:]
    assert "ckpt_0000008 is corrupt: __1_0.distcp does not match the checksum" in said
    assert re.search(r"resuming from \S+ckpt_0000004", said)
    want, got = losses(ref), losses(out)
    assert sorted(want) == sorted(got) and all(abs(want[i] - got[i]) < 1e-5 for i in want)
