import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import engine.losses
from engine.losses import _add_matmul, chunked_cross_entropy


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


@pytest.mark.parametrize("autocast", [False, True])
def test_rows_of_a_chunk_in_float32_blocks(monkeypatch, autocast):
    """A chunk's float32 work goes FLOAT32_ROWS rows at a time (7 here: blocks of 7 and a last shorter one)."""
    monkeypatch.setattr(engine.losses, "FLOAT32_ROWS", 7)
    h, w, t = problem()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        want = reference(h, w, t)
        for chunk_size in (32, 100):
            got = chunked(h, w, t, chunk_size)
            # (under autocast the plain path rounds the whole weight gradient to bfloat16 once, as in the test above)
            for a, b, atol in zip(got, want, (1e-5, 1e-5, 1e-3) if autocast else (1e-6,) * 3):
                torch.testing.assert_close(a, b, rtol=0, atol=atol)


def test_confident_targets_keep_their_gradient_in_bfloat16():
    """Where the target's probability p is near 1, its logit's gradient p - 1 is small: computed from p rounded to
    bfloat16 it would be 0 or -2^-8. The plain path computes it in float32 and rounds it once; so does ours."""
    h, w, t = problem(N=64, C=32, V=200)
    with torch.no_grad():
        w *= 4
        t = (h @ w.T).argmax(dim=1)
        t[::5] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = F.linear(h, w).float()
        want = F.cross_entropy(logits, t)
        loss = chunked_cross_entropy(h, w, t, chunk_size=24)
    assert logits.softmax(dim=1).max() > 0.9999
    got_grads, want_grads = torch.autograd.grad(loss, (h, w)), torch.autograd.grad(want, (h, w))
    torch.testing.assert_close(got_grads[0], want_grads[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(got_grads[1], want_grads[1], rtol=0, atol=1e-3)


@pytest.mark.parametrize("factor", [-3.0, 0.0])
def test_gradient_of_a_negative_or_zero_multiple(factor):
    """The backward takes the incoming gradient's size into the exponent and its sign onto the (n, C) operands."""
    h, w, t = problem()
    for dtype in (torch.float32, torch.bfloat16):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            got = torch.autograd.grad(factor * chunked_cross_entropy(h, w, t, chunk_size=32), (h, w))
            want = torch.autograd.grad(factor * F.cross_entropy((h @ w.T).float(), t), (h, w))
        for a, b, atol in zip(got, want, (1e-6, 1e-6) if dtype == torch.float32 else (3e-5, 3e-3)):
            torch.testing.assert_close(a, b, rtol=0, atol=atol)
        assert factor != 0 or all(g.abs().sum() == 0 for g in got)


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                         reason="needs CUDA")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_matmul_adds_into_the_float32_sum(device, dtype):
    """acc += a @ b in place, float32 acc, a and b in dtype (on CUDA with bfloat16: addmm with out_dtype)."""
    g = torch.Generator().manual_seed(0)
    acc = torch.randn(40, 24, generator=g).to(device)
    a, b = (torch.randn(*shape, generator=g).to(device, dtype) for shape in ((40, 32), (32, 24)))
    want = acc.double() + a.double() @ b.double()
    ptr = acc.data_ptr()
    _add_matmul(acc, a, b)
    assert acc.dtype == torch.float32 and acc.data_ptr() == ptr
    # a bfloat16 partial (the CPU's) rounds the product to 8 bits; the float32 sum, and CUDA's, keep 24
    torch.testing.assert_close(acc.double(), want, rtol=0, atol=1e-4 if dtype == torch.float32 else 0.1)


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


def test_bfloat16_holds_the_chunk_in_16_bits_and_float32_rows_at_a_time():
    """Under bfloat16 autocast a chunk's logits and then its gradient are one 16-bit (n, V) buffer, beside float32
    work on FLOAT32_ROWS rows at a time, where a float32 copy of the whole chunk was (6 bytes a logit, 8 inside
    logsumexp). Beside those: the weight's 16-bit copy and float32 gradient, the CPU's 16-bit partial of it, and
    the hidden states' gradient."""
    from tools.bench import TensorMemory

    N, C, V = 1024, 16, 1000
    chunk, rows = 1024, engine.losses.FLOAT32_ROWS
    h, w, t = problem(N=N, C=C, V=V)
    with TensorMemory() as mem:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = chunked_cross_entropy(h, w, t, chunk_size=chunk)
        forward = mem.peak
        loss.backward()
    logits, f32_rows = 2 * chunk * V, 4 * rows * V
    assert logits + f32_rows <= forward < logits + f32_rows + 2 * V * C + 64 * N
    assert mem.peak < logits + f32_rows + 8 * V * C + 4 * N * C + 64 * N


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


def test_bytes_moved_counts_operands_once_by_hand():
    from tools.bench_loss_memory import BytesMoved

    a, b, c = torch.ones(10), torch.ones(10), torch.empty(10)
    x, idx, rows = torch.ones(4, 10), torch.tensor([[1], [2], [3], [4]]), torch.arange(4)
    cases = [
        (lambda: a + b, 3 * 40),  # two read, one written
        (lambda: c.add_(a), 3 * 40),  # in place: c read and written
        (lambda: torch.mul(a, b, out=c), 3 * 40),  # out= is written, not read
        (lambda: (x.view(10, 4), x.t(), x[1:3], x[:, 0], a.expand(3, 10), x.detach()), 0),  # views move nothing
        (lambda: c.copy_(a.bfloat16()), (40 + 20) + (20 + 40)),  # the cast, then a copy that does not read c
        (lambda: a.bfloat16() - b, (40 + 20) + (20 + 40 + 40)),  # 16 bits and float32 into float32 in one pass
        (lambda: x.gather(1, idx), 4 * 8 + 2 * 4 * 4),  # the index, and the four elements it names
        (lambda: x.index_put_((rows, rows), b[:4]), 2 * 4 * 8 + 16 + 2 * 4 * 4),
        (lambda: torch.logsumexp(x, 1), 6 * 160 + 16),  # amax, sub, exp_, sum inside the kernel
    ]
    for op, want in cases:
        with BytesMoved() as moved:
            op()
        assert moved.bytes == want


def test_moves_fewer_bytes_per_logit_than_its_previous_version():
    """Bytes moved per logit element, forward and backward, fitted over small shapes (tools/bench_loss_memory.py
    --compare runs the same at a larger shape, with time and memory)."""
    from tools.bench_loss_memory import fitted, reference_v1

    per_logit = {}
    for dtype in (torch.float32, torch.bfloat16):
        for name, fn in (("previous", reference_v1), ("now", chunked_cross_entropy)):
            coef, residual = fitted(fn, dtype)
            assert residual < 1  # the same ops at every shape
            per_logit[name, dtype] = round(coef[0].item())
    # by hand, bfloat16: forward 22 = the matmul writing the logits 2, amax 2, float32 logits - max 2 + 4, exp_ 4 + 4,
    # sum 4; backward 18 = the logits 2, logits - shift 2 + 4, exp into their 16-bit buffer 4 + 2, the two matmuls
    # reading it 2 + 2. Before, 74: the same matmuls 8, two float32 copies and the cast back 6 each, logsumexp's 24
    # inside, sub_, exp_ and mul_ in place 8 each
    assert per_logit["now", torch.bfloat16] == 22 + 18 < per_logit["previous", torch.bfloat16] == 74
    # float32, all in place: forward 28 = 4 + 4 + 8 + 8 + 4, backward 28 = 4 + 8 + 8 + 4 + 4; before, mul_'s 8 more
    assert per_logit["now", torch.float32] == 28 + 28 < per_logit["previous", torch.float32] == 64


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
