"""Kronecker layers against their dense equivalents."""
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from kron.errors import ShapeError
from kron.layers import FusedKroneckerLinear, KroneckerEmbedding, KroneckerLinear, dense_weight, kron_linear

CASES = [((4, 6, 3, 2), 1), ((4, 6, 3, 2), 2), ((1, 6, 12, 2), 1), ((12, 1, 1, 12), 2), ((6, 8, 1, 1), 1)]
BATCHES = [(5,), (2, 3), (2, 1, 4), ()]


@pytest.mark.parametrize("shape, rank", CASES)
@pytest.mark.parametrize("order", ["a_first", "b_first"])
@pytest.mark.parametrize("lead", BATCHES)
def test_forward_matches_dense_float32(shape, rank, order, lead):
    m1, n1, m2, n2 = shape
    A = torch.randn(rank, m1, n1)
    B = torch.randn(rank, m2, n2)
    bias = torch.randn(m1 * m2)
    x = torch.randn(*lead, n1 * n2)
    y = kron_linear(x, A, B, bias, order)
    ref = x @ dense_weight(A, B).T + bias
    assert y.shape == (*lead, m1 * m2)
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape, rank", CASES)
@pytest.mark.parametrize("order", ["a_first", "b_first"])
def test_forward_matches_dense_bfloat16(shape, rank, order):
    m1, n1, m2, n2 = shape
    A = torch.randn(rank, m1, n1).bfloat16()
    B = torch.randn(rank, m2, n2).bfloat16()
    x = torch.randn(3, 4, n1 * n2).bfloat16()
    y = kron_linear(x, A, B, None, order)
    assert y.dtype == torch.bfloat16
    ref = x.float() @ dense_weight(A.float(), B.float()).T
    assert torch.allclose(y.float(), ref, rtol=5e-2, atol=5e-2 * ref.abs().max().item())


@pytest.mark.parametrize("shape, rank", CASES)
@pytest.mark.parametrize("order", ["a_first", "b_first"])
def test_gradients_equal_autograd_through_dense_form(shape, rank, order):
    m1, n1, m2, n2 = shape
    A = torch.randn(rank, m1, n1, dtype=torch.float64, requires_grad=True)
    B = torch.randn(rank, m2, n2, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, n1 * n2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, m1 * m2, dtype=torch.float64)
    (kron_linear(x, A, B, None, order) * w).sum().backward()
    grads = [t.grad.clone() for t in (A, B, x)]
    for t in (A, B, x):
        t.grad = None
    ((x @ dense_weight(A, B).T) * w).sum().backward()
    for g, t in zip(grads, (A, B, x)):
        assert torch.allclose(g, t.grad, atol=1e-10)


def test_auto_order_picks_the_cheaper_contraction():
    assert KroneckerLinear(768, 768, (384, 768, 2, 1)).order == "a_first"
    assert KroneckerLinear(768, 768, (2, 1, 384, 768)).order == "b_first"


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_from_linear_exact_and_keeps_dtype(kind, dtype):
    A = torch.randn(2, 4, 3)
    B = torch.randn(2, 2, 5)
    W = dense_weight(A, B)  # (8, 15): out 8, in 15
    if kind == "linear":
        module = nn.Linear(15, 8)
        module.weight.data.copy_(W)
    else:
        module = Conv1D(8, 15)  # weight stored (in, out)
        module.weight.data.copy_(W.T)
    module = module.to(dtype)
    layer = KroneckerLinear.from_linear(module, (4, 3, 2, 5), rank=2)
    assert layer.A.dtype == dtype and layer.A.device == module.weight.device
    x = torch.randn(3, 15).to(dtype)
    tol = 1e-4 if dtype == torch.float32 else 0.1
    assert torch.allclose(layer(x).float(), module(x).float(), rtol=tol, atol=tol * 10)
    assert layer.init_error < (1e-5 if dtype == torch.float32 else 1e-2)
    assert torch.allclose(layer.to_dense().float(), W, atol=tol * 10)


def test_from_linear_rejects_bad_shape_and_type():
    with pytest.raises(ShapeError, match="not 8x15"):
        KroneckerLinear.from_linear(nn.Linear(15, 8), (4, 4, 2, 5))
    with pytest.raises(TypeError, match="supported types are torch.nn.Linear"):
        KroneckerLinear.from_linear(nn.Conv2d(3, 3, 1), (1, 1, 3, 3))


def test_fused_qkv_blocks_are_factored_separately():
    blocks = [dense_weight(torch.randn(1, 4, 2), torch.randn(1, 2, 4)) for _ in range(3)]
    module = Conv1D(24, 8)
    module.weight.data.copy_(torch.cat(blocks).T)
    fused = FusedKroneckerLinear.from_linear(module, (4, 2, 2, 4), rank=1, blocks=3)
    x = torch.randn(5, 8)
    assert torch.allclose(fused(x), module(x), atol=1e-5)
    assert fused.init_error < 1e-5
    assert torch.allclose(fused.to_dense(), torch.cat(blocks), atol=1e-5)


def test_embedding_lookup_and_init():
    A = torch.randn(50, 4)
    B = torch.randn(1, 3)
    emb = nn.Embedding(50, 12)
    emb.weight.data.copy_(torch.kron(A, B))
    k = KroneckerEmbedding.from_embedding(emb, factor=3)
    ids = torch.randint(0, 50, (2, 7))
    assert torch.allclose(k(ids), emb(ids), atol=1e-5)
    assert k.init_error < 1e-5
    assert k.A.shape == (50, 4) and k.B.shape == (1, 3)
    with pytest.raises(Exception, match="must divide the embedding size 12"):
        KroneckerEmbedding.from_embedding(emb, factor=5)
