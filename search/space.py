"""The search space of compression plans for one teacher, sized without loading its weights (the teacher's
matrices come from search/model_info.py, budget checks and repairs from search/budget.py).

The teacher's transformers config is instantiated on the `meta` device (no memory, no weights): enough to list its
matrices and their shapes. Matrices are grouped (embedding, attention = Q/K/V, attention_output, ffn_in, ffn_out,
plus any user groups given by module selectors), and the space is a set of categorical choices:

* one choice per (group, layer), or per group with `tie_layers` — matrices of a group whose shapes differ
  (Llama's grouped-query K/V against Q) get one choice per distinct shape;
* options are factor shapes encoded as "m1xn1,m2xn2,rR" (A m1 x n1 ⊗ B m2 x n2, rank R; for GPT-2's fused
  c_attn the shape of each of the 3 blocks), "f4" for an embedding factor, or "keep";
* which layers are decomposed: all, a fixed mask, one boolean per layer ("L3.on", `layers: free`), or exactly k
  layers (`layers: {count: k}`: a priority in [0, 1] per layer "L3.priority", the k highest win);
* with `prune` in `space.methods`, one block choice per layer and block ("L3.prune_heads", "L3.prune_ffn"; one per
  block kind with `tie_layers`): "none", or a fraction of the block's heads (key/value groups) or FFN neurons
  removed ("0.5"; with int8 in `space.quantize` also "0.5+int8", the pruned matrices stored as int8). Structured
  pruning removes units from every matrix of a block together (Q, K, V and the attention output; all FFN
  matrices), so it is offered only where the space searches the whole block (groups attention + attention_output,
  ffn_in + ffn_out), and a pruned block's matrices take no choice of their own: the block choice is drawn first and
  their per-matrix choices are then not drawn (`BlockChoice`).

The same drawing code serves Optuna (`define_by_run`) and plain random sampling (`sample`), so both always agree
on which parameters exist. Costs are computed analytically (`plan_cost`): the teacher's counts plus, for each
replaced matrix, the difference between its factors and its dense weight, following `kron.surgery`'s
conventions (tied embeddings counted once; a compressed tied input embedding leaves the LM head a dense copy;
multiply-adds of every linear layer including the LM head, embedding lookups free).
"""
from __future__ import annotations

import math
import random
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, NamedTuple, Sequence

from kron.errors import ConfigError
from kron.vocab import AXES, SIZE_AXES

from .budget import NO_PRUNE, BudgetMixin
from .config import GROUPS, SearchConfig, SpaceConfig, base_trial_config
from .model_info import Matrix, ModelInfo, inspect_model, teacher_skeleton  # noqa: F401 (re-exported)

__all__ = [
    "KEEP",
    "NO_PRUNE",
    "BlockChoice",
    "Choice",
    "Matrix",
    "PlanCost",
    "SearchSpace",
    "parse_option",
]

# keys a trial's Ray config has besides the plan parameters (search.searcher.PlanSearcher adds them for the
# experiment trackers); every method here that takes a plan's parameters accepts and ignores them
PLAN_INFO_KEYS = ("plan_summary", *(f"plan_{axis}" for axis in SIZE_AXES), "plan_compression_ratio")

KEEP = "keep"


def parse_option(option: str) -> dict | str:
    """"keep" -> "keep"; "f4" -> {"embedding_factor": 4}; "384x768,2x1,r1" -> {"shape": [...], "rank": 1}: the spec
    dict of a search option (each method owns its option strings)."""
    from kron.methods import parse_option as parse

    if option == KEEP:
        return KEEP
    spec = parse(option)
    if spec is None:
        raise ValueError(f"cannot parse choice {option!r}; expected 'keep', 'f<factor>', 'm1xn1,m2xn2,r<rank>' or "
                         "'lr<rank>'")
    return spec.to_dict()


class PlanCost(NamedTuple):
    """Parameters (all, as the trial's `params` metric) and multiply-adds per token of a plan."""

    params: int
    macs: int


@dataclass(frozen=True)
class Choice:
    """One categorical decision: the option applied to a set of matrices (one layer's, or all layers' if tied)."""

    key: str
    group: str
    layer: int | None  # None: tied across layers, or outside the numbered layers
    dims: tuple[int, int]  # (rows, cols) of each block
    options: tuple[str, ...]
    matrices: tuple[Matrix, ...]
    # option -> {size axis: Δ} (kron.vocab.AXES: Δparams, Δparams excluding the output embedding, Δmacs, Δbytes)
    # of ONE of `matrices`
    deltas: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def tied(self) -> bool:
        """A choice shared by the matrices of several numbered layers (tie_layers)."""
        return self.layer is None and any(mx.layer is not None for mx in self.matrices)


