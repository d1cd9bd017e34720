import numpy as np
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
    assert lines[-1].startswith("largest batch: 5 (per rank (ddp, world size 1)")
    assert any("(does not fit)" in line for line in lines)


# tiny_llama3 at vocab 256, by hand: the token table and the untied head 256 x 64 each, the final norm 64; a block:
# qkv (4 query + 2 x 2 key/value heads of 16) x 64, proj 64 x 64, the fused gate/up 2*176 x 64, down 64 x 176, two
# norms of 64. Every dim 0 (256, 128, 64, 352) divides by 8.
ROOT_NUMEL = 2 * 256 * 64 + 64
BLOCK_NUMEL = 128 * 64 + 64 * 64 + 352 * 64 + 64 * 176 + 2 * 64
NUMEL = ROOT_NUMEL + 2 * BLOCK_NUMEL
BY_HAND = {  # bytes the fullest rank holds beyond one process: float32 weights and gradients, AdamW's two moments
    # FSDP: a 1/W row slice of every tensor (4 + 4 + 8 bytes an element), plus the gathered float32 parameters of
    # two blocks and the root
    ("fsdp", 2): 16 * NUMEL // 2 - 16 * NUMEL + 4 * (2 * BLOCK_NUMEL + ROOT_NUMEL),
    ("fsdp", 8): 16 * NUMEL // 8 - 16 * NUMEL + 4 * (2 * BLOCK_NUMEL + ROOT_NUMEL),
    # ZeRO-1: whole weights and gradients; the moments of the tensors the greedy partition gives the fullest rank.
    # Two ranks: the matrices come in equal pairs, one each; then the five norm vectors, three to rank 0.
    ("zero1", 2): 8 * ((NUMEL - 5 * 64) // 2 + 3 * 64) - 8 * NUMEL,
    # Eight ranks: the two fused gate/up matrices (the largest) alone on ranks 0 and 1, which nothing outgrows
    # (the tables 16384 on ranks 2-3, down 11264 on 4-5, qkv 8192 + proj 4096 on 6-7, the norms on 4-5)
    ("zero1", 8): 8 * 352 * 64 - 8 * NUMEL,
}


@pytest.mark.parametrize("mode,world", list(BY_HAND))
def test_finder_corrects_each_peak_to_the_fullest_rank(mode, world):
    from engine.plan import state_bytes

    finder = Finder(parse_args(TINY + [f"--use_{mode}=True"]), float("inf"), world)
    model = finder.run.owner
    assert sum(p.numel() for p in model.parameters()) == NUMEL
    ranks = state_bytes(model, mode, world)
    gathered = 4 * (2 * BLOCK_NUMEL + ROOT_NUMEL) if mode == "fsdp" else 0
    plan = max(sum(r.values()) for r in ranks) - sum(state_bytes(model, "ddp", 1)[0].values()) + gathered
    assert finder.rank["correction"] == BY_HAND[mode, world] == plan < 0
    assert (finder.rank["mode"], finder.rank["world"]) == (mode, world)
    p = finder.peak(3)
    assert finder.per_rank(p) == p + BY_HAND[mode, world]


def test_finder_fits_a_larger_batch_on_eight_fsdp_ranks_than_on_one(monkeypatch):
    fsdp = TINY + ["--use_fsdp=True"]
    one = Finder(parse_args(fsdp), float("inf"), 1)
    assert one.rank["correction"] == 4 * (2 * BLOCK_NUMEL + ROOT_NUMEL)  # one rank: the whole state, plus gathering
    peaks = {b: one.peak(b) for b in range(1, 13)}  # one process's
    limit = peaks[6] + 1000
    found, lines = {}, {}
    for world in (1, 8):
        lines[world] = []
        found[world], finder = find_batch_size.main(fsdp + [f"--memory_limit_gb={limit / 1e9}",
                                                            f"--world_size={world}"], out=lines[world].append)
        assert finder.rank["world"] == world
        correction = BY_HAND["fsdp", 8] if world == 8 else one.rank["correction"]
        fit = [b for b, p in peaks.items() if p + correction <= limit]
        assert found[world] == max(fit) < 12
    assert found[8] > 6 > found[1] > 0
    per_rank = (peaks[found[8]] + BY_HAND["fsdp", 8]) / 1e9
    assert f"batch {found[8]:5d}: single-process peak {peaks[found[8]] / 1e9:.4g} GB, per rank (fsdp, world size 8) " \
           f"{per_rank:.4g} GB" in lines[8]
    assert lines[8][-1].startswith(f"largest batch: {found[8]} (per rank (fsdp, world size 8) {per_rank:.4g} GB")
    ddp = Finder(parse_args(TINY), float("inf"), 8).rank  # DDP's gradients are views into its buckets: no copy
    assert (ddp["mode"], ddp["correction"]) == ("ddp", 0)
    monkeypatch.setenv("WORLD_SIZE", "8")  # under torchrun the job's size is the default
    assert find_batch_size.split_argv(["--gpus=2"])[1]["world_size"] == 2
    assert find_batch_size.split_argv([])[1]["world_size"] == 8


def test_finder_compiles_each_batch_size_afresh():
    """Dynamo would recompile a second batch size with a dynamic batch dimension (and stop recompiling past its
    limit, 8): each size must get its own static graph, as the run that uses it compiles. On CPU the finder refuses
    compile (it cannot count inside compiled graphs), so the compiled step is put in by hand, with a backend that
    records what it was given and runs it eagerly."""
    finder = Finder(parse_args(TINY), float("inf"))
    graphs = []

    def record(gm, inputs):
        graphs.append(([tuple(t.shape) for t in inputs if isinstance(t, torch.Tensor) and not t.is_floating_point()],
                       any(not isinstance(t, torch.Tensor) for t in inputs)))  # sizes passed as symbols
        return gm.forward

    finder.compiled, finder.run.forward = True, torch.compile(finder.run.owner, backend=record)
    sizes = list(range(2, 13))
    try:
        for b in sizes:
            finder.peak(b)
    finally:  # counting the last step under TensorMemory (a dispatch mode) stops later compiles of GPT.forward
        torch._dynamo.reset()
    assert [shapes for shapes, _ in graphs] == [[(b, 32), (b, 32)] for b in sizes]
    assert not any(symbolic for _, symbolic in graphs)


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


# issue 21's order: data, versions, the flash probe, the GPU tests, the loop's CUDA paths, the 1.5B loss, GPT-2
# compiled with and without CUDA graphs, the real loop against bench, one FSDP step; then what else fits in 540 s
GPU_CHECK_ORDER = ["synthetic data", "versions", "sdpa flash probe", "gpu tests", "loop: compile", "loop: CUDA graphs",
                   "loop: fp16 + GradScaler", "llama3 1.5B loss chunk 0 vs 1024", "gpt2 124M compile vs CUDA graphs",
                   "loop vs bench tokens/s", "FSDP step (torchrun, 1 GPU)"]
OWN_OPTIONS = {  # options the tools read themselves, beside train.py's keys
    "tools/bench.py": {"--warmup", "--iters", "--repeats", "--threads"},
    "tools/find_batch_size.py": {"--memory_limit_gb", "--max_batch", "--world_size", "--gpus"},
    "scripts/loop_vs_bench.py": {"--iters"},
}


def test_gpu_check_dry_run_lists_commands_that_parse(tmp_path):
    import os
    import shlex
    import subprocess

    from conftest import ROOT

    from engine.config import FIELDS
    from scripts.make_synthetic_data import VOCABS

    res = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, env={**os.environ, "GPU_CHECK_DIR": str(tmp_path)})
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    heads, cmds = lines[0::2], lines[1::2]
    names = [h[2:].rsplit(" (at most ", 1)[0] for h in heads]
    limits = [int(h.rsplit("at most ", 1)[1].rstrip("s)")) for h in heads]
    assert sum(limits) <= 9 * 60  # the whole within 9 minutes
    assert names[:len(GPU_CHECK_ORDER)] == GPU_CHECK_ORDER
    assert "qwen3 loss memory" in names[len(GPU_CHECK_ORDER):]
    step = dict(zip(names, cmds))
    data = str(tmp_path / "data")
    assert shlex.split(step["synthetic data"])[1:] == ["scripts/make_synthetic_data.py", data]
    for name, cmd in step.items():
        argv = shlex.split(cmd)
        env = [a for a in argv if "=" in a and a.split("=")[0].isupper()]
        argv = argv[len(env):]
        if name.startswith("loop: "):  # the loop's CUDA paths, with dynamo's graph breaks and recompiles logged
            assert env == ["TORCH_LOGS=graph_breaks,recompiles"], cmd
        if argv[1] == "-c" or argv[1:3] == ["-m", "pytest"]:
            continue
        script = next(a for a in argv if a.endswith(".py"))
        assert os.path.exists(os.path.join(ROOT, script)), cmd
        if script not in ("train.py", *OWN_OPTIONS):
            continue
        rest, compare = [], []
        for a in argv[argv.index(script) + 1:]:
            if a == "--compare" or compare and "=" in a and not a.startswith("--"):
                compare.append(a)
            elif a.split("=")[0] not in OWN_OPTIONS.get(script, ()):
                rest.append(a)
        cfg = parse_args(rest)  # train.py's keys and values, as the tool will read them
        for pair in compare[1:]:  # --compare key=a,b: each value a valid setting of that key
            key, values = pair.split("=")
            assert key in FIELDS, cmd
            for v in values.split(","):
                parse_args([*rest, f"--{key}={v}"])
        if any(a.startswith("--dataset=") for a in rest):  # the bins step 0 writes
            assert os.path.dirname(cfg.dataset) == data and os.path.basename(cfg.dataset) in VOCABS, cmd
    paths = {n: parse_args(shlex.split(c)[shlex.split(c).index("train.py") + 1:])
             for n, c in step.items() if "train.py" in shlex.split(c)}
    assert paths["loop: compile"].compile and paths["loop: CUDA graphs"].use_cuda_graphs
    assert paths["loop: fp16 + GradScaler"].dtype == "float16"
    fsdp = paths["FSDP step (torchrun, 1 GPU)"]
    assert fsdp.use_fsdp and fsdp.dtype == "bfloat16" and fsdp.device == "cuda"  # FSDP's bf16 policy, on NCCL
    assert " -m torch.distributed.run --standalone --nproc_per_node=1 train.py " in step["FSDP step (torchrun, 1 GPU)"]
    assert all(p.device == "cuda" for p in paths.values())
    # the plain loss against the config's own
    default = parse_args([os.path.join(ROOT, "config", "full_llama3_1.5b_optimal.py")]).loss_chunk_size
    assert f"--compare loss_chunk_size=0,{default}" in step[f"llama3 1.5B loss chunk 0 vs {default}"]
    assert "--compare use_cuda_graphs=False,True" in step["gpt2 124M compile vs CUDA graphs"]
    assert subprocess.run(["bash", "scripts/gpu_check.sh", "--bogus"], cwd=ROOT, capture_output=True).returncode == 2


