"""The closed-form damage of Kronecker factors on one matrix block (`kron.damage.MatrixBlock`): the output error
f = tr((W − Σ A_k⊗B_k) S (W − Σ A_k⊗B_k)ᵀ) of `data_aware_kronecker`'s factors (the better of the SVD init and
the data-aware ones), computed from pieces the block caches across shapes — S laid out in the n2² blocks of each
split, W·S — so that each shape costs its own factorisation plus O(m·n·r + m1·(r·n1)² + r²·n²), not m·n² products.
The results equal `data_aware_kronecker`'s (tests/kron/test_profile.py)."""
from __future__ import annotations

import torch

from ...factor import nearest_kronecker
from .datainit import KronLS, balance, kron_dense, s_blocks, search_and_refine

__all__ = ["f_kron", "kronecker_damage", "kronecker_layer"]

_KEY = "kronecker"  # this method's entries in MatrixBlock.cache


def _split(block, n1: int, n2: int, *, gram: bool = False) -> torch.Tensor:
    """S (or, gram: M = (W·Sr)ᵀ(W·Sr), Sr = S + λI) laid out as its n2² blocks of n1 x n1 (`s_blocks`), shared by
    the shapes with this split."""
    cache = block.cache.setdefault(_KEY, {})
    key = ("split", n1, n2, gram)
    if key not in cache:
        if gram and "M" not in cache:
            WSr = block.WS + block.lam * block.W
            cache["M"] = WSr.T @ WSr
        cache[key] = s_blocks(cache["M"] if gram else block.S, n1, n2)
    return cache[key]


def f_kron(block, A: torch.Tensor, B: torch.Tensor) -> float:
    """tr((W − Σ A_k⊗B_k) S (W − Σ A_k⊗B_k)ᵀ) from the factors: O(m·n·r + m1·(r·n1)² + r²·n²)."""
    r, m1, n1 = A.shape
    _, m2, n2 = B.shape
    cross = float((kron_dense(A, B) * block.WS).sum().item())  # <Ŵ, W·S>
    Ar = A.permute(1, 0, 2).reshape(m1, r * n1)
    D = (Ar.T @ Ar).reshape(r, n1, r, n1).permute(0, 2, 1, 3).reshape(r * r, n1 * n1)  # D[k,l,a,b]
    C = torch.einsum("kip,liq->klpq", B, B).reshape(r * r, n2 * n2)
    quad = float(((D @ _split(block, n1, n2).T) * C).sum().item())  # Σ_kl Σ_pq C[k,l,p,q] <D_kl, S_pq>
    return max(block.base - 2 * cross + quad, 0.0)


def _layout(block, shape, rank: int) -> KronLS:
    """The least-squares layout of one shape on S + λI, from the cached S blocks and W·S."""
    m1, n1, m2, n2 = shape
    # A taller than wide with B one row: the search keeps A implicit (`KronLS.implicit_A`); its M = (W·Sr)ᵀ(W·Sr)
    # costs m·n² once, so only where W is not wide
    implicit = m2 == 1 and m1 > n1 and block.W.shape[0] >= block.W.shape[1]
    Mblk = _split(block, n1, n2, gram=True) if implicit else None
    return KronLS(block.W, block.S, shape, rank, WS=block.WS, lam=block.lam, Sblk=_split(block, n1, n2), Mblk=Mblk,
                  base=block.base + block.lam * float((block.W * block.W).sum().item()))


def _solve(block, shape, rank: int, *, grid: int = 12, iters: int = 10, tol: float = 1e-6,
           seed: int = 0) -> tuple[float, str, tuple]:
    """(f, init, (A, B)) of `data_aware_kronecker(W, S, shape, rank)`: the better of the SVD init and the
    data-aware factors on S."""
    m1, n1, m2, n2 = shape
    svd = nearest_kronecker(block.W, shape, rank)
    f_svd = f_kron(block, svd.A, svd.B)
    f_data = None
    if n1 == 1 or n2 == 1:
        _, Linv, WL = block.whitener()
        white = nearest_kronecker(WL, shape, rank)
        A, B = white.A, white.B
        if n2 == 1:
            A = block.unwhiten(A.reshape(rank * m1, n1)).reshape(rank, m1, n1)
        else:
            B = block.unwhiten(B.reshape(rank * m2, n2)).reshape(rank, m2, n2)
        if Linv is None:  # exact L·Lᵀ = S + λI: ‖(W − Ŵ)L‖² is the SVD's tail, then take the ridge's part out
            tail = float((white.singular_values[rank:].double() ** 2).sum().item())
            f_data = max(tail - block.lam * float(((block.W - kron_dense(A, B)) ** 2).sum().item()), 0.0)
    else:
        A, B, _ = search_and_refine(_layout(block, shape, rank), svd.B, grid, seed, iters, tol)
    A, B = balance(A, B)  # as data_aware_kronecker returns them
    if f_data is None:
        f_data = f_kron(block, A, B)
    return (f_svd, "svd", (svd.A, svd.B)) if f_svd < f_data else (f_data, "data", (A, B))


def kronecker_damage(block, spec) -> tuple[float, str]:
    """(f, init) of one Kronecker spec (its shape and rank) on one block; the factors stay in the block's cache."""
    cache = block.cache.setdefault(_KEY, {})
    key = ("solved", tuple(spec.shape), spec.rank)
    if key not in cache:
        cache[key] = _solve(block, tuple(spec.shape), spec.rank)
    f, init, _ = cache[key]
    return f, init


def kronecker_layer(module, spec, blocks) -> torch.nn.Module | None:
    """The layer `KroneckerMethod.build(module, spec, "data", stats)` gives, from the factors `kronecker_damage`
    left in each block's cache; None when some are missing."""
    key = ("solved", tuple(spec.shape), spec.rank)
    factors = [b.cache.get(_KEY, {}).get(key) for b in blocks]
    if not factors or any(f is None for f in factors):
        return None
    from ..base import get_method
    from ..layers import set_factors

    return set_factors(get_method("kronecker").build(module, spec, "none"), module, [f[2] for f in factors],
                       ("A", "B"))
