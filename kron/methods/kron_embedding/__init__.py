"""The Kronecker-factored word embedding of KroneckerBERT/KnGPT2: an nn.Embedding (v x d) as A (v x d/f) ⊗ B (1 x f),
so row i of A is still word i's vector and a lookup costs O(d). Data-free (SVD) init: an embedding has no input
activations. Plan-rule key: `embedding_factor: f`. Search option: "fF".
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar, Mapping

from pydantic import Field, field_validator

from ...errors import PlanError
from ..base import Method, MethodOptions, ModuleSpec, Slot, check_keys, positive_int, register
from ..linear import hints_for

__all__ = ["EmbeddingOptions", "EmbeddingSpec", "KroneckerEmbeddingMethod"]


class EmbeddingOptions(MethodOptions):
    """The embedding factors a search or a profile offers: f of A (v x d/f) ⊗ B (1 x f), each dividing d."""

    factors: list[int] = Field(default_factory=lambda: [2, 4, 8],
                               description="f of A (v x d/f) ⊗ B (1 x f) for the embedding group")

    @field_validator("factors")
    @classmethod
    def _factors(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("embedding_factors must list at least one factor f > 1, e.g. [2, 4]")
        bad = [f for f in v if f < 2]
        if bad:
            raise ValueError(f"embedding factors must be integers >= 2 (f = 1 does not compress), got {bad}")
        return sorted(set(v))


@dataclass(frozen=True)
class EmbeddingSpec(ModuleSpec):
    """factor: f of A (v x d/f) ⊗ B (1 x f)."""

    factor: int
    method: ClassVar[str] = "kron_embedding"

    def __post_init__(self):
        positive_int(self.factor, "embedding_factor")

    @property
    def embedding_factor(self) -> int:
        """The factor under its plan-file name."""
        return self.factor

    @property
    def kind(self) -> str:
        return "embedding"

    def params(self, m: int, n: int) -> int:
        return m * (n // self.factor) + self.factor

    def macs(self, m: int, n: int) -> int:
        return 0  # a lookup

    def describe(self, m: int | None = None, n: int | None = None) -> str:
        f = self.factor
        if m is not None and n is not None:
            return f"A {m}x{n // f} ⊗ B 1x{f}"
        return f"A v x d/{f} ⊗ B 1x{f}"

    def label(self) -> str:
        return f"emb f{self.factor}"

    def option(self) -> str:
        return f"f{self.factor}"

    def compression(self, m: int | None = None, n: int | None = None) -> float:
        if m is None or n is None:  # v·d / (v·d/f + f): f to within f²/(v·d)
            return float(self.factor)
        return m * n / self.params(m, n)

    def to_dict(self) -> dict:
        return {"embedding_factor": self.factor}

    def check(self, slot: Slot) -> None:
        if slot.n % self.factor:
            raise PlanError(f"module {slot.name} ({slot.m} x {slot.n} embedding): embedding_factor {self.factor} does "
                            f"not divide {slot.n}")

    @classmethod
    def _from_dict(cls, d: Mapping) -> "EmbeddingSpec":
        check_keys(d, ("shape", "rank", "blocks", "embedding_factor", "lowrank_rank"), "module spec")
        positive_int(d["embedding_factor"], "embedding_factor")
        if d.get("rank", 1) != 1 or d.get("blocks", 1) != 1:
            raise PlanError(f"an embedding spec takes neither rank nor blocks (got rank={d.get('rank', 1)}, "
                            f"blocks={d.get('blocks', 1)}): A (v x d/f) ⊗ B (1 x f) is a single product")
        return cls(factor=d["embedding_factor"])


class KroneckerEmbeddingMethod(Method):
    name = "kron_embedding"
    spec_type = EmbeddingSpec
    module_kinds = ("embedding",)
    primary_keys = ("embedding_factor",)
    family = "kronecker"
    option_keys = {}
    order = 20
    dict_key = "embedding_factor"
    rule_hint = "embedding_factor (A v x d/f ⊗ B 1 x f)"

    def validate_rule(self, options: dict, where: str) -> dict:
        positive_int(options["embedding_factor"], f"{where}: embedding_factor")
        if options.get("rank", 1) != 1 or options.get("blocks", 1) != 1:
            raise PlanError(f"{where}: embedding_factor cannot be combined with rank or blocks")
        return {"embedding_factor": options["embedding_factor"]}

    def spec_for(self, options: Mapping, slot: Slot) -> EmbeddingSpec:
        if slot.kind not in self.module_kinds:
            raise PlanError(f"{slot.where}: embedding_factor applies to nn.Embedding only, but {slot.name} is a "
                            f"{slot.type_name} ({slot.m} x {slot.n}); give {hints_for('linear')} for linear layers")
        f, n = options["embedding_factor"], slot.n
        if n % f or f == 1:
            valid = [d for d in range(2, n + 1) if n % d == 0]
            raise PlanError(f"{slot.where}: module {slot.name} (Embedding {slot.m} x {n}) cannot take embedding_factor "
                            f"{f}: f must divide the embedding size {n} and be > 1; valid: {valid}")
        return EmbeddingSpec(factor=f)

    options_type = EmbeddingOptions

    def candidates(self, m: int, n: int, options: EmbeddingOptions, span) -> list[EmbeddingSpec]:
        """Each of the options' factors that divides the embedding size."""
        return [EmbeddingSpec(factor=f) for f in sorted({f for f in options.factors if n % f == 0})]

    def build(self, module, spec: EmbeddingSpec, init: str):
        from .layer import KroneckerEmbedding

        if init == "svd":
            return KroneckerEmbedding.from_embedding(module, spec.factor)
        return KroneckerEmbedding(module.num_embeddings, module.embedding_dim, spec.factor, module.padding_idx,
                                  device=module.weight.device, dtype=module.weight.dtype)

    def layer_types(self) -> tuple[type, ...]:
        from .layer import KroneckerEmbedding

        return (KroneckerEmbedding,)

    def recognise(self, module) -> EmbeddingSpec | None:
        from .layer import KroneckerEmbedding

        return EmbeddingSpec(factor=module.factor) if isinstance(module, KroneckerEmbedding) else None

    def parse_label(self, text: str) -> EmbeddingSpec | None:
        m = re.fullmatch(r"emb f(\d+)", text)
        return None if m is None else EmbeddingSpec(factor=int(m.group(1)))

    def parse_option(self, text: str) -> EmbeddingSpec | None:
        m = re.fullmatch(r"\s*f(\d+)\s*", text)
        return None if m is None else EmbeddingSpec(factor=int(m.group(1)))


register(KroneckerEmbeddingMethod())
