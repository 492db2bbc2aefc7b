"""The nearest-Kronecker-product problem and shape enumeration."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kron.errors import ShapeError
from kron.factor import divisors, factor_shapes, kron_macs, nearest_kronecker, rearrange
from kron.layers import dense_weight

SHAPES = [(4, 6, 3, 2), (1, 6, 12, 2), (12, 1, 1, 12), (3, 3, 4, 4), (8, 2, 2, 8)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_exact_round_trip_for_sum_of_kronecker_products(shape, rank):
    m1, n1, m2, n2 = shape
    if rank > min(m1 * n1, m2 * n2):
        pytest.skip("rank above the factors' capacity")
    g = torch.Generator().manual_seed(rank)
    A = torch.randn(rank, m1, n1, dtype=torch.float64, generator=g)
    B = torch.randn(rank, m2, n2, dtype=torch.float64, generator=g)
    W = dense_weight(A, B)
    f = nearest_kronecker(W, shape, rank)
    assert f.A.shape == (rank, m1, n1) and f.B.shape == (rank, m2, n2)
    assert torch.allclose(f.to_dense(), W, atol=1e-10)
    assert f.rel_error < 1e-7


def test_error_equals_svd_tail_and_is_optimal():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(12, 10, dtype=torch.float64, generator=g)
    shape = (4, 5, 3, 2)
    for rank in (1, 2, 3):
        f = nearest_kronecker(W, shape, rank)
        S = torch.linalg.svdvals(rearrange(W, *shape))
        tail = math.sqrt((S[rank:] ** 2).sum().item()) / W.norm().item()
        assert f.rel_error == pytest.approx(tail, rel=1e-10)
        achieved = (W - f.to_dense()).norm().item() / W.norm().item()
        assert achieved == pytest.approx(tail, rel=1e-8)
        # No perturbation of the returned factors does better (Eckart–Young at the optimum).
        for i in range(20):
            gp = torch.Generator().manual_seed(100 + i)
            dA = torch.randn(f.A.shape, dtype=torch.float64, generator=gp) * 1e-3
            dB = torch.randn(f.B.shape, dtype=torch.float64, generator=gp) * 1e-3
            worse = (W - dense_weight(f.A + dA, f.B + dB)).norm().item() / W.norm().item()
            assert worse >= achieved - 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_weights_are_factored_in_float32(dtype):
    A = torch.randn(1, 8, 4)
    B = torch.randn(1, 2, 3)
    W = dense_weight(A, B).to(dtype)
    f = nearest_kronecker(W, (8, 4, 2, 3))
    assert f.A.dtype == torch.float32
    # Rounding to low precision breaks exact Kronecker structure; the answer must be the float32 optimum.
    ref = nearest_kronecker(W.float(), (8, 4, 2, 3))
    assert torch.allclose(f.to_dense(), ref.to_dense(), rtol=1e-6, atol=1e-6)
    assert f.rel_error == pytest.approx(ref.rel_error, rel=1e-5)
    assert f.rel_error < 1e-2


def test_tall_embedding_table_path_matches_full_svd():
    # 5000 x 8 rearranged to (5000*4) x 2: goes through the Gram-matrix route.
    W = torch.randn(5000, 8, dtype=torch.float64)
    f = nearest_kronecker(W, (5000, 4, 1, 2))
    S = torch.linalg.svdvals(rearrange(W, 5000, 4, 1, 2))
    assert f.rel_error == pytest.approx(math.sqrt(S[1] ** 2 / (S ** 2).sum()), rel=1e-9)
    assert (W - f.to_dense()).norm() / W.norm() == pytest.approx(f.rel_error, rel=1e-7)


@pytest.mark.parametrize(
    "shape, rank, message",
    [
        ((5, 6, 3, 2), 1, "need m1·m2 = 12 and n1·n2 = 12"),
        ((4, 6, 3), 1, "four integers"),
        ((4, 6, 3, 2), 7, "rank 7 exceeds the maximum 6"),
        ((0, 6, 3, 2), 1, "must be positive"),
    ],
)
def test_bad_shapes_name_the_problem(shape, rank, message):
    with pytest.raises(ShapeError, match=message):
        nearest_kronecker(torch.randn(12, 12), shape, rank)


def test_factor_shapes_enumeration_and_filters():
    all_shapes = factor_shapes(12, 8, include_trivial=True)
    assert len(all_shapes) == len(divisors(12)) * len(divisors(8))
    nontrivial = factor_shapes(12, 8)
    assert all(s.m1 * s.n1 > 1 and s.m2 * s.n2 > 1 for s in nontrivial)
    assert len(nontrivial) == len(all_shapes) - 2
    for s in factor_shapes(768, 3072, min_compression=10, max_compression=100):
        assert 10 <= s.compression <= 100
        assert s.m1 * s.m2 == 768 and s.n1 * s.n2 == 3072
        assert s.params == s.m1 * s.n1 + s.m2 * s.n2
        assert s.macs_per_token == min(s.n1 * s.m2 * (s.n2 + s.m1), s.m1 * s.n2 * (s.n1 + s.m2))
    for s in factor_shapes(64, 64, max_aspect=4):
        assert max(s.m1, s.n1) <= 4 * min(s.m1, s.n1) and max(s.m2, s.n2) <= 4 * min(s.m2, s.n2)
    assert all(s.rank == 3 and 3 <= min(s.m1 * s.n1, s.m2 * s.n2) for s in factor_shapes(12, 8, rank=3))


def test_kngpt2_shape_costs():
    macs, order = kron_macs(384, 768, 2, 1)
    assert order == "a_first" and macs == 384 * 1 * (768 + 2)
    (s,) = [s for s in factor_shapes(768, 768) if s.shape == (384, 768, 2, 1)]
    assert s.params == 384 * 768 + 2
    assert s.compression == pytest.approx(2.0, rel=1e-4)


@settings(max_examples=60, deadline=None)
@given(m=st.integers(1, 96), n=st.integers(1, 96), rank=st.integers(1, 3))
def test_property_every_enumerated_shape_is_valid_and_unique(m, n, rank):
    shapes = factor_shapes(m, n, rank=rank, include_trivial=True)
    seen = set()
    for s in shapes:
        assert s.m1 * s.m2 == m and s.n1 * s.n2 == n
        assert rank <= min(s.m1 * s.n1, s.m2 * s.n2)
        assert s.shape not in seen
        seen.add(s.shape)
    expected = sum(
        1 for m1 in divisors(m) for n1 in divisors(n) if rank <= min(m1 * n1, (m // m1) * (n // n1))
    )
    assert len(shapes) == expected


@settings(max_examples=40, deadline=None)
@given(
    dims=st.tuples(st.integers(1, 5), st.integers(1, 5), st.integers(1, 5), st.integers(1, 5)),
    rank=st.integers(1, 2),
    seed=st.integers(0, 10_000),
)
def test_property_factorisation_is_exact_on_kronecker_sums(dims, rank, seed):
    m1, n1, m2, n2 = dims
    if rank > min(m1 * n1, m2 * n2):
        return
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(rank, m1, n1, dtype=torch.float64, generator=g)
    B = torch.randn(rank, m2, n2, dtype=torch.float64, generator=g)
    W = dense_weight(A, B)
    f = nearest_kronecker(W, dims, rank)
    assert torch.allclose(f.to_dense(), W, atol=1e-8 * max(1.0, W.abs().max().item()))


@settings(max_examples=40, deadline=None)
@given(
    dims=st.tuples(st.integers(1, 5), st.integers(1, 5), st.integers(1, 5), st.integers(1, 5)),
    rank=st.integers(1, 3),
    seed=st.integers(0, 10_000),
)
def test_property_error_is_the_svd_tail_on_random_matrices(dims, rank, seed):
    """On a random (generally not Kronecker) matrix the reported error is the SVD tail of R(W), the factors
    reproduce exactly that error, and no other rank-`rank` Kronecker sum does better than the SVD says."""
    m1, n1, m2, n2 = dims
    rank = min(rank, m1 * n1, m2 * n2)
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m1 * m2, n1 * n2, dtype=torch.float64, generator=g)
    f = nearest_kronecker(W, dims, rank)
    S = torch.linalg.svdvals(rearrange(W, m1, n1, m2, n2))
    tail = math.sqrt(float((S[rank:] ** 2).sum() / (S ** 2).sum()))
    assert f.rel_error == pytest.approx(tail, abs=1e-9)
    achieved = float(torch.linalg.norm(W - f.to_dense()) / torch.linalg.norm(W))
    assert achieved == pytest.approx(f.rel_error, abs=1e-9)
    assert f.A.shape == (rank, m1, n1) and f.B.shape == (rank, m2, n2)
    # a perturbed factorisation is never better than the optimum
    A2 = f.A + 1e-3 * torch.randn(f.A.shape, dtype=torch.float64, generator=g)
    worse = float(torch.linalg.norm(W - dense_weight(A2, f.B)) / torch.linalg.norm(W))
    assert worse >= f.rel_error - 1e-12
