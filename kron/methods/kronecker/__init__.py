"""Kronecker factors of a linear layer, W ≈ Σ_k A_k ⊗ B_k (KnGPT2, KroneckerBERT), initialised by the nearest
Kronecker product (Van Loan–Pitsianis). Plan-rule keys: `shape: [m1, n1, m2, n2]` or `factor: f` (the valid shape
nearest to f-fold compression), `rank` (summed products), `blocks` (a fused projection's equal output blocks, each
factored on its own). Search option: "m1xn1,m2xn2,rR" per block.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import ClassVar, Literal, Mapping, Sequence

from pydantic import Field, field_validator

from ...errors import PlanError, ShapeError
from ...shapes import FactorShape, factor_shapes, kron_macs, kron_params, validate_shape
from ..base import LINEAR_KINDS, Method, MethodOptions, ModuleSpec, Slot, Span, check_keys, positive_int, register
from ..linear import linear_rows, rows_and_dims, wrong_kind

__all__ = ["SPLITS", "KroneckerMethod", "KroneckerOptions", "KroneckerSpec", "format_shape", "nearest_shape",
           "thin_shapes"]

# `ranks: auto`: the ranks offered per shape, kept where the compression range allows them
AUTO_RANKS = (1, 2, 4, 8, 16, 32, 64)


class KroneckerOptions(MethodOptions):
    """The Kronecker factors a search or a profile offers per matrix (within the shared compression span)."""

    ranks: list[int] | Literal["auto"] = Field(
        default_factory=lambda: [1], description="numbers of summed Kronecker products, or 'auto': per shape, every "
                                                 "rank 1, 2, 4, ..., 64 whose compression lies in the range (the "
                                                 "low-rank corner of the Kronecker family and high-rank sums)")
    max_aspect: float | None = Field(None, ge=1, description="largest rows/cols ratio of A and of B")

    @field_validator("ranks")
    @classmethod
    def _ranks(cls, v):
        if v == "auto":
            return v
        if not v:
            raise ValueError("ranks must list at least one rank, e.g. [1] or [1, 2]")
        bad = [r for r in v if r < 1]
        if bad:
            raise ValueError(f"ranks must be positive integers, got {bad}")
        return sorted(set(v))


def as_shape(value, what: str) -> tuple[int, int, int, int]:
    if (isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 4
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value)):
        raise PlanError(f"{what} must be four positive integers [m1, n1, m2, n2] "
                        f"(A m1 x n1, B m2 x n2), got {value!r}")
    return tuple(int(v) for v in value)


@dataclass(frozen=True)
class KroneckerSpec(ModuleSpec):
    """shape: (m1, n1, m2, n2) of A (m1 x n1) and B (m2 x n2) for the (out x in) weight — for a fused projection
    (blocks > 1) the shape of each block, whose weight is (out/blocks x in). rank: summed Kronecker products.
    blocks: 1, or the number of equal output blocks of a fused projection (GPT-2's c_attn = [Q; K; V]: 3)."""

    shape: tuple[int, int, int, int]
    rank: int = 1
    blocks: int = 1
    method: ClassVar[str] = "kronecker"

    def __post_init__(self):
        object.__setattr__(self, "shape", as_shape(self.shape, "shape"))
        positive_int(self.rank, "rank")
        positive_int(self.blocks, "blocks")

    @property
    def kind(self) -> str:
        return "fused" if self.blocks > 1 else "linear"

    def params(self, m: int, n: int) -> int:
        return self.blocks * kron_params(*self.shape, self.rank)

    def macs(self, m: int, n: int) -> int:
        return self.blocks * kron_macs(*self.shape, self.rank)[0]

    def weight_shapes(self, m: int, n: int) -> list[tuple[int, ...]]:
        m1, n1, m2, n2 = self.shape
        return [(self.rank, m1, n1), (self.rank, m2, n2)] * self.blocks

    def describe(self, m: int | None = None, n: int | None = None) -> str:
        m1, n1, m2, n2 = self.shape
        text = f"A {m1}x{n1} ⊗ B {m2}x{n2}"
        if self.rank > 1:
            text += f", rank {self.rank}"
        if self.blocks > 1:
            text = f"{self.blocks} blocks of {text}"
        return text

    def label(self) -> str:
        m1, n1, m2, n2 = self.shape
        return f"{m1}x{n1}⊗{m2}x{n2} r{self.rank}" + (f" b{self.blocks}" if self.blocks > 1 else "")

    def option(self) -> str:
        return format_shape(*self.shape, self.rank)

    def compression(self, m: int | None = None, n: int | None = None) -> float:
        m1, n1, m2, n2 = self.shape  # the block count cancels out
        return (m1 * m2 * n1 * n2) / kron_params(m1, n1, m2, n2, self.rank)

    def to_dict(self) -> dict:
        out = {"shape": list(self.shape), "rank": self.rank}
        if self.blocks != 1:
            out["blocks"] = self.blocks
        return out

    def to_rule(self) -> dict:
        out = {"shape": list(self.shape)}
        if self.rank != 1:
            out["rank"] = self.rank
        if self.blocks != 1:
            out["blocks"] = self.blocks
        return out

    def check(self, slot: Slot) -> None:
        rows = linear_rows(self, slot)
        try:
            validate_shape(rows, slot.n, self.shape, self.rank, what=f"module {slot.name}")
        except ShapeError as exc:
            raise PlanError(str(exc)) from None

    @classmethod
    def _from_dict(cls, d: Mapping) -> "KroneckerSpec":
        check_keys(d, ("shape", "rank", "blocks", "embedding_factor", "lowrank_rank"), "module spec")
        return cls(shape=d["shape"], rank=d.get("rank", 1), blocks=d.get("blocks", 1))


def format_shape(m1: int, n1: int, m2: int, n2: int, rank: int = 1) -> str:
    return f"{m1}x{n1},{m2}x{n2},r{rank}"


_OPTION_RE = re.compile(r"\s*(\d+)x(\d+)\s*,\s*(\d+)x(\d+)\s*(?:,\s*r(\d+)\s*)?")
_LABEL_RE = re.compile(r"(\d+)x(\d+)⊗(\d+)x(\d+) r(\d+)(?: b(\d+))?")


SPLITS = ("output", "input")


def nearest_shape(m: int, n: int, factor: float, rank: int = 1, *, prefer: str = "output") -> FactorShape:
    """The valid non-trivial split of an m x n weight whose compression is nearest to `factor`.

    Nearest by |log(compression / factor)|. prefer="output" (the default; the tie-break of the first release and of
    the papers' shapes): ties broken by fewer multiply-adds per token, then by A holding more parameters than B,
    then by (m1, n1, m2, n2) ascending — for a square weight at 2x this is A m/2 x n ⊗ B 2 x 1, which splits the
    output. prefer="input": among the nearest shapes, the one whose B has the fewest rows (B 1 x n2 splits only the
    input: what data-aware init serves best, ../shared/notes/data-aware-init.md), then the same tie-break.
    Used by `factor:` rules and the `uniform:` preset.
    """
    if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor >= 1):
        raise PlanError(f"factor must be a finite number >= 1, got {factor!r}")
    if prefer not in SPLITS:
        raise PlanError(f"split must be one of {', '.join(SPLITS)}, got {prefer!r}")
    shapes = factor_shapes(m, n, rank=rank)
    if not shapes:
        raise ShapeError(f"a {m}x{n} weight has no non-trivial Kronecker split at rank {rank}")

    def key(s: FactorShape):
        a_smaller = 0 if s.m1 * s.n1 > s.m2 * s.n2 else 1
        dist = round(abs(math.log(s.compression / factor)), 12)
        if prefer == "input":
            return (dist, s.m2, s.macs_per_token, a_smaller, s.shape)
        return (dist, s.macs_per_token, a_smaller, s.shape)

    return min(shapes, key=key)


