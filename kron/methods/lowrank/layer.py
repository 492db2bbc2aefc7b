"""The low-rank (U·V) baseline to Kronecker layers: a drop-in replacement for nn.Linear / GPT-2 Conv1D that
computes (x · Vᵀ) · Uᵀ, r·(m + n) multiply-adds per token instead of m·n."""
from __future__ import annotations

import math

import torch
from torch import nn

from ...errors import PlanError
from ...factor import nearest_lowrank
from ...functional import lowrank_linear
from ...shapes import lowrank_params
from ..layers import FactoredLinear, FusedLinear

__all__ = ["FusedLowRankLinear", "LowRankLinear"]


def _check_lowrank(out_features: int, in_features: int, rank: int, what: str) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise PlanError(f"{what}: rank must be a positive integer, got {rank!r}")
    if rank > min(out_features, in_features):
        raise PlanError(f"{what}: rank {rank} exceeds min(out, in) = {min(out_features, in_features)} for a "
                        f"{out_features} x {in_features} weight (the SVD has no more components)")


class LowRankLinear(FactoredLinear):
    """Linear layer with weight U · V: U (out x rank), V (rank x in); the low-rank baseline to Kronecker layers."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        _check_lowrank(out_features, in_features, rank, "LowRankLinear")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        kw = {"device": device, "dtype": dtype}
        self.U = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.V = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        self.init_error: float | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # W_ij sums `rank` products of independent factors: give W nn.Linear's variance 1/(3·in).
        std = (1.0 / (3 * self.in_features * self.rank)) ** 0.25
        nn.init.uniform_(self.U, -std * math.sqrt(3), std * math.sqrt(3))
        nn.init.uniform_(self.V, -std * math.sqrt(3), std * math.sqrt(3))

    @property
    def macs_per_token(self) -> int:
        return lowrank_params(self.out_features, self.in_features, self.rank)

    @property
    def factor_params(self) -> int:
        return lowrank_params(self.out_features, self.in_features, self.rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lowrank_linear(x, self.U, self.V, self.bias)

    def to_dense(self) -> torch.Tensor:
        return self.U @ self.V

    @classmethod
    def from_linear(cls, module: nn.Module, rank: int, **init_kw) -> "LowRankLinear":
        """Factor an nn.Linear or GPT-2 Conv1D by truncated SVD (√σ in each factor), or whitened with `S=` (and
        `ridge=`), keeping device and dtype."""
        return super().from_linear(module, rank, **init_kw)

    @classmethod
    def _check(cls, out_features: int, in_features: int, rank: int, *, what: str) -> None:
        _check_lowrank(out_features, in_features, rank, what)

    @classmethod
    def _nearest(cls, weight: torch.Tensor, rank: int) -> tuple[dict, float]:
        factors = nearest_lowrank(weight, rank)
        return {"U": factors.U, "V": factors.V}, factors.rel_error

    @classmethod
    def _data_aware(cls, weight: torch.Tensor, S: torch.Tensor, rank: int, *,
                    ridge: float | None = None) -> tuple[dict, float, str]:
        """The whitened truncated SVD of SVD-LLM (`kron.datainit.whitened_lowrank`)."""
        from ...datainit import DEFAULT_RIDGE
        from .datainit import whitened_lowrank

        f = whitened_lowrank(weight, S, rank, DEFAULT_RIDGE if ridge is None else ridge)
        return {"U": f.U, "V": f.V}, f.rel_error, f.init

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}")


class FusedLowRankLinear(FusedLinear):
    """A fused projection (GPT-2's c_attn = [Q; K; V]) split into equal output blocks, each its own U·V."""

    block_type = LowRankLinear

    def __init__(self, blocks: list[LowRankLinear], bias: torch.Tensor | None):
        super().__init__(blocks, bias)

    @property
    def rank(self) -> int:
        return self.blocks[0].rank

    @classmethod
    def from_linear(cls, module: nn.Module, rank: int, blocks: int = 3, **init_kw) -> "FusedLowRankLinear":
        """Split the output rows of an nn.Linear/Conv1D into `blocks` equal parts and give each a rank-`rank` U·V
        (whitened with `S=`: every block sees the same input)."""
        return super().from_linear(module, rank, blocks=blocks, **init_kw)