def test_synthetic_data_trains_both_vocabularies(tmp_path):
    import os

    from conftest import ROOT

    import train
    from engine.data.bins import TokenDataset
    from scripts.make_synthetic_data import VOCABS, main

    assert main([str(tmp_path), "--tokens=3000", "--val_tokens=600"], out=lambda s: None) == 0
    for name, vocab in VOCABS.items():
        d = TokenDataset(str(tmp_path / name), vocab_limit=vocab)  # also checks every id is below vocab
        assert (d.vocab_size, d.dtype) == (vocab, np.uint16 if vocab < 65536 else np.uint32)
        assert [len(d.splits[s][0]) for s in ("train", "val")] == [3000, 600]
        assert d.token_bytes is None  # the ids stand for no text: no bits per byte
    cfg = parse_args([os.path.join(ROOT, "config", "smoke.py"), "--preset=tiny_llama3",
                      f"--dataset={tmp_path / 'llama3'}", f"--out_dir={tmp_path / 'o'}", "--dtype=float32",
                      "--block_size=32", "--batch_size=2", "--max_iters=2", "--eval_interval=2", "--eval_iters=1"])
    assert train.main(cfg, log=lambda *a: None)["final"]["val"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without CUDA gets")
def test_sdpa_probe_needs_cuda(capsys):
    from tools import sdpa_probe

    assert sdpa_probe.main() == 2
    assert "needs CUDA" in capsys.readouterr().err
