"""The data-aware init of low-rank U·V: the whitened SVD of SVD-LLM (`kron.datainit` has the objective it
minimises and the pieces every method shares)."""
from __future__ import annotations

import torch

from ...datainit import DEFAULT_RIDGE, checked_inputs, output_error, ridged, weight_error, whitener
from ...errors import ShapeError
from ...factor import LowRankFactors, nearest_lowrank

__all__ = ["whitened_lowrank"]


def whitened_lowrank(W: torch.Tensor, S: torch.Tensor, rank: int, ridge: float = DEFAULT_RIDGE) -> LowRankFactors:
    """Rank-`rank` U·V minimising tr((W − UV)(S + λI)(W − UV)ᵀ) (SVD-LLM's whitening), in float64.

    U = P_r Σ_r^½ and V = Σ_r^½ Q_rᵀ L⁻¹ from the SVD P Σ Qᵀ of W·L, S + λI = L Lᵀ. Exact, so never worse than SVD
    init on the calibration objective (the ridge only trades weight error against it). Returns LowRankFactors with
    rel_error (weight), output_error (on S) and singular_values (of W·L).
    """
    W64, S64 = checked_inputs(W, S, "whitened_lowrank")
    m, n = W64.shape
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(m, n):
        raise ShapeError(f"rank must be an integer in [1, {min(m, n)}] for a {m}x{n} weight, got {rank!r}")
    with torch.no_grad():
        L, Linv = whitener(ridged(S64, ridge))
        P, sig, Qh = torch.linalg.svd(W64 @ L, full_matrices=False)
        root = sig[:rank].sqrt()
        U = P[:, :rank] * root
        V = (root[:, None] * Qh[:rank]) @ Linv
        W_hat = U @ V
        out = LowRankFactors(U.contiguous(), V.contiguous(), weight_error(W64, W_hat), sig,
                             output_error=output_error(W64, S64, W_hat), init="data")
        svd = nearest_lowrank(W64, rank)
        svd_err = output_error(W64, S64, svd.to_dense())
        if svd_err < out.output_error:  # only by rounding: the whitened solution is exact
            svd.output_error, svd.init = svd_err, "svd"
            return svd
    return out
