"""Kronecker factor shapes and the nearest-Kronecker-product problem.

Convention used everywhere in kronsearch: a weight W has the `nn.Linear` orientation (out x in) = (m x n), and
W ≈ Σ_k A_k ⊗ B_k with A_k (m1 x n1), B_k (m2 x n2), m = m1·m2, n = n1·n2.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import ShapeError
from .shapes import (FactorShape, divisors, factor_shapes, kron_macs, kron_params, lowrank_params,  # noqa: F401
                     lowrank_rank_for_ratio, validate_shape)

__all__ = [
    "FactorShape",
    "KroneckerFactors",
    "LowRankFactors",
    "divisors",
    "factor_shapes",
    "kron_macs",
    "kron_params",
    "lowrank_params",
    "lowrank_rank_for_ratio",
    "nearest_kronecker",
    "nearest_lowrank",
    "rearrange",
    "validate_shape",
]


def rearrange(W: torch.Tensor, m1: int, n1: int, m2: int, n2: int) -> torch.Tensor:
    """Van Loan's R(W): row i·n1 + j is vec of block W[i·m2:(i+1)·m2, j·n2:(j+1)·n2] (row-major).

    ‖W - A ⊗ B‖_F = ‖R(W) - vec(A) vec(B)ᵀ‖_F, so the nearest Kronecker product is a rank-1 SVD problem.
    """
    return W.reshape(m1, m2, n1, n2).permute(0, 2, 1, 3).reshape(m1 * n1, m2 * n2)


@dataclass
class KroneckerFactors:
    """Result of `nearest_kronecker` (or `kron.datainit.data_aware_kronecker`): A (rank, m1, n1), B (rank, m2, n2),
    relative Frobenius (weight) error; data-aware results also give the relative output error on the calibration
    statistics and which init won ("data", or "svd" when the SVD init was better on the calibration objective)."""

    A: torch.Tensor
    B: torch.Tensor
    rel_error: float
    singular_values: torch.Tensor
    output_error: float | None = None
    init: str = "svd"

    def to_dense(self) -> torch.Tensor:
        return sum(torch.kron(a, b) for a, b in zip(self.A, self.B))


def nearest_kronecker(W: torch.Tensor, shape, rank: int = 1, *, dtype: torch.dtype | None = None) -> KroneckerFactors:
    """Best Σ_{k<rank} A_k ⊗ B_k to W in Frobenius norm (Van Loan & Pitsianis): rearrangement + truncated SVD.

    Args:
        W: (m, n) weight, any float dtype, any device. Not modified.
        shape: (m1, n1, m2, n2) with m1·m2 = m and n1·n2 = n.
        rank: number of Kronecker products kept.
        dtype: float32 or float64 for the SVD; default float64 when W is float64, else float32.
    Returns factors in the compute dtype (callers cast), the relative error sqrt(Σ_{k>rank} σ_k²) / ‖W‖_F and
    all singular values of R(W). √σ_k is split evenly between A_k and B_k.
    """
    if W.dim() != 2:
        raise ShapeError(f"nearest_kronecker expects a 2-D weight, got shape {tuple(W.shape)}")
    m, n = W.shape
    m1, n1, m2, n2 = validate_shape(m, n, shape, rank)
    if dtype is None:
        dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"SVD dtype must be float32 or float64, got {dtype}")
    with torch.no_grad():
        R = rearrange(W.detach().to(dtype), m1, n1, m2, n2)
        U, S, Vh = _svd(R, rank)
        total = torch.sum(S.double() ** 2)
        tail = torch.sum(S[rank:].double() ** 2)
        rel = math.sqrt(tail.item() / total.item()) if total.item() > 0 else 0.0
        root = S[:rank].sqrt()
        A = (U[:, :rank] * root).T.reshape(rank, m1, n1)
        B = (Vh[:rank].T * root).T.reshape(rank, m2, n2)
    return KroneckerFactors(A.contiguous(), B.contiguous(), rel, S)


@dataclass
class LowRankFactors:
    """Result of `nearest_lowrank` (or `kron.datainit.whitened_lowrank`): U (m, rank), V (rank, n), relative Frobenius
    (weight) error, all singular values; data-aware results also give the relative output error on the calibration
    statistics and which init won."""

    U: torch.Tensor
    V: torch.Tensor
    rel_error: float
    singular_values: torch.Tensor
    output_error: float | None = None
    init: str = "svd"

    def to_dense(self) -> torch.Tensor:
        return self.U @ self.V


def nearest_lowrank(W: torch.Tensor, rank: int, *, dtype: torch.dtype | None = None) -> LowRankFactors:
    """Best rank-`rank` U·V to W in Frobenius norm (Eckart–Young): truncated SVD, √σ_k split between U and V.

    Args:
        W: (m, n) weight, any float dtype, any device. Not modified.
        rank: 1 <= rank <= min(m, n).
        dtype: float32 or float64 for the SVD; default float64 when W is float64, else float32.
    Returns factors in the compute dtype (callers cast) and the relative error sqrt(Σ_{k>rank} σ_k²) / ‖W‖_F.
    """
    if W.dim() != 2:
        raise ShapeError(f"nearest_lowrank expects a 2-D weight, got shape {tuple(W.shape)}")
    m, n = W.shape
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(m, n):
        raise ShapeError(f"rank must be an integer in [1, {min(m, n)}] for a {m}x{n} weight, got {rank!r}")
    if dtype is None:
        dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"SVD dtype must be float32 or float64, got {dtype}")
    with torch.no_grad():
        U, S, Vh = _svd(W.detach().to(dtype), rank)
        total = torch.sum(S.double() ** 2)
        tail = torch.sum(S[rank:].double() ** 2)
        rel = math.sqrt(tail.item() / total.item()) if total.item() > 0 else 0.0
        root = S[:rank].sqrt()
        Uf = U[:, :rank] * root
        Vf = root[:, None] * Vh[:rank]
    return LowRankFactors(Uf.contiguous(), Vf.contiguous(), rel, S)


def _svd(R: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD truncated to `rank` left/right vectors, with all singular values.

    Very tall or wide matrices with a small side (an embedding table rearranged: 19M x 2) go through the Gram
    matrix, accumulated in float64 chunk by chunk so squaring the condition number costs no accuracy that
    matters here and no float64 copy of the whole table is made.
    """
    rows, cols = R.shape
    small, large = min(rows, cols), max(rows, cols)
    if small <= 64 and large >= 64 * small:
        M = R.T if rows < cols else R  # tall: (large, small)
        G = torch.zeros(small, small, dtype=torch.float64, device=R.device)
        for chunk in M.split(1 << 18):
            c = chunk.double()
            G += c.T @ c
        evals, V = torch.linalg.eigh(G)
        order = torch.argsort(evals, descending=True)
        S, V = evals[order].clamp_min(0).sqrt(), V[:, order]
        safe = torch.where(S > S[0] * 1e-12, S, torch.ones_like(S))[:rank]
        Vr = V[:, :rank]
        U = torch.cat([(chunk.double() @ Vr) / safe for chunk in M.split(1 << 18)]).to(R.dtype)
        S, Vr = S.to(R.dtype), Vr.to(R.dtype)
        if rows < cols:
            return Vr, S, U.T
        return U, S, Vr.T
    U, S, Vh = torch.linalg.svd(R, full_matrices=False)
    return U[:, :rank], S, Vh[:rank]
