"""The low-rank baseline: W ≈ U (m x r) · V (r x n), initialised by truncated SVD, or with calibration data by the
whitened SVD of SVD-LLM (`init="data"`; a fair baseline to data-aware Kronecker factors). Plan-rule keys: `lowrank_rank: r`
or `lowrank_ratio: f` (r = max(1, floor(m·n / (f·(m + n)))) per module), `blocks` (each output block its own U·V).
Search option: "lrR" per block.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import ClassVar, Mapping

from ...errors import PlanError
from ...shapes import lowrank_params, lowrank_rank_for_ratio
from ..base import LINEAR_KINDS, Method, ModuleSpec, Slot, check_keys, positive_int, register
from ..linear import linear_rows, rows_and_dims, wrong_kind

__all__ = ["LowRankMethod", "LowRankSpec"]


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


@dataclass(frozen=True)
class LowRankSpec(ModuleSpec):
    """rank: the rank r of U·V (per block); blocks: equal output blocks, each its own U·V."""

    rank: int
    blocks: int = 1
    method: ClassVar[str] = "lowrank"

    def __post_init__(self):
        positive_int(self.rank, "lowrank_rank")
        positive_int(self.blocks, "blocks")

    @property
    def lowrank_rank(self) -> int:
        """The rank of U·V under its plan-file name."""
        return self.rank

    @property
    def kind(self) -> str:
        return "lowrank"

    def params(self, m: int, n: int) -> int:
        return self.blocks * lowrank_params(m // self.blocks, n, self.rank)

    def macs(self, m: int, n: int) -> int:
        return self.params(m, n)

    def weight_shapes(self, m: int, n: int) -> list[tuple[int, ...]]:
        return [(m // self.blocks, self.rank), (self.rank, n)] * self.blocks

    def describe(self, m: int | None = None, n: int | None = None) -> str:
        r = self.rank
        text = f"U {m // self.blocks}x{r} · V {r}x{n}" if m is not None and n is not None else f"U·V of rank {r}"
        return f"{self.blocks} blocks of {text}" if self.blocks > 1 else text

    def label(self) -> str:
        return f"lowrank r{self.rank}" + (f" b{self.blocks}" if self.blocks > 1 else "")

    def option(self) -> str:
        return f"lr{self.rank}"

    def compression(self, m: int | None = None, n: int | None = None) -> float:
        if m is None or n is None:
            return math.nan  # m·n / (r·(m+n)) needs the matrix size
        return m * n / self.params(m, n)

    def to_dict(self) -> dict:
        out = {"lowrank_rank": self.rank}
        if self.blocks != 1:
            out["blocks"] = self.blocks
        return out

    def check(self, slot: Slot) -> None:
        rows = linear_rows(self, slot)
        if self.rank > min(rows, slot.n):
            raise PlanError(f"module {slot.name} ({slot.m} x {slot.n}): lowrank_rank {self.rank} exceeds min(m, n) = "
                            f"{min(rows, slot.n)} of its {rows} x {slot.n} {'blocks' if self.blocks > 1 else 'weight'}")

    @classmethod
    def _from_dict(cls, d: Mapping) -> "LowRankSpec":
        check_keys(d, ("shape", "rank", "blocks", "embedding_factor", "lowrank_rank"), "module spec")
        if d.get("rank", 1) != 1:
            raise PlanError(f"a low-rank spec takes lowrank_rank (the rank of U·V), not rank={d['rank']} (the "
                            "number of summed Kronecker products)")
        return cls(rank=d["lowrank_rank"], blocks=d.get("blocks", 1))


class LowRankMethod(Method):
    name = "lowrank"
    spec_type = LowRankSpec
    module_kinds = LINEAR_KINDS
    primary_keys = ("lowrank_rank", "lowrank_ratio")
    option_keys = {"blocks": 1}
    alternative = "a low-rank U·V instead of Kronecker factors"
    order = 30
    dict_key = "lowrank_rank"
    rule_hint = "lowrank_rank or lowrank_ratio"
    data_init = True

    def validate_rule(self, options: dict, where: str) -> dict:
        out = dict(options)
        if "lowrank_rank" in out:
            positive_int(out["lowrank_rank"], f"{where}: lowrank_rank")
        if "lowrank_ratio" in out:
            f = out["lowrank_ratio"]
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or f <= 1:
                raise PlanError(f"{where}: lowrank_ratio must be a parameter reduction > 1 (e.g. 2: U·V holds half "
                                f"the weight's parameters), got {f!r}")
            out["lowrank_ratio"] = float(f)
        if out.get("rank", 1) != 1:
            raise PlanError(f"{where}: rank is the number of summed Kronecker products and does not apply to a "
                            f"low-rank U·V (got rank={out['rank']}); give its rank as lowrank_rank")
        return out

    def rule_to_dict(self, options: Mapping) -> dict:
        out = {}
        if "lowrank_rank" in options:
            out["lowrank_rank"] = options["lowrank_rank"]
        if "lowrank_ratio" in options:
            out["lowrank_ratio"] = _num(options["lowrank_ratio"])
        if options.get("blocks", 1) != 1:
            out["blocks"] = options["blocks"]
        return out

    def spec_for(self, options: Mapping, slot: Slot) -> LowRankSpec:
        if slot.kind not in self.module_kinds:
            raise PlanError(wrong_kind(slot, self.rule_hint))
        blocks = options.get("blocks", 1)
        rows, dims = rows_and_dims(slot, blocks)
        n, where, name = slot.n, slot.where, slot.name
        if "lowrank_ratio" in options:
            r = lowrank_rank_for_ratio(rows, n, options["lowrank_ratio"])
            asked = f"lowrank_ratio {_num(options['lowrank_ratio'])} (rank {r})"
        else:
            r = options["lowrank_rank"]
            asked = f"lowrank_rank {r}"
        best = (rows * n - 1) // (rows + n)  # the largest rank with r·(m + n) < m·n
        hint = (f"ranks 1-{best} compress it" if best >= 1
                else "no rank compresses a matrix this thin; keep it dense")
        per = f"each {rows} x {n} block" if blocks > 1 else f"a {rows} x {n} weight"
        if r >= min(rows, n):
            raise PlanError(f"{where}: module {name} ({dims}): {asked} is >= min(m, n) = {min(rows, n)}, so U·V "
                            f"can hold any {rows} x {n} matrix with {lowrank_params(rows, n, r):,} parameters against "
                            f"{rows * n:,} dense: no compression; {hint}")
        if lowrank_params(rows, n, r) >= rows * n:
            raise PlanError(f"{where}: module {name} ({dims}): {asked} gives U·V {lowrank_params(rows, n, r):,} "
                            f"parameters for {per} of {rows * n:,}: no compression; {hint}")
        return LowRankSpec(rank=r, blocks=blocks)

    def candidates(self, m: int, n: int, options, span) -> list[LowRankSpec]:
        """Ranks whose compression m·n / (r·(m + n)) lies in the span, thinned to its max_shapes evenly over
        log-compression, in increasing compression."""
        c = span
        lo = c.min_compression or 1.0
        hi = c.max_compression or math.inf
        ranks = [r for r in range(1, min(m, n)) if lo <= m * n / lowrank_params(m, n, r) <= hi
                 and lowrank_params(m, n, r) < m * n]
        k = c.max_shapes
        if k is not None and len(ranks) > k:
            logs = [math.log(m * n / lowrank_params(m, n, r)) for r in ranks]
            picked = sorted({min(range(len(ranks)), key=lambda j: (abs(logs[j] - (logs[0] + (logs[-1] - logs[0]) *
                                                                                      i / max(k - 1, 1))), j))
                             for i in range(k)})
            ranks = [ranks[j] for j in picked]
        return [LowRankSpec(rank=r) for r in sorted(ranks, reverse=True)]

    def block_damage(self, block, spec: LowRankSpec):
        from .damage import lowrank_damage

        return lowrank_damage(block, spec)

    def layer_from_factors(self, module, spec: LowRankSpec, blocks):
        from .damage import lowrank_layer

        return lowrank_layer(module, spec, blocks)

    def build(self, module, spec: LowRankSpec, init: str, stats=None):
        from ..layers import linear_weight
        from .layer import FusedLowRankLinear, LowRankLinear

        r = spec.rank
        kw = {"device": module.weight.device, "dtype": module.weight.dtype}
        data = {"S": stats.S, "ridge": getattr(stats, "ridge", None)} if init == "data" and stats is not None else {}
        if init == "data":
            init = "svd"  # the layers take S= for the whitened (SVD-LLM) init
        if spec.blocks > 1:
            if init == "svd":
                return FusedLowRankLinear.from_linear(module, r, blocks=spec.blocks, **data)
            out_f, in_f = linear_weight(module)[0].shape
            parts = [LowRankLinear(in_f, out_f // spec.blocks, r, bias=False, **kw) for _ in range(spec.blocks)]
            return FusedLowRankLinear(parts, module.bias)
        if init == "svd":
            return LowRankLinear.from_linear(module, r, **data)
        out_f, in_f = linear_weight(module)[0].shape
        return LowRankLinear(in_f, out_f, r, bias=module.bias is not None, **kw)

    def layer_types(self) -> tuple[type, ...]:
        from .layer import FusedLowRankLinear, LowRankLinear

        return (FusedLowRankLinear, LowRankLinear)

    def recognise(self, module) -> LowRankSpec | None:
        from .layer import FusedLowRankLinear, LowRankLinear

        if isinstance(module, FusedLowRankLinear):
            if len({b.rank for b in module.blocks}) != 1:
                raise PlanError("fused blocks with different ranks cannot be described by one spec")
            return LowRankSpec(rank=module.rank, blocks=len(module.blocks))
        if isinstance(module, LowRankLinear):
            return LowRankSpec(rank=module.rank)
        return None

    def parse_label(self, text: str) -> LowRankSpec | None:
        m = re.fullmatch(r"lowrank r(\d+)(?: b(\d+))?", text)
        return None if m is None else LowRankSpec(rank=int(m.group(1)), blocks=int(m.group(2) or 1))

    def parse_option(self, text: str) -> LowRankSpec | None:
        m = re.fullmatch(r"\s*lr(\d+)\s*", text)
        return None if m is None else LowRankSpec(rank=int(m.group(1)))


register(LowRankMethod())
