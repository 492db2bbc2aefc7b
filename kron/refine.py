"""Refining an automatic plan on the model itself: exchange moves judged by the joint model-level measure.

`kron.autoplan` chooses per matrix the candidate that minimises a *sum* of per-matrix damages, each measured with
that matrix compressed alone. The sum is a model of the real objective — the damage of the model with every
matrix compressed at once — and a biased one: errors of successive layers interact, and the proxy is not comparable
across matrices. On the demo teacher at 4x the knapsack plan ties the uniform low-rank preset at init instead of
beating it (docs/autoplan.md).

`refine_plan` starts from the knapsack's plan and improves it on the real objective: the KL(teacher ‖ student) of
the whole compressed model on held-out calibration batches (`kron.measure.ModelMeasure`, the profile's model-level
measure). A move gives one matrix its next better candidate (the next step up its own cost/damage staircase) and
takes the next step down from another, when the two together stay within the budget (or only gives, when the
budget's slack allows). Moves are tried in the order the profile predicts they help; the first that lowers the
measured KL by more than `min_gain` (relative) is kept and the list is made again; the refinement stops when
`patience` moves in a row fail or after `max_evals` measurements. It never returns a plan the measure rates worse
than the start, nor one over the budget.

`PlanEvaluator` does the measuring (also for `kron.evo`'s evolutionary search): every matrix is built with its
method's data-aware init once per candidate and cached, so a measurement costs one forward pass over the held-out
tokens, at one or more token levels (a cheap screening level, then the full one). Pure torch: the caller hands in
the model, its calibration statistics and held-out batches (`trials.calibration` in the CLI).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from .autoplan import Budget, Item, Option, Solution, budget_room, items_from_profile
from .errors import ConfigError, DataError, PlanError

__all__ = ["PlanEvaluator", "Refinement", "check_token_levels", "plan_choice", "refine_plan", "staircase"]


@dataclass
class Refinement:
    """What `refine_plan` did: the refined Solution (damage: the measured KL), the KL of the start and of the end,
    how many measurements and accepted moves, each accepted move as text, and the seconds it took."""

    solution: Solution
    start_kl: float
    kl: float
    evals: int
    moves: list[str] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0

    @property
    def gain(self) -> float:
        """Relative KL reduction over the start (0 when nothing was found)."""
        return (self.start_kl - self.kl) / self.start_kl if self.start_kl > 0 else 0.0

    def to_dict(self) -> dict:
        return {"start_kl": self.start_kl, "kl": self.kl, "gain": self.gain, "evals": self.evals,
                "moves": list(self.moves), "seconds": round(self.seconds, 2), "tokens": self.tokens}


def staircase(item: Item) -> list[Option]:
    """The options of an item that are not dominated (no other option is as cheap with less damage), cheapest
    first, with strictly falling damage."""
    out: list[Option] = []
    for o in sorted(item.options, key=lambda o: (o.cost, o.damage)):
        if not out or o.damage < out[-1].damage:
            if out and o.cost == out[-1].cost:
                continue
            out.append(o)
    return out


def check_token_levels(token_levels: Sequence[int | None]) -> tuple:
    """The held-out token levels of a `PlanEvaluator` as a tuple: positive integers, strictly increasing, None (every
    held-out token) only last. ConfigError otherwise."""
    levels = tuple(token_levels) if not isinstance(token_levels, (int, str)) else (token_levels,)
    if not levels:
        raise ConfigError("the model-level measure needs at least one token level, got none")
    for i, t in enumerate(levels):
        last = i == len(levels) - 1
        if t is None and last:
            continue
        if isinstance(t, bool) or not isinstance(t, int) or t < 1:
            raise ConfigError(f"token levels are positive numbers of held-out tokens (None: all of them, last), got "
                              f"{t!r} in {list(levels)}")
        if i and (levels[i - 1] is None or levels[i - 1] >= t):
            raise ConfigError(f"token levels must increase (a screening level first, the full one last), got "
                              f"{list(levels)}")
    return levels


class PlanEvaluator:
    """Measures plans (name -> Option) on the model: the KL of the whole compressed model on the held-out batches,
    at one or more token levels (a cheap screening level first, the full one last; `kron.measure.ModelMeasure`
    each, at most that many tokens, None: all of them). Every (matrix, candidate) layer is built once (data-aware
    init from `stats`, with `ridge`) and shared by all levels; a value is cached per (plan, level), so asking again
    costs nothing and is not counted. A level the held-out batches cannot fill beyond the level below it (the same
    tokens) shares that level's measure and cache.

    `evals_per_level` / `tokens_per_level`: measurements made and held-out tokens they ran over, per level;
    `tokens(level)`: the tokens one measurement at that level reads."""

    def __init__(self, model: nn.Module, stats, heldout: Sequence, token_levels: Sequence[int | None] = (4096,),
                 ridge: float | None = None):
        from .measure import ModelMeasure

        self.model = model
        self.ridge = ridge
        self.stats = stats
        self.token_levels = check_token_levels(token_levels)
        self.modules = dict(model.named_modules())
        self.measures: list = []
        self.slots: list[int] = []  # level -> index into measures
        for level in self.token_levels:
            m = ModelMeasure(model, heldout, level)
            if self.measures and m.tokens == self.measures[-1].tokens:
                self.slots.append(len(self.measures) - 1)  # the held-out batches ran out: the same measure
            else:
                self.measures.append(m)
                self.slots.append(len(self.measures) - 1)
        self.built: dict[tuple[str, str], nn.Module] = {}
        self.seen: dict[tuple, float] = {}
        self.evals_per_level = [0] * len(self.token_levels)
        self.tokens_per_level = [0] * len(self.token_levels)

    @property
    def evals(self) -> int:
        """Measurements made, over all levels."""
        return sum(self.evals_per_level)

    @property
    def measure(self):
        """The full level's ModelMeasure."""
        return self.measures[self.slots[-1]]

    def tokens(self, level: int = -1) -> int:
        """Held-out tokens one measurement at `level` reads."""
        return self.measures[self.slots[level]].tokens

    def layer(self, name: str, option: Option) -> nn.Module:
        """The layer of matrix `name` for candidate `option`, built once (data-aware init; an embedding's factors
        data-free, as the profile built them)."""
        from .calibration import ModuleStats
        from .methods import get_method
        from .methods.base import spec_from_dict

        key = (name, option.label)
        if key not in self.built:
            spec = spec_from_dict(option.spec)
            method = get_method(spec.method)
            with torch.no_grad():
                if not method.data_init:
                    layer = method.build(self.modules[name], spec, "svd")
                else:
                    st = self.stats.stats(name)
                    one = ModuleStats(S=st.S, tokens=st.tokens, ridge=self.ridge)
                    layer = method.build(self.modules[name], spec, "data", stats=one)
            self.built[key] = layer.eval()
        return self.built[key]

    def __call__(self, choice: Mapping[str, Option], level: int = -1) -> float:
        """The measure of the plan `choice` at token level `level` (an index into token_levels; -1: the full one)."""
        if not -len(self.token_levels) <= level < len(self.token_levels):
            raise ConfigError(f"token level {level} out of range: this evaluator has {len(self.token_levels)}")
        level %= len(self.token_levels)
        slot = self.slots[level]
        key = (tuple(sorted((n, o.label) for n, o in choice.items())), slot)
        if key in self.seen:
            return self.seen[key]
        measure = self.measures[slot]
        value = measure.with_layers({name: self.layer(name, o) for name, o in choice.items() if o.spec != "keep"})
        if value != value:
            raise DataError("a plan's model-level measure is NaN (the calibration statistics or a weight hold "
                            "extreme values)")
        self.seen[key] = value
        self.evals_per_level[level] += 1
        self.tokens_per_level[level] += measure.tokens
        return value


