"""Evolving an automatic plan on the model: a (1+λ) evolutionary search judged by the whole model's KL.

`kron.autoplan`'s knapsack minimises a sum of per-matrix damages; `kron.refine` improves its plan by greedy
exchange moves. `evolve_plan` searches more widely, after EvoPress (Sieberling, Kuznedelev, Kurtic, Alistarh:
"EvoPress: Towards Optimal Dynamic Model Compression via Evolutionary Search", 2024, IST-DASLab/EvoPress):

* the parent starts as the knapsack's plan; each matrix's candidates form a staircase (`kron.refine.staircase`: the
  candidates no other beats on both cost and damage, cheapest first — across every method the profile offers, so
  one staircase mixes Kronecker shapes, low-rank ranks, int8/int4 widths and keep);
* each generation makes `offspring` children of the parent, each by 1..`max_switches` level switches (`mutate`):
  one matrix one step up its staircase (costlier, less damage), paid for by steps down of others until the plan
  is within the budget's room again, then what is left of the room spent on steps up that fit (EvoPress's switches
  are between levels of equal size; here steps cost very different amounts, see `mutate`);
* multi-step selection: every child is measured on a few held-out tokens (the first token level), the best few
  (`survivors`) again on more, ...; the best at the full level replaces the parent only when it beats it there
  (elitist: the parent's full-level KL is known), so the result is never worse than the start nor over the budget.

The measure is `kron.refine.PlanEvaluator` (each matrix's candidate layer built once, a value cached per plan and
level) unless the caller passes `evaluate_many(choices, level) -> [KL, ...]`, e.g. to spread a batch over workers.
`state_path`: a JSON file written atomically after each generation (the parent, its KL, the counts, the random
generator's state); an existing file with the same header resumes from its last generation, so an interrupted
run ends as an uninterrupted one would; a file made for other settings is refused, naming the setting.

Pure torch (and the standard library's `random`): no Ray.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from .autoplan import Budget, Item, Option, Solution, budget_room, items_from_profile
from .errors import ConfigError, DataError, PlanError
from .refine import PlanEvaluator, check_token_levels, plan_choice, staircase

__all__ = ["DEFAULT_TOKEN_LEVELS", "FORMAT", "Evolution", "check_evo_settings", "evolve_choice", "evolve_plan",
           "mutate"]

FORMAT = "kronsearch.evo/1"
DEFAULT_TOKEN_LEVELS = (512, 4096)  # screening level, full level (held-out tokens per measurement, at most)


@dataclass
class Evolution:
    """What `evolve_plan` did: the evolved Solution (damage: its measured KL at the full level), the KL of the start
    and of the end, the generations run in all (`resumed_from` of them by an earlier run), why it stopped, per token
    level the tokens one measurement reads, the measurements made and the tokens they read (an earlier run's
    included), the seconds (likewise), the parent's KL after each generation (`history[0]`: the start) and the
    workers that measured (1: in process)."""

    solution: Solution
    start_kl: float
    kl: float
    generations: int
    stopped: str
    token_levels: tuple
    level_tokens: list[int]
    evals_per_level: list[int]
    tokens_per_level: list[int]
    seconds: float = 0.0
    history: list[float] = field(default_factory=list)
    resumed_from: int = 0
    workers: int = 1

    @property
    def gain(self) -> float:
        """Relative KL reduction over the start (0 when nothing was found)."""
        return (self.start_kl - self.kl) / self.start_kl if self.start_kl > 0 else 0.0

    @property
    def evals(self) -> int:
        return sum(self.evals_per_level)

    @property
    def tokens(self) -> int:
        return sum(self.tokens_per_level)

    def to_dict(self) -> dict:
        levels = [{"tokens": t, "tokens_per_eval": n, "evals": e, "tokens_read": r} for t, n, e, r in
                  zip(self.token_levels, self.level_tokens, self.evals_per_level, self.tokens_per_level)]
        return {"start_kl": self.start_kl, "kl": self.kl, "gain": self.gain, "generations": self.generations,
                "stopped": self.stopped, "resumed_from": self.resumed_from, "evals": self.evals,
                "tokens": self.tokens, "seconds": round(self.seconds, 2), "workers": self.workers, "levels": levels,
                "history": list(self.history)}


def check_evo_settings(generations: int, offspring: int, max_switches: int, token_levels: Sequence[int | None],
                       survivors: Sequence[int] | None = None, time_budget_s: float | None = None,
                       patience: int | None = None) -> tuple[tuple, tuple]:
    """(token levels, survivors) of valid settings of `evolve_plan`, ConfigError naming the bad one otherwise.
    survivors: how many candidates measured at each token level go on to the next, the last 1 (default: a quarter
    of the offspring at the first level, then 1)."""
    for name, value in (("generations", generations), ("offspring", offspring), ("max_switches", max_switches)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 1):
        raise ConfigError(f"patience must be a positive number of generations (or None: no limit), got {patience!r}")
    if time_budget_s is not None and not (isinstance(time_budget_s, (int, float)) and time_budget_s > 0
                                          and math.isfinite(time_budget_s)):
        raise ConfigError(f"time_budget_s must be a positive number of seconds (or None), got {time_budget_s!r}")
    levels = check_token_levels(token_levels)
    if survivors is None:
        survivors = tuple(max(1, offspring // 4 ** (i + 1)) for i in range(len(levels) - 1)) + (1,)
    survivors = tuple(survivors)
    if len(survivors) != len(levels):
        raise ConfigError(f"survivors needs one count per token level ({len(levels)}), got {list(survivors)}")
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in survivors) or survivors[-1] != 1 or any(
            a < b for a, b in zip(survivors, survivors[1:])):
        raise ConfigError(f"survivors must be positive, not increasing, and end with 1 (the new parent), got "
                          f"{list(survivors)}")
    return levels, survivors


def _step(stair: Sequence[Option], cur: Option, up: bool) -> Option | None:
    """The next option of the staircase above (costlier, less damage) or below (cheaper) `cur` (None at an end); an
    option off the staircase steps to the stairs around it."""
    if up:
        return next((o for o in stair if o.cost > cur.cost and o.damage < cur.damage), None)
    return next((o for o in reversed(stair) if o.cost < cur.cost), None)


def _steps(child: Mapping[str, Option], stairs: Mapping[str, Sequence[Option]]):
    ups, downs = [], []
    for name, cur in child.items():
        stair = stairs.get(name) or ()
        u, d = _step(stair, cur, True), _step(stair, cur, False)
        if u is not None:
            ups.append((name, u, u.cost - cur.cost))
        if d is not None:
            downs.append((name, d, d.cost - cur.cost))
    return ups, downs


def mutate(choice: Mapping[str, Option], stairs: Mapping[str, Sequence[Option]], room: int, rng: random.Random,
           switches: int = 1, *, fill: bool = True) -> dict[str, Option]:
    """A child of the plan `choice` (name -> Option) by `switches` level switches within the summed cost `room`.
    A switch moves one matrix, drawn at random, one step up its staircase (`stairs[name]`, `kron.refine.staircase`:
    costlier, less damage) and pays for it by steps down of other matrices, each drawn at random among the steps
    that free no more than is still owed (when none is that small: the smallest step that frees it all), until the
    plan fits the room again (a matrix may step down more than once; a matrix whose step up cannot be paid for is
    not drawn). Fewer switches when none is left; the plan is returned unchanged when no switch fits. fill: then spend
    what is left of the room on single steps up, each drawn at random among those that fit, until none does.

    Steps cost very different amounts (at a high compression an FFN's step up costs what several attention
    projections' steps down free, an embedding's step frees hundreds of times more), so EvoPress's one-up,
    one-down switch between levels of equal size rarely fits here, or leaves the child far under its budget: paying
    with as many small steps down as needed, then filling, keeps a child near the parent and its cost at the
    budget, as the parent's is. Deterministic given `rng`'s state."""
    child = dict(choice)
    cost = sum(o.cost for o in child.values())
    for _ in range(switches):
        floor = {n: min((o.cost for o in stairs.get(n) or ()), default=cur.cost) for n, cur in child.items()}
        spare = sum(max(cur.cost - floor[n], 0) for n, cur in child.items())  # all the others could free
        ups = [(n, o, dc) for n, o, dc in _steps(child, stairs)[0]
               if cost + dc - (spare - max(child[n].cost - floor[n], 0)) <= room]
        if not ups:
            break
        name_u, up, dc_u = ups[rng.randrange(len(ups))]
        child[name_u] = up
        cost += dc_u
        while cost > room:  # pay for it (the bound above says the others can), overpaying as little as may be
            downs = [(n, o, dc) for n, o, dc in _steps(child, stairs)[1] if n != name_u]
            part = [d for d in downs if -d[2] <= cost - room]
            if not part:  # one step pays it all: the cheapest such step
                least = max(dc for _, _, dc in downs)
                part = [d for d in downs if d[2] == least]
            name, down, dc = part[rng.randrange(len(part))]
            child[name] = down
            cost += dc
    while fill and child != choice:
        fits = [(n, o, dc) for n, o, dc in _steps(child, stairs)[0] if cost + dc <= room]
        if not fits:
            break
        name, up, dc = fits[rng.randrange(len(fits))]
        child[name] = up
        cost += dc
    return child


def _key(choice: Mapping[str, Option]) -> tuple:
    return tuple(sorted((n, o.label) for n, o in choice.items()))


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _batch_parts(batch):
    if hasattr(batch, "shape"):
        return batch, None
    return batch.get("input_ids"), batch.get("attention_mask")


def _tokens_read(batches: Sequence, max_tokens: int | None) -> int:
    """The held-out tokens a `kron.measure.ModelMeasure` with this budget reads (its rule, without running it)."""
    from .measure import budgeted_batches

    return sum(n for _, n in budgeted_batches(batches, max_tokens))


def _heldout_digest(batches: Sequence) -> str:
    h = hashlib.sha256()
    for b in batches:
        for t in _batch_parts(b):
            if t is not None:
                h.update(str(tuple(t.shape)).encode())
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _header(profile, budget, methods, damage, embeddings, items, start, heldout, levels, survivors, offspring,
            max_switches, seed) -> dict:
    emb = embeddings if isinstance(embeddings, bool) else sorted(int(f) for f in embeddings)
    candidates = [(it.name, [(o.label, o.cost, repr(o.damage)) for o in it.options]) for it in items]
    h = {"budget": str(budget), "axis": budget.axis, "methods": None if methods is None else sorted(methods),
         "damage": damage, "embeddings": emb, "model": profile.get("model"), "calibration": profile.get("calibration"),
         "ridge": profile.get("ridge"), "candidates": _digest(candidates), "start": _digest(_key(start)),
         "heldout": _heldout_digest(heldout), "token_levels": list(levels), "survivors": list(survivors),
         "offspring": offspring, "max_switches": max_switches, "seed": seed}
    return json.loads(json.dumps(h, default=str))  # as it reads back from the file


def _load_state(path: Path, header: dict) -> dict | None:
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is not a readable evolution state ({exc}); delete it to start afresh") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or not isinstance(state.get("header"), dict):
        raise ConfigError(f"{path} is not an evolution state of this release (format {FORMAT}); delete it or give "
                          "another state file")
    for key, want in header.items():
        have = state["header"].get(key)
        if have != want:
            raise ConfigError(f"{path} was written by an evolution with other settings: {key} is {_shown(have)} "
                              f"there, {_shown(want)} now; delete it or give another state file to start afresh")
    return state


def _shown(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _resumed(state: Mapping, by_label: Mapping, path: Path):
    """(rng, parent, generation, stale, parent KL, start KL, history, seconds, evals, tokens) of a saved state."""
    try:
        rng = random.Random()
        version, internal, gauss = state["rng"]
        rng.setstate((version, tuple(internal), gauss))
        parent = {n: by_label[n][label] for n, label in state["parent"].items()}
        if parent.keys() != by_label.keys():
            raise KeyError("parent")
        return (rng, parent, int(state["generation"]), int(state["stale"]), float(state["kl"]),
                float(state["start_kl"]), [float(v) for v in state["history"]], float(state["seconds"]),
                [int(v) for v in state["evals"]], [int(v) for v in state["tokens"]])
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{path} is a damaged evolution state ({type(exc).__name__}: {exc}); delete it to start "
                          "afresh") from None


def evolve_plan(model, stats, profile: Mapping, budget: Budget, solution: Solution, heldout: Sequence, *,
                methods: Sequence[str] | None = None, damage: str = "proxy", embeddings=True, generations: int = 40,
                offspring: int = 16, survivors: Sequence[int] | None = None,
                token_levels: Sequence[int | None] = DEFAULT_TOKEN_LEVELS, max_switches: int = 3, seed: int = 0,
                time_budget_s: float | None = None, patience: int | None = None, state_path=None,
                progress: Callable[[int, float], None] | None = None,
                evaluate_many: Callable[[list, int], list] | None = None, workers: int = 1) -> Evolution:
    """Evolve `solution` (from `kron.autoplan.auto_plan` on the same profile, budget, methods, damage and
    embeddings) on the model; see the module docstring. heldout: the held-out batches the KL is measured on;
    token_levels: tokens per measurement at each selection step (increasing; None: all); survivors: see
    `check_evo_settings`; stops after `generations` in all (a resumed run's included), after `time_budget_s` seconds
    of this call, or after `patience` generations without a better parent. progress(generation, parent's KL) after
    each generation. evaluate_many(choices, level) -> one KL per plan (name -> Option) at token level index `level`:
    measures in place of the in-process `kron.refine.PlanEvaluator` (model and stats are then unused); workers: how
    many processes it spreads a batch over (reported, not used).

    Returns an Evolution whose solution has the measured KL as its damage (bound = nan)."""
    levels, survivors = check_evo_settings(generations, offspring, max_switches, token_levels, survivors,
                                           time_budget_s, patience)
    items, fixed = items_from_profile(profile, budget.axis, methods=methods, damage=damage, embeddings=embeddings)
    room = budget_room(profile, budget, fixed)
    start = plan_choice(items, solution)
    if sum(o.cost for o in start.values()) > room:
        raise PlanError(f"the plan to evolve is over its budget {budget}: it was made for another budget")
    header = _header(profile, budget, methods, damage, embeddings, items, start, heldout, levels, survivors,
                     offspring, max_switches, seed)
    was_training = getattr(model, "training", False)
    ev = None
    if evaluate_many is None:
        model.eval()
        ev = PlanEvaluator(model, stats, heldout, levels, profile.get("ridge"))
        evaluate_many = lambda choices, level: [ev(c, level) for c in choices]  # noqa: E731
    try:
        return evolve_choice(items, room, start, heldout, evaluate_many, header=header, fixed=fixed,
                             budget=str(budget), solution=solution, generations=generations, offspring=offspring,
                             survivors=survivors, token_levels=levels, max_switches=max_switches, seed=seed,
                             time_budget_s=time_budget_s, patience=patience, state_path=state_path,
                             progress=progress, workers=workers)
    finally:
        if ev is not None:
            model.train(was_training)


def evolve_choice(items: Sequence[Item], room: int, start: Mapping[str, Option], heldout: Sequence,
                  evaluate_many: Callable[[list, int], list], *, header: Mapping | None = None, fixed: int = 0,
                  budget: str = "", solution: Solution | None = None, generations: int = 40, offspring: int = 16,
                  survivors: Sequence[int] | None = None, token_levels: Sequence[int | None] = DEFAULT_TOKEN_LEVELS,
                  max_switches: int = 3, seed: int = 0, time_budget_s: float | None = None,
                  patience: int | None = None, state_path=None, progress: Callable[[int, float], None] | None = None,
                  workers: int = 1) -> Evolution:
    """The evolution itself, on any multiple-choice items (`kron.autoplan.Item`: a profile's matrices, or a search
    space's choices, whose options' labels the measure understands): `start` (item name -> Option, its summed cost
    within `room`) evolved by `evaluate_many(choices, level)` (one KL per plan at token level index `level`) on
    `heldout` (only counted here: the tokens each level reads). header: what a state file must match to be resumed
    (default: the items, the start, the held-out batches and the settings); fixed: the size outside the items, added
    to the result's cost; budget: its text for messages; solution: the start's Solution (its solver and notes are
    carried on). The other settings: `evolve_plan`."""
    levels, survivors = check_evo_settings(generations, offspring, max_switches, token_levels, survivors,
                                           time_budget_s, patience)
    t0 = time.time()
    start = dict(start)
    if sum(o.cost for o in start.values()) > room:
        raise PlanError(f"the plan to evolve is over its budget {budget or room}: it was made for another budget")
    stairs = {it.name: staircase(it) for it in items}
    by_label = {it.name: {o.label: o for o in it.options} for it in items}
    level_tokens = [_tokens_read(heldout, t) for t in levels]
    slots = [level_tokens.index(n) for n in level_tokens]  # a level no larger than the one below shares its values
    if header is None:
        candidates = [(it.name, [(o.label, o.cost, repr(o.damage)) for o in it.options]) for it in items]
        header = json.loads(json.dumps({
            "room": room, "candidates": _digest(candidates), "start": _digest(_key(start)),
            "heldout": _heldout_digest(heldout), "token_levels": list(levels), "survivors": list(survivors),
            "offspring": offspring, "max_switches": max_switches, "seed": seed}, default=str))
    path = Path(state_path) if state_path is not None else None
    state = _load_state(path, dict(header)) if path is not None else None
    cache: dict[tuple, float] = {}
    evals, tokens = [0] * len(levels), [0] * len(levels)

    def measure(choices: list, level: int) -> list[float]:
        todo = [c for c in choices if (_key(c), slots[level]) not in cache]
        if todo:
            values = list(evaluate_many(todo, level))
            if len(values) != len(todo) or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
                raise DataError(f"the model-level measure gave {values!r} for {len(todo)} plans: one finite KL each "
                                "expected")
            for c, v in zip(todo, values):
                cache[(_key(c), slots[level])] = float(v)
            evals[level] += len(todo)
            tokens[level] += len(todo) * level_tokens[level]
        return [cache[(_key(c), slots[level])] for c in choices]

    if state is None:
        rng = random.Random(seed)
        parent = start
        gen, stale, seconds_before, resumed = 0, 0, 0.0, 0
        parent_kl = start_kl = measure([start], len(levels) - 1)[0]
        history = [parent_kl]
    else:
        (rng, parent, gen, stale, parent_kl, start_kl, history, seconds_before, evals,
         tokens) = _resumed(state, by_label, path)
        resumed = gen

    def save(stopped: str | None) -> None:
        if path is None:
            return
        from .fsutil import atomic_write_json

        version, internal, gauss = rng.getstate()
        atomic_write_json(path, {
            "format": FORMAT, "header": header, "generation": gen, "stopped": stopped,
            "parent": {n: o.label for n, o in parent.items()}, "kl": parent_kl, "start_kl": start_kl,
            "stale": stale, "history": history, "evals": evals, "tokens": tokens,
            "seconds": seconds_before + time.time() - t0, "rng": [version, list(internal), gauss]}, indent=None)

    if state is None:
        save(None)
    stopped = "generations"
    while True:
        if gen >= generations:
            break
        if patience is not None and stale >= patience:
            stopped = "patience"
            break
        if time_budget_s is not None and time.time() - t0 >= time_budget_s:
            stopped = "time budget"
            break
        children, seen = [], {_key(parent)}
        for _ in range(4 * offspring):  # distinct children; a tiny plan may have fewer
            if len(children) >= offspring:
                break
            child = mutate(parent, stairs, room, rng, rng.randint(1, max_switches))
            if _key(child) not in seen:
                seen.add(_key(child))
                children.append(child)
        if not children:
            stopped = "no switch keeps the budget"
            break
        pool = list(range(len(children)))
        for level in range(len(levels)):
            values = measure([children[i] for i in pool], level)
            ranked = sorted(zip(values, pool))  # ties: the earlier child
            pool = [i for _, i in ranked[:survivors[level]]]
        best_kl, best = ranked[0]
        gen += 1
        if best_kl < parent_kl:
            parent, parent_kl, stale = children[best], best_kl, 0
        else:
            stale += 1
        history.append(parent_kl)
        save(None)
        if progress is not None:
            progress(gen, parent_kl)
    save(stopped)
    cost = sum(o.cost for o in parent.values())
    if cost > room or parent_kl > start_kl:  # switches keep the room and the parent only improves
        raise PlanError(f"internal check failed: the evolved plan costs {cost + fixed:,} (budget {budget or room}) "
                        f"with KL {parent_kl:.4g} against the start's {start_kl:.4g}")
    solver = solution.solver if solution is not None else "knapsack"
    notes = list(solution.notes) if solution is not None else []
    sol = Solution(choice=dict(parent), damage=parent_kl, cost=cost + fixed, room=room + fixed, bound=float("nan"),
                   solver=solver + "+evo", exact=False,
                   notes=notes + [f"evolved on the model: KL {start_kl:.4g} -> {parent_kl:.4g} in {gen} generations, "
                                  f"{sum(evals)} measurements ({stopped})"])
    return Evolution(sol, start_kl, parent_kl, gen, stopped, levels, level_tokens, evals, tokens,
                     seconds_before + time.time() - t0, history, resumed, workers)
