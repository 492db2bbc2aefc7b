"""Pure contraction functions of the factorised layers (no modules, no state): the Kronecker product applied
to a batch of tokens without forming the dense weight, its dense form, and the low-rank product.

Layers in `kron.methods` call these; keeping the maths here (tensorly-torch's `functional` split) lets it be tested
and tuned on its own.
"""
from __future__ import annotations

import torch
from torch import nn

from .factor import kron_macs

__all__ = ["dense_weight", "kron_linear", "lowrank_linear"]


_BATCHED_MIN = 32  # per-token columns from which a batched GEMM beats one transpose + a large GEMM (measured)


def kron_linear(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None = None,
                order: str = "auto") -> torch.Tensor:
    """y = x · (Σ_k A_k ⊗ B_k)ᵀ + bias for x (..., n1·n2), A (r, m1, n1), B (r, m2, n2); returns (..., m1·m2).

    order: "a_first" (cost m1·n2·(n1+m2) per token), "b_first" (n1·m2·(n2+m1)) or "auto" (the cheaper).
    """
    r, m1, n1 = A.shape
    _, m2, n2 = B.shape
    if order == "auto":
        order = kron_macs(m1, n1, m2, n2, r)[1]
    lead = x.shape[:-1]
    X = x.reshape(-1, n1, n2)
    T = X.shape[0]
    # Each order is one large GEMM plus one contraction over the other factor. That second contraction is a
    # batched GEMM over tokens when its per-token matrices are wide enough for BLAS to be efficient (no copy of
    # any activation-sized tensor for rank 1); for narrow ones (a few columns per token) it is cheaper to
    # transpose the intermediate once and run one large GEMM. On CPU a fresh activation-sized copy costs about as
    # much as the small matmuls, so the copies are kept to the cases where they pay.
    if order == "a_first":
        # U[t, (k, i1), j2] = Σ_j1 A[k, i1, j1] X[t, j1, j2]
        Ar = A.reshape(r * m1, n1)
        if n2 == 1:
            U = X.reshape(T, n1) @ Ar.T
        elif n2 >= _BATCHED_MIN:
            # explicit bmm: torch.matmul's folding heuristic changes with requires_grad and was 1.7x slower here
            U = torch.bmm(Ar.expand(T, r * m1, n1), X)  # batched over tokens: (T, r·m1, n2)
        else:
            U = (X.transpose(1, 2).reshape(T * n2, n1) @ Ar.T).reshape(T, n2, r * m1).transpose(1, 2)
        if r == 1:
            U = U.reshape(T * m1, n2)
        else:
            U = U.reshape(T, r, m1, n2).permute(0, 2, 1, 3).reshape(T * m1, r * n2)
        Bm = B.permute(0, 2, 1).reshape(r * n2, m2)  # [(k, j2), i2] = B[k, i2, j2]
        Y = U * Bm if r * n2 == 1 else U @ Bm  # (T·m1, m2); an outer product needs no matmul
    elif order == "b_first":
        # Z[t, j1, (k, i2)] = Σ_j2 X[t, j1, j2] B[k, i2, j2]
        Z = X.reshape(T * n1, n2) @ B.reshape(r * m2, n2).T
        if r == 1:
            Z = Z.reshape(T, n1, m2)
        else:
            Z = Z.reshape(T, n1, r, m2).permute(0, 2, 1, 3).reshape(T, r * n1, m2)
        Am = A.permute(1, 0, 2).reshape(m1, r * n1)  # [i1, (k, j1)] = A[k, i1, j1]
        if m2 == 1:
            Y = Z.reshape(T, r * n1) @ Am.T
        elif m2 >= _BATCHED_MIN:
            Y = torch.bmm(Am.expand(T, m1, r * n1), Z)  # (T, m1, m2)
        else:
            Zt = Z.transpose(0, 1).reshape(r * n1, T * m2)
            Y = (Am @ Zt).reshape(m1, T, m2).transpose(0, 1)
    else:
        raise ValueError(f"order must be 'auto', 'a_first' or 'b_first', got {order!r}")
    y = Y.reshape(T, m1 * m2)
    if bias is not None:
        # in place when y is a fresh result (not a view of the input): saves an activation-sized allocation
        y = y.add_(bias) if y.data_ptr() != x.data_ptr() else y + bias
    return y.reshape(*lead, m1 * m2)


def dense_weight(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Σ_k A_k ⊗ B_k as an (m1·m2, n1·n2) matrix."""
    r, m1, n1 = A.shape
    _, m2, n2 = B.shape
    # (k, i1, j1) x (k, i2, j2) -> (i1, i2, j1, j2), summed over k
    return torch.einsum("kab,kcd->acbd", A, B).reshape(m1 * m2, n1 * n2)


def lowrank_linear(x: torch.Tensor, U: torch.Tensor, V: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x · Vᵀ · Uᵀ + bias for x (..., n), U (m, r), V (r, n): r·(m + n) multiply-adds per token, never m·n."""
    return nn.functional.linear(nn.functional.linear(x, V), U, bias)
