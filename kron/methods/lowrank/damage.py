"""The closed-form damage of a low-rank U·V on one matrix block (`kron.damage.MatrixBlock`), for every rank from
one SVD: with W·L = P Σ Qᵀ (S + λI = L Lᵀ), the whitened solution of `whitened_lowrank` leaves W − Ŵ_r =
P_t Σ_t Q_tᵀ L⁻¹, so f(r) = Σ_{i>r} σ_i² z_i S z_iᵀ with z_i = q_iᵀ L⁻¹."""
from __future__ import annotations

import torch

__all__ = ["lowrank_damage", "lowrank_layer"]

_KEY = "lowrank"  # this method's entry in MatrixBlock.cache: (P, σ, Z, tail)


def _svd(block):
    if _KEY not in block.cache:
        _, Linv, WL = block.whitener()
        if WL.shape[0] < WL.shape[1]:  # wide: LAPACK is ~3x faster on the tall transpose (same factors)
            U, sig, Ph = torch.linalg.svd(WL.T, full_matrices=False)
            P, Qh = Ph.T, U.T
        else:
            P, sig, Qh = torch.linalg.svd(WL, full_matrices=False)
        Z = block.unwhiten(Qh)
        if Linv is None:  # L·Lᵀ = S + λI, so z S zᵀ = q L⁻¹(L Lᵀ − λI)L⁻ᵀ qᵀ = 1 − λ‖z‖² (unit rows q)
            g = (1 - block.lam * (Z * Z).sum(1)).clamp_min(0)
        else:
            g = ((Z @ block.S) * Z).sum(1)
        tail = (sig ** 2 * g).flip(0).cumsum(0).flip(0)  # tail[i] = Σ_{j>=i}
        block.cache[_KEY] = (P, sig, Z, torch.cat([tail, tail.new_zeros(1)]))
    return block.cache[_KEY]


def lowrank_damage(block, spec) -> tuple[float, str]:
    """(f, "data") of `whitened_lowrank(W, S, rank)` on one block."""
    return max(float(_svd(block)[3][spec.rank].item()), 0.0), "data"


def lowrank_layer(module, spec, blocks) -> torch.nn.Module | None:
    """The layer `LowRankMethod.build(module, spec, "data", stats)` gives (U = P_r Σ_r^½, V = Σ_r^½ Z_r, as
    `whitened_lowrank`), from the SVD each block cached; None when some block has none."""
    if not blocks or any(_KEY not in b.cache for b in blocks):
        return None
    from ..base import get_method
    from ..layers import set_factors

    factors = []
    for b in blocks:
        P, sig, Z, _ = b.cache[_KEY]
        root = sig[:spec.rank].sqrt()
        factors.append((P[:, :spec.rank] * root, root[:, None] * Z[:spec.rank]))
    return set_factors(get_method("lowrank").build(module, spec, "none"), module, factors, ("U", "V"))
