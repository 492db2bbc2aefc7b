"""Structured pruning in a search space: one choice per attention ("heads") or FFN ("ffn") block of a layer —
"none" (the block's matrices take their own choices) or a fraction of its units removed, which gives every matrix
of the block its PruneSpec (optionally stored by a modifier, "0.5+int8") — since pruning removes a unit from every
matrix of a block together. The search space (`search.space.BlockChoice`) holds the choices; what they are is
decided here: which blocks a space can prune, each option's per-matrix specs and costs, and which option a seed
plan's pruned block is. Torch-free.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

from ...errors import ConfigError
from .spec import BLOCK_PARTS, PruneSpec, removed_units

__all__ = ["block_contexts", "block_options", "prunable", "seed_option"]

# the searched groups that make up a prunable block: a unit leaves all of them at once
PARTS = BLOCK_PARTS


def block_contexts(model) -> dict:
    """(layer, part) -> {matrix name: its prune context (`PruneMethod.plan_context`: part, side, units, blocks)
    plus "bias" (whether it has one)} for every attention / FFN block of the model, searched or not, or
    {"error": why} where the block cannot be pruned. The model may live on the meta device."""
    from .structure import blocks_of, context

    modules = dict(model.named_modules())
    out: dict = {}
    for key, names in blocks_of(model).items():
        block = {}
        for name in names:
            ctx = dict(context(model, name, modules[name]))
            if ctx.get("error"):
                block = {"error": ctx["error"]}
                break
            ctx["bias"] = getattr(modules[name], "bias", None) is not None
            block[name] = ctx
        out[key] = block
    return out


def prunable(contexts: Mapping, searched: Mapping[str, str], layers: Sequence[int], *, tie_layers: bool,
             fixed: bool, groups: Sequence[str], others: bool, loose: Sequence[tuple[str, str]]) -> dict:
    """(layer, part) -> {matrix name: context} of the blocks a space may prune: those of its `layers` whose every
    matrix it searches (`searched`: name -> group) in the block's own groups (PARTS); with `tie_layers` only parts
    whose block is searched in every layer. ConfigError where nothing can be pruned, or — without another
    per-matrix method (`others`) — where a searched matrix (`loose`: (name, group) of every non-embedding one)
    belongs to no prunable block."""
    out, why = {}, []
    for (layer, part), block in sorted(contexts.items()):
        if layer not in layers:
            continue
        if "error" in block:
            why.append(block["error"])
            continue
        if all(n in searched and searched[n] in PARTS[part] for n in block):
            out[(layer, part)] = block
    if tie_layers:  # one choice for the block in every layer: only where every layer has it whole
        for part in PARTS:
            if any((i, part) not in out for i in layers):
                out = {k: v for k, v in out.items() if k[1] != part}
    if not out:
        raise ConfigError(
            "space.methods: prune removes whole attention heads (from a layer's Q, K, V and attention output "
            "together: groups attention + attention_output) or FFN neurons (from all its FFN matrices: groups "
            f"ffn_in + ffn_out), but this space searches no such block whole (groups {list(groups)}"
            + (f", layers {list(layers)}" if fixed else "") + ")"
            + (f"; {why[0]}" if why else "") + "; add the missing groups or drop prune")
    if not others:
        in_blocks = {n for block in out.values() for n in block}
        stray = [(n, g) for n, g in loose if n not in in_blocks]
        if stray:
            raise ConfigError(
                f"space.methods: with prune alone, every searched matrix must belong to a prunable block, but "
                f"{stray[0][0]} (group {stray[0][1]}) does not (its block's other groups are not searched, or "
                "tie_layers needs the block in every layer); add kronecker or lowrank to space.methods, or search "
                "the whole block")
    return out


def block_options(part: str, blocks: Mapping[int, Mapping[str, Mapping]], sizes: Mapping[str, tuple[int, int, int]],
                  fractions: Sequence[float], extra: Sequence[str], variants: Sequence[tuple[str, Callable | None]],
                  width: int) -> tuple[dict, dict]:
    """(specs, deltas) of one block choice over `blocks` (layer -> {matrix name: context}, the layers it spans):
    specs: option -> layer -> {matrix name: its spec's option string}; deltas: option -> layer -> {size axis: Δ}
    of that layer's block. Options are named by the fraction each removes exactly (of the first layer's units:
    every layer of a transformers model has the same), so fractions rounding to the same count are one option;
    each fraction comes in every variant (`variants`: (option suffix, wrap) — "" and None for the plain pruned
    matrices, "+int8" and the modifier's spec maker for pruning + int8), float variants first. `extra`: options a
    seed plan needs ("0.5", "0.5+int8"). sizes: matrix name -> (m, n, fused blocks); width: bytes per float."""
    units = {i: next(iter(b.values()))["units"] for i, b in blocks.items()}
    first = units[min(units)]

    def named(f: float) -> str:
        return f"{removed_units(f, first) / first:.6g}"

    suffixes = [s for s, _ in variants]
    wrap = dict(variants)
    wanted = {(named(f), s) for f in fractions for s in suffixes}
    for x in extra:
        frac, plus, rest = x.partition("+")
        wanted.add((named(float(frac)), plus + rest))
    specs, deltas = {}, {}
    for fraction, suffix in sorted(wanted, key=lambda fs: (suffixes.index(fs[1]) if fs[1] in suffixes
                                                           else len(suffixes), float(fs[0]))):
        label = fraction + suffix
        kept = {i: u - removed_units(float(fraction), u) for i, u in units.items()}
        if not all(0 < kept[i] < units[i] for i in units):
            continue  # removes nothing, or every unit
        specs[label], deltas[label] = {}, {}
        for i, block in blocks.items():
            specs[label][i] = {}
            total = {"params": 0, "params_excl_output_embedding": 0, "macs_per_token": 0, "bytes": 0}
            for name, ctx in block.items():
                m, n, fused = sizes[name]
                sp = PruneSpec(part=part, side=ctx["side"], units=ctx["units"], kept=kept[i], blocks=fused)
                if suffix and wrap.get(suffix) is None:  # a seed's variant the space does not offer itself
                    from ..base import parse_option

                    stored = parse_option(sp.option() + suffix)
                else:
                    stored = wrap[suffix](sp) if suffix else sp
                dense = m * n
                d_bias = sp.pruned_dims(m, n)[0] - m if ctx["bias"] else 0  # removed rows lose their bias
                dp = sp.params(m, n) - dense + d_bias
                total["params"] += dp
                total["params_excl_output_embedding"] += dp
                total["macs_per_token"] += sp.macs(m, n) - dense
                total["bytes"] += stored.bytes(m, n, width) - dense * width + d_bias * width
                option = PruneSpec(part=part, side=ctx["side"], units=ctx["units"], kept=kept[i]).option()
                specs[label][i][name] = option + suffix
            deltas[label][i] = total
    return specs, deltas


def seed_option(options: Sequence[str], specs: Mapping, names: Mapping[int, Sequence[str]],
                seed: Mapping[str, str], layers: Sequence[int], key: str, where: str) -> tuple[str, bool]:
    """(the option of a block choice that gives every matrix of the seed's pruned blocks in `layers` exactly the
    seed's spec, whether the choice lacks it): an existing option (a plain fraction, never a modified twin the
    seed did not ask for), else the fraction the seed removes, to be added. ConfigError when the layers of a tied
    choice are pruned by different fractions."""
    from ..base import parse_option, structure_of

    opt = next((o for o in options[1:] if all(specs[o][i] == {n: seed[n] for n in names[i]} for i in layers)), None)
    if opt is not None:
        return opt, False

    def pruned(n):
        return structure_of(parse_option(seed[n]))

    kept = {i: {pruned(n).kept for n in names[i]} for i in layers}
    units = {i: pruned(names[i][0]).units for i in layers}
    fractions = {f"{(units[i] - min(kept[i])) / units[i]:.6g}" for i in layers}
    label = fractions.pop()
    first = seed[names[layers[0]][0]]
    suffix = first[len(pruned(names[layers[0]][0]).option()):]  # a modifier's part ("+int8"), if any
    if fractions or any(len(kept[i]) > 1 or units[i] - removed_units(float(label), units[i]) != min(kept[i])
                        for i in layers):
        raise ConfigError(f"{where}: the blocks of choice {key} are pruned by different fractions, but the space "
                          "gives them one choice (tie_layers)")
    return label + suffix, True