def valid_shapes_hint(m: int, n: int, rank: int, target_params: int | None, count: int = 10) -> str:
    shapes = factor_shapes(m, n, rank=rank)
    if not shapes:
        return f"a {m}x{n} weight has no non-trivial split at rank {rank}"
    if target_params is not None:
        shapes = sorted(shapes, key=lambda s: (abs(s.params - target_params), s.shape))[:count]
        shapes.sort(key=lambda s: (-s.params, s.shape))
        head = f"the {len(shapes)} valid shapes [m1, n1, m2, n2] nearest in parameter count"
    else:
        shapes = shapes[:count]
        head = "valid shapes [m1, n1, m2, n2] include"
    listed = "; ".join(f"{list(s.shape)} ({s.params:,} params, {s.compression:.1f}x)" for s in shapes)
    return f"{head}: {listed}"


def thin_shapes(shapes: list, k: int | None) -> list:
    """At most k shapes, evenly spread over log-compression (always keeping both ends)."""
    if k is None or len(shapes) <= k:
        return shapes
    shapes = sorted(shapes, key=lambda s: (s.compression, s.macs_per_token, s.shape))
    if k == 1:
        return [shapes[len(shapes) // 2]]
    logs = [math.log(s.compression) for s in shapes]
    lo, hi = logs[0], logs[-1]
    picked: list[int] = []
    for i in range(k):
        target = lo + (hi - lo) * i / (k - 1)
        j = min((j for j in range(len(shapes)) if j not in picked), key=lambda j: (abs(logs[j] - target), j))
        picked.append(j)
    return [shapes[j] for j in sorted(picked)]


class KroneckerMethod(Method):
    name = "kronecker"
    spec_type = KroneckerSpec
    module_kinds = LINEAR_KINDS
    primary_keys = ("shape", "factor")
    option_keys = {"rank": 1, "blocks": 1}
    order = 10
    dict_key = "shape"
    rule_hint = "shape or factor"
    data_init = True

    def validate_rule(self, options: dict, where: str) -> dict:
        out = dict(options)
        if "shape" in out:
            out["shape"] = as_shape(out["shape"], f"{where}: shape")
        if "factor" in out:
            f = out["factor"]
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or f < 1:
                raise PlanError(f"{where}: factor must be a compression factor >= 1 (e.g. 4), got {f!r}")
            out["factor"] = float(f)
        return out

    def rule_to_dict(self, options: Mapping) -> dict:
        out = {}
        if "shape" in options:
            out["shape"] = list(options["shape"])
        if "factor" in options:
            f = options["factor"]
            out["factor"] = int(f) if float(f).is_integer() else f
        for k in ("rank", "blocks"):
            if options.get(k, 1) != 1:
                out[k] = options[k]
        return out

    def spec_for(self, options: Mapping, slot: Slot) -> KroneckerSpec:
        if slot.kind not in self.module_kinds:
            raise PlanError(wrong_kind(slot, self.rule_hint))
        rank, blocks = options.get("rank", 1), options.get("blocks", 1)
        rows, dims = rows_and_dims(slot, blocks)
        where, name = slot.where, slot.name
        if "factor" in options:
            try:
                shape = nearest_shape(rows, slot.n, options["factor"], rank,
                                      prefer=getattr(slot, "split", None) or "output").shape
            except ShapeError as exc:
                raise PlanError(f"{where}: module {name} ({dims}): {exc}") from None
            return KroneckerSpec(shape=shape, rank=rank, blocks=blocks)
        shape = options["shape"]
        try:
            validate_shape(rows, slot.n, shape, rank, what="")
        except ShapeError as exc:
            reason = str(exc).lstrip(": ")
            hint = valid_shapes_hint(rows, slot.n, rank, kron_params(*shape, rank))
            raise PlanError(f"{where}: module {name} ({dims}) cannot take shape {list(shape)} at rank "
                            f"{rank}: {reason}. {hint}") from None
        m1, n1, m2, n2 = shape
        if m1 * n1 == 1 or m2 * n2 == 1:
            raise PlanError(f"{where}: module {name} ({dims}): shape {list(shape)} has a 1x1 factor, "
                            f"which only rescales the weight (no compression). "
                            f"{valid_shapes_hint(rows, slot.n, rank, rows * slot.n // 2)}")
        return KroneckerSpec(shape=shape, rank=rank, blocks=blocks)

    options_type = KroneckerOptions

    def candidates(self, m: int, n: int, options: KroneckerOptions, span: Span) -> list[KroneckerSpec]:
        """Valid shapes at each of the options' ranks with compression in the span and factors no more elongated
        than max_aspect, thinned to the span's max_shapes per matrix (evenly over log-compression), in increasing
        compression."""
        shapes = []
        for r in (AUTO_RANKS if options.ranks == "auto" else options.ranks):  # "auto": every rank the span allows
            shapes += factor_shapes(m, n, rank=r, min_compression=span.min_compression,
                                    max_compression=span.max_compression, max_aspect=options.max_aspect)
        shapes = thin_shapes(shapes, span.max_shapes)
        shapes.sort(key=lambda s: (s.compression, s.rank, s.macs_per_token, s.shape))
        return [KroneckerSpec(shape=s.shape, rank=s.rank) for s in shapes]

    def level_order(self, spec: KroneckerSpec, m: int, n: int) -> tuple:
        """Among equally compressing shapes: the fewest B rows first (the input-side splits data-aware init serves
        best), then the fewest multiply-adds."""
        return (spec.shape[2], spec.macs(m, n), spec.label())

    def block_damage(self, block, spec: KroneckerSpec):
        from .damage import kronecker_damage

        return kronecker_damage(block, spec)

    def layer_from_factors(self, module, spec: KroneckerSpec, blocks: Sequence):
        from .damage import kronecker_layer

        return kronecker_layer(module, spec, blocks)

    def build(self, module, spec: KroneckerSpec, init: str, stats=None):
        from ..layers import linear_weight
        from .layer import FusedKroneckerLinear, KroneckerLinear

        kw = {"S": stats.S, "ridge": getattr(stats, "ridge", None)} if init == "data" and stats is not None else {}
        if init == "data":
            init = "svd"  # the layers take S= (and ridge=) for the data-aware init
        if spec.blocks > 1:
            if init == "svd":
                return FusedKroneckerLinear.from_linear(module, spec.shape, spec.rank, blocks=spec.blocks, **kw)
            out_f, in_f = linear_weight(module)[0].shape
            if out_f % spec.blocks:
                raise PlanError(f"cannot split {out_f} output features into {spec.blocks} equal blocks")
            kw = {"device": module.weight.device, "dtype": module.weight.dtype}
            parts = [KroneckerLinear(in_f, out_f // spec.blocks, spec.shape, spec.rank, bias=False, **kw)
                     for _ in range(spec.blocks)]
            return FusedKroneckerLinear(parts, module.bias)
        if init == "svd":
            return KroneckerLinear.from_linear(module, spec.shape, spec.rank, **kw)
        out_f, in_f = linear_weight(module)[0].shape
        return KroneckerLinear(in_f, out_f, spec.shape, spec.rank, bias=module.bias is not None,
                               device=module.weight.device, dtype=module.weight.dtype)

    def layer_types(self) -> tuple[type, ...]:
        from .layer import FusedKroneckerLinear, KroneckerLinear

        return (FusedKroneckerLinear, KroneckerLinear)

    def recognise(self, module) -> KroneckerSpec | None:
        from .layer import FusedKroneckerLinear, KroneckerLinear

        if isinstance(module, FusedKroneckerLinear):
            first = module.blocks[0]
            if any(b.shape != first.shape or b.rank != first.rank for b in module.blocks):
                raise PlanError("fused blocks with different shapes cannot be described by one spec")
            return KroneckerSpec(shape=first.shape, rank=first.rank, blocks=len(module.blocks))
        if isinstance(module, KroneckerLinear):
            return KroneckerSpec(shape=module.shape, rank=module.rank)
        return None

    def parse_label(self, text: str) -> KroneckerSpec | None:
        m = _LABEL_RE.fullmatch(text)
        if m is None:
            return None
        m1, n1, m2, n2, r = (int(g) for g in m.groups()[:5])
        return KroneckerSpec(shape=(m1, n1, m2, n2), rank=r, blocks=int(m.group(6) or 1))

    def parse_option(self, text: str) -> KroneckerSpec | None:
        m = _OPTION_RE.fullmatch(text)
        if m is None:
            return None
        m1, n1, m2, n2 = (int(g) for g in m.groups()[:4])
        return KroneckerSpec(shape=(m1, n1, m2, n2), rank=int(m.group(5) or 1))


register(KroneckerMethod())
