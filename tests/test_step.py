"""engine/step.py: the one training step that train.py runs and the benchmarks time."""
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

from engine.config import TrainConfig, parse_args
from engine.objectives import PretrainTask
from engine.optim import make_optimizer
from engine.step import forward_backward, optimizer_step
from model import GPT, ModelConfig
from tools import bench

IGNORE = -100


class MaskedTokens(PretrainTask):
    """Micro-batches whose numbers of target tokens differ, as SFT's do."""

    static_weights = False

    def __init__(self):
        pass

    def weight(self, b):
        return (b["labels"] != IGNORE).sum()


def batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for keep in (3, 20, 9):  # target tokens per micro-batch: a plain mean of the three losses would be wrong
        x = torch.randint(0, 64, (2, 12), generator=g)
        y = torch.randint(0, 64, (2, 12), generator=g)
        y.view(-1)[keep:] = IGNORE
        out.append({"input_ids": x, "labels": y})
    return out


def model_and_optimizer():
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("tiny_llama3", vocab_size=64, dropout=0.0))
    return model, make_optimizer(model, TrainConfig(learning_rate=1e-3), "cpu")


def test_the_step_is_the_token_weighted_mean_over_micro_batches():
    model, opt = model_and_optimizer()
    micro = batches()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    res = forward_backward(model, model, MaskedTokens(), micro, nullcontext(), scaler, opt, grad_clip=0.0).result()
    grads = [p.grad.clone() for p in model.parameters()]

    # the reference: one cross-entropy over every target token of the step, computed directly from the logits
    model.zero_grad()
    logits = torch.cat([model(b["input_ids"])[0] for b in micro])
    labels = torch.cat([b["labels"] for b in micro])
    ref = F.cross_entropy(logits.reshape(-1, 64).double(), labels.reshape(-1), ignore_index=IGNORE)
    ref.backward()
    assert res.loss == pytest.approx(ref.item(), abs=1e-5)
    for g, p in zip(grads, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-6)
    norm = torch.cat([g.flatten() for g in grads]).norm()
    assert res.grad_norm == pytest.approx(norm.item(), rel=1e-5)
    assert res.tokens == 3 * 2 * 12 and res.real_tokens == 3 * 2 * 12


def test_the_step_clips_and_reports_the_norm_before_clipping():
    model, opt = model_and_optimizer()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    res = forward_backward(model, model, MaskedTokens(), batches(), nullcontext(), scaler, opt, grad_clip=1e-3,
                           flags=(1, 0)).result()
    after = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()
    assert res.grad_norm > 1e-2 and after == pytest.approx(1e-3, rel=1e-4)
    assert res.flags == [1.0, 0.0]
    optimizer_step(opt, scaler)
    assert all(p.grad is None for p in model.parameters())


def test_bench_times_the_training_step(monkeypatch):
    calls = []

    def spy(model, owner, task, micro, *args, **kwargs):
        calls.append(len(micro))
        return forward_backward(model, owner, task, micro, *args, **kwargs)

    monkeypatch.setattr(bench, "forward_backward", spy)
    run = bench.Run(parse_args(["--preset=tiny_llama3", "--vocab_size=64", "--block_size=16", "--batch_size=2",
                                "--device=cpu", "--dtype=float32", "--gradient_accumulation_steps=3"]))
    run.step()
    assert calls == [3]


def test_bench_alternates_the_order_of_its_rows():
    order = []

    class Row:
        def __init__(self, name):
            self.name = name

        def step(self):
            order.append(self.name)

    bench.measure([Row("A"), Row("B")], warmup=0, iters=1, repeats=4, device="cpu")
    assert "".join(order) == "ABBAABBA"
