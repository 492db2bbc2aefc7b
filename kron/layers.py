"""Kronecker-factored drop-in replacements for nn.Linear / GPT-2 Conv1D and nn.Embedding, and the low-rank
(U·V) baseline.

The forward pass never forms the dense weight: y = Σ_k (A_k ⊗ B_k) x = Σ_k vec(A_k · X · B_kᵀ) with X the input
viewed as (n1 x n2), contracted in whichever order costs fewer multiply-adds for this shape; a low-rank layer
computes (x · Vᵀ) · Uᵀ.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .errors import PlanError
from .factor import kron_macs, kron_params, lowrank_params, nearest_kronecker, nearest_lowrank, validate_shape
from .functional import dense_weight, kron_linear, lowrank_linear

__all__ = [
    "FusedKroneckerLinear",
    "FusedLowRankLinear",
    "KroneckerEmbedding",
    "KroneckerLinear",
    "LowRankLinear",
    "dense_weight",
    "kron_linear",
    "lowrank_linear",
]


def _linear_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (out, in) weight and bias of an nn.Linear or a transformers Conv1D (stored as (in, out))."""
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return module.weight.T, module.bias
    raise TypeError(
        f"cannot factor a {type(module).__name__}: supported types are torch.nn.Linear and "
        "transformers.pytorch_utils.Conv1D"
    )


class KroneckerLinear(nn.Module):
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
        """The equivalent dense weight, (out, in) like nn.Linear.weight."""
        return dense_weight(self.A, self.B)

    @classmethod
    def from_linear(cls, module: nn.Module, shape, rank: int = 1) -> "KroneckerLinear":
        """Factor an nn.Linear or GPT-2 Conv1D by SVD (nearest Kronecker product), keeping device and dtype."""
        weight, bias = _linear_weight(module)
        out_f, in_f = weight.shape
        validate_shape(out_f, in_f, shape, rank, what=f"{type(module).__name__}({in_f} -> {out_f})")
        return cls._from_weight(weight, bias, shape, rank)

    @classmethod
    def _from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, shape, rank: int) -> "KroneckerLinear":
        out_f, in_f = weight.shape
        layer = cls(in_f, out_f, shape, rank, bias=bias is not None, device=weight.device, dtype=weight.dtype)
        factors = nearest_kronecker(weight, shape, rank)
        with torch.no_grad():
            layer.A.copy_(factors.A.to(weight.dtype))
            layer.B.copy_(factors.B.to(weight.dtype))
            if bias is not None:
                layer.bias.copy_(bias)
        layer.init_error = factors.rel_error
        return layer

    def extra_repr(self) -> str:
        m1, n1, m2, n2 = self.shape
        return (f"in={self.in_features}, out={self.out_features}, A={m1}x{n1}, B={m2}x{n2}, rank={self.rank}, "
                f"bias={self.bias is not None}, order={self.order}")


class _FusedLinear(nn.Module):
    """Equal output blocks of a fused projection, each its own factored layer (no bias), plus the fused bias."""

    def __init__(self, blocks: list[nn.Module], bias: torch.Tensor | None):
        super().__init__()
        if len({b.in_features for b in blocks}) != 1:
            raise ValueError(f"all blocks of a {type(self).__name__} need the same input size")
        self.blocks = nn.ModuleList(blocks)
        self.in_features = blocks[0].in_features
        self.out_features = sum(b.out_features for b in blocks)
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    @property
    def init_error(self) -> float | None:
        errs = [b.init_error for b in self.blocks]
        if any(e is None for e in errs):
            return None
        return math.sqrt(sum(e * e for e in errs) / len(errs))

    @property
    def macs_per_token(self) -> int:
        return sum(b.macs_per_token for b in self.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([b(x) for b in self.blocks], dim=-1)
        return y + self.bias if self.bias is not None else y

    def to_dense(self) -> torch.Tensor:
        return torch.cat([b.to_dense() for b in self.blocks], dim=0)


class FusedKroneckerLinear(_FusedLinear):
    """A fused projection (GPT-2's c_attn = [Q; K; V]) split into equal output blocks, each its own Kronecker layer.

    The papers factor Q, K and V separately; factoring the fused 2304 x 768 matrix as one product would tie them.
    """

    def __init__(self, blocks: list[KroneckerLinear], bias: torch.Tensor | None):
        super().__init__(blocks, bias)

    @classmethod
    def from_linear(cls, module: nn.Module, shape, rank: int = 1, blocks: int = 3) -> "FusedKroneckerLinear":
        """Split the output rows of an nn.Linear/Conv1D into `blocks` equal parts and factor each with `shape`."""
        weight, bias = _linear_weight(module)
        out_f, in_f = weight.shape
        if blocks < 1 or out_f % blocks:
            raise PlanError(f"cannot split {out_f} output features into {blocks} equal blocks")
        rows = out_f // blocks
        validate_shape(rows, in_f, shape, rank, what=f"each of {blocks} blocks ({in_f} -> {rows})")
        parts = [KroneckerLinear._from_weight(w, None, shape, rank) for w in weight.split(rows, dim=0)]
        return cls(parts, bias)


def _check_lowrank(out_features: int, in_features: int, rank: int, what: str) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise PlanError(f"{what}: rank must be a positive integer, got {rank!r}")
    if rank > min(out_features, in_features):
        raise PlanError(f"{what}: rank {rank} exceeds min(out, in) = {min(out_features, in_features)} for a "
                        f"{out_features} x {in_features} weight (the SVD has no more components)")


class LowRankLinear(nn.Module):
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
        """The equivalent dense weight, (out, in) like nn.Linear.weight."""
        return self.U @ self.V

    @classmethod
    def from_linear(cls, module: nn.Module, rank: int) -> "LowRankLinear":
        """Factor an nn.Linear or GPT-2 Conv1D by truncated SVD (√σ in each factor), keeping device and dtype."""
        weight, bias = _linear_weight(module)
        out_f, in_f = weight.shape
        _check_lowrank(out_f, in_f, rank, f"{type(module).__name__}({in_f} -> {out_f})")
        return cls._from_weight(weight, bias, rank)

    @classmethod
    def _from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, rank: int) -> "LowRankLinear":
        out_f, in_f = weight.shape
        layer = cls(in_f, out_f, rank, bias=bias is not None, device=weight.device, dtype=weight.dtype)
        factors = nearest_lowrank(weight, rank)
        with torch.no_grad():
            layer.U.copy_(factors.U.to(weight.dtype))
            layer.V.copy_(factors.V.to(weight.dtype))
            if bias is not None:
                layer.bias.copy_(bias)
        layer.init_error = factors.rel_error
        return layer

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}")