@dataclass(frozen=True)
class BlockChoice:
    """A per-block method's choice (structured pruning, `kron.methods.prune.search`) for one layer's block — its
    attention ("heads") or FFN ("ffn") — or, with tie_layers, for that block in every searched layer: "none" (the
    block's matrices take their own choices, `members`) or one of the method's options ("0.5": half the units
    removed), which gives every matrix of the block its spec and overrides `members`; with a modifier in the space
    also each option modified ("0.5+int8": pruning + int8)."""

    key: str  # "L3.prune_heads", or "prune_heads" when tied
    part: str  # "heads" | "ffn"
    layer: int | None  # None: tied across layers
    options: tuple[str, ...]  # "none", then the method's options (the fractions removed, ascending; float first)
    members: tuple[str, ...]  # keys of the per-matrix choices of the block's matrices
    names: dict = field(compare=False, hash=False, repr=False)  # layer -> the block's matrix names, model order
    # option -> layer -> {matrix name: PruneSpec option string, "+int8" for int8 (blocks left to `resolved`)}
    specs: dict = field(default_factory=dict, compare=False, hash=False, repr=False)
    # option -> layer -> {size axis: Δ} of that layer's block
    deltas: dict = field(default_factory=dict, compare=False, hash=False, repr=False)
    method: str = "prune"  # the per-block method whose choice it is

    @property
    def tied(self) -> bool:
        return self.layer is None

    @property
    def layers(self) -> list[int]:
        return sorted(self.names)


# ----------------------------------------------------------------------------------------------- the space


