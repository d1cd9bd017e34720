import math

import pytest

from engine.config import FIELDS, ConfigError, help_text, parse_args
from engine.optim import lr_at


def test_files_then_overrides_left_to_right(tmp_path):
    a = tmp_path / "a.py"
    a.write_text("batch_size = 8\nlearning_rate = 1e-3\nimport math\n_private = 3\ndef helper():\n    pass\n")
    b = tmp_path / "b.py"
    b.write_text("batch_size = 16\n")
    cfg = parse_args([str(a), "--batch_size=4", str(b), "--compile=True", "--min_lr=3e-5", "--block_size=None",
                      "--preset=gpt2", "--max_iters=1e3"])
    assert cfg.batch_size == 16 and cfg.learning_rate == 1e-3 and cfg.compile is True
    assert cfg.min_lr == 3e-5 and cfg.block_size is None and cfg.preset == "gpt2" and cfg.max_iters == 1000


def test_config_file_runs_in_its_own_namespace(tmp_path):
    import train

    before = dict(vars(train))
    f = tmp_path / "c.py"
    f.write_text("_scratch = 5\nbatch_size = _scratch * 2\n")
    assert parse_args([str(f)]).batch_size == 10  # private helper names are not keys
    assert vars(train) == before
    assert parse_args([]).batch_size != 10  # nothing leaks into the next parse


@pytest.mark.parametrize("args,msg", [
    (["--batch_sise=4"], "did you mean batch_size"),
    (["--learning_rat=1e-3"], "did you mean learning_rate"),
    (["--zzz=1"], "--help"),
    (["--batch_size=four"], "batch_size='four' is not a valid int"),
    (["--batch_size=2.5"], "not a valid int"),
    (["--compile=yes"], "not a valid bool"),
    (["--learning_rate=fast"], "not a valid float"),
    (["--batch_size=None"], "batch_size=None is not allowed"),
    (["--batch_size"], "has no value"),
    (["--batch_size=0"], "batch_size must be at least 1"),
    (["--gradient_accumulation_steps=0"], "gradient_accumulation_steps must be at least 1"),
    (["--use_zero1=True", "--use_fsdp=True"], "exclusive"),
    (["--use_cuda_graphs=True", "--use_fsdp=True"], "cannot capture FSDP"),
    (["--use_cuda_graphs=True", "--objective=sft"], "static shapes"),
    (["--dtype=float64"], "dtype='float64' is not one of"),
    (["--lr_schedule=step"], "lr_schedule"),
    (["--min_lr=1", "--learning_rate=0.1"], "min_lr"),
])
def test_bad_values_name_the_problem(args, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_args(args)


def test_bad_keys_and_types_in_a_config_file(tmp_path):
    f = tmp_path / "typo.py"
    f.write_text("max_iter = 10\n")
    with pytest.raises(ConfigError, match=r"typo.py.*did you mean max_iters"):
        parse_args([str(f)])
    f.write_text("batch_size = '8'\n")
    with pytest.raises(ConfigError, match="batch_size='8' is not a valid int"):
        parse_args([str(f)])
    f.write_text("x = 1/0\n")
    with pytest.raises(ConfigError, match="ZeroDivisionError"):
        parse_args([str(f)])
    with pytest.raises(ConfigError, match="does not exist"):
        parse_args([str(tmp_path / "missing.py")])


def test_help_lists_every_key_with_default():
    text = help_text()
    lines = {line.split()[0]: line for line in text.splitlines() if line.strip().startswith("--")}
    for name, f in FIELDS.items():
        assert repr(f.default) in lines[f"--{name}"] and f.metadata["help"] in lines[f"--{name}"]


def cfg_of(**kw):
    return parse_args([f"--{k}={v}" for k, v in kw.items()])


def test_cosine_schedule_formula():
    c = cfg_of(learning_rate=1.0, min_lr=0.1, warmup_iters=10, max_iters=110, lr_schedule="cosine")
    assert lr_at(0, c) == pytest.approx(1 / 11)
    assert lr_at(9, c) == pytest.approx(10 / 11)
    for it in (10, 35, 60, 85, 109):
        want = 0.1 + 0.5 * (1 + math.cos(math.pi * (it - 10) / 100)) * 0.9
        assert lr_at(it, c) == pytest.approx(want)
    assert lr_at(60, c) == pytest.approx(0.55)
    assert lr_at(110, c) == pytest.approx(0.1) and lr_at(500, c) == pytest.approx(0.1)


def test_linear_constant_wsd_and_warmup_ratio():
    c = cfg_of(learning_rate=1.0, min_lr=0.0, warmup_iters=0, max_iters=100, lr_schedule="linear")
    assert [lr_at(i, c) for i in (0, 25, 50, 99)] == pytest.approx([1.0, 0.75, 0.5, 0.01])
    c = cfg_of(learning_rate=0.5, min_lr=0.0, warmup_iters=4, max_iters=100, lr_schedule="constant")
    assert lr_at(3, c) == pytest.approx(0.4) and lr_at(50, c) == 0.5 and lr_at(99, c) == 0.5
    c = cfg_of(learning_rate=1.0, min_lr=0.0, warmup_iters=0, max_iters=100, lr_schedule="wsd", wsd_decay_ratio=0.2)
    assert lr_at(79, c) == 1.0 and lr_at(80, c) == 1.0
    assert lr_at(90, c) == pytest.approx(0.5) and lr_at(100, c) == 0.0
    c = cfg_of(learning_rate=1.0, min_lr=0.0, warmup_ratio=0.1, max_iters=200, lr_decay_iters=100,
               lr_schedule="linear")
    assert lr_at(19, c) == pytest.approx(20 / 21)  # 20 warm-up steps
    assert lr_at(60, c) == pytest.approx(1 - 40 / 80)
    assert lr_at(150, c) == 0.0
