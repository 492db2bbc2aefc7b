"""Kronecker-factored drop-in replacements for nn.Linear / GPT-2 Conv1D.

The forward pass never forms the dense weight: y = Σ_k (A_k ⊗ B_k) x = Σ_k vec(A_k · X · B_kᵀ) with X the input
viewed as (n1 x n2), contracted in whichever order costs fewer multiply-adds for this shape (`kron.functional`).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ...factor import nearest_kronecker
from ...functional import dense_weight, kron_linear
from ...shapes import kron_macs, kron_params, validate_shape
from ..layers import FactoredLinear, FusedLinear

__all__ = ["FusedKroneckerLinear", "KroneckerLinear"]


class KroneckerLinear(FactoredLinear):
    """Linear layer with weight Σ_k A_k ⊗ B_k: A (rank, m1, n1), B (rank, m2, n2), in = n1·n2, out = m1·m2."""

    def __init__(self, in_features: int, out_features: int, shape, rank: int = 1, bias: bool = True,
                 order: str = "auto", device=None, dtype=None):
        super().__init__()
        m1, n1, m2, n2 = validate_shape(out_features, in_features, shape, rank, what="KroneckerLinear")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.shape = (m1, n1, m2, n2)
        kw = {"device": device, "dtype": dtype}
        self.A = nn.Parameter(torch.empty(rank, m1, n1, **kw))
        self.B = nn.Parameter(torch.empty(rank, m2, n2, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        self.order = kron_macs(m1, n1, m2, n2, rank)[1] if order == "auto" else order
        self.init_error: float | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Variance of a product of independent factors multiplies; aim at Kaiming-uniform-like scale for W.
        bound = (1.0 / math.sqrt(self.in_features)) ** 0.5 / self.rank ** 0.25
        nn.init.uniform_(self.A, -bound * math.sqrt(3), bound * math.sqrt(3))
        nn.init.uniform_(self.B, -bound * math.sqrt(3), bound * math.sqrt(3))

    @property
    def macs_per_token(self) -> int:
        return kron_macs(*self.shape, self.rank)[0]

    @property
    def factor_params(self) -> int:
        return kron_params(*self.shape, self.rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kron_linear(x, self.A, self.B, self.bias, self.order)

    def to_dense(self) -> torch.Tensor:
        return dense_weight(self.A, self.B)

    @classmethod
    def from_linear(cls, module: nn.Module, shape, rank: int = 1, **init_kw) -> "KroneckerLinear":
        """Factor an nn.Linear or GPT-2 Conv1D by SVD (nearest Kronecker product), or data-aware with `S=` (and
        `ridge=`), keeping device and dtype."""
        return super().from_linear(module, shape, rank, **init_kw)

    @classmethod
    def _check(cls, out_features: int, in_features: int, shape, rank: int = 1, *, what: str) -> None:
        validate_shape(out_features, in_features, shape, rank, what=what)

    @classmethod
    def _nearest(cls, weight: torch.Tensor, shape, rank: int = 1) -> tuple[dict, float]:
        factors = nearest_kronecker(weight, shape, rank)
        return {"A": factors.A, "B": factors.B}, factors.rel_error

    @classmethod
    def _data_aware(cls, weight: torch.Tensor, S: torch.Tensor, shape, rank: int = 1, *,
                    ridge: float | None = None) -> tuple[dict, float, str]:
        from ...datainit import DEFAULT_RIDGE
        from .datainit import data_aware_kronecker

        f = data_aware_kronecker(weight, S, shape, rank, DEFAULT_RIDGE if ridge is None else ridge)
        return {"A": f.A, "B": f.B}, f.rel_error, f.init

    def extra_repr(self) -> str:
        m1, n1, m2, n2 = self.shape
        return (f"in={self.in_features}, out={self.out_features}, A={m1}x{n1}, B={m2}x{n2}, rank={self.rank}, "
                f"bias={self.bias is not None}, order={self.order}")


class FusedKroneckerLinear(FusedLinear):
    """A fused projection (GPT-2's c_attn = [Q; K; V]) split into equal output blocks, each its own Kronecker layer.

    The papers factor Q, K and V separately; factoring the fused 2304 x 768 matrix as one product would tie them.
    """

    block_type = KroneckerLinear

    def __init__(self, blocks: list[KroneckerLinear], bias: torch.Tensor | None):
        super().__init__(blocks, bias)

    @classmethod
    def from_linear(cls, module: nn.Module, shape, rank: int = 1, blocks: int = 3,
                    **init_kw) -> "FusedKroneckerLinear":
        """Split the output rows of an nn.Linear/Conv1D into `blocks` equal parts and factor each with `shape`
        (data-aware with `S=`: every block sees the same input)."""
        return super().from_linear(module, shape, rank, blocks=blocks, **init_kw)