class FusedLowRankLinear(_FusedLinear):
    """A fused projection (GPT-2's c_attn = [Q; K; V]) split into equal output blocks, each its own U·V."""

    def __init__(self, blocks: list[LowRankLinear], bias: torch.Tensor | None):
        super().__init__(blocks, bias)

    @property
    def rank(self) -> int:
        return self.blocks[0].rank

    @classmethod
    def from_linear(cls, module: nn.Module, rank: int, blocks: int = 3) -> "FusedLowRankLinear":
        """Split the output rows of an nn.Linear/Conv1D into `blocks` equal parts and give each a rank-`rank` U·V."""
        weight, bias = _linear_weight(module)
        out_f, in_f = weight.shape
        if blocks < 1 or out_f % blocks:
            raise PlanError(f"cannot split {out_f} output features into {blocks} equal blocks")
        rows = out_f // blocks
        _check_lowrank(rows, in_f, rank, f"each of {blocks} blocks ({in_f} -> {rows})")
        parts = [LowRankLinear._from_weight(w, None, rank) for w in weight.split(rows, dim=0)]
        return cls(parts, bias)


class KroneckerEmbedding(nn.Module):
    """Embedding table A (v x d/f) ⊗ B (1 x f), as in KroneckerBERT/KnGPT2: row i of A is still word i's vector,
    and a lookup costs O(d)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, factor: int, padding_idx: int | None = None,
                 device=None, dtype=None):
        super().__init__()
        if factor < 1 or embedding_dim % factor:
            raise PlanError(
                f"embedding factor f={factor} must divide the embedding size {embedding_dim}; valid f: "
                f"{[f for f in range(1, embedding_dim + 1) if embedding_dim % f == 0]}"
            )
        self.num_embeddings, self.embedding_dim, self.factor = num_embeddings, embedding_dim, factor
        self.padding_idx = padding_idx
        kw = {"device": device, "dtype": dtype}
        self.A = nn.Parameter(torch.randn(num_embeddings, embedding_dim // factor, **kw) * 0.02)
        self.B = nn.Parameter(torch.ones(1, factor, **kw))
        self.init_error: float | None = None

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.num_embeddings, self.embedding_dim // self.factor, 1, self.factor)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = nn.functional.embedding(input_ids, self.A, self.padding_idx)
        return (rows.unsqueeze(-1) * self.B[0]).flatten(-2)

    def to_dense(self) -> torch.Tensor:
        return torch.kron(self.A, self.B)

    @classmethod
    def from_embedding(cls, module: nn.Embedding, factor: int) -> "KroneckerEmbedding":
        """Factor an nn.Embedding (v x d) as A (v x d/f) ⊗ B (1 x f) by SVD, keeping device and dtype."""
        if not isinstance(module, nn.Embedding):
            raise TypeError(f"cannot factor a {type(module).__name__} as an embedding: expected torch.nn.Embedding")
        W = module.weight
        v, d = W.shape
        layer = cls(v, d, factor, module.padding_idx, device=W.device, dtype=W.dtype)
        factors = nearest_kronecker(W, (v, d // factor, 1, factor), 1)
        with torch.no_grad():
            layer.A.copy_(factors.A[0].to(W.dtype))
            layer.B.copy_(factors.B[0].to(W.dtype))
        layer.init_error = factors.rel_error
        return layer

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, A={self.num_embeddings}x{self.embedding_dim // self.factor}, B=1x{self.factor}"
