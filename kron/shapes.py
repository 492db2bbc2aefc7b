"""Factor shapes and their costs, in plain Python (no torch): which splits (m1, n1, m2, n2) of an m x n weight
exist, and how many parameters and multiply-adds a Kronecker or low-rank factorisation of it costs.

Convention used everywhere in kronsearch: a weight W has the `nn.Linear` orientation (out x in) = (m x n), and
W ≈ Σ_k A_k ⊗ B_k with A_k (m1 x n1), B_k (m2 x n2), m = m1·m2, n = n1·n2. Torch-free so that the search space's
cost model and `analysis` can use it without loading torch.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .errors import ShapeError

__all__ = [
    "FactorShape",
    "divisors",
    "factor_shapes",
    "kron_macs",
    "kron_params",
    "lowrank_params",
    "lowrank_rank_for_ratio",
    "order_macs",
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


def order_macs(m1: int, n1: int, m2: int, n2: int, rank: int = 1) -> dict[str, int]:
    """Multiply-adds per token of each contraction order.

    "b_first" contracts X (n1 x n2) with Bᵀ first: n1·m2·(n2 + m1); "a_first" with A first: m1·n2·(n1 + m2).
    """
    return {"a_first": rank * m1 * n2 * (n1 + m2), "b_first": rank * n1 * m2 * (n2 + m1)}


def kron_macs(m1: int, n1: int, m2: int, n2: int, rank: int = 1) -> tuple[int, str]:
    """Multiply-adds per token of the cheaper contraction order (`order_macs`), and that order's name."""
    costs = order_macs(m1, n1, m2, n2, rank)
    if costs["a_first"] <= costs["b_first"]:
        return costs["a_first"], "a_first"
    return costs["b_first"], "b_first"


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


def lowrank_params(m: int, n: int, rank: int) -> int:
    """Parameters of U (m x rank) · V (rank x n), biases not included; also its multiply-adds per token."""
    return rank * (m + n)


def lowrank_rank_for_ratio(m: int, n: int, ratio: float) -> int:
    """The rank whose U·V holds about 1/ratio of an m x n weight's parameters: max(1, floor(m·n / (ratio·(m+n))))."""
    # the small epsilon keeps exact quotients such as 768·768 / (2·1536) = 192 from flooring to 191
    return max(1, math.floor(m * n / (ratio * (m + n)) + 1e-9))
