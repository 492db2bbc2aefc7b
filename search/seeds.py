"""Warm starts: hand-made plans (`search.seed_plans`: presets such as kngpt2, uniform:2, lowrank:2, or plan files)
evaluated first, as trials of the search, so that its front starts from everything a researcher would pick by hand.

A seed is resolved on the teacher (its config on the meta device), then written in the space's own parameters: one
option per choice, the decomposed layers for `layers: free | {count: k}`. Its per-matrix options are added to the
space's choices when the space would not have sampled them (a preset's exact shapes, `keep` for a matrix it leaves
dense), so the seed is exactly representable and later samples may reuse its choices. A seed that the space cannot
express — it compresses a matrix outside the searched groups or layers, uses a method not in `space.methods`,
treats tied matrices differently, or breaks the budget — is an error naming the seed and the reason, before Ray
starts.
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


def resolve_seeds(names: list[str], model, info, methods: list[str]) -> list[Seed]:
    """The seeds `names` on `model` (the teacher, meta device is fine), per searched matrix of `info` (ModelInfo)."""
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
            allowed = ["kron_embedding"] if mx.kind == "embedding" else methods
            if spec.method not in allowed:
                raise ConfigError(f"{where} makes {module} {spec.method}, but space.methods is {methods}; add "
                                  f"{spec.method!r} to space.methods")
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
    for c in space.choices:
        live = [mx for mx in c.matrices if mx.layer is None or mx.layer in on]
        if not live:
            continue
        opts = {seed.options.get(mx.name, KEEP) for mx in live}
        if len(opts) > 1:
            raise ConfigError(f"{where}: the matrices of choice {c.key} ({', '.join(mx.name for mx in live)}) take "
                              f"different options {sorted(opts)}, but the space gives them one choice (tie_layers or "
                              "a shared shape bucket)")
        opt = opts.pop()
        params[c.key] = opt
        if opt not in c.options:
            missing[c.key] = opt
    return params, missing