def plan_choice(items: Sequence[Item], solution: Solution) -> dict[str, Option]:
    """The plan `solution` (from `kron.autoplan.auto_plan` on the same profile) as name -> the items' own Option of
    the same label (its damage is the items' objective, not the solution's). PlanError when the solution lacks a
    matrix or chose a candidate the items do not offer (it was made from another profile or methods)."""
    by_name = {it.name: it for it in items}
    missing = [n for n in by_name if n not in solution.choice]
    if missing:
        raise PlanError(f"the plan to improve has no choice for {missing[0]}: it was made from another profile")
    choice = {}
    for n, it in by_name.items():
        o = solution.choice[n]
        same = [x for x in it.options if x.label == o.label]
        if not same:
            raise PlanError(f"the plan to improve chose {o.label} for {n}, which the profile does not offer")
        choice[n] = same[0]
    return choice


def _moves(items: Sequence[Item], stairs: Mapping[str, list[Option]], choice: Mapping[str, Option], slack: int):
    """Candidate moves (predicted change of summed damage, [(name, new option), ...]), best predicted first."""
    ups, downs = [], []
    for it in items:
        st, cur = stairs[it.name], choice[it.name]
        # where the current option sits on the staircase: the costliest stair not costlier than it (-1: none)
        i = max((k for k, o in enumerate(st) if o.cost <= cur.cost), default=-1)
        if i + 1 < len(st):
            nxt = st[i + 1]
            if nxt.cost > cur.cost and nxt.damage < cur.damage:
                ups.append((it.name, nxt, nxt.cost - cur.cost, nxt.damage - cur.damage))
        j = i - 1 if i >= 0 and st[i].label == cur.label else i  # the next stair below the current option
        if j >= 0 and st[j].cost < cur.cost:
            downs.append((it.name, st[j], st[j].cost - cur.cost, st[j].damage - cur.damage))
    out = []
    for name_u, up, dc_u, dd_u in ups:
        if dc_u <= slack:
            out.append((dd_u, [(name_u, up)]))
        for name_d, down, dc_d, dd_d in downs:
            if name_d != name_u and dc_u + dc_d <= slack:
                out.append((dd_u + dd_d, [(name_u, up), (name_d, down)]))
    out.sort(key=lambda m: m[0])
    return out


