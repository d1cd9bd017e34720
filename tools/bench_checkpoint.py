"""What checksumming costs a checkpoint save: engine.checkpoint.save_checkpoint (CRC-32 of every file as it is
written, torch's own per-record CRC-32 off) against a plain DCP save of the same tensors plus torch.save of the
meta (what a save cost before checksums), both fsynced; then the time to check every file of a checkpoint on load.

    python tools/bench_checkpoint.py --out=/tmp/bench_ckpt --repeats=10

Model and AdamW state in float32, one CPU thread; contestants alternate (A B B A ...); medians.
"""
import argparse
import os
import shutil
import statistics
import time
import warnings

import torch
import torch.distributed.checkpoint as dcp

from engine import checkpoint as C
from model import GPT, ModelConfig


def plain_save(tensors, meta, out_dir, iteration):
    path = C.checkpoint_path(out_dir, iteration)
    os.makedirs(path)
    dcp.save(tensors, storage_writer=dcp.FileSystemWriter(path, sync_files=True))
    with open(os.path.join(path, C.META), "wb") as f:
        torch.save(meta, f)
        f.flush()
        os.fsync(f.fileno())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="/tmp/bench_ckpt", help="scratch folder (emptied); put it on the disk to measure")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--n_layer", type=int, default=6)
    ap.add_argument("--n_embd", type=int, default=512)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    model = GPT(ModelConfig(n_layer=args.n_layer, n_head=8, n_embd=args.n_embd, block_size=256, vocab_size=32768))
    opt = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    tensors = {"model": model.state_dict(), "optim": dict(opt.state_dict()["state"])}
    meta = {"iter_num": 1, "model_config": {}, "rng": {"torch": [torch.get_rng_state()]}}
    nbytes = sum(t.numel() * t.element_size() for d in (tensors["model"], *tensors["optim"].values())
                 for t in d.values())
    contestants = {"plain DCP": plain_save, "with checksums": C.save_checkpoint}
    times = {k: [] for k in contestants}
    shutil.rmtree(args.out, ignore_errors=True)
    for name, fn in contestants.items():  # warm-up
        fn(tensors, meta, os.path.join(args.out, "warm", name.replace(" ", "_")), 1)
    for r in range(args.repeats):
        for name in (list(contestants) if r % 2 == 0 else list(contestants)[::-1]):
            folder = os.path.join(args.out, str(r))
            t = time.perf_counter()
            contestants[name](tensors, meta, folder, 1)
            times[name].append(time.perf_counter() - t)
            shutil.rmtree(folder)
    C.save_checkpoint(tensors, meta, os.path.join(args.out, "v"), 1)
    checks = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        C.verify(C.checkpoint_path(os.path.join(args.out, "v"), 1))
        checks.append(time.perf_counter() - t)
    shutil.rmtree(args.out)
    base = statistics.median(times["plain DCP"])
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {nbytes / 1e6:.0f} MB of tensors "
          f"in {args.out}, torch {torch.__version__}, {args.repeats} repeats")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"  save {name:15s} median {m * 1000:7.0f} ms  {m / base:.2f}x")
    print(f"  check every file on load: median {statistics.median(checks) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
