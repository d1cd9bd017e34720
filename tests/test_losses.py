import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from engine.losses import chunked_cross_entropy


def problem(N=100, C=24, V=300, dtype=torch.float32, seed=0):
    """Hidden states, an output projection and targets with every fifth one ignored."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, C, generator=g, dtype=dtype).requires_grad_()
    w = (torch.randn(V, C, generator=g, dtype=dtype) * 0.3).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    t[::5] = -100
    return h, w, t


def reference(h, w, t):
    """Plain cross-entropy on the full logits: (loss, grad hidden, grad weight)."""
    loss = F.cross_entropy((h @ w.T).float() if h.dtype != torch.float64 else h @ w.T, t, ignore_index=-100)
    return (loss, *torch.autograd.grad(loss, (h, w)))


def chunked(h, w, t, chunk_size):
    loss = chunked_cross_entropy(h, w, t, chunk_size=chunk_size)
    return (loss, *torch.autograd.grad(loss, (h, w)))


@pytest.mark.parametrize("chunk_size", [1, 7, 32, 100, 128, 4096])  # 7 and 32 do not divide N=100
def test_equals_cross_entropy_float32(chunk_size):
    h, w, t = problem()
    got, want = chunked(h, w, t, chunk_size), reference(h, w, t)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # against float64 on the same numbers: float32 rounding only
    want64 = reference(*(x.detach().double().requires_grad_() for x in (h, w)), t)
    for a, b in zip(got, want64):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [9, 50])
def test_float64_exact_and_gradcheck(chunk_size):
    h, w, t = problem(N=50, C=8, V=40, dtype=torch.float64)
    for a, b in zip(chunked(h, w, t, chunk_size), reference(h, w, t)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda h, w: chunked_cross_entropy(h, w, t, chunk_size=chunk_size), (h, w))


def test_mean_is_over_non_ignored_targets_by_hand():
    h = torch.zeros(3, 2, requires_grad=True)  # all logits 0: each valid row costs log(V)
    w = torch.ones(4, 2, requires_grad=True)
    t = torch.tensor([1, -100, 3])
    loss = chunked_cross_entropy(h, w, t, chunk_size=2)
    assert loss.item() == pytest.approx(torch.log(torch.tensor(4.0)).item(), abs=1e-7)
    loss.backward()
    assert h.grad[1].abs().sum() == 0  # the ignored row gets no gradient


def test_all_ignored_gives_zero_not_nan():
    h, w, t = problem(N=10)
    t[:] = -100
    assert torch.isnan(F.cross_entropy(h @ w.T, t))  # the plain loss divides 0 by 0; ours is documented to differ
    loss, gh, gw = chunked(h, w, t, 4)
    assert loss.item() == 0.0
    assert gh.abs().sum() == 0 and gw.abs().sum() == 0


def test_weight_without_grad_and_custom_ignore_index():
    h, w, t = problem(N=20)
    t[t == -100] = 7  # now 7 is the ignored id
    loss = chunked_cross_entropy(h, w.detach(), t, chunk_size=6, ignore_index=7)
    (gh,) = torch.autograd.grad(loss, h)
    want = F.cross_entropy(h @ w.T, t, ignore_index=7)
    torch.testing.assert_close(loss, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(gh, torch.autograd.grad(want, h)[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("backward_in_autocast", [False, True])
def test_autocast_bfloat16_cpu(backward_in_autocast):
    # the plain path under autocast: bfloat16 logits from the Linear, then softmax in float32
    h, w, t = problem(N=64, C=32, V=200)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = F.cross_entropy(F.linear(h, w).float(), t)
        loss = chunked_cross_entropy(h, w, t, chunk_size=24)
        if backward_in_autocast:
            got_grads = torch.autograd.grad(loss, (h, w))
    if not backward_in_autocast:  # as train.py does: backward after leaving the autocast block
        got_grads = torch.autograd.grad(loss, (h, w))
    want_grads = torch.autograd.grad(want, (h, w))
    assert loss.dtype == torch.float32 and all(g.dtype == torch.float32 for g in got_grads)
    torch.testing.assert_close(loss, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_grads[0], want_grads[0], rtol=0, atol=1e-5)
    # the plain path rounds the whole weight gradient to bfloat16 once; ours sums chunks in float32
    torch.testing.assert_close(got_grads[1], want_grads[1], rtol=0, atol=1e-3)
    # and the bfloat16 rounding is really there: float32 logits give another loss
    assert (loss - F.cross_entropy(h @ w.T, t)).abs() > 1e-4


class LargestOutput(TorchDispatchMode):
    """Records the largest number of elements of any tensor an aten op returns."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in tree_flatten(out)[0]:
            if isinstance(x, torch.Tensor):
                self.numel = max(self.numel, x.numel())
        return out


