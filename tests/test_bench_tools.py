import pytest
import torch

from engine.config import parse_args
from tools import bench, find_batch_size
from tools.bench import TensorMemory
from tools.find_batch_size import Finder, largest_fitting

TINY = ["--preset=tiny_llama3", "--vocab_size=256", "--block_size=32", "--device=cpu", "--dtype=float32"]


def test_tensor_memory_counts_by_hand():
    with TensorMemory() as mem:
        a = torch.empty(1000)  # 4000 bytes
        b = torch.empty(500, dtype=torch.float64)  # 4000 bytes
        v = a.view(10, 100).t()  # a view: no new memory
        a.add_(1)  # in place: no new memory
        c = a + 1  # 4000 bytes
        del a, v  # a's storage lives on in neither: freed
        d = torch.empty(250)  # 1000 bytes
    assert mem.peak == 12000 and mem.largest == 4000
    assert mem.live == 9000
    del b, c
    assert mem.live == 1000  # frees are seen after the mode is left too
    del d


def test_largest_fitting_search():
    tried = []

    def fits(b):
        tried.append(b)
        return b <= 37

    assert largest_fitting(fits, 4096) == 37
    assert tried[:7] == [1, 2, 4, 8, 16, 32, 64]  # doubling, then bisection between 32 and 64
    assert len(tried) == 12
    assert largest_fitting(lambda b: True, 100) == 100  # the cap itself is tried
    assert largest_fitting(lambda b: False, 100) == 0


def test_finder_returns_the_largest_batch_under_a_cpu_limit():
    finder = Finder(parse_args(TINY), float("inf"))
    p5, p6 = finder.peak(5), finder.peak(6)
    assert 0 < p5 < p6 and finder.peak(5) == p5  # grows with the batch; repeatable
    limit_gb = (p5 + p6) / 2 / 1e9
    lines = []
    batch, found = find_batch_size.main(TINY + [f"--memory_limit_gb={limit_gb}"], out=lines.append)
    assert batch == 5
    assert found.peak(batch) <= found.limit < found.peak(batch + 1)
    assert lines[-1].startswith("largest batch: 5 (peak")
    assert any("(does not fit)" in line for line in lines)


def test_finder_refuses_cuda_graphs(capsys):
    with pytest.raises(SystemExit) as e:
        find_batch_size.main(TINY + ["--use_cuda_graphs=True"], out=lambda s: None)
    assert e.value.code == 2 and "memory pool for every batch size" in capsys.readouterr().err


def test_finder_refuses_compile_on_cpu(capsys):
    with pytest.raises(SystemExit) as e:
        find_batch_size.main(TINY + ["--compile=True"], out=lambda s: None)
    assert e.value.code == 2 and "leave out --compile=True" in capsys.readouterr().err


def test_bench_prints_a_table_per_setting():
    lines = []
    rows = bench.main(TINY + ["--batch_size=2", "--warmup=1", "--iters=2", "--repeats=1",
                              "--compare", "attention_backend=manual,sdpa", "n_layer=1,2"], out=lines.append)
    assert [r["setting"] for r in rows] == [
        "attention_backend=manual n_layer=1", "attention_backend=manual n_layer=2",
        "attention_backend=sdpa n_layer=1", "attention_backend=sdpa n_layer=2"]
    head = lines.index("| setting | ms/iter | tokens/s | MFU | peak mem GB | vs row 1 |")
    body = lines[head + 2:]
    assert len(body) == 4 and all(line.count("|") == 7 for line in body)
    assert body[0].endswith("| 1.00x |")
    for r in rows:
        assert r["ms/iter"] > 0 and r["tokens/s"] == pytest.approx(2 * 32 / (r["ms/iter"] / 1000))
        assert r["MFU"] is None  # no peak given on CPU
    assert "command: python" in lines[0] + lines[1]