def refine_plan(model: nn.Module, stats, profile: Mapping, budget: Budget, solution: Solution,
                heldout: Sequence, *, methods: Sequence[str] | None = None, damage: str = "proxy",
                max_evals: int = 40, patience: int = 12, min_gain: float = 1e-3, kl_tokens: int | None = 4096,
                embeddings=True, progress: Callable[[int, float], None] | None = None) -> Refinement:
    """Improve `solution` (from `kron.autoplan.auto_plan` on the same profile, budget, methods and damage) by
    exchange moves judged by the model-level KL of the whole compressed model on `heldout` batches (at most
    `kl_tokens` tokens). See the module docstring. embeddings: as `auto_plan`'s. progress(evals, best KL) after
    each measurement.

    Returns a Refinement whose solution has the measured KL as its damage (bound = nan: no lower bound on it)."""
    if max_evals < 1:
        raise PlanError(f"refining needs at least one measurement (max_evals >= 1), got {max_evals}")
    t0 = time.time()
    items, fixed = items_from_profile(profile, budget.axis, methods=methods, damage=damage, embeddings=embeddings)
    room = budget_room(profile, budget, fixed)
    choice = plan_choice(items, solution)
    stairs = {it.name: staircase(it) for it in items}
    was_training = model.training
    model.eval()
    try:
        ev = PlanEvaluator(model, stats, heldout, (kl_tokens,), profile.get("ridge"))
        start = best = ev(choice)
        if progress is not None:
            progress(ev.evals, best)
        accepted: list[str] = []
        while ev.evals < max_evals:
            cost = sum(o.cost for o in choice.values())
            improved = False
            fails = 0
            for _, move in _moves(items, stairs, choice, room - cost):
                if ev.evals >= max_evals or fails >= patience:
                    break
                trial = dict(choice)
                for n, o in move:
                    trial[n] = o
                before = ev.evals
                value = ev(trial)
                if progress is not None and ev.evals > before:
                    progress(ev.evals, min(best, value))
                if value < best * (1 - min_gain):
                    accepted.append(", ".join(f"{n}: {choice[n].label} -> {o.label}" for n, o in move)
                                    + f" (KL {best:.4g} -> {value:.4g})")
                    choice, best = trial, value
                    improved = True
                    break
                fails += 1
            if not improved:
                break
        tokens = ev.measure.tokens
        evals = ev.evals
    finally:
        model.train(was_training)
    cost = sum(o.cost for o in choice.values())
    if cost > room:  # moves keep within the room; never hand out a plan over its budget
        raise PlanError(f"internal check failed: the refined plan costs {cost + fixed:,}, over the budget {budget}")
    sol = Solution(choice=choice, damage=best, cost=cost + fixed, room=room + fixed, bound=float("nan"),
                   solver=solution.solver + "+refine", exact=False,
                   notes=list(solution.notes) + [f"refined on the model: KL {start:.4g} -> {best:.4g} in {evals} "
                                                 f"measurements, {len(accepted)} moves kept"])
    return Refinement(sol, start, best, evals, accepted, time.time() - t0, tokens)