def test_never_materialises_the_full_logits():
    N, C, V, chunk = 512, 16, 1000, 64
    h, w, t = problem(N=N, C=C, V=V)
    with LargestOutput() as plain:
        F.cross_entropy(h @ w.T, t).backward()
    assert plain.numel >= N * V  # the counter sees the full logits when they exist
    h.grad = w.grad = None
    with LargestOutput() as ours:
        chunked_cross_entropy(h, w, t, chunk_size=chunk).backward()
    assert ours.numel == chunk * V  # one chunk's logits is the largest tensor, forward and backward
    assert h.grad is not None and w.grad is not None


def test_one_chunk_of_logits_is_alive_at_a_time():
    """The previous chunk's logits (softmax in backward) are freed before the next chunk's are made: the peak is
    one chunk's, which engine/plan.py's loss estimate counts (two chunks' alive doubled it)."""
    from tools.bench import TensorMemory

    N, C, V, chunk = 512, 16, 1000, 64
    h, w, t = problem(N=N, C=C, V=V)
    with TensorMemory() as mem:
        loss = chunked_cross_entropy(h, w, t, chunk_size=chunk)
        forward = mem.peak
        loss.backward()
    one = chunk * V * 4  # one chunk's float32 logits
    assert one <= forward < 1.5 * one
    assert mem.peak < 1.5 * one + 4 * V * C + 4 * N * C  # and the weight's and the hidden states' gradients


@pytest.mark.parametrize("autocast", [False, True])
def test_compiled_keeps_no_logits_for_backward(autocast):
    """Under torch.compile the chunk loops are opaque operators: the compiler cannot keep forward's chunk logits
    for backward (traced as plain ops, it kept all of them), and the numbers stay those of eager."""
    N, C, V, chunk = 512, 16, 1000, 64
    h, w, t = problem(N=N, C=C, V=V)
    loss_fn = torch.compile(lambda h, w, t: chunked_cross_entropy(h, w, t, chunk_size=chunk), backend="aot_eager",
                            fullgraph=True)
    saved = []

    def pack(x):
        saved.append(x.numel())
        return x

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            loss = loss_fn(h, w, t)
        want = chunked_cross_entropy(h, w, t, chunk_size=chunk)
    got = (loss, *torch.autograd.grad(loss, (h, w)))
    assert saved and max(saved) <= V * C  # the weight is the largest; one chunk's logits would be 64,000
    for a, b in zip(got, (want, *torch.autograd.grad(want, (h, w)))):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_rejects_bad_shapes():
    h, w, t = problem(N=8)
    with pytest.raises(ValueError, match="weight"):
        chunked_cross_entropy(h, w.T, t)
    with pytest.raises(ValueError, match="targets"):
        chunked_cross_entropy(h, w, t[:4])
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_cross_entropy(h, w, t, chunk_size=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bfloat16_autocast_matches_plain():
    h, w, t = (x.cuda() for x in problem(N=1000, C=64, V=5000))
    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want = F.cross_entropy(F.linear(h, w).float(), t)
        loss = chunked_cross_entropy(h, w, t, chunk_size=300)
    torch.testing.assert_close(loss, want, rtol=0, atol=2e-3)
    for a, b in zip(torch.autograd.grad(loss, (h, w)), torch.autograd.grad(want, (h, w))):
        torch.testing.assert_close(a, b, rtol=0.02, atol=0.01 * b.abs().max().item())  # bf16 rounding only
