"""optimizer=muon: torch.optim.Muon on the blocks' 2-D weights and AdamW on the rest, through train.py, against
torch's own optimizers applied by hand; which parameter goes where, per family; exact resume; 2 gloo ranks."""
import pytest
import torch
from conftest import logged_losses, run_log
from test_distributed import close, launch, ok
from test_train import TINY

import train
from engine.checkpoint import list_checkpoints, load_checkpoint
from engine.config import ConfigError, TrainConfig, parse_args
from engine.data.bins import BatchSampler, TokenDataset
from engine.optim import describe, lr_at, make_optimizer, muon_names
from model import GPT, ModelConfig

MUON = ["--optimizer=muon", "--muon_lr=0.03", "--muon_momentum=0.9", "--muon_weight_decay=0.05"]


def train_run(dataset, out_dir, *extra):
    lines = []
    cfg = parse_args(TINY + [f"--dataset={dataset}", f"--out_dir={out_dir}", *MUON, *extra])
    return train.main(cfg, log=lines.append), cfg, lines


@pytest.mark.parametrize("preset", ["tiny_gpt2", "tiny_llama", "tiny_llama3", "tiny_qwen3"])
def test_block_matrices_go_to_muon_and_the_rest_to_adamw(preset):
    model = GPT(ModelConfig.from_preset(preset, vocab_size=64))
    n = model.config.n_layer
    want = {f"blocks.{i}.{m}" for i in range(n) for m in ("attn.qkv.weight", "attn.proj.weight", "mlp.fc.weight",
                                                          "mlp.proj.weight")}
    assert set(muon_names(model)) == want
    opt = make_optimizer(model, TrainConfig(optimizer="muon", learning_rate=1e-3, muon_lr=0.02), "cpu")
    muon, adam = opt.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adam, torch.optim.AdamW)
    names = {p: k for k, p in model.named_parameters()}
    assert {names[p] for g in muon.param_groups for p in g["params"]} == want
    rest = {names[p] for g in adam.param_groups for p in g["params"]}
    assert rest == set(names.values()) - want and "tok_emb.weight" in rest
    assert ("lm_head.weight" in rest) == (not model.config.tie_embeddings)  # the output head stays on AdamW
    decayed = {names[p] for p in adam.param_groups[0]["params"]}  # embeddings and head decay, vectors do not
    assert all(model.get_parameter(k).dim() == 2 for k in decayed) and all(
        model.get_parameter(k).dim() == 1 for k in rest - decayed)
    assert [g["lr_ratio"] for g in opt.param_groups] == [20.0, 1.0, 1.0]
    line = describe(model, opt)
    assert line.startswith(f"optimizer: Muon on {4 * n} block matrices") and "AdamW on" in line
    assert describe(model, make_optimizer(model, TrainConfig(), "cpu")) is None


def test_one_step_equals_torch_muon_and_adamw_by_hand(dataset, tmp_path):
    res, cfg, lines = train_run(dataset, tmp_path / "o", "--max_iters=1", "--eval_interval=1", "--grad_clip=0")
    assert any(line.startswith("optimizer: Muon on 8 block matrices") for line in lines)
    after = load_checkpoint(list_checkpoints(tmp_path / "o")[-1])["model"]

    torch.manual_seed(cfg.seed)  # the initial model the run built, and the gradient of its one step
    model = GPT(train.model_config(cfg, 61, "sdpa"))
    x, y = BatchSampler(TokenDataset(dataset), cfg.batch_size, 32, cfg.seed).batch("train", 0, 0)
    model(x, y)[1].backward()
    lr = lr_at(0, cfg)
    for name, p in model.named_parameters():
        w = p.detach().clone().requires_grad_()
        w.grad = p.grad.clone()
        if name in muon_names(model):
            opt = torch.optim.Muon([w], lr=lr * cfg.muon_lr / cfg.learning_rate, momentum=cfg.muon_momentum,
                                   weight_decay=cfg.muon_weight_decay)
        else:
            opt = torch.optim.AdamW([w], lr=lr, betas=(cfg.beta1, cfg.beta2),
                                    weight_decay=cfg.weight_decay if p.dim() >= 2 else 0.0)
        opt.step()
        torch.testing.assert_close(after[name], w.detach(), atol=2e-6, rtol=1e-5, msg=name)
        assert not torch.equal(after[name], p.detach()), name  # every tensor moved
    matrix = "blocks.0.attn.qkv.weight"  # and Muon's update is not AdamW's
    adam_w = dict(model.named_parameters())[matrix].detach().clone().requires_grad_()
    adam_w.grad = dict(model.named_parameters())[matrix].grad.clone()
    torch.optim.AdamW([adam_w], lr=lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay).step()
    assert (after[matrix] - adam_w).abs().max() > 1e-3


def test_muon_resumes_exactly(dataset, tmp_path):
    common = ["--lr_decay_iters=12", "--eval_interval=6", "--gradient_accumulation_steps=2"]
    full, _, _ = train_run(dataset, tmp_path / "full", "--max_iters=12", *common)
    train_run(dataset, tmp_path / "half", "--max_iters=6", *common)
    resumed, _, _ = train_run(dataset, tmp_path / "half", "--max_iters=12", "--init_from=resume", *common)
    a, b = logged_losses(tmp_path / "full"), logged_losses(tmp_path / "half")
    assert sorted(a) == sorted(b) == list(range(1, 13))
    assert all(a[i] == b[i] for i in a), (a, b)  # bit-identical: Muon's momentum came back with the weights
    state = load_checkpoint(list_checkpoints(tmp_path / "half")[-1])
    assert state["config"]["optimizer"] == "muon"


def test_muon_under_fsdp_is_refused_with_the_reason(dataset, tmp_path):
    with pytest.raises(ConfigError, match="optimizer=muon needs each block matrix whole.*use_zero1=True"):
        parse_args(TINY + [f"--dataset={dataset}", "--optimizer=muon", "--use_fsdp=True"])
    with pytest.raises(ConfigError, match="optimizer='mu0n' is not one of adamw, muon"):
        parse_args(TINY + [f"--dataset={dataset}", "--optimizer=mu0n"])


@pytest.mark.distributed
@pytest.mark.slow
def test_zero1_one_process_and_ddp_resume_into_each_other(tmp_path, tmp_path_factory):
    from conftest import write_dataset

    data = write_dataset(str(tmp_path_factory.mktemp("muon") / "data"))
    common = ["--eval_interval=3", "--lr_decay_iters=9", *MUON]
    ok(launch(0, tmp_path / "one", data, "--max_iters=9", *common))
    # ZeRO-1 on 2 ranks (each steps whole matrices of its share), then one process, then DDP on 2 ranks: each
    # resumes the other's checkpoint, Muon's momentum resharded by parameter name
    ok(launch(2, tmp_path / "mixed", data, "--max_iters=3", "--use_zero1=True", *common))
    ok(launch(0, tmp_path / "mixed", data, "--max_iters=6", "--init_from=resume", *common))
    ok(launch(2, tmp_path / "mixed", data, "--max_iters=9", "--init_from=resume", *common))
    # torch's Muon orthogonalises in bfloat16, where the last-bit differences of a 2-rank gradient sum can round
    # differently: a few 1e-5 apart here, against 1e-5 for AdamW (a rank skipping its share of the update, or a lost
    # momentum, is off by 2e-3 or more)
    close(logged_losses(tmp_path / "one"), logged_losses(tmp_path / "mixed"), tol=2e-4)
    assert [r["iter"] for r in run_log(tmp_path / "mixed")["environment"]["resumes"]] == [3, 6]
