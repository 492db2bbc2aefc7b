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
from typing import Mapping, Sequence

from pydantic import Field, field_validator

from ...errors import PlanError
from ..base import LINEAR_KINDS, Method, MethodOptions, ModuleSpec, Slot, check_keys, option_defaults, register
from ..linear import wrong_kind
from .spec import BLOCK_PARTS, PARTS, SCOPES, PruneSpec, plain_number, removed_units, with_kept

__all__ = ["PruneMethod", "PruneOptions", "PruneSpec", "removed_units", "with_kept"]

_RULE_KEYS = ("heads", "ffn", "scope")


def _fraction(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 <= value < 1:
        raise PlanError(f"{what} must be a fraction removed in [0, 1) (0 keeps everything, 0.5 removes half), "
                        f"got {value!r}")
    return float(value)

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
        return {"prune": {k: plain_number(v) if k in PARTS else v for k, v in options["prune"].items()}}

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
            raise PlanError(f"{slot.where}: prune {part} {plain_number(fractions[part])} would remove all {units} "
                            f"{unit_word} of layer {ctx['layer']} (module {slot.name}); a layer keeps at least one "
                            f"(fractions below {(units - 0.5) / units:.3g} do)")
        return PruneSpec(part=part, side=ctx["side"], units=units, kept=units - removed, blocks=ctx.get("blocks", 1),
                         scope=fractions.get("scope", "layer"))

    # --- search: chosen per block (all of a layer's attention or FFN matrices together), never per matrix
    options_type = PruneOptions
    # part -> the searched groups its blocks span (`search.py`: which blocks, their options and costs)
    block_parts = BLOCK_PARTS
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
