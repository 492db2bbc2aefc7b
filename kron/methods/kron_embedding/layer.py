"""The Kronecker-factored embedding of KroneckerBERT/KnGPT2: A (v x d/f) ⊗ B (1 x f)."""
from __future__ import annotations

import torch
from torch import nn

from ...errors import PlanError
from ...factor import nearest_kronecker

__all__ = ["KroneckerEmbedding"]


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
