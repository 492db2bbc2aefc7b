"""kron.functional.kron_linear: the custom autograd Function against autograd through the dense weight, and the
buffer pool's safety (a buffer is reused only once nothing references it).

Double backward is not supported (the Function is once_differentiable); `test_double_backward_raises` pins that.
"""
import pytest
import torch

from kron import functional as F
from kron.functional import _BATCHED_MIN, dense_weight, kron_linear

# (m1, n1, m2, n2): n2 == 1, m2 == 1, narrow (< _BATCHED_MIN) and wide (>= _BATCHED_MIN) second contractions
SHAPES = [
    (4, 6, 3, 1),            # a_first with n2 == 1
    (4, 6, 2, 1),            # a_first with n2 == 1, m2 == 2: the output written as complex pairs (KnGPT2's B 2 x 1)
    (5, 4, 1, 2),            # b_first with m2 == 1, n2 == 2 (KnGPT2's swapped B 1 x 2)
    (3, 1, 4, 6),            # m1 == 1 / n1 == 1
    (5, 4, 1, 3),            # m2 == 1 (b_first: one GEMM for the second contraction)
    (4, 3, 5, 2),            # narrow both ways
    (3, 2, 2, _BATCHED_MIN),  # a_first wide (bmm over tokens)
    (2, 3, _BATCHED_MIN, 2),  # b_first wide
    (6, 6, 2, 3),            # b_first weight gradient through permuted copies (p·q > c·(p + q))
    (20, 20, 2, _BATCHED_MIN),  # a_first weight gradient through permuted copies
]


@pytest.fixture
def pooled(monkeypatch):
    """Every tensor, however small, goes through the reuse pool (the small test sizes would otherwise bypass it)."""
    monkeypatch.setattr(F._BufferPool, "MIN_BYTES", 0)
    yield
    F.clear_buffer_pool()


@pytest.fixture(params=["pool", "no-pool"])
def pool(request, monkeypatch):
    """Run with every tensor going through the reuse pool (threshold 0), and with the pool off."""
    if request.param == "pool":
        monkeypatch.setattr(F._BufferPool, "MIN_BYTES", 0)
    else:
        monkeypatch.setattr(F._POOL, "limit_bytes", 0)
    yield request.param
    F.clear_buffer_pool()


@pytest.fixture(params=["whole", "chunks"])
def chunks(request, monkeypatch):
    """Run the forward without gradients whole, and in token chunks of 3 (the test batch of 20 tokens ends in a
    short chunk), whatever the layer's arithmetic intensity."""
    if request.param == "chunks":
        monkeypatch.setattr(F, "_CHUNK_TOKENS", 3)
        monkeypatch.setattr(F, "_CHUNK_MAX_INTENSITY", float("inf"))
        monkeypatch.setattr(F, "_CHUNK_MIN_THREADS", 1)
    return request.param