class SearchSpace(BudgetMixin):
    """All plans of a `space:` section for one teacher; see the module docstring for the parametrisation."""

    # class defaults: a space pickled before prune was searchable (a resumed search's scheduler) has no blocks
    blocks: Sequence[BlockChoice] = ()
    _blocks_by_key: dict = {}
    _prunable: dict = {}

    def __init__(self, space: SpaceConfig, info: ModelInfo, *, extra_options: dict[str, list[str]] | None = None,
                 dropped_options: dict[str, list[str]] | None = None, damages: dict | None = None,
                 seed_damages: dict | None = None):
        self.config = space
        self.info = info
        self._extra_options = extra_options or {}
        self._dropped_options = dropped_options or {}  # what the sensitivity prior removed (search.prior)
        self.damages = damages  # module -> option -> damage of the teacher's sensitivity profile, when computed
        # what the automatic seeds minimise instead (search.seed_damage: kl, `prior.seed_kl_damages`); None: damages
        self.seed_damages = seed_damages
        self.seeds: list[tuple[str, dict]] = []  # (label, parameters) of the seed plans, evaluated first
        self.prepared = False  # search.prepare.prepare_space has added its damages and seeds
        self.layer_mode, self.fixed_layers, self.count = self._layer_mode(space, info)
        self._prunable = self._prunable_blocks(space, info)
        self.choices: list[Choice] = self._build_choices(space, info)
        self.blocks: list[BlockChoice] = self._build_blocks(space, info)
        if not self.choices and not self.blocks:
            raise ConfigError("space: nothing to search — no matrix of the selected groups lies in the decomposed "
                              f"layers {self.fixed_layers}")
        self._by_key = {c.key: c for c in self.choices}
        self._blocks_by_key = {b.key: b for b in self.blocks}
        if self.size() == 0:
            raise ConfigError("space: every plan of this space is empty (nothing decomposed), e.g. layers {count: 0} "
                              "with only per-layer groups; decompose at least one layer or add the embedding group")
        self.budget = space.budget.to_budget() if space.budget is not None else None
        if self.budget is not None:
            self.feasible_plan = self._check_budget()

    # --------------------------------------------------------------------------------- construction

    @classmethod
    def from_config(cls, cfg: SearchConfig) -> "SearchSpace":
        """The space of a search config, sized from the teacher's config on the meta device: data only, no weights
        read and no calibration; the prior's damages and the seed plans come from `search.prepare.prepare_space`."""
        return cls.from_model(teacher_skeleton(base_trial_config(cfg)), cfg.space)

    def _target_size(self, target: str, model, metric: str, name: str) -> int:
        """The size on `metric` an "auto@TARGET" seed aims at: TARGET itself when it is a size (3.5M), else the size
        of the preset or plan file TARGET on this space (resolved as a seed would be)."""
        from kron.autoplan import parse_number

        from .seeds import resolve_seeds, seed_options

        value = parse_number(target)
        if value is not None:
            return int(value)
        try:
            ref = resolve_seeds([target], model, self.info, self.config.method_names(),
                                self.config.structure_methods("embedding"))[0]
        except ConfigError as exc:
            raise ConfigError(f"search.seed_plans: {name!r}: {target!r} is neither a size (3.5M, 250k) nor a seed "
                              f"plan the space can express: {exc}") from None
        extras = seed_options(ref, self)[1]
        merged = {k: list(v) for k, v in self._extra_options.items()}
        for k, o in extras.items():
            merged.setdefault(k, []).append(o)
        space = SearchSpace(self.config, self.info, extra_options=merged,
                            dropped_options=self._dropped_options) if extras else self
        costs = space.plan_costs(seed_options(ref, space)[0])
        return int(costs.get(metric, costs["params"]))

    def with_damages(self, damages: dict) -> "SearchSpace":
        """This space knowing the teacher's damages (`search.prior.search_damages`), with the options the prior
        (`space.prior`) drops removed."""
        from .prior import pruned_options

        drop = pruned_options(self, damages, self.config.prior.max_damage) if self.config.prior else {}
        return SearchSpace(self.config, self.info, extra_options=self._extra_options, dropped_options=drop,
                           damages=damages, seed_damages=self.seed_damages)

    def with_seeds(self, names: list[str], model, *, metric: str = "params") -> "SearchSpace":
        """This space, with the options the seed plans `names` need added, and `seeds` set (search.seeds).
        "auto" / "auto:N" seeds need the damages (`with_damages`); metric: their size axis."""
        from .prior import auto_count, auto_seed_at, auto_seeds, auto_target
        from .seeds import Seed, resolve_seeds, seed_options

        seeds = []
        for name in names:
            n, target = auto_count(name), auto_target(name)
            if n is None and target is None:
                seeds += resolve_seeds([name], model, self.info, self.config.method_names(),
                                       self.config.structure_methods("embedding"))
                continue
            if self.damages is None:
                raise ConfigError(f"search.seed_plans: {name!r} (automatic plans from the teacher's sensitivity) "
                                  "needs the teacher's calibration statistics; SearchSpace.from_config computes them "
                                  "from the trial's data (or call with_damages first)")
            damages = self.seed_damages if self.seed_damages is not None else self.damages
            if n is not None:
                seeds += [Seed(label, options, layers)
                          for label, options, layers in auto_seeds(self, damages, n, metric)]
                continue
            size = self._target_size(target, model, metric, name)
            seeds.append(Seed(*auto_seed_at(self, damages, size, metric, f"seed:{name}")))
        extras: dict[str, list[str]] = {}
        for seed in seeds:
            for key, opt in seed_options(seed, self)[1].items():
                extras.setdefault(key, []).append(opt)
        space = SearchSpace(self.config, self.info, extra_options=extras, dropped_options=self._dropped_options,
                            damages=self.damages, seed_damages=self.seed_damages) if extras else self
        for seed in seeds:
            params = seed_options(seed, space)[0]
            breaches = space.over_budget(params)
            if breaches and seed.label.startswith("seed:auto@"):  # planned on one size axis, over on another
                print(f"kronsearch: automatic seed {seed.label} left out: {'; '.join(breaches)}", file=sys.stderr)
                continue
            if breaches:
                raise ConfigError(f"search.seed_plans: {seed.label.removeprefix('seed:')!r} breaks the space's budget "
                                  f"({'; '.join(breaches)}); drop it or relax space.budget")
            space.seeds.append((seed.label, params))
        return space

    @classmethod
    def from_model(cls, model, space: SpaceConfig | dict) -> "SearchSpace":
        """Build the space of a `space:` section (a SpaceConfig or its dict) for a model (the meta device is fine)."""
        if isinstance(space, dict):
            from pydantic import ValidationError

            from .config import format_errors

            try:
                space = SpaceConfig.model_validate(space)
            except ValidationError as exc:
                raise ConfigError(format_errors(exc, "", root=SpaceConfig, prefix="space.")) from None
        return cls(space, inspect_model(model, space))

    @property
    def dropped_options(self) -> dict[str, list[str]]:
        """Choice key -> the options the sensitivity prior (`space.prior`) removed."""
        return dict(getattr(self, "_dropped_options", {}))  # a space pickled before the prior existed has none

    @property
    def layered_groups(self) -> list[str]:
        return list(dict.fromkeys(m.group for m in self.info.matrices if m.layer is not None))

    def _layer_mode(self, space: SpaceConfig, info: ModelInfo):
        layers = space.layers
        ids = sorted({m.layer for m in info.matrices if m.layer is not None})
        if not ids:
            return "all", [], None  # only embeddings / non-layer matrices
        if isinstance(layers, list):
            missing = [i for i in layers if i not in ids]
            if missing:
                raise ConfigError(f"space.layers: layers {missing} do not exist; the searched matrices are in layers "
                                  f"{ids[0]}-{ids[-1]} (0-based)")
            return "fixed", list(layers), None
        if layers == "all":
            return "fixed", ids, None
        if layers == "odd":
            return "fixed", [i for i in ids if i % 2 == 1], None
        if layers == "even":
            return "fixed", [i for i in ids if i % 2 == 0], None
        if layers == "free":
            return "free", ids, None
        k = layers.count
        if k > len(ids):
            raise ConfigError(f"space.layers.count: {k} layers requested but the model has {len(ids)} (layers "
                              f"{ids[0]}-{ids[-1]})")
        if k == len(ids):
            return "fixed", ids, None
        return "count", ids, k

    def _options_for(self, group: str, dims: tuple[int, int], kind: str, example: str) -> list[str]:
        """The options of one choice: each structure method's candidates (kron.methods, with its options from
        `space.methods`) or the group's explicit list, then each in every variant of the listed modifiers."""
        from kron.methods import get_method

        sc = self.config
        rows, cols = dims
        methods = sc.structure_methods("embedding" if kind == "embedding" else "linear")
        listed = sc.shapes.get(group) if sc.shapes else None
        if listed:
            specs = self._listed_specs(group, listed, methods, rows, cols, kind, example)
        else:
            specs = [s for name in methods for s in get_method(name).candidates(rows, cols, sc.method_options(name),
                                                                                 sc.span)]
            if not specs and kind != "embedding":
                rng = f"[{sc.min_compression}, {sc.max_compression or 'inf'}]"
                options = "; ".join(f"{n} {sc.method_options(n)}" for n in methods if str(sc.method_options(n)))
                raise ConfigError(
                    f"space: group {group} has no valid factor shape for {example} (each block {rows} x {cols}) with "
                    f"compression in {rng}" + (f", options {options}" if options else "")
                    + "; widen min_compression/max_compression or change the methods' options")
        if kind == "embedding":
            if not specs:
                factors = sorted({f for n in methods for f in getattr(sc.method_options(n), "factors", ())})
                valid = [d for d in range(2, min(cols, 64) + 1) if cols % d == 0]
                raise ConfigError(f"space.embedding_factors: none of {factors} divides the embedding size {cols} of "
                                  f"{example}; valid factors include {valid}")
            specs = sorted(set(specs), key=lambda sp: (sp.compression(rows, cols), sp.label()))
        opts = [sp.option() for sp in specs]
        if kind != "embedding":
            for name in sc.modifier_methods():  # each structure also modified, and the dense matrix
                opts = _with_variants(get_method(name), sc.method_options(name), specs, opts)
        if sc.allow_keep or (sc.shapes and KEEP in sc.shapes.get(group, [])):
            opts = opts + [KEEP]
        return opts

    def _listed_specs(self, group: str, listed, methods, rows: int, cols: int, kind: str, example: str) -> list:
        """The specs of a group's explicit option list (`space.shapes`) that fit this shape bucket."""
        from kron.errors import PlanError
        from kron.methods import Slot, get_method

        sc = self.config
        specs = []
        for o in listed:
            if o == KEEP:
                continue
            spec = _parse_or_error(o, group)
            method = get_method(spec.method)
            slot = Slot(f"space.shapes.{group}", example, "embedding" if kind == "embedding" else "linear", "", rows,
                        cols)
            if kind == "embedding":
                fits = spec.method in methods and spec.compression(rows, cols) > 1
                try:
                    spec.check(slot)
                except PlanError:
                    fits = False
                if not fits:
                    raise ConfigError(f"space.shapes.{group}: {o!r} is not a valid embedding factor for "
                                      f"{example} ({rows} x {cols}); write f<k> with k dividing {cols}")
                specs.append(spec)
                continue
            if "embedding" in method.module_kinds:
                raise ConfigError(f"space.shapes.{group}: {o!r} is an embedding factor; {group} holds linear "
                                  f"layers: write m1xn1,m2xn2,r<rank>")
            if method.block_parts:
                raise ConfigError(f"space.shapes.{group}: {o!r} is a {spec.method} option; {method.block_hint}")
            if spec.method not in methods:
                raise ConfigError(f"space.shapes.{group}: {o!r} is a {spec.method} option but space.methods is "
                                  f"{sc.method_names()}; add {spec.method!r} to space.methods")
            try:
                spec.check(slot)
            except PlanError:
                continue  # fits another shape bucket of this group (e.g. Llama K/V vs Q)
            if spec.params(rows, cols) >= rows * cols:
                raise ConfigError(f"space.shapes.{group}: {o!r} does not compress {example} ({rows} x {cols})")
            specs.append(spec)
        if not specs and kind != "embedding":
            raise ConfigError(f"space.shapes.{group}: none of {sc.shapes[group]} fits {example} "
                              f"(each block {rows} x {cols}, out x in); need m1·m2 = {rows} and n1·n2 = {cols}")
        return specs

    @staticmethod
    def _option_cost(option: str, rows: int, cols: int, kind: str) -> tuple[int, int]:
        """(Δparams, Δmacs) of one block under `option` against its dense weight."""
        from kron.methods import parse_option as parse_spec

        if option == KEEP:
            return 0, 0
        sp = parse_spec(option)
        return sp.params(rows, cols) - rows * cols, (sp.macs(rows, cols) - rows * cols if kind != "embedding" else 0)

    @staticmethod
    def _option_bytes(option: str, rows: int, cols: int, width: int) -> int:
        """Δbytes of one block under `option` against its dense weight of `width`-byte floats (int8: 1 + scales)."""
        from kron.methods import parse_option as parse_spec

        if option == KEEP:
            return 0
        return parse_spec(option).bytes(rows, cols, width) - rows * cols * width

    def _prunable_blocks(self, space: SpaceConfig, info: ModelInfo) -> dict:
        """method -> (layer, part) -> {matrix name: context} of the blocks each per-block method (prune) may choose
        for: its own decision (`Method.choosable_blocks`) over the searched matrices of the decomposed layers."""
        from kron.methods import get_method

        searched = {mx.name: mx.group for mx in info.matrices if mx.layer in set(self.fixed_layers)}
        loose = [(mx.name, mx.group) for mx in info.matrices if mx.layer in set(self.fixed_layers)
                 and mx.kind != "embedding"]
        out = {}
        for name in space.block_methods():
            contexts = (getattr(info, "block_contexts", None) or {}).get(name, {})
            out[name] = get_method(name).choosable_blocks(
                contexts, searched, self.fixed_layers, tie_layers=space.tie_layers, fixed=self.layer_mode == "fixed",
                groups=space.groups, others=bool(space.structure_methods()), loose=loose)
        return out

    def _build_blocks(self, space: SpaceConfig, info: ModelInfo) -> list[BlockChoice]:
        """The block choices of the per-block methods (see `BlockChoice`), each layer's parts in the method's
        order."""
        from kron.methods import get_method

        mats = {mx.name: (mx.m, mx.n, mx.blocks) for mx in info.matrices}
        out = []
        for name, prunable in self._prunable.items():
            method = get_method(name)
            parts = list(method.block_parts)
            variants = [("", None)] if _keeps_float(space) else []
            for mod in space.modifier_methods():
                m, mo = get_method(mod), space.method_options(mod)
                variants += [("+" + v.option(), lambda sp, m=m, mo=mo, j=j: m.variants(sp, mo)[j])
                             for j, v in enumerate(m.variants(None, mo))]
            per_key: dict[tuple, dict[int, dict]] = {}
            for (layer, part), block in prunable.items():
                per_key.setdefault((None if space.tie_layers else layer, part), {})[layer] = block
            for (layer, part), blocks in sorted(per_key.items(), key=lambda kv: (-1 if kv[0][0] is None else kv[0][0],
                                                                                 parts.index(kv[0][1]))):
                key = f"{name}_{part}" if layer is None else f"L{layer}.{name}_{part}"
                specs, deltas = method.block_options(part, blocks, mats, space.method_options(name),
                                                     self._extra_options.get(key, ()), variants, info.float_width)
                if not specs:
                    continue  # e.g. a single head: nothing to prune
                members = tuple(c.key for c in self.choices if c.group in method.block_parts[part]
                                and c.layer == layer and (layer is not None or c.tied))
                names = {i: list(b) for i, b in blocks.items()}
                out.append(BlockChoice(key, part, layer, (NO_PRUNE, *specs), members, names, specs, deltas, name))
        return out

    def _build_choices(self, space: SpaceConfig, info: ModelInfo) -> list[Choice]:
        active_layers = set(self.fixed_layers)
        # with a per-block method (prune) as the only linear one, a block's matrices have no choice of their own
        block_only = set() if space.structure_methods() else {
            n for blocks in self._prunable.values() for block in blocks.values() for n in block}
        buckets: dict[tuple, list[Matrix]] = {}
        for mx in info.matrices:
            if mx.layer is not None and mx.layer not in active_layers:
                continue
            if mx.name in block_only:
                continue
            tied = space.tie_layers or mx.layer is None
            layer = None if tied else mx.layer
            buckets.setdefault((mx.group, layer, mx.block_dims, mx.kind == "embedding"), []).append(mx)
        # groups whose matrices come in several shapes get the shape in the key
        shapes_per_group: dict[str, set] = {}
        for (g, _, dims, _), _ in buckets.items():
            shapes_per_group.setdefault(g, set()).add(dims)
        order = {g: i for i, g in enumerate(list(GROUPS) + list(space.modules or {}))}
        choices = []
        for (g, layer, dims, is_emb), mats in sorted(
                buckets.items(), key=lambda kv: (-1 if kv[0][1] is None else kv[0][1], order[kv[0][0]], kv[0][2])):
            key = g if layer is None else f"L{layer}.{g}"
            if len(shapes_per_group[g]) > 1:
                key += f".{dims[0]}x{dims[1]}"
            kind = "embedding" if is_emb else "linear"
            opts = self._options_for(g, dims, kind, mats[0].name)
            dropped = self._dropped_options.get(key, ())
            opts = [o for o in opts if o not in dropped]
            for extra in self._extra_options.get(key, ()):  # a seed plan's options the space would not sample
                if extra in opts:
                    continue
                if extra == KEEP or opts[-1:] != [KEEP]:
                    opts.append(extra)
                else:
                    opts.insert(len(opts) - 1, extra)  # "keep" stays last
            deltas = {}
            blocks = mats[0].blocks  # equal within a bucket: same group, same block dims
            for o in opts:
                dp, dm = self._option_cost(o, *dims, kind)
                d_excl, d_macs = dp * blocks, dm * blocks
                d_all = d_excl
                d_bytes = blocks * self._option_bytes(o, *dims, info.float_width)
                if o != KEEP and is_emb and info.tied_input_embedding == mats[0].name:
                    d_all += mats[0].m * mats[0].n  # the LM head keeps a dense copy of the table
                    d_bytes += mats[0].m * mats[0].n * info.float_width
                deltas[o] = {"params": d_all, "params_excl_output_embedding": d_excl, "macs_per_token": d_macs,
                             "bytes": d_bytes}
            choices.append(Choice(key, g, layer, dims, tuple(opts), tuple(mats), deltas))
        return choices

    # --------------------------------------------------------------------------------- drawing

    def _draw(self, categorical: Callable[[str, Sequence], Any], uniform: Callable[[str, float, float], float]) -> dict:
        """Draw one plan's parameters through the two callbacks (Optuna's suggest_* or a random generator)."""
        params: dict[str, Any] = {}
        on = self._draw_layers(params, categorical, uniform)
        pruned: set[str] = set()
        for b in self.blocks:  # before the matrices: a pruned block's matrices take no choice of their own
            if not self._block_live(b, on):
                continue
            params[b.key] = categorical(b.key, b.options)
            if params[b.key] != NO_PRUNE:
                pruned.update(b.members)
        for c in self.choices:
            if c.key in pruned:
                continue
            if c.layer is not None and c.layer not in on:
                continue
            if c.tied and not any(mx.layer in on for mx in c.matrices):
                continue  # tied group with every layer switched off
            params[c.key] = categorical(c.key, c.options)
        return params

    @staticmethod
    def _block_live(b: BlockChoice, on: set[int]) -> bool:
        """Whether a block choice is drawn when the layers `on` are decomposed."""
        return b.layer in on if b.layer is not None else any(i in on for i in b.names)

    def pruned_members(self, params: dict) -> set[str]:
        """Keys of the per-matrix choices that the plan's pruned blocks override (not drawn, ignored if given)."""
        out: set[str] = set()
        for b in self.blocks:
            if params.get(b.key, NO_PRUNE) != NO_PRUNE:
                out.update(b.members)
        return out

    def _draw_layers(self, params: dict, categorical, uniform) -> set[int]:
        if self.layer_mode == "free":
            on = set()
            for i in self.fixed_layers:
                v = categorical(f"L{i}.on", (True, False))
                params[f"L{i}.on"] = v
                if v:
                    on.add(i)
            return on
        if self.layer_mode == "count":
            prio = {}
            for i in self.fixed_layers:
                prio[i] = uniform(f"L{i}.priority", 0.0, 1.0)
                params[f"L{i}.priority"] = prio[i]
            return set(_top_k(prio, self.count))
        return set(self.fixed_layers)

    def active_layers(self, params: dict) -> set[int]:
        """Layers decomposed by a parameter set."""
        if self.layer_mode == "free":
            return {i for i in self.fixed_layers if params.get(f"L{i}.on")}
        if self.layer_mode == "count":
            return set(_top_k({i: float(params[f"L{i}.priority"]) for i in self.fixed_layers}, self.count))
        return set(self.fixed_layers)

    def define_by_run(self, trial) -> dict:
        """Suggest one plan through an Optuna trial (categorical per choice, float priorities for `count`)."""
        return self._draw(lambda name, opts: trial.suggest_categorical(name, list(opts)),
                          lambda name, lo, hi: trial.suggest_float(name, lo, hi))

    def sample(self, rng: random.Random | int | None = None) -> dict:
        """One plan's parameters drawn uniformly per choice (dry runs, property tests); never the empty plan."""
        if not isinstance(rng, random.Random):
            rng = random.Random(rng)
        for _ in range(10_000):
            params = self._draw(lambda name, opts: opts[rng.randrange(len(opts))],
                                lambda name, lo, hi: rng.uniform(lo, hi))
            if not self.is_empty(params):
                return params
        raise ConfigError("space: random sampling keeps drawing the empty plan (nothing decomposed)")

    def is_empty(self, params: dict) -> bool:
        """True when the plan decomposes nothing (it would be the teacher itself: never worth a trial)."""
        return not self.assignment(params)

    def rejection_reasons(self, params: dict) -> list[str]:
        """Why a sampled plan must not be trained: budget limits it breaks, or an empty plan."""
        if self.is_empty(params):
            return ["empty plan (nothing decomposed)"]
        return self.over_budget(params)

    def sample_within_budget(self, rng: random.Random | int | None = None, tries: int = 1000) -> dict:
        """A random plan that meets the budget (rejection sampling, then greedy repair)."""
        if not isinstance(rng, random.Random):
            rng = random.Random(rng)
        params = self.sample(rng)
        for _ in range(tries - 1):
            if self.within_budget(params):
                return params
            params = self.sample(rng)
        return self.repair(params)  # a repair only removes cost, so it never empties a plan that was not empty

    # --------------------------------------------------------------------------------- meaning

    def _check(self, params: dict) -> None:
        for key, value in params.items():
            choice = self._by_key.get(key) or self._blocks_by_key.get(key)
            if choice is not None:
                if value not in choice.options:
                    raise ConfigError(f"plan parameter {key}={value!r} is not one of {list(choice.options)}")
            elif key in PLAN_INFO_KEYS:  # a trial's Ray config also carries the plan's summary and sizes
                continue
            elif not re.fullmatch(r"L\d+\.(on|priority)", key):
                raise ConfigError(f"unknown plan parameter {key!r}; this space has {self.param_names()[:8]}...")

    def params_of(self, config: Mapping | None) -> dict:
        """The plan parameters in a trial's config (Ray's config may hold other keys; None: none)."""
        config = config or {}
        return {k: config[k] for k in self.param_names() if k in config}

    def seed_label(self, config: Mapping) -> str | None:
        """The label of the seed plan (search.seed_plans) a trial's config holds ("seed:kngpt2"), None for a sampled
        plan."""
        params = self.params_of(config)
        # getattr: a space pickled by a release without seed plans (an older search being resumed) has no `seeds`
        return next((label for label, p in getattr(self, "seeds", ()) if p == params), None)

    def param_names(self) -> list[str]:
        names = []
        if self.layer_mode == "free":
            names += [f"L{i}.on" for i in self.fixed_layers]
        elif self.layer_mode == "count":
            names += [f"L{i}.priority" for i in self.fixed_layers]
        return names + [b.key for b in self.blocks] + [c.key for c in self.choices]

    def assignment(self, params: dict) -> dict[str, str]:
        """Module name -> option string for every matrix the plan decomposes (kept ones left out)."""
        self._check(params)
        on = self.active_layers(params)
        skip = self.pruned_members(params)
        out: dict[str, str] = {}
        for c in self.choices:
            if c.key not in params or c.key in skip:
                continue
            opt = params[c.key]
            if opt == KEEP:
                continue
            for mx in c.matrices:
                if mx.layer is None or mx.layer in on:
                    out[mx.name] = opt
        for b in self.blocks:
            opt = params.get(b.key, NO_PRUNE)
            if opt == NO_PRUNE:
                continue
            for i, specs in b.specs[opt].items():
                if i in on:
                    out.update(specs)
        if self.blocks:  # model order, as without blocks
            order = {mx.name: k for k, mx in enumerate(self.info.matrices)}
            out = dict(sorted(out.items(), key=lambda kv: order[kv[0]]))
        return out

    def resolved(self, params: dict) -> dict[str, dict]:
        """Module name -> spec dict (as `ModuleSpec.to_dict`, e.g. {"shape", "rank", "blocks"} or
        {"embedding_factor"}) of the plan."""
        from dataclasses import replace

        from kron.methods import parse_option as parse_spec

        blocks = {mx.name: mx.blocks for mx in self.info.matrices}
        out = {}
        for name, opt in self.assignment(params).items():
            spec = parse_spec(opt)
            if blocks[name] > 1 and hasattr(spec, "blocks"):
                spec = replace(spec, blocks=blocks[name])
            out[name] = spec.to_dict()
        return out

    def to_plan_rules(self, params: dict) -> list[dict]:
        """kron plan rules (TrialConfig.plan.rules) for a parameter set: one rule per distinct spec, selecting
        exact module names, in model order."""
        from kron.methods import spec_from_dict

        grouped: dict[str, tuple[dict, list[str]]] = {}
        for name, spec in self.resolved(params).items():
            rule = spec_from_dict(spec).to_rule()
            # prune rules name a fraction, resolved per matrix against its block: one rule per fraction
            key = repr(sorted(rule.items())) if "prune" in spec else repr(sorted(spec.items()))
            grouped.setdefault(key, (rule, []))[1].append(name)
        rules = []
        for rule, names in grouped.values():
            rules.append({"select": names[0] if len(names) == 1 else names, **rule})
        return rules

    def to_plan_dict(self, params: dict, name: str | None = None) -> dict:
        """A complete kron plan dict (version, default, rules)."""
        plan = {"version": 1, "default": KEEP, "rules": self.to_plan_rules(params)}
        if name:
            plan = {"version": 1, "name": name, "default": KEEP, "rules": plan["rules"]}
        return plan

    def plan_costs(self, params: dict) -> dict[str, Any]:
        """{"params", "params_excl_output_embedding", "macs_per_token", "bytes", "compression_ratio"} of a plan,
        analytically."""
        self._check(params)
        on = self.active_layers(params)
        total = self.teacher_sizes()
        skip = self.pruned_members(params)
        for b in self.blocks:
            opt = params.get(b.key, NO_PRUNE)
            if opt == NO_PRUNE:
                continue
            for i, delta in b.deltas[opt].items():
                if i in on:
                    for axis in SIZE_AXES:
                        total[axis] += delta[axis]
        for c in self.choices:
            opt = params.get(c.key)
            if opt is None or c.key in skip:
                continue
            n = sum(1 for mx in c.matrices if mx.layer is None or mx.layer in on)
            for axis in SIZE_AXES:
                total[axis] += n * c.deltas[opt][axis]
        excl = total["params_excl_output_embedding"]
        return {**total, "compression_ratio": self.info.params_excl_output_embedding / max(excl, 1)}

    def plan_cost(self, params: dict) -> PlanCost:
        """(parameters, multiply-adds per token) after compression, computed analytically (no model built)."""
        c = self.plan_costs(params)
        return PlanCost(c["params"], c["macs_per_token"])

    def describe(self, params: dict) -> str:
        """One line: the decomposed layers and each choice, e.g. "layers 1,3 | L1.attention 32x64,2x1,r1 | ..."."""
        parts = []
        if self.layer_mode in ("free", "count"):
            on = sorted(self.active_layers(params))
            parts.append("layers " + (",".join(map(str, on)) if on else "none"))
        skip = self.pruned_members(params)
        for b in self.blocks:
            if b.key in params:
                parts.append(f"{b.key} {params[b.key]}")
        for c in self.choices:
            if c.key in params and c.key not in skip:
                parts.append(f"{c.key} {params[c.key]}")
        return " | ".join(parts)

    # --------------------------------------------------------------------------------- size

    def size(self) -> int:
        """Number of distinct non-empty plans in the space (a Python int: exact, however large)."""
        return self._size_with_empty() - (1 if self._empty_possible() else 0)

    def _empty_possible(self) -> bool:
        non_layer = [c for c in self.choices if c.layer is None and not c.tied]
        layered = [c for c in self.choices if c not in non_layer]
        if not all(KEEP in c.options for c in non_layer):
            return False
        if self.layer_mode == "free" or (self.layer_mode == "count" and self.count == 0):
            return True
        return all(KEEP in c.options for c in layered)

    def _count(self, choices: list[Choice], blocks: Sequence[BlockChoice]) -> int:
        """Distinct assignments of a set of choices and the block choices among them: a pruned block is one
        assignment of its matrices whatever their own choices, an unpruned one leaves them to those choices."""
        members = {k for b in blocks for k in b.members}
        n = math.prod(len(c.options) for c in choices if c.key not in members)
        for b in blocks:
            n *= len(b.options) - 1 + math.prod(len(c.options) for c in choices if c.key in b.members)
        return n

    def _size_with_empty(self) -> int:
        allow_keep = {c.key: KEEP in c.options for c in self.choices}
        non_layer = [c for c in self.choices if c.layer is None and not c.tied]
        tied = [c for c in self.choices if c.tied]
        tied_blocks = [b for b in self.blocks if b.tied]
        base = self._count(non_layer, [])
        if self.layer_mode not in ("free", "count"):
            return base * self._count([c for c in self.choices if c not in non_layer], self.blocks)
        L = len(self.fixed_layers)
        if tied or tied_blocks:
            # which layers are on x one shared option per tied group; all-keep collapses onto "no layer on"
            P = self._count(tied, tied_blocks)
            P_eff = P - (1 if all(allow_keep[c.key] for c in tied) else 0)
            if self.layer_mode == "free":
                return base * ((2 ** L - 1) * P_eff + 1)
            if self.count == 0:
                return base
            return base * (math.comb(L, self.count) * P_eff + (P - P_eff))
        per_layer = []
        for i in self.fixed_layers:
            cs = [c for c in self.choices if c.layer == i]
            bs = [b for b in self.blocks if b.layer == i]
            P = self._count(cs, bs)
            per_layer.append(P - (1 if (cs or bs) and all(allow_keep[c.key] for c in cs) else 0))
        if self.layer_mode == "free":
            return base * math.prod(1 + p for p in per_layer)
        # exactly k layers on; layers whose options are all "keep" look like switched-off ones, so the distinct
        # plans are those with at most k effectively decomposed layers when keep is allowed everywhere
        keep_everywhere = all(allow_keep[c.key] for c in self.choices if c.layer is not None)
        if keep_everywhere:
            return base * sum(_elementary_symmetric(per_layer, j) for j in range(self.count + 1))
        return base * _elementary_symmetric(per_layer, self.count)

    def size_log10(self) -> float:
        n = self.size()
        return math.log10(n) if n > 0 else float("-inf")

    def summary(self) -> str:
        """A few lines describing the space: matrices, choices per group, layer mode, size."""
        info = self.info
        lines = [f"teacher: {info.model_type} ({info.family or 'custom'} family), {len(info.layers)} layers, "
                 f"{info.params:,} parameters ({info.params_excl_output_embedding:,} excluding the output "
                 f"embedding), {info.macs:,} multiply-adds per token"]
        groups: dict[str, list[Choice]] = {}
        for c in self.choices:
            groups.setdefault(c.group, []).append(c)
        for g, cs in groups.items():
            dims = sorted({c.dims for c in cs})
            n_mats = len({mx.name for c in cs for mx in c.matrices})
            opts = sorted({len(c.options) for c in cs})
            example = ", ".join(cs[0].options[:3]) + (", ..." if len(cs[0].options) > 3 else "")
            lines.append(f"  {g:<17} {n_mats:>3} matrices, block {' / '.join(f'{a}x{b}' for a, b in dims)}: "
                         f"{len(cs)} choice(s) of {'/'.join(map(str, opts))} options (e.g. {example})")
        from kron.methods import get_method

        for b in self.blocks:
            if b is not next(x for x in self.blocks if (x.method, x.part) == (b.method, b.part)):
                continue  # one line per method and part
            bs = [x for x in self.blocks if (x.method, x.part) == (b.method, b.part)]
            what = get_method(b.method).part_words(b.part)
            lines.append(f"  {b.method}_{b.part:<{16 - len(b.method)}} {len(bs):>3} block choice(s) ({what} removed; a "
                         f"pruned block's matrices take no other option): {' | '.join(bs[0].options)}")
        mode = {"fixed": f"fixed {self.fixed_layers}", "free": "free (one on/off per layer)",
                "count": f"exactly {self.count} of {len(self.fixed_layers)}"}.get(self.layer_mode, self.layer_mode)
        lines.append(f"  layers decomposed: {mode}; tie_layers: {self.config.tie_layers}")
        if self.budget is not None:
            lines.append("  budget: " + ", ".join(f"{AXES[lim.axis].budget_key} {lim.value:,}"
                                                  for lim in self.budget.limits))
        n = self.size()
        lines.append(f"  size: {n:,} distinct plans (10^{self.size_log10():.2f})" if n < 10 ** 15 else
                     f"  size: 10^{self.size_log10():.2f} distinct plans")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- helpers


