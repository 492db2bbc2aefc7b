"""Structured pruning: whole attention heads and FFN neurons removed, leaving a smaller dense model (not a mask).

Plan rule: `prune: {heads: 0.5, ffn: 0.5}` on the attention and FFN matrices it selects (fractions removed, in
[0, 1), per layer), optionally `scope: global` (the same total, spread over the selected layers by importance).
A pruned block is pruned as a whole: every matrix of a layer's attention (Q, K, V — GPT-2's fused c_attn — and the
output projection) or of its FFN (GPT-2's c_fc / c_proj, BERT's intermediate / output, Llama's gate / up / down)
must be pruned alike, which `check_resolved` enforces before the model changes.

Grouped-query attention (Llama-family with fewer key/value heads): the unit removed is a whole key/value group (one
K and V head and the query heads that read it), so every layer keeps `num_key_value_groups` and the KV cache
shrinks with the heads; `heads: 0.5` on 8 KV heads x 4 query heads removes 4 groups (16 query heads).

With `quantize: int8` beside `prune:` (one rule: "pruning + int8") each pruned matrix is then stored as int8 with
per-output-channel float32 scales (`kron.methods.quant`, whose spec and layer wrap this method's); the block-wide
steps below see the pruned matrices whether or not they are quantised (`kron.methods.base.structure_of`).

Each matrix's spec (`PruneSpec`) is concrete: the part ("heads" / "ffn"), the side that loses rows ("out": Q, K, V,
up, gate) or columns ("in": the attention output, down), the units (heads or KV groups; neurons) and how many are
kept; which ones are kept is decided when the model is pruned (`prepare`: by importance on calibration data under
`init: data`, by weight magnitude otherwise, see `structure.py`) and stored in the pruned layers (`layer.py`).
Torch-free, like every method's `__init__`.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import ClassVar, Mapping, Sequence

from pydantic import Field, field_validator

from ...errors import PlanError
from ..base import (LINEAR_KINDS, Method, MethodOptions, ModuleSpec, Slot, check_keys, option_defaults,
                    positive_int, register)
from ..linear import wrong_kind

__all__ = ["PruneMethod", "PruneOptions", "PruneSpec", "removed_units"]

PARTS = ("heads", "ffn")
SIDES = ("out", "in")
SCOPES = ("layer", "global")
_RULE_KEYS = ("heads", "ffn", "scope")


def removed_units(fraction: float, units: int) -> int:
    """How many of `units` a fraction removes: the nearest count, halves up (0.5 of 3 heads removes 2)."""
    return math.floor(fraction * units + 0.5 + 1e-9)


def _fraction(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 <= value < 1:
        raise PlanError(f"{what} must be a fraction removed in [0, 1) (0 keeps everything, 0.5 removes half), "
                        f"got {value!r}")
    return float(value)


def _num(x: float) -> int | float:
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
        return {"prune": {self.part: _num(round((self.units - self.kept) / self.units, 12))}}

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


class PruneOptions(MethodOptions):
    """What a search offers of pruning: per attention / FFN block, these fractions of its units removed."""

    fractions: list[float] = Field(
        default_factory=lambda: [0.25, 0.5, 0.75],
        description="the fractions of a block's units (heads / KV groups, FFN neurons) a pruned attention or FFN "
                    "block may remove, each in (0, 1); rounded to whole units per block")

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        bad = [f for f in v if isinstance(f, bool) or not 0 < f < 1]
        if not v or bad:
            raise ValueError(f"prune_fractions must list fractions of units removed, each in (0, 1) (e.g. "
                             f"[0.25, 0.5]), got {bad or v}")
        return sorted(set(v))


class PruneMethod(Method):
    name = "prune"
    spec_type = PruneSpec
    module_kinds = LINEAR_KINDS
    primary_keys = ("prune",)
    option_keys: dict = {}
    alternative = "structured pruning (whole attention heads and FFN neurons removed)"
    order = 40
    dict_key = "prune"
    rule_hint = "prune"
    data_init = True  # init "data": importance from calibration statistics; else weight magnitude

    # --- plan rules
    def validate_rule(self, options: dict, where: str) -> dict:
        value = options["prune"]
        if not isinstance(value, Mapping):
            raise PlanError(f"{where}: prune takes a mapping of fractions removed, e.g. prune: {{heads: 0.5, ffn: "
                            f"0.5}} (optionally scope: global); got {value!r}")
        check_keys(value, _RULE_KEYS, f"{where}: prune")
        if not any(value.get(k) is not None for k in PARTS):
            raise PlanError(f"{where}: prune needs heads and/or ffn (fractions removed), got {dict(value)!r}")
        inner = {k: _fraction(value[k], f"{where}: prune {k}") for k in PARTS if value.get(k) is not None}
        scope = value.get("scope", "layer")
        if scope not in SCOPES:
            raise PlanError(f"{where}: prune scope must be 'layer' (each layer removes its fraction) or 'global' "
                            f"(the same total, spread over the selected layers by importance), got {scope!r}")
        if scope != "layer":
            inner["scope"] = scope
        others = [k for k in options if k != "prune" and k in option_defaults()]
        if others:
            raise PlanError(f"{where}: {', '.join(others)} do not apply to prune (a pruned matrix stays dense; fused "
                            "projections are split into their heads automatically)")
        return {**{k: v for k, v in options.items() if k != "prune"}, "prune": inner}

    def rule_to_dict(self, options: Mapping) -> dict:
        return {"prune": {k: _num(v) if k in PARTS else v for k, v in options["prune"].items()}}

    def spec_for(self, options: Mapping, slot: Slot) -> PruneSpec:
        if slot.kind not in self.module_kinds:
            raise PlanError(wrong_kind(slot, "prune"))
        ctx = slot.context
        if ctx is None:
            raise PlanError(f"{slot.where}: prune needs the model to find module {slot.name}'s attention or FFN "
                            "block (resolve the plan against the model)")
        if ctx.get("error"):
            raise PlanError(f"{slot.where}: {ctx['error']}")
        part = ctx["part"]
        fractions = options["prune"]
        if part not in fractions:
            what = "an attention matrix" if part == "heads" else "an FFN matrix"
            raise PlanError(f"{slot.where}: module {slot.name} is {what} of layer {ctx['layer']}, but the rule's "
                            f"prune gives no {part} fraction (prune: {{{part}: ...}}), or select only the "
                            f"{'FFN' if part == 'heads' else 'attention'} matrices")
        units = ctx["units"]
        removed = removed_units(fractions[part], units)
        if removed >= units:
            unit_word = ctx.get("unit_word", part)
            raise PlanError(f"{slot.where}: prune {part} {_num(fractions[part])} would remove all {units} "
                            f"{unit_word} of layer {ctx['layer']} (module {slot.name}); a layer keeps at least one "
                            f"(fractions below {(units - 0.5) / units:.3g} do)")
        return PruneSpec(part=part, side=ctx["side"], units=units, kept=units - removed, blocks=ctx.get("blocks", 1),
                         scope=fractions.get("scope", "layer"))

    # --- search: chosen per block (all of a layer's attention or FFN matrices together), never per matrix
    options_type = PruneOptions
    # part -> the searched groups its blocks span (`search.py`: which blocks, their options and costs)
    block_parts = {"heads": ("attention", "attention_output"), "ffn": ("ffn_in", "ffn_out")}
    block_hint = ("pruning is chosen per attention / FFN block, not per matrix: list prune in space.methods and the "
                  "fractions in space.methods.prune.fractions")

    def search_blocks(self, model) -> dict:
        from .search import block_contexts

        return block_contexts(model)

    def choosable_blocks(self, contexts, searched, layers, **kw) -> dict:
        from .search import prunable

        return prunable(contexts, searched, layers, **kw)

    def block_options(self, part, blocks, sizes, options: PruneOptions, extra, variants, width):
        from .search import block_options

        return block_options(part, blocks, sizes, options.fractions, extra, variants, width)

    def seed_block_option(self, options, specs, names, seed, layers, key, where):
        from .search import seed_option

        return seed_option(options, specs, names, seed, layers, key, where)

    def part_words(self, part: str) -> str:
        return "attention heads" if part == "heads" else "FFN neurons"

    # --- modules
    def build(self, module, spec: PruneSpec, init: str, stats=None, keep: Sequence[int] | None = None,
              source: str | None = None):
        from .layer import PrunedLinear

        return PrunedLinear.from_module(module, spec, keep, source=source if init != "none" else None)

    def layer_types(self) -> tuple[type, ...]:
        from .layer import PrunedLinear

        return (PrunedLinear,)

    def recognise(self, module) -> PruneSpec | None:
        from .layer import PrunedLinear

        if isinstance(module, PrunedLinear):
            return module.spec()
        return None

    # --- structure (torch; the attention / FFN blocks of GPT-2, BERT and Llama-family models)
    def plan_context(self, model, name: str, module) -> Mapping | None:
        from .structure import context

        return context(model, name, module)

    def check_resolved(self, specs: Mapping[str, ModuleSpec], model) -> None:
        from .structure import check_blocks

        check_blocks(model, specs)

    def prepare(self, model, specs, init: str, calib=None) -> dict[str, dict]:
        from .structure import choose_units

        return choose_units(model, specs, init, calib)

    def finish(self, model, names) -> None:
        from .structure import fix_attention

        fix_attention(model, names)

    def merge_config(self, model) -> dict:
        from .structure import merge_config

        return merge_config(model)

    # --- labels and options
    def parse_label(self, text: str) -> PruneSpec | None:
        m = re.fullmatch(r"prune (heads|ffn) (out|in) (\d+)/(\d+)(?: b(\d+))?( global)?", text)
        if m is None:
            return None
        return PruneSpec(part=m.group(1), side=m.group(2), units=int(m.group(4)), kept=int(m.group(3)),
                         blocks=int(m.group(5) or 1), scope="global" if m.group(6) else "layer")

    def parse_option(self, text: str) -> PruneSpec | None:
        m = re.fullmatch(r"\s*pr:(heads|ffn):(out|in):(\d+)/(\d+)(?::b(\d+))?\s*", text)
        if m is None:
            return None
        return PruneSpec(part=m.group(1), side=m.group(2), units=int(m.group(4)), kept=int(m.group(3)),
                         blocks=int(m.group(5) or 1))


register(PruneMethod())


def with_kept(spec: PruneSpec, kept: int) -> PruneSpec:
    return replace(spec, kept=kept)
