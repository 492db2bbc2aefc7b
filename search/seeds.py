"""Warm starts: hand-made plans (`search.seed_plans`: presets such as kngpt2, uniform:2, lowrank:2, or plan files)
evaluated first, as trials of the search, so that its front starts from everything a researcher would pick by hand.

A seed is resolved on the teacher (its config on the meta device), then written in the space's own parameters: one
option per choice, the decomposed layers for `layers: free | {count: k}`. Its per-matrix options are added to the
space's choices when the space would not have sampled them (a preset's exact shapes, `keep` for a matrix it leaves
dense), so the seed is exactly representable and later samples may reuse its choices. A seed that the space cannot
express — it compresses a matrix outside the searched groups or layers, uses a method not in `space.methods`,
treats tied matrices differently, or breaks the budget — is an error naming the seed and the reason, before Ray
starts.

A seed that prunes (the preset `prune:<f>`, or prune rules) is written as the space's block choices ("L3.prune_heads":
the fraction its kept units remove; a fraction `space.methods.prune.fractions` lacks is added to that choice), so it
needs prune in `space.methods` and the pruned blocks searched whole; `scope: global` plans (kept units decided
across layers when the model is pruned) cannot be seeds.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from kron.errors import ConfigError, UserError

__all__ = ["Seed", "resolve_seeds", "seed_options"]

KEEP = "keep"


@dataclass(frozen=True)
class Seed:
    """One seed plan: its label ("seed:kngpt2"), the option of every searched matrix it touches (matrix name ->
    option string or "keep"), and the layers it decomposes."""

    label: str
    options: dict
    layers: frozenset


def _plan(name: str, config):
    from pathlib import Path

    from kron.plan import CompressionPlan
    from kron.presets import get_plan

    if name.endswith((".yaml", ".yml", ".json")) or Path(name).expanduser().is_file():
        return CompressionPlan.load(Path(name).expanduser())
    return get_plan(name, config)


def resolve_seeds(names: list[str], model, info, methods: list[str], embedding_methods=("kron_embedding",)
                  ) -> list[Seed]:
    """The seeds `names` on `model` (the teacher, meta device is fine), per searched matrix of `info` (ModelInfo).
    methods: the space's methods (a modifier's specs count as their structure's, which must be listed too);
    embedding_methods: those an embedding may take."""
    from kron.methods import get_method, structure_of

    seeds = []
    matrices = {mx.name: mx for mx in info.matrices}
    for name in names:
        where = f"search.seed_plans: {name!r}"
        try:
            specs = _plan(name, model.config).resolve(model)
        except UserError as exc:
            raise ConfigError(f"{where} does not fit the teacher: {exc}") from None
        options, layers = {}, set()
        for module, spec in specs.items():
            if spec == KEEP:
                continue
            mx = matrices.get(module)
            if mx is None:
                raise ConfigError(f"{where} compresses {module}, which the space does not search; add its group to "
                                  "space.groups (or space.modules), or drop the seed")
            allowed = list(embedding_methods) if mx.kind == "embedding" else list(methods)
            used = [get_method(spec.method).name]  # a modifier's spec: the modifier and the structure it wraps
            if structure_of(spec) is not spec:
                used.append(get_method(structure_of(spec).method).name)
            bad = [m for m in used if m not in allowed]
            if bad:
                raise ConfigError(f"{where} makes {module} {spec.method if bad[0] == used[0] else bad[0]}, but "
                                  f"space.methods is {list(methods)}; add {bad[0]!r} to space.methods")
            if getattr(spec, "scope", "layer") != "layer":
                raise ConfigError(f"{where} prunes {module} with scope: {spec.scope}; a search prunes each block by "
                                  "its own fraction (scope: layer), so such a plan cannot be a seed")
            if getattr(spec, "blocks", 1) != mx.blocks:
                raise ConfigError(f"{where}: {module} is searched as {mx.blocks} block(s) but the seed factors it "
                                  f"as {getattr(spec, 'blocks', 1)}")
            options[module] = (replace(spec, blocks=1) if hasattr(spec, "blocks") else spec).option()
            if mx.layer is not None:
                layers.add(mx.layer)
        if not options:
            raise ConfigError(f"{where} compresses nothing the space searches")
        seeds.append(Seed(f"seed:{name}", options, frozenset(layers)))
    return seeds


def seed_options(seed: Seed, space) -> tuple[dict, dict[str, str]]:
    """(parameters of `seed` in `space`, choice key -> option the space lacks). Raises ConfigError when the space
    cannot express the seed."""
    where = f"search.seed_plans: {seed.label.removeprefix('seed:')!r}"
    params: dict[str, Any] = {}
    if space.layer_mode == "fixed":
        outside = sorted(seed.layers - set(space.fixed_layers))
        if outside:
            raise ConfigError(f"{where} decomposes layers {outside}, outside space.layers {space.fixed_layers}")
        on = set(space.fixed_layers)
    elif space.layer_mode == "free":
        on = set(seed.layers)
        params.update({f"L{i}.on": i in on for i in space.fixed_layers})
    else:  # exactly k layers
        if len(seed.layers) != space.count:
            raise ConfigError(f"{where} decomposes {len(seed.layers)} layers ({sorted(seed.layers)}), but "
                              f"space.layers asks for exactly {space.count}")
        on = set(seed.layers)
        params.update({f"L{i}.priority": 1.0 if i in on else 0.0 for i in space.fixed_layers})
    missing: dict[str, str] = {}
    pruned = _seed_blocks(seed, space, on, params, missing, where)
    for c in space.choices:
        live = [mx for mx in c.matrices if mx.layer is None or mx.layer in on]
        if not live or c.key in pruned:
            continue
        opts = {seed.options.get(mx.name, KEEP) for mx in live}
        if any(_block_method_of(o) for o in opts):
            raise ConfigError(f"{where} prunes {', '.join(mx.name for mx in live)}, but the space has no prune "
                              f"choice for that block (prune in space.methods? the block's groups all searched? "
                              "tie_layers needs the block searched in every layer)")
        if len(opts) > 1:
            raise ConfigError(f"{where}: the matrices of choice {c.key} ({', '.join(mx.name for mx in live)}) take "
                              f"different options {sorted(opts)}, but the space gives them one choice (tie_layers or "
                              "a shared shape bucket)")
        opt = opts.pop()
        params[c.key] = opt
        if opt not in c.options:
            missing[c.key] = opt
    return params, missing


def _block_method_of(option: str):
    """The per-block method whose spec an option string is (its structure's, under a modifier), or None."""
    from kron.methods import get_method, parse_option, structure_of

    spec = parse_option(option) if option != KEEP else None
    if spec is None:
        return None
    method = get_method(structure_of(spec).method)
    return method.name if method.block_parts else None


def _seed_blocks(seed: Seed, space, on: set, params: dict, missing: dict, where: str) -> set[str]:
    """Write the seed's blocks of the space's per-block methods (pruned blocks) as its block choices (into `params`,
    with any option the space lacks into `missing`); return the keys of the per-matrix choices they override."""
    from kron.methods import get_method

    overridden: set[str] = set()
    for b in getattr(space, "blocks", ()):
        layers = [i for i in b.layers if i in on]
        if not layers:
            continue
        names = [n for i in layers for n in b.names[i]]
        opts = [seed.options.get(n, KEEP) for n in names]
        hit = [o for o in opts if _block_method_of(o) == b.method]
        if not hit:
            params[b.key] = "none"
            continue
        if len(hit) != len(names):
            left = [n for n, o in zip(names, opts) if _block_method_of(o) != b.method]
            raise ConfigError(f"{where} prunes part of block {b.key} but not {', '.join(left)}; a block is pruned "
                              "whole")
        opt, lacking = get_method(b.method).seed_block_option(b.options, b.specs, b.names, seed.options, layers,
                                                              b.key, where)
        if lacking:
            missing[b.key] = opt
        params[b.key] = opt
        overridden.update(b.members)
    return overridden
