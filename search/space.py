"""The search space of compression plans for one teacher, sized without loading its weights: drawing plans, their
costs and the plan rules they stand for (the teacher's matrices come from search/model_info.py, the choices and
how they are built from search/choices.py, counting the plans from search/space_size.py, budget checks and
repairs from search/budget.py).

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
  removed ("0.5"; with the quant modifier in `space.methods` also "0.5+int8", the pruned matrices stored as int8). Structured
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

import random
import re
import sys
from typing import Any, Callable, Mapping, NamedTuple, Sequence

from kron.errors import ConfigError
from kron.vocab import SIZE_AXES

from .budget import NO_PRUNE, BudgetMixin
from .choices import KEEP, BlockChoice, Choice, ChoiceBuilder, parse_option
from .config import SearchConfig, SpaceConfig, base_trial_config
from .model_info import Matrix, ModelInfo, inspect_model, teacher_skeleton  # noqa: F401 (re-exported)
from .space_size import SpaceSize

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

class PlanCost(NamedTuple):
    """Parameters (all, as the trial's `params` metric) and multiply-adds per token of a plan."""

    params: int
    macs: int


# ----------------------------------------------------------------------------------------------- the space


class SearchSpace(ChoiceBuilder, SpaceSize, BudgetMixin):
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

    def with_seeds(self, names: list[str], model, *, metric: str = "params", evolve=None) -> "SearchSpace":
        """This space, with the options the seed plans `names` need added, and `seeds` set (search.seeds).
        "auto" / "auto:N" seeds need the damages (`with_damages`); metric: their size axis; evolve: improves each
        automatic seed on the model (`search.seed_evolution.seed_evolver`; None: the knapsack's plans)."""
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
                          for label, options, layers in auto_seeds(self, damages, n, metric, evolve)]
                continue
            size = self._target_size(target, model, metric, name)
            seeds.append(Seed(*auto_seed_at(self, damages, size, metric, f"seed:{name}", evolve)))
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

def _top_k(priorities: dict[int, float], k: int) -> list[int]:
    """The k layers with the highest priority (ties: lower index first)."""
    return sorted(sorted(priorities, key=lambda i: (-priorities[i], i))[:k])