def test_bench_compares_compiled_and_eager():
    rows = bench.main(TINY + ["--batch_size=2", "--warmup=1", "--iters=1", "--repeats=1", "--compare",
                              "compile=False,True"], out=lambda s: None)
    assert [r["setting"] for r in rows] == ["compile=False", "compile=True"]
    assert rows[0]["peak mem GB"] > 0 and rows[1]["peak mem GB"] is None  # not countable inside compiled graphs
    assert all(r["tokens/s"] > 0 for r in rows)


def test_bench_mfu_with_a_given_peak():
    rows = bench.main(TINY + ["--batch_size=2", "--warmup=0", "--iters=1", "--repeats=1", "--peak_flops=1e12"],
                      out=lambda s: None)
    (r,) = rows
    run_flops = bench.Run(parse_args(TINY)).flops_per_token
    assert abs(r["MFU"] - run_flops * r["tokens/s"] / 1e12) < 1e-12


def test_bench_step_trains():
    run = bench.Run(parse_args(TINY + ["--batch_size=2"]))
    before = [p.detach().clone() for p in run.model.parameters()]
    run.step()
    assert all(p.grad is None for p in run.model.parameters())
    assert all(not torch.equal(a, p) for a, p in zip(before, run.model.parameters()))


def test_vs_hf_gpt2_runs_interleaved():
    lines = []
    rows = bench.main(["--vs_hf_gpt2", "--n_layer=1", "--n_embd=32", "--n_head=2", "--block_size=16",
                       "--batch_size=2", "--vocab_size=128", "--warmup=0", "--iters=1", "--repeats=1"],
                      out=lines.append)
    assert [r["setting"] for r in rows] == ["ours, sdpa", "transformers, sdpa", "ours, manual",
                                            "transformers, eager"]
    assert lines[-1].startswith("ours/transformers tokens/s: sdpa ")


def test_loss_memory_bench_on_cpu():
    from tools import bench_loss_memory

    lines = []
    results = bench_loss_memory.main(["--vocab=3000", "--width=16", "--batch=2", "--seq=128", "--chunk_sizes=32",
                                      "--repeats=1"], out=lines.append)
    (_, plain, plain_largest, plain_loss), (_, ours, ours_largest, ours_loss) = results
    assert plain_largest == 256 * 3000 * 4 and ours_largest == 32 * 3000 * 4  # full vs one chunk of logits
    assert ours < plain / 4
    assert abs(ours_loss - plain_loss) < 1e-5
    assert lines[-2].startswith("| plain |") and lines[-1].startswith("| chunked 32 |")


def test_gpu_check_dry_run_lists_commands_that_parse():
    import os
    import shlex
    import subprocess

    from conftest import ROOT

    from engine.config import FIELDS

    res = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    heads, cmds = lines[0::2], lines[1::2]
    limits = [int(h.rsplit("at most ", 1)[1].rstrip("s)")) for h in heads]
    assert sum(limits) <= 9 * 60  # the whole within 9 minutes
    names = " ".join(heads)
    for owed in ("gpu tests", "backends x compile", "CUDA graphs", "batch finder", "1.5B step", "loss memory",
                 "muon", "memory plan vs measured"):
        assert owed in names
    own = {"--warmup", "--iters", "--repeats", "--threads", "--memory_limit_gb", "--max_batch"}
    for cmd in cmds:
        argv = shlex.split(cmd)
        if argv[1] != "tools/bench.py" and argv[1] != "tools/find_batch_size.py":
            assert argv[1] in ("-c", "-m") or os.path.exists(os.path.join(ROOT, argv[1])), cmd
            continue
        rest, compare = [], []
        for a in argv[2:]:
            if a == "--compare" or compare and "=" in a and not a.startswith("--"):
                compare.append(a)
            elif a.split("=")[0] not in own:
                rest.append(a)
        parse_args(rest)  # train.py's keys and values, as the tool will read them
        for pair in compare[1:]:  # --compare key=a,b: each value a valid setting of that key
            key, values = pair.split("=")
            assert key in FIELDS, cmd
            for v in values.split(","):
                parse_args([*rest, f"--{key}={v}"])
    assert subprocess.run(["bash", "scripts/gpu_check.sh", "--bogus"], cwd=ROOT, capture_output=True).returncode == 2
