"""Kronecker factor shapes and the nearest-Kronecker-product problem.

Convention used everywhere in kronsearch: a weight W has the `nn.Linear` orientation (out x in) = (m x n), and
W ≈ Σ_k A_k ⊗ B_k with A_k (m1 x n1), B_k (m2 x n2), m = m1·m2, n = n1·n2.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from .errors import ShapeError

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


def divisors(k: int) -> list[int]:
    """All positive divisors of k, ascending."""
    if k < 1:
        raise ShapeError(f"cannot factor a dimension of size {k}")
    small, large = [], []
    for d in range(1, math.isqrt(k) + 1):
        if k % d == 0:
            small.append(d)
            if d != k // d:
                large.append(k // d)
    return small + large[::-1]


def kron_params(m1: int, n1: int, m2: int, n2: int, rank: int = 1) -> int:
    """Parameters of Σ_{k<rank} A_k ⊗ B_k (biases not included)."""
    return rank * (m1 * n1 + m2 * n2)


def kron_macs(m1: int, n1: int, m2: int, n2: int, rank: int = 1) -> tuple[int, str]:
    """Multiply-adds per token of the cheaper contraction order, and that order's name.

    "b_first" contracts X (n1 x n2) with Bᵀ first: n1·m2·(n2 + m1); "a_first" with A first: m1·n2·(n1 + m2).
    """
    b_first = n1 * m2 * (n2 + m1)
    a_first = m1 * n2 * (n1 + m2)
    if a_first <= b_first:
        return rank * a_first, "a_first"
    return rank * b_first, "b_first"


@dataclass(frozen=True)
class FactorShape:
    """One valid split of an m x n weight, with its cost."""

    m1: int
    n1: int
    m2: int
    n2: int
    rank: int
    params: int
    macs_per_token: int
    order: str
    compression: float  # dense parameters / Kronecker parameters
    mac_reduction: float  # dense multiply-adds / Kronecker multiply-adds

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.m1, self.n1, self.m2, self.n2)

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"A {self.m1}x{self.n1} ⊗ B {self.m2}x{self.n2} (rank {self.rank})"


def validate_shape(m: int, n: int, shape, rank: int = 1, *, what: str = "weight") -> tuple[int, int, int, int]:
    """Check that (m1, n1, m2, n2) factors an m x n weight at this rank; return it as a tuple of ints."""
    try:
        m1, n1, m2, n2 = (int(v) for v in shape)
    except (TypeError, ValueError):
        raise ShapeError(f"{what}: a factor shape is four integers [m1, n1, m2, n2], got {shape!r}") from None
    if min(m1, n1, m2, n2) < 1:
        raise ShapeError(f"{what}: factor sizes must be positive, got {[m1, n1, m2, n2]}")
    if m1 * m2 != m or n1 * n2 != n:
        raise ShapeError(
            f"{what}: shape A {m1}x{n1} ⊗ B {m2}x{n2} gives a {m1 * m2}x{n1 * n2} matrix, "
            f"not {m}x{n} (need m1·m2 = {m} and n1·n2 = {n})"
        )
    if not isinstance(rank, int) or rank < 1:
        raise ShapeError(f"{what}: rank must be a positive integer, got {rank!r}")
    max_rank = min(m1 * n1, m2 * n2)
    if rank > max_rank:
        raise ShapeError(
            f"{what}: rank {rank} exceeds the maximum {max_rank} for A {m1}x{n1} ⊗ B {m2}x{n2} "
            "(min(m1·n1, m2·n2))"
        )
    return m1, n1, m2, n2


def factor_shapes(
    m: int,
    n: int,
    *,
    rank: int = 1,
    min_compression: float | None = None,
    max_compression: float | None = None,
    max_aspect: float | None = None,
    include_trivial: bool = False,
) -> list[FactorShape]:
    """Every valid split (m1, n1, m2, n2) of an m x n weight, sorted by parameter count (largest first).

    Args:
        m, n: the weight's rows (out features) and columns (in features).
        rank: number of summed Kronecker products; splits whose factors cannot hold that rank are skipped.
        min_compression / max_compression: keep splits whose dense/Kronecker parameter ratio lies in range.
        max_aspect: keep splits whose factors A and B both have max(rows, cols)/min(rows, cols) ≤ this.
        include_trivial: keep splits where A or B is 1x1 (a scaled copy of W: no compression at all).
    """
    if m < 1 or n < 1:
        raise ShapeError(f"cannot factor a {m}x{n} weight")
    if not isinstance(rank, int) or rank < 1:
        raise ShapeError(f"rank must be a positive integer, got {rank!r}")
    if min_compression is not None and max_compression is not None and min_compression > max_compression:
        raise ShapeError(f"min_compression {min_compression:g} is above max_compression {max_compression:g}: no shape "
                         "can lie in that range; give min_compression <= max_compression")
    if max_aspect is not None and max_aspect < 1:
        raise ShapeError(f"max_aspect must be >= 1 (the ratio of a factor's longer to its shorter side), "
                         f"got {max_aspect:g}")
    dense = m * n
    out: list[FactorShape] = []
    for m1 in divisors(m):
        for n1 in divisors(n):
            m2, n2 = m // m1, n // n1
            if not include_trivial and (m1 * n1 == 1 or m2 * n2 == 1):
                continue
            if rank > min(m1 * n1, m2 * n2):
                continue
            if max_aspect is not None:
                if max(m1, n1) / min(m1, n1) > max_aspect or max(m2, n2) / min(m2, n2) > max_aspect:
                    continue
            params = kron_params(m1, n1, m2, n2, rank)
            compression = dense / params
            if min_compression is not None and compression < min_compression:
                continue
            if max_compression is not None and compression > max_compression:
                continue
            macs, order = kron_macs(m1, n1, m2, n2, rank)
            out.append(FactorShape(m1, n1, m2, n2, rank, params, macs, order, compression, dense / macs))
    out.sort(key=lambda s: (-s.params, s.macs_per_token, s.shape))
    return out


def rearrange(W: torch.Tensor, m1: int, n1: int, m2: int, n2: int) -> torch.Tensor:
    """Van Loan's R(W): row i·n1 + j is vec of block W[i·m2:(i+1)·m2, j·n2:(j+1)·n2] (row-major).

    ‖W - A ⊗ B‖_F = ‖R(W) - vec(A) vec(B)ᵀ‖_F, so the nearest Kronecker product is a rank-1 SVD problem.
    """
    return W.reshape(m1, m2, n1, n2).permute(0, 2, 1, 3).reshape(m1 * n1, m2 * n2)


@dataclass
class KroneckerFactors:
    """Result of `nearest_kronecker`: A (rank, m1, n1), B (rank, m2, n2), relative Frobenius error."""

    A: torch.Tensor
    B: torch.Tensor
    rel_error: float
    singular_values: torch.Tensor

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


def lowrank_params(m: int, n: int, rank: int) -> int:
    """Parameters of U (m x rank) · V (rank x n), biases not included; also its multiply-adds per token."""
    return rank * (m + n)


def lowrank_rank_for_ratio(m: int, n: int, ratio: float) -> int:
    """The rank whose U·V holds about 1/ratio of an m x n weight's parameters: max(1, floor(m·n / (ratio·(m+n))))."""
    # the small epsilon keeps exact quotients such as 768·768 / (2·1536) = 192 from flooring to 191
    return max(1, math.floor(m * n / (ratio * (m + n)) + 1e-9))


@dataclass
class LowRankFactors:
    """Result of `nearest_lowrank`: U (m, rank), V (rank, n), relative Frobenius error, all singular values."""

    U: torch.Tensor
    V: torch.Tensor
    rel_error: float
    singular_values: torch.Tensor

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
