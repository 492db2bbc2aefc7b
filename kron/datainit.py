"""Activation-aware (data-aware) initialisation of factored weights: minimise the output error on calibration inputs.

SVD init minimises ‖W − Ŵ‖_F and ignores which input directions a layer actually sees. With S = E[x xᵀ] the
input second moment of the layer on calibration data (`kron.calibration`), the output error is

    f(Ŵ) = E‖(W − Ŵ) x‖² = tr((W − Ŵ) S (W − Ŵ)ᵀ)

and each method minimises it in its own `datainit` module (see ../shared/notes/data-aware-init.md for the maths
and the measured figures):

* `kron.methods.lowrank.datainit.whitened_lowrank(W, S, rank)`: SVD-LLM. With S + λI = L Lᵀ, f = ‖(W − UV) L‖_F²,
  so the truncated SVD of W·L is the exact minimiser; V is un-whitened by L⁻¹.
* `kron.methods.kronecker.datainit.data_aware_kronecker(W, S, shape, rank)`: Ŵ = Σ_k A_k ⊗ B_k, exact where one
  side of the input is not split (n1 == 1 or n2 == 1), otherwise a search over B's direction refined by
  alternating least squares; never worse than the SVD init on f.

This module holds what they share: the objective, the ridge λ = ridge · mean(diag S) (default ridge 1e-2: keeps
the factors from drifting far from W in directions the calibration data never used, and makes a singular S
harmless) and the whitener L. Maths in float64; factors are returned in float64 (callers cast), with `rel_error`
the relative weight error ‖W − Ŵ‖_F / ‖W‖_F as in `kron.factor` and `output_error` the relative output error
sqrt(f(Ŵ) / f(0)) on the S given.
"""
from __future__ import annotations

import math

import torch

from .errors import DataError, ShapeError

__all__ = [
    "DEFAULT_RIDGE",
    "calibration_objective",
    "checked_inputs",
    "output_error",
    "ridged",
    "weight_error",
    "whitener",
]

DEFAULT_RIDGE = 1e-2


# ----------------------------------------------------------------------------------------------- objective


def calibration_objective(W: torch.Tensor, S: torch.Tensor, W_hat: torch.Tensor | None = None) -> float:
    """tr((W − Ŵ) S (W − Ŵ)ᵀ) = E‖(W − Ŵ)x‖² (Ŵ = 0 when not given), in float64."""
    D = W.detach().double()
    if W_hat is not None:
        D = D - W_hat.detach().double().to(D.device)
    S = S.detach().double().to(D.device)
    return float(((D @ S) * D).sum().clamp_min(0).item())


def output_error(W: torch.Tensor, S: torch.Tensor, W_hat: torch.Tensor) -> float:
    """Relative output error sqrt(E‖(W − Ŵ)x‖² / E‖Wx‖²) on inputs with second moment S (0 when W·x is always 0)."""
    base = calibration_objective(W, S)
    if base <= 0:
        return 0.0
    return math.sqrt(calibration_objective(W, S, W_hat) / base)


def weight_error(W: torch.Tensor, W_hat: torch.Tensor) -> float:
    norm = float(torch.linalg.norm(W).item())
    return float(torch.linalg.norm(W - W_hat).item()) / norm if norm > 0 else 0.0


# ----------------------------------------------------------------------------------------------- helpers


def checked_inputs(W: torch.Tensor, S: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, S) in float64, S symmetrised; ShapeError / DataError naming `what` for wrong shapes or non-finite
    values."""
    if W.dim() != 2:
        raise ShapeError(f"{what} expects a 2-D weight, got shape {tuple(W.shape)}")
    n = W.shape[1]
    if S.dim() != 2 or tuple(S.shape) != (n, n):
        raise ShapeError(f"{what}: the input second moment S must be {n} x {n} for a weight with {n} inputs, got "
                         f"{tuple(S.shape)}")
    W64 = W.detach().double()
    S64 = S.detach().double().to(W64.device)
    if not torch.isfinite(S64).all():
        raise DataError(f"{what}: the calibration statistics hold NaN or inf values (the model produced non-finite "
                        "activations on the calibration data)")
    if not torch.isfinite(W64).all():
        raise DataError(f"{what}: the weight holds NaN or inf values")
    return W64, (S64 + S64.T) / 2


def ridged(S: torch.Tensor, ridge: float) -> torch.Tensor:
    """S + λI with λ = ridge · mean(diag S); the identity when S is zero (no calibration signal: plain SVD)."""
    if not (isinstance(ridge, (int, float)) and math.isfinite(ridge) and ridge >= 0):
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge!r}")
    n = S.shape[0]
    scale = float(torch.diagonal(S).mean().item()) if n else 0.0
    eye = torch.eye(n, dtype=S.dtype, device=S.device)
    if not scale > 0:
        return eye
    return S + max(ridge, 1e-10) * scale * eye


def whitener(Sr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, L⁻¹) with Sr = L·Lᵀ: Cholesky, or the symmetric square root where Cholesky fails numerically."""
    L, info = torch.linalg.cholesky_ex(Sr)
    if int(info.item()) == 0:
        eye = torch.eye(Sr.shape[0], dtype=Sr.dtype, device=Sr.device)
        return L, torch.linalg.solve_triangular(L, eye, upper=False)
    evals, Q = torch.linalg.eigh(Sr)
    floor = float(evals.abs().max().item()) * 1e-12 + 1e-300
    root = evals.clamp_min(floor).sqrt()
    return Q * root, (Q / root).T