def _parse_or_error(option: str, group: str):
    from kron.methods import parse_option as parse_spec

    spec = parse_spec(option)
    if spec is not None:
        return spec
    try:
        return parse_option(option)
    except ValueError as exc:
        raise ConfigError(f"space.shapes.{group}: {exc}") from None


def _with_variants(method, options, specs: list, opts: list[str]) -> list[str]:
    """`opts` (the options of `specs`, a choice's structures), then in each variant of a modifier (int8, int4): every
    structure modified and the dense matrix modified; without the unmodified ones where the modifier says so."""
    dense = method.variants(None, options)
    wrapped = [method.variants(sp, options) for sp in specs]
    out = list(opts) if method.keeps_unmodified(options) else []
    for j in range(len(dense)):
        out += [w[j].option() for w in wrapped if len(w) == len(dense)] + [dense[j].option()]
    return out


def _keeps_float(space: SpaceConfig) -> bool:
    """Whether the space offers unmodified structures (every modifier keeps them: float weights beside int8)."""
    from kron.methods import get_method

    return all(get_method(n).keeps_unmodified(space.method_options(n)) for n in space.modifier_methods())


def _top_k(priorities: dict[int, float], k: int) -> list[int]:
    """The k layers with the highest priority (ties: lower index first)."""
    return sorted(sorted(priorities, key=lambda i: (-priorities[i], i))[:k])


def _elementary_symmetric(values: Sequence[int], k: int) -> int:
    e = [1] + [0] * k
    for v in values:
        for j in range(k, 0, -1):
            e[j] += e[j - 1] * v
    return e[k]
