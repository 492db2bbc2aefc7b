"""The spec of a pruned matrix (`PruneSpec`) and the unit arithmetic every part of the pruning method shares
(the rule, the layers, the block structure, the search). Torch-free."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar, Mapping

from ...errors import PlanError
from ..base import ModuleSpec, Slot, check_keys, positive_int

__all__ = ["BLOCK_PARTS", "PARTS", "SCOPES", "SIDES", "PruneSpec", "plain_number", "removed_units", "with_kept"]

PARTS = ("heads", "ffn")
SIDES = ("out", "in")
SCOPES = ("layer", "global")


def removed_units(fraction: float, units: int) -> int:
    """How many of `units` a fraction removes: the nearest count, halves up (0.5 of 3 heads removes 2)."""
    return math.floor(fraction * units + 0.5 + 1e-9)


def plain_number(x: float) -> int | float:
    """2.0 -> 2, 0.5 -> 0.5: a number as a plan file writes it."""
    return int(x) if float(x).is_integer() else x


@dataclass(frozen=True)
class PruneSpec(ModuleSpec):
    """part: "heads" or "ffn"; side: "out" (rows removed: Q, K, V, up, gate) or "in" (columns: attention output,
    down); units: heads (key/value groups under grouped-query attention) or FFN neurons of the block before pruning;
    kept: how many of them remain; blocks: equal output blocks each pruned alike (GPT-2's fused c_attn: 3);
    scope: "layer" (this block's fraction) or "global" (kept decided across the selected layers)."""

    part: str
    side: str
    units: int
    kept: int
    blocks: int = 1
    scope: str = "layer"
    method: ClassVar[str] = "prune"

    def __post_init__(self):
        if self.part not in PARTS:
            raise PlanError(f"a prune spec's part must be one of {', '.join(PARTS)}, got {self.part!r}")
        if self.side not in SIDES:
            raise PlanError(f"a prune spec's side must be one of {', '.join(SIDES)}, got {self.side!r}")
        if self.scope not in SCOPES:
            raise PlanError(f"a prune spec's scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")
        positive_int(self.units, "prune units")
        positive_int(self.kept, "prune kept")
        positive_int(self.blocks, "prune blocks")
        if self.kept > self.units:
            raise PlanError(f"a prune spec keeps {self.kept} of {self.units} {self.part}: more than there are")

    @property
    def kind(self) -> str:
        return "pruned"

    def pruned_dims(self, m: int, n: int) -> tuple[int, int]:
        """(rows, columns) of the pruned m x n weight."""
        if self.side == "out":
            return m * self.kept // self.units, n
        return m, n * self.kept // self.units

    def params(self, m: int, n: int) -> int:
        rows, cols = self.pruned_dims(m, n)
        return rows * cols

    def weight_shapes(self, m: int, n: int) -> list[tuple[int, ...]]:
        return [self.pruned_dims(m, n)]

    def aux_bytes(self, m: int, n: int) -> int:
        # the kept units' indices (int32) the layer stores so a saved model knows which remain (`bytes` adds the
        # weight; int8 of a pruned matrix keeps them beside its int8 weight and scales)
        return 4 * self.kept

    def macs(self, m: int, n: int) -> int:
        return self.params(m, n)

    def _units_word(self) -> str:
        return "heads" if self.part == "heads" else "neurons"

    def describe(self, m: int | None = None, n: int | None = None) -> str:
        text = f"{self.kept} of {self.units} {self._units_word()} kept"
        if self.scope == "global":
            text += " (global)"
        if m is not None and n is not None:
            rows, cols = self.pruned_dims(m, n)
            text += f": {rows}x{cols}"
        return text

    def label(self) -> str:
        return (f"prune {self.part} {self.side} {self.kept}/{self.units}" + (f" b{self.blocks}" if self.blocks > 1
                                                                              else "")
                + (" global" if self.scope == "global" else ""))

    def option(self) -> str:
        return f"pr:{self.part}:{self.side}:{self.kept}/{self.units}" + (f":b{self.blocks}" if self.blocks > 1 else "")

    def compression(self, m: int | None = None, n: int | None = None) -> float:
        return self.units / self.kept  # the pruned side shrinks by units/kept, whatever the size

    def to_dict(self) -> dict:
        inner = {"part": self.part, "side": self.side, "units": self.units, "kept": self.kept}
        if self.blocks != 1:
            inner["blocks"] = self.blocks
        if self.scope != "layer":
            inner["scope"] = self.scope
        return {"prune": inner}

    def to_rule(self) -> dict:
        # the fraction that removes exactly units - kept (removed_units rounds to the nearest count)
        return {"prune": {self.part: plain_number(round((self.units - self.kept) / self.units, 12))}}

    def check(self, slot: Slot) -> None:
        size = slot.m if self.side == "out" else slot.n
        if size % (self.blocks * self.units):
            side = "output features" if self.side == "out" else "input features"
            raise PlanError(f"module {slot.name} ({slot.m} x {slot.n}): its {size} {side} do not split into "
                            f"{self.blocks} x {self.units} {self._units_word()} (a saved prune spec for another "
                            "model?)")

    @classmethod
    def _from_dict(cls, d: Mapping) -> "PruneSpec":
        check_keys(d, ("prune",), "module spec")
        inner = d["prune"]
        check_keys(inner, ("part", "side", "units", "kept", "blocks", "scope"), "prune module spec")
        missing = [k for k in ("part", "side", "units", "kept") if k not in inner]
        if missing:
            raise PlanError(f"prune module spec {dict(inner)!r} lacks {', '.join(missing)}")
        return cls(part=inner["part"], side=inner["side"], units=inner["units"], kept=inner["kept"],
                   blocks=inner.get("blocks", 1), scope=inner.get("scope", "layer"))


def with_kept(spec: PruneSpec, kept: int) -> PruneSpec:
    return replace(spec, kept=kept)


# part -> the search groups its blocks span: a unit leaves every matrix of them at once
BLOCK_PARTS = {"heads": ("attention", "attention_output"), "ffn": ("ffn_in", "ffn_out")}
