"""Data-aware initialisation (kron.datainit and each method's own: kron.methods.kronecker.datainit,
kron.methods.lowrank.datainit): exact recovery, agreement with SVD when S = I, never worse than SVD
init on the calibration objective, singular S handled by the ridge."""
from __future__ import annotations

import math

import pytest
import torch

from kron.datainit import calibration_objective, output_error
from kron.methods.kronecker.datainit import data_aware_kronecker
from kron.methods.lowrank.datainit import whitened_lowrank
from kron.errors import DataError, ShapeError
from kron.factor import nearest_kronecker, nearest_lowrank


def correlated_S(n: int, seed: int, tokens: int = 2000) -> torch.Tensor:
    """A second moment with strongly unequal, correlated directions (like real activations)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) / math.sqrt(n)
    scale = torch.rand(n, generator=g, dtype=torch.float64) * 4 + 0.05
    X = torch.randn(tokens, n, generator=g, dtype=torch.float64) @ mix * scale
    return X.T @ X / tokens


# (m, n, shape) covering n2 == 1 (output split, exact), n1 == 1 (exact), m2 == 1 (input split) and general
SHAPES = [
    (24, 16, (12, 16, 2, 1)),   # n2 == 1
    (24, 16, (6, 1, 4, 16)),    # n1 == 1
    (24, 16, (24, 8, 1, 2)),    # input split, B 1 x 2
    (24, 16, (24, 4, 1, 4)),    # input split, B 1 x 4
    (24, 16, (6, 4, 4, 4)),     # general
    (24, 16, (3, 8, 8, 2)),     # general
]


@pytest.mark.parametrize("m, n, shape", SHAPES)
@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_never_worse_than_svd_init_on_the_calibration_objective(m, n, shape, rank, seed):
    if rank > min(shape[0] * shape[1], shape[2] * shape[3]):
        pytest.skip("rank above what the shape holds")
    g = torch.Generator().manual_seed(100 + seed)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    S = correlated_S(n, seed)
    svd = nearest_kronecker(W, shape, rank)
    data = data_aware_kronecker(W, S, shape, rank)
    f_svd = calibration_objective(W, S, svd.to_dense())
    f_data = calibration_objective(W, S, data.to_dense())
    assert f_data <= f_svd * (1 + 1e-9)
    assert data.output_error == pytest.approx(output_error(W, S, data.to_dense()))
    assert data.rel_error == pytest.approx(float(torch.linalg.norm(W - data.to_dense()) / torch.linalg.norm(W)))
    assert data.A.shape == (rank, shape[0], shape[1]) and data.B.shape == (rank, shape[2], shape[3])


def test_data_aware_beats_svd_clearly_on_correlated_inputs():
    W = torch.randn(32, 24, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    S = correlated_S(24, 0)
    for shape, gain in [((16, 24, 2, 1), 1.0), ((32, 12, 1, 2), 0.95), ((8, 6, 4, 4), 0.95)]:
        svd = nearest_kronecker(W, shape)
        data = data_aware_kronecker(W, S, shape)
        assert data.init == "data"
        assert data.output_error < gain * output_error(W, S, svd.to_dense())


@pytest.mark.parametrize("shape", [(12, 16, 2, 1), (6, 1, 4, 16), (24, 8, 1, 2), (6, 4, 4, 4)])
@pytest.mark.parametrize("rank", [1, 2])
def test_exact_recovery_of_a_kronecker_product(shape, rank):
    g = torch.Generator().manual_seed(3)
    A = torch.randn(rank, shape[0], shape[1], generator=g, dtype=torch.float64)
    B = torch.randn(rank, shape[2], shape[3], generator=g, dtype=torch.float64)
    W = sum(torch.kron(a, b) for a, b in zip(A, B))
    f = data_aware_kronecker(W, correlated_S(W.shape[1], 4), shape, rank)
    assert f.rel_error < 1e-8 and f.output_error < 1e-8


@pytest.mark.parametrize("shape", [(12, 16, 2, 1), (6, 1, 4, 16), (24, 8, 1, 2), (6, 4, 4, 4)])
@pytest.mark.parametrize("rank", [1, 3])
def test_identity_S_gives_the_svd_solution(shape, rank):
    rank = min(rank, shape[0] * shape[1], shape[2] * shape[3])
    W = torch.randn(24, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    f = data_aware_kronecker(W, torch.eye(16, dtype=torch.float64), shape, rank)
    svd = nearest_kronecker(W, shape, rank)
    assert torch.allclose(f.to_dense(), svd.to_dense(), atol=1e-8)
    assert f.rel_error == pytest.approx(svd.rel_error, abs=1e-9)


def test_whitened_lowrank_exact_identity_and_never_worse():
    g = torch.Generator().manual_seed(6)
    U = torch.randn(30, 4, generator=g, dtype=torch.float64)
    V = torch.randn(4, 20, generator=g, dtype=torch.float64)
    S = correlated_S(20, 6)
    exact = whitened_lowrank(U @ V, S, 4)
    assert exact.rel_error < 1e-9 and exact.output_error < 1e-9
    W = torch.randn(30, 20, generator=g, dtype=torch.float64)
    ident = whitened_lowrank(W, torch.eye(20, dtype=torch.float64), 5)
    assert torch.allclose(ident.to_dense(), nearest_lowrank(W, 5).to_dense(), atol=1e-8)
    for r in (1, 3, 8):
        data = whitened_lowrank(W, S, r)
        assert calibration_objective(W, S, data.to_dense()) <= calibration_objective(
            W, S, nearest_lowrank(W, r).to_dense()) * (1 + 1e-9)
        assert data.U.shape == (30, r) and data.V.shape == (r, 20)


@pytest.mark.parametrize("S", ["rank_deficient", "zero"])
def test_singular_S_gives_finite_factors(S):
    W = torch.randn(24, 16, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    if S == "zero":
        S = torch.zeros(16, 16, dtype=torch.float64)
    else:
        X = torch.randn(3, 16, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
        S = X.T @ X / 3  # rank 3 of 16
    for shape in [(12, 16, 2, 1), (24, 8, 1, 2), (6, 4, 4, 4)]:
        f = data_aware_kronecker(W, S, shape, 2)
        assert torch.isfinite(f.A).all() and torch.isfinite(f.B).all() and math.isfinite(f.output_error)
    lr = whitened_lowrank(W, S, 3, ridge=0.0)
    assert torch.isfinite(lr.U).all() and torch.isfinite(lr.V).all()


def test_float32_weights_and_bad_input():
    W = torch.randn(24, 16)
    S = correlated_S(16, 9).float()
    f = data_aware_kronecker(W, S, (24, 8, 1, 2))
    assert f.A.dtype == torch.float64  # maths in float64; the layers cast back
    with pytest.raises(ShapeError, match="must be 16 x 16"):
        data_aware_kronecker(W, torch.eye(8), (24, 8, 1, 2))
    bad = S.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(DataError, match="NaN or inf"):
        whitened_lowrank(W, bad, 2)


@pytest.mark.parametrize("shape, rank", [((6, 4, 4, 4), 2), ((24, 8, 1, 2), 1), ((3, 8, 8, 2), 3)])
def test_least_squares_layout_matches_the_four_index_formulas(shape, rank):
    """`KronLS` (blocks of S laid out once per shape, the ridge added analytically) solves the same least squares
    as the plain four-index contractions on S + λI, and its objective-only path gives the same f and A."""
    from kron.datainit import ridged
    from kron.methods.kronecker.datainit import KronLS

    m1, n1, m2, n2 = shape
    g = torch.Generator().manual_seed(3)
    W = torch.randn(m1 * m2, n1 * n2, generator=g, dtype=torch.float64)
    S = correlated_S(n1 * n2, 4)
    Sr = ridged(S, 1e-2)
    lam = float((torch.diagonal(Sr) - torch.diagonal(S)).mean())
    B = torch.randn(rank, m2, n2, generator=g, dtype=torch.float64)
    # reference: the normal equations written with einsum on the 4-index views of S + λI
    S4, WS4 = Sr.reshape(n1, n2, n1, n2), (W @ Sr).reshape(m1, m2, n1, n2)
    GA = torch.einsum("kip,liq,apbq->kalb", B, B, S4).reshape(rank * n1, rank * n1)
    HA = torch.einsum("xiap,kip->xka", WS4, B).reshape(m1, rank * n1)
    A_ref = torch.linalg.solve(GA, HA.T).T.reshape(m1, rank, n1).permute(1, 0, 2)
    GB = torch.einsum("kxa,lxb,apbq->kplq", A_ref, A_ref, S4).reshape(rank * n2, rank * n2)
    HB = torch.einsum("xiap,kxa->ikp", WS4, A_ref).reshape(m2, rank * n2)
    B_ref = torch.linalg.solve(GB, HB.T).T.reshape(m2, rank, n2).permute(1, 0, 2)
    base = calibration_objective(W, Sr)
    for ls in (KronLS(W, Sr, shape, rank), KronLS(W, S, shape, rank, lam=lam)):
        assert ls.base == pytest.approx(base, rel=1e-12)
        A, f = ls.solve_A(B)
        assert torch.allclose(A, A_ref, rtol=1e-8, atol=1e-10)
        dense = torch.einsum("kac,kbd->abcd", A, B).reshape(m1 * m2, n1 * n2)
        assert f == pytest.approx(calibration_objective(W, Sr, dense), rel=1e-9)
        f_only, later = ls.f_A(B)
        assert f_only == f and torch.equal(later(), A)
        B2, _ = ls.solve_B(A)
        assert torch.allclose(B2, B_ref, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("shape, rank", [((24, 4, 1, 4), 1), ((24, 8, 1, 2), 2), ((12, 2, 1, 8), 3)])
def test_implicit_search_matches_the_explicit_one(shape, rank):
    """With B one row and A taller than wide, the search and refinement keep A implicit (G⁻¹ and HᵀH from the
    blocks of M = (W·Sr)ᵀ(W·Sr)); it takes the same start, steps and stop as the explicit path."""
    from kron.datainit import ridged
    from kron.methods.kronecker.datainit import KronLS, s_blocks, search_and_refine

    m1, n1, m2, n2 = shape
    g = torch.Generator().manual_seed(7)
    W = torch.randn(m1 * m2, n1 * n2, generator=g, dtype=torch.float64)
    S = correlated_S(n1 * n2, 8)
    Sr = ridged(S, 1e-2)
    lam = float((torch.diagonal(Sr) - torch.diagonal(S)).mean())
    WSr = W @ Sr
    explicit = KronLS(W, S, shape, rank, lam=lam)
    implicit = KronLS(W, S, shape, rank, lam=lam, Mblk=s_blocks(WSr.T @ WSr, n1, n2))
    B0 = nearest_kronecker(W, shape, rank).B
    A1, B1, f1 = search_and_refine(explicit, B0, 12, 0, 10, 1e-6)
    A2, B2, f2 = search_and_refine(implicit, B0, 12, 0, 10, 1e-6)
    assert f2 == pytest.approx(f1, rel=1e-9)
    dense1, dense2 = (torch.einsum("kac,kbd->abcd", A, B).reshape(W.shape) for A, B in ((A1, B1), (A2, B2)))
    assert torch.allclose(dense2, dense1, rtol=1e-6, atol=1e-8 * float(dense1.abs().max()))  # factors: up to T, T⁻ᵀ
    assert calibration_objective(W, Sr, dense2) == pytest.approx(f2, rel=1e-9)
