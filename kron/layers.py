"""The factorised layers of the built-in methods, under the import path of the first release.

Each layer lives with its method (`kron.methods.<method>.layer`); the contractions are in `kron.functional`.
"""
from __future__ import annotations

from .functional import dense_weight, kron_linear, lowrank_linear
from .methods.kron_embedding.layer import KroneckerEmbedding
from .methods.kronecker.layer import FusedKroneckerLinear, KroneckerLinear
from .methods.layers import linear_weight
from .methods.lowrank.layer import FusedLowRankLinear, LowRankLinear

__all__ = [
    "FusedKroneckerLinear",
    "FusedLowRankLinear",
    "KroneckerEmbedding",
    "KroneckerLinear",
    "LowRankLinear",
    "dense_weight",
    "kron_linear",
    "linear_weight",
    "lowrank_linear",
]