def _factors(shape, rank, dtype, requires_grad=True):
    m1, n1, m2, n2 = shape
    A = torch.randn(rank, m1, n1, dtype=dtype, requires_grad=requires_grad)
    B = torch.randn(rank, m2, n2, dtype=dtype, requires_grad=requires_grad)
    return A, B


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("order", ["a_first", "b_first"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gradcheck_float64(shape, rank, order, with_bias, pooled):
    m1, n1, m2, n2 = shape
    rank = min(rank, m1 * n1, m2 * n2)
    A, B = _factors(shape, rank, torch.float64)
    x = torch.randn(2, 3, n1 * n2, dtype=torch.float64, requires_grad=True)  # leading batch dims
    bias = torch.randn(m1 * m2, dtype=torch.float64, requires_grad=True) if with_bias else None
    inputs = (x, A, B) + ((bias,) if with_bias else ())

    def fn(x, A, B, *b):
        return kron_linear(x, A, B, b[0] if b else None, order)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, fast_mode=True)


@pytest.mark.parametrize("order", ["a_first", "b_first"])
@pytest.mark.parametrize("shape", [(4, 3, 5, 2), (2, 3, _BATCHED_MIN, 2)])
def test_gradcheck_float64_full_jacobian(shape, order):
    """One slow-mode gradcheck per order (the others use fast_mode, a random projection of the Jacobian)."""
    A, B = _factors(shape, 2, torch.float64)
    x = torch.randn(3, shape[1] * shape[3], dtype=torch.float64, requires_grad=True)
    bias = torch.randn(shape[0] * shape[2], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, A, B, b: kron_linear(x, A, B, b, order), (x, A, B, bias))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("order", ["a_first", "b_first"])
def test_float32_matches_autograd_of_dense_reference(shape, rank, order, pool, chunks):
    m1, n1, m2, n2 = shape
    rank = min(rank, m1 * n1, m2 * n2)
    A, B = _factors(shape, rank, torch.float32)
    bias = torch.randn(m1 * m2, requires_grad=True)
    x = torch.randn(4, 5, n1 * n2, requires_grad=True)
    w = torch.randn(4, 5, m1 * m2)
    y = kron_linear(x, A, B, bias, order)
    (y * w).sum().backward()
    got = [t.grad.clone() for t in (x, A, B, bias)]
    for t in (x, A, B, bias):
        t.grad = None
    ref = x @ dense_weight(A, B).T + bias
    (ref * w).sum().backward()
    assert torch.allclose(y, ref, rtol=1e-4, atol=1e-4)
    for g, t in zip(got, (x, A, B, bias)):
        assert torch.allclose(g, t.grad, rtol=1e-4, atol=1e-4 * max(1.0, t.grad.abs().max().item()))
    with torch.no_grad():
        assert torch.allclose(kron_linear(x, A, B, bias, order), ref, rtol=1e-4, atol=1e-4)


def test_chunks_only_for_memory_bound_layers_on_large_cpu_batches(monkeypatch):
    """512-token chunks where the layer does little arithmetic per element it moves (measured to pay on 2 threads),
    the whole batch for the GEMM-heavy KnGPT2 shapes (no gain, or a loss), for small batches and on one thread."""
    monkeypatch.setattr(F, "_CHUNK_MIN_THREADS", 1)

    def chunk(shape, tokens, order):
        m1, n1, m2, n2 = shape
        X = torch.empty(tokens, n1, n2)
        return F._chunk_tokens(X, torch.empty(1, m1, n1), torch.empty(1, m2, n2), order)

    assert chunk((24, 6, 128, 128), 4096, "b_first") == F._CHUNK_TOKENS
    assert chunk((48, 256, 64, 3), 4096, "a_first") == F._CHUNK_TOKENS
    assert chunk((384, 768, 2, 1), 4096, "a_first") == 4096
    assert chunk((1536, 768, 2, 1), 4096, "a_first") == 4096
    assert chunk((768, 1536, 1, 2), 4096, "b_first") == 4096
    assert chunk((24, 6, 128, 128), 2 * F._CHUNK_TOKENS - 1, "b_first") == 2 * F._CHUNK_TOKENS - 1
    monkeypatch.setattr(F, "_CHUNK_MIN_THREADS", torch.get_num_threads() + 1)
    assert chunk((24, 6, 128, 128), 4096, "b_first") == 4096


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rank", [1, 2])
def test_orders_agree_forward_and_backward(shape, rank):
    m1, n1, m2, n2 = shape
    rank = min(rank, m1 * n1, m2 * n2)
    A, B = _factors(shape, rank, torch.float64)
    x = torch.randn(7, n1 * n2, dtype=torch.float64, requires_grad=True)
    out = {}
    for order in ("a_first", "b_first"):
        y = kron_linear(x, A, B, None, order)
        gx, gA, gB = torch.autograd.grad(y.pow(2).sum(), (x, A, B))
        out[order] = (y.detach(), gx, gA, gB)
    for a, b in zip(out["a_first"], out["b_first"]):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("order", ["a_first", "b_first"])
def test_no_grad_path_and_partial_requires_grad(order):
    A, B = _factors((4, 3, 5, 2), 2, torch.float64, requires_grad=False)
    x = torch.randn(6, 6, dtype=torch.float64)
    with torch.no_grad():
        y = kron_linear(x, A, B.requires_grad_(), None, order)
    assert not y.requires_grad and y.grad_fn is None
    ref = x @ dense_weight(A, B.detach()).T
    assert torch.allclose(y, ref)
    # only B needs a gradient: x and A get none, B's equals autograd's through the dense form
    y = kron_linear(x, A, B, None, order)
    (gB,) = torch.autograd.grad(y.sum(), (B,))
    (ref_gB,) = torch.autograd.grad((x @ dense_weight(A, B).T).sum(), (B,))
    assert torch.allclose(gB, ref_gB)


def test_double_backward_raises():
    A, B = _factors((4, 3, 5, 2), 1, torch.float64)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(kron_linear(x, A, B).pow(2).sum(), (x,), create_graph=True)
    with pytest.raises(RuntimeError):
        gx.sum().backward()


def test_output_can_be_modified_in_place_under_autograd():
    A, B = _factors((4, 3, 5, 32), 1, torch.float32)
    x = torch.randn(8, 96, requires_grad=True)
    y = kron_linear(x, A, B)
    y.add_(1.0)  # would raise if the Function returned a view
    y.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("order", ["a_first", "b_first"])
def test_pool_never_reuses_a_live_result(order, pool):
    A, B = _factors((8, 16, 8, 16), 1, torch.float32, requires_grad=False)
    xs = [torch.randn(64, 256) for _ in range(3)]
    ys = [kron_linear(x, A, B, None, order) for x in xs]  # all alive at once
    for x, y in zip(xs, ys):
        assert torch.allclose(y, x @ dense_weight(A, B).T, rtol=1e-4, atol=1e-4)
    # a view kept by the caller keeps its storage out of the pool
    v = kron_linear(xs[0], A, B, None, order)[:3]
    kept = v.clone()
    for x in xs[1:]:
        kron_linear(x, A, B, None, order)
    assert torch.equal(v, kept)


@pytest.mark.parametrize("order", ["a_first", "b_first"])
def test_pool_safe_for_tensors_saved_by_autograd(order, pool):
    """Two graphs alive at once: the second forward must not overwrite the first one's saved intermediates."""
    A, B = _factors((8, 16, 8, 16), 2, torch.float32)
    x1, x2 = torch.randn(32, 256, requires_grad=True), torch.randn(32, 256, requires_grad=True)
    l1 = kron_linear(x1, A, B, None, order).pow(2).sum()
    l2 = kron_linear(x2, A, B, None, order).pow(2).sum()
    g1 = torch.autograd.grad(l1, (x1, A, B))
    g2 = torch.autograd.grad(l2, (x2, A, B))
    r1 = torch.autograd.grad((x1 @ dense_weight(A, B).T).pow(2).sum(), (x1, A, B))
    r2 = torch.autograd.grad((x2 @ dense_weight(A, B).T).pow(2).sum(), (x2, A, B))
    for g, r in zip(g1 + g2, r1 + r2):
        assert torch.allclose(g, r, rtol=1e-3, atol=1e-3 * r.abs().max().item())


def test_rejects_bad_order_and_width():
    A, B = _factors((2, 3, 2, 2), 1, torch.float32, requires_grad=False)
    with pytest.raises(ValueError, match="order must be"):
        kron_linear(torch.randn(2, 6), A, B, None, "c_first")
    with pytest.raises(ValueError, match="features"):
        kron_linear(torch.randn(2, 7), A, B)


@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pairs_go_through_complex_views(monkeypatch, chunks, rank, dtype):
    # KnGPT2's B 2 x 1 (Q/K/V, c_fc): the forward writes its output pairs through complex views; equal to dense
    calls = []
    real = F._pairs_outer_acc
    monkeypatch.setattr(F, "_pairs_outer_acc", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    for shape, order in [((4, 6, 2, 1), "a_first"), ((6, 8, 2, 1), "auto")]:
        calls.clear()
        m1, n1, m2, n2 = shape
        A, B = _factors(shape, rank, dtype)
        bias = torch.randn(m1 * m2, dtype=dtype, requires_grad=True)
        x = torch.randn(7, n1 * n2, dtype=dtype, requires_grad=True)
        W = sum(torch.kron(A[k], B[k]) for k in range(rank))
        y = F.kron_linear(x, A, B, bias, order=order)
        ref = x @ W.t() + bias
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(y, ref, rtol=tol, atol=tol)
        g = torch.randn_like(y)
        gx, = torch.autograd.grad(y, x, g)
        gx_ref, = torch.autograd.grad(ref, x, g)
        torch.testing.assert_close(gx, gx_ref, rtol=tol, atol=tol)
        assert len(calls) == rank, (shape, calls)  # one call per rank term, in the forward only
        with torch.no_grad():  # the inference forward, whole or (fixture `chunks`) into row slices of the output
            torch.testing.assert_close(F.kron_linear(x, A, B, bias, order=order), ref, rtol=tol, atol=tol)
        calls.clear()

