"""Automatic compression plans: per matrix, the candidate that minimises the summed damage under a size budget.

A multiple-choice knapsack: items are a model's compressible matrices, each item's options are its candidates
(Kronecker shapes, low-rank ranks, keep) with a cost (parameters or multiply-adds per token) and a damage (the
profile's relative output error, `kron.profile`; or, with `damage="kl"`, the model-level KL the profile measured for
some candidates and `kl_damages` estimates for the rest); exactly one option per item, total cost (plus what is not
compressed) within the budget, summed damage as small as possible.

Two solvers, both returning the chosen options, the predicted damage and a lower bound on the optimum:

* `solve_dp`: dynamic programming over the cost axis. Costs are measured from each item's cheapest option; when the
  room left above the cheapest plan fits `max_cells` cells of the costs' common divisor the DP is exact; otherwise
  costs are rounded *up* to a grid of `max_cells` cells, so the plan always meets the true budget and is optimal for
  the rounded costs.
* `solve_lagrange`: sweep the multiplier λ of min Σ damage + λ·cost (each item on its own), take the cheapest
  feasible λ by bisection, then greedily spend the rest of the budget on the upgrades with the best damage saved per
  unit of cost.

The bound is the Lagrangian dual max_λ Σ_i min_o (d_io + λ·c_io) − λ·room, a lower bound on the true optimum:
`gap` = damage − bound says how far from optimal a plan can be at most (0 up to rounding for an exact DP).

Pure Python (numpy for the DP when installed), torch-free: `analysis` and the search may use it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from .budget import Budget, Limit, parse_budget, parse_number
from .errors import ConfigError, PlanError
from .vocab import AXES, RATIO_AXIS

__all__ = ["DAMAGES", "DEFAULT_METHODS", "Budget", "Constraints", "Item", "Limit", "Option", "Solution", "kl_damages",
           "parse_budget", "parse_number", "solve", "solve_brute", "solve_dp", "solve_lagrange"]

DEFAULT_METHODS = ("kronecker", "lowrank")
DEFAULT_MAX_CELLS = 100_000


# what earlier releases' flat constraints called Kronecker's options (a profile's header keeps them so)
_LEGACY_OPTIONS = {"ranks": ("kronecker", "ranks"), "max_aspect": ("kronecker", "max_aspect")}


@dataclass(frozen=True, init=False)
class Constraints:
    """The candidates a profile offers per matrix: each method's own options (`options`: method -> options, validated
    by the method, its defaults where not given), within the span shared by every method — per-matrix compression in
    [min_compression, max_compression], at most `max_shapes` compression levels per method and matrix (evenly over
    log-compression), each with at most `shapes_per_level` candidates (in the method's `level_order`: Kronecker's
    splits with the fewest B rows first, i.e. the input-side splits data-aware init serves best, then the fewest
    multiply-adds). `Constraints(ranks=..., max_aspect=...)` are Kronecker's options, as earlier releases spelled
    them."""

    min_compression: float
    max_compression: float | None
    max_shapes: int | None
    shapes_per_level: int
    options: tuple  # ((method, ((key, value), ...)), ...): hashable; `options_dict()` reads it

    def __init__(self, *, min_compression: float = 1.5, max_compression: float | None = 16.0,
                 max_shapes: int | None = 8, shapes_per_level: int = 2, options: Mapping | None = None, **legacy):
        opts = {k: dict(v) for k, v in dict(options or {}).items()}
        for key, value in legacy.items():
            if key not in _LEGACY_OPTIONS:
                raise TypeError(f"Constraints() got an unexpected keyword argument {key!r}")
            method, option = _LEGACY_OPTIONS[key]
            opts.setdefault(method, {})[option] = list(value) if isinstance(value, tuple) else value
        if not (min_compression >= 1):
            raise PlanError(f"min_compression must be >= 1, got {min_compression}")
        if max_compression is not None and max_compression < min_compression:
            raise PlanError(f"max_compression {max_compression} is below min_compression {min_compression}")
        if max_shapes is not None and max_shapes < 1:
            raise PlanError(f"max_shapes must be a positive integer, got {max_shapes}")
        if shapes_per_level < 1:
            raise PlanError(f"shapes_per_level must be a positive integer, got {shapes_per_level}")
        from .methods import get_method

        checked = {}
        for name, given in opts.items():
            try:
                checked[get_method(name).name] = get_method(name).options(given).model_dump(mode="json",
                                                                                           exclude_unset=True)
            except ConfigError as exc:
                raise PlanError(str(exc)) from None
        for k, v in (("min_compression", min_compression), ("max_compression", max_compression),
                     ("max_shapes", max_shapes), ("shapes_per_level", shapes_per_level),
                     ("options", tuple(sorted((n, _frozen(o)) for n, o in checked.items())))):
            object.__setattr__(self, k, v)

    def options_dict(self) -> dict[str, dict]:
        """method -> the options given for it (not the defaults)."""
        return {n: _thawed(o) for n, o in self.options}

    def options_for(self, method: str):
        """A method's validated options (`MethodOptions`): those given, over its defaults."""
        from .methods import get_method

        return get_method(method).options(self.options_dict().get(get_method(method).name))

    @property
    def span(self):
        from .methods import Span

        return Span(self.min_compression, self.max_compression, self.max_shapes)

    @property
    def ranks(self) -> tuple[int, ...]:
        """Kronecker's ranks (the option earlier releases held here)."""
        ranks = self.options_for("kronecker").ranks
        return ranks if ranks == "auto" else tuple(ranks)

    @property
    def max_aspect(self) -> float | None:
        return self.options_for("kronecker").max_aspect

    def to_dict(self, methods: Iterable[str] | None = None) -> dict:
        """The JSON form (a profile's header): the span and `options` — with `methods`, the full options of each of
        them, defaults included, so that two settings compare equal exactly when they offer the same candidates."""
        from .methods import get_method

        opts = self.options_dict()
        if methods is not None:
            opts = {get_method(m).name: self.options_for(m).model_dump(mode="json") for m in methods}
        return {"min_compression": self.min_compression, "max_compression": self.max_compression,
                "max_shapes": self.max_shapes, "shapes_per_level": self.shapes_per_level, "options": opts}

    @classmethod
    def from_dict(cls, d: Mapping) -> "Constraints":
        """From `to_dict`, or from the flat dict of earlier releases (ranks, max_aspect beside the span)."""
        d = dict(d)
        legacy = {k: d.pop(k) for k in list(d) if k in _LEGACY_OPTIONS}
        options = {k: dict(v) for k, v in dict(d.pop("options", None) or {}).items()}
        for key, value in legacy.items():
            method, option = _LEGACY_OPTIONS[key]
            options.setdefault(method, {}).setdefault(option, value)
        return cls(**d, options=options)


def _frozen(options: Mapping) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in options.items()))


def _thawed(options: tuple) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in options}


@dataclass(frozen=True)
class Option:
    """One choice for an item: a label, its spec (a spec dict, or "keep"), cost on the budget axis, damage."""

    label: str
    spec: Any
    cost: int
    damage: float


@dataclass
class Item:
    """A matrix and its options (at least one)."""

    name: str
    options: list[Option]

    def __post_init__(self):
        if not self.options:
            raise PlanError(f"matrix {self.name} has no candidate (not even keep)")
        for o in self.options:
            if not (isinstance(o.damage, (int, float)) and math.isfinite(o.damage)):
                raise PlanError(f"matrix {self.name}: candidate {o.label} has a non-finite damage {o.damage!r}")


@dataclass
class Solution:
    """choice: item name -> chosen Option; damage: summed damage; cost: summed option cost; bound: Lagrangian lower
    bound on the optimal damage; exact: the DP ran on the true costs (no rounding); solver: which solver."""

    choice: dict[str, Option]
    damage: float
    cost: int
    room: int
    bound: float
    solver: str
    exact: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def gap(self) -> float:
        return max(self.damage - self.bound, 0.0)

    def to_dict(self) -> dict:
        return {"damage": self.damage, "cost": self.cost, "room": self.room, "bound": self.bound, "gap": self.gap,
                "solver": self.solver, "exact": self.exact,
                "choice": {n: {"label": o.label, "cost": o.cost, "damage": o.damage,
                               "spec": o.spec} for n, o in self.choice.items()}}


# ----------------------------------------------------------------------------------------------- checks


def _check(items: Sequence[Item], room: int) -> tuple[int, int]:
    """(cheapest total, dearest total); PlanError when even the cheapest plan costs more than `room`."""
    if not items:
        raise PlanError("nothing to compress: no matrix has candidates")
    lo = sum(min(o.cost for o in it.options) for it in items)
    hi = sum(max(o.cost for o in it.options) for it in items)
    if lo > room:
        raise PlanError(f"budget unreachable: the cheapest plan over these candidates costs {lo:,} against the "
                        f"{room:,} the budget leaves")
    return lo, hi


def lagrangian_bound(items: Sequence[Item], room: int, *, iters: int = 60) -> float:
    """max over λ >= 0 of Σ_i min_o (d + λ c) − λ·room (concave in λ: golden-section search on a log scale)."""

    def value(lam: float) -> float:
        return sum(min(o.damage + lam * o.cost for o in it.options) for it in items) - lam * room

    best = value(0.0)
    # slopes are integers: the dual is piecewise linear; probe breakpoints on a log grid then refine
    dmax = max((o.damage for it in items for o in it.options), default=0.0)
    if dmax <= 0:
        return best
    lo, hi = -30.0, math.log(max(dmax, 1e-300)) + 5
    grid = [lo + (hi - lo) * k / 200 for k in range(201)]
    vals = [value(math.exp(g)) for g in grid]
    k = max(range(len(vals)), key=vals.__getitem__)
    best = max(best, vals[k])
    a, b = grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)]
    phi = (math.sqrt(5) - 1) / 2
    for _ in range(iters):
        c, d = b - phi * (b - a), a + phi * (b - a)
        vc, vd = value(math.exp(c)), value(math.exp(d))
        best = max(best, vc, vd)
        if vc >= vd:
            b = d
        else:
            a = c
    return best


# ----------------------------------------------------------------------------------------------- solvers


def solve_brute(items: Sequence[Item], room: int) -> Solution:
    """Exhaustive search (tests; a handful of items only). Ties: the first in option order."""
    import itertools

    _check(items, room)
    best = None
    for combo in itertools.product(*[range(len(it.options)) for it in items]):
        cost = sum(it.options[k].cost for it, k in zip(items, combo))
        if cost > room:
            continue
        dmg = sum(it.options[k].damage for it, k in zip(items, combo))
        if best is None or dmg < best[0] - 1e-15:
            best = (dmg, cost, combo)
    dmg, cost, combo = best
    choice = {it.name: it.options[k] for it, k in zip(items, combo)}
    return Solution(choice, dmg, cost, room, dmg, "brute", exact=True)


def _dp(items: Sequence[Item], w: list[list[int]], cells: int) -> list[int]:
    """Option index per item minimising the summed damage with Σ w <= cells (integer weights)."""
    INF = math.inf
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy ships with every install of kronsearch's dependencies
        np = None
    n = cells + 1
    if np is not None:
        best = np.zeros(n)  # best[c]: least damage within c cells (no item yet: 0)
        picks = []
        for it, ws in zip(items, w):
            new = np.full(n, INF)
            arg = np.full(n, -1, dtype=np.int32)
            for k, (o, wk) in enumerate(zip(it.options, ws)):
                if wk > cells:
                    continue
                cand = np.full(n, INF)
                cand[wk:] = best[: n - wk] + o.damage
                better = cand < new - 1e-15
                new = np.where(better, cand, new)
                arg = np.where(better, k, arg)
            picks.append(arg)
            best = new
        c = int(np.argmin(best))
        chosen = []
        for ws, arg in zip(reversed(w), reversed(picks)):
            k = int(arg[c])
            chosen.append(k)
            c -= ws[k]
        return chosen[::-1]
    best = [0.0] * n  # plain Python fallback
    picks = []
    for it, ws in zip(items, w):
        new = [INF] * n
        arg = [-1] * n
        for c in range(n):
            for k, (o, wk) in enumerate(zip(it.options, ws)):
                if wk <= c and best[c - wk] + o.damage < new[c] - 1e-15:
                    new[c], arg[c] = best[c - wk] + o.damage, k
        picks.append(arg)
        best = new
    c = min(range(n), key=lambda j: (best[j], j))
    chosen = []
    for ws, arg in zip(reversed(w), reversed(picks)):
        k = arg[c]
        chosen.append(k)
        c -= ws[k]
    return chosen[::-1]


def solve_dp(items: Sequence[Item], room: int, *, max_cells: int = DEFAULT_MAX_CELLS) -> Solution:
    """Exact (or rounded-up-cost) dynamic programming; see the module docstring. When costs are rounded, a second
    DP with costs rounded down (a relaxation: every plan within budget stays within it) gives a lower bound."""
    lo, hi = _check(items, room)
    base = [min(o.cost for o in it.options) for it in items]
    extra_room = min(room, hi) - lo  # what may be spent above the cheapest plan
    deltas = [[o.cost - b for o in it.options] for it, b in zip(items, base)]
    g = 0
    for ds in deltas:
        for d in ds:
            g = math.gcd(g, d)
    g = g or 1
    exact = extra_room // g <= max_cells
    if exact:
        cells = int(extra_room // g)
        chosen = _dp(items, [[d // g for d in ds] for ds in deltas], cells)
    else:
        unit = extra_room / max_cells
        cells = max_cells
        chosen = _dp(items, [[math.ceil(d / unit - 1e-9) for d in ds] for ds in deltas], cells)
    choice = {it.name: it.options[k] for it, k in zip(items, chosen)}
    dmg = sum(o.damage for o in choice.values())
    cost = sum(o.cost for o in choice.values())
    if exact:
        return Solution(choice, dmg, cost, room, dmg, "dp", exact=True)
    relaxed = _dp(items, [[math.floor(d / unit + 1e-9) for d in ds] for ds in deltas], cells)
    lower = sum(it.options[k].damage for it, k in zip(items, relaxed))
    bound = min(max(lower, lagrangian_bound(items, room)), dmg)
    sol = Solution(choice, dmg, cost, room, bound, "dp", exact=False)
    sol.notes.append(f"costs rounded up to a grid of {cells:,} cells of {unit:,.1f} (the plan is optimal for them); "
                     "the bound comes from the same DP with costs rounded down")
    return sol


def solve_lagrange(items: Sequence[Item], room: int) -> Solution:
    """Lagrangian sweep (bisection on λ) and a greedy fill of the remaining budget."""
    _check(items, room)

    def pick(lam: float) -> list[int]:
        out = []
        for it in items:
            out.append(min(range(len(it.options)),
                           key=lambda k: (it.options[k].damage + lam * it.options[k].cost, it.options[k].cost)))
        return out

    def cost_of(ch):
        return sum(it.options[k].cost for it, k in zip(items, ch))

    ch = pick(0.0)
    if cost_of(ch) > room:
        lo, hi = 0.0, 1.0
        while cost_of(pick(hi)) > room:
            hi *= 4
            if hi > 1e300:
                ch = [min(range(len(it.options)), key=lambda k: it.options[k].cost) for it in items]
                break
        else:
            for _ in range(200):
                mid = (lo + hi) / 2
                if cost_of(pick(mid)) > room:
                    lo = mid
                else:
                    hi = mid
                if hi - lo <= 1e-12 * hi:
                    break
            ch = pick(hi)
    # greedy fill: best damage saved per unit of extra cost, while it fits
    spent = cost_of(ch)
    while True:
        best, best_rate = None, 0.0
        for i, it in enumerate(items):
            cur = it.options[ch[i]]
            for k, o in enumerate(it.options):
                dc, dd = o.cost - cur.cost, cur.damage - o.damage
                if dd <= 0 or spent + dc > room:
                    continue
                rate = math.inf if dc <= 0 else dd / dc
                if best is None or rate > best_rate:
                    best, best_rate = (i, k, dc), rate
        if best is None:
            break
        i, k, dc = best
        ch[i] = k
        spent += dc
    choice = {it.name: it.options[k] for it, k in zip(items, ch)}
    dmg = sum(o.damage for o in choice.values())
    return Solution(choice, dmg, spent, room, min(lagrangian_bound(items, room), dmg), "lagrange")


def solve(items: Sequence[Item], room: int, *, solver: str = "dp", max_cells: int = DEFAULT_MAX_CELLS) -> Solution:
    """The best plan within `room` (see the module docstring); solver "dp" (default) or "lagrange"."""
    if solver == "dp":
        return solve_dp(items, room, max_cells=max_cells)
    if solver == "lagrange":
        return solve_lagrange(items, room)
    raise ConfigError(f"solver must be 'dp' or 'lagrange', got {solver!r}")


# ----------------------------------------------------------------------------------------------- profiles


def kl_damages(entry: Mapping, *, name: str = "matrix") -> list[float]:
    """The model-level damage of every candidate of one profiled matrix (`damage="kl"`), estimated from the
    candidates whose KL was measured (`kron.profile`'s `model_damage`, `--kl-subset`): log KL is interpolated
    piecewise-linearly in log proxy between the measured candidates (sorted by proxy; equal proxies averaged),
    and beyond the measured range the nearest measured KL/proxy ratio is kept (KL proportional to the proxy, its
    first-order behaviour). A measured candidate keeps its measurement; keep (and any zero proxy) is 0.

    Why: the proxy (relative output error) is not comparable across matrices — the same relative error costs the
    model 100x more in one matrix than in another — and the summed proxy ranks plans accordingly worse than the
    summed KL. PlanError when the matrix has no measured candidate with a positive proxy and KL."""
    points: dict[float, list[float]] = {}
    for c in entry["candidates"]:
        md = c.get("model_damage")
        if c["method"] == "keep" or md is None or not (c["damage"] > 0 and md > 0):
            continue
        if math.isfinite(c["damage"]) and math.isfinite(md):
            points.setdefault(math.log(c["damage"]), []).append(math.log(md))
    if not points:
        raise PlanError(f"damage kl: {name} has no candidate measured at model level (make the profile with "
                        "`kronsearch profile --kl-subset N`, N >= 1; 4 or more per matrix is advised)")
    xs = sorted(points)
    ys = [sum(points[x]) / len(points[x]) for x in xs]
    out = []
    for c in entry["candidates"]:
        md = c.get("model_damage")
        d = c["damage"]
        if c["method"] == "keep" or not d > 0:
            out.append(0.0)
            continue
        if md is not None and md >= 0 and math.isfinite(md):
            out.append(float(md))
            continue
        x = math.log(d)
        if x <= xs[0]:
            y = ys[0] + x - xs[0]
        elif x >= xs[-1]:
            y = ys[-1] + x - xs[-1]
        else:
            k = next(i for i in range(1, len(xs)) if x <= xs[i])
            t = (x - xs[k - 1]) / (xs[k] - xs[k - 1])
            y = ys[k - 1] + t * (ys[k] - ys[k - 1])
        out.append(math.exp(y))
    return out


DAMAGES = ("proxy", "kl")


def profile_totals(profile: Mapping) -> dict[str, float]:
    """The profiled model's size on every axis it records ({axis: total}; a profile made before byte counts has
    none for bytes)."""
    model = profile["model"]
    return {a.name: int(model[a.totals_key]) for a in AXES.values() if model.get(a.totals_key) is not None}


def candidate_cost(entry: Mapping, cand: Mapping, axis: str) -> int:
    """A profiled candidate's cost on a size axis: its parameters (a tied embedding's factors plus the LM head's
    dense copy), parameters excluding the output embedding (the factors alone), multiply-adds per token, or bytes of
    weight storage (recorded, or — in a profile made before byte counts — from its spec at float32)."""
    if axis == "params":
        return int(cand["params"])
    if axis == "params_excl_output_embedding":
        return int(cand.get("params_excl_output_embedding", cand["params"]))
    if axis == "macs_per_token":
        return int(cand["macs"])
    if cand.get("bytes") is not None:
        return int(cand["bytes"])
    from .methods import spec_from_dict

    width = int(entry.get("float_width", 4))
    m, n = int(entry["m"]), int(entry["n"])
    own = m * n * width if cand["method"] == "keep" else spec_from_dict(cand["spec"]).bytes(m, n, width)
    tied = entry.get("tied") and cand["method"] != "keep"
    return own + (m * n * width if tied else 0)  # a compressed tied embedding leaves the head a dense copy


def _dense_cost(entry: Mapping, axis: str) -> int:
    keep = next(c for c in entry["candidates"] if c["method"] == "keep")
    return candidate_cost(entry, keep, axis)


def items_from_profile(profile: Mapping, axis: str, *, methods: Iterable[str] | None = None,
                       damage: str = "proxy", embeddings: bool | Iterable[int] = True) -> tuple[list[Item], int]:
    """(items, fixed) from a profile dict (`kron.profile`): options per matrix costed on a size axis
    (`kron.vocab.AXES`, see `candidate_cost`), and `fixed` the model's size on that axis outside the profiled
    matrices' weights. damage: "proxy" (the relative output error; an embedding's: its table's weight error) or
    "kl" (the model-level KL, measured or estimated: `kl_damages`). methods: the linear methods whose candidates are
    offered (an embedding's factors are offered whenever the profile has them and `embeddings` is True; False: the
    embedding stays as it is; a collection of factors: only those). A modified structure (Kronecker in int4) is
    offered only when both its methods are."""
    if damage not in DAMAGES:
        raise ConfigError(f"damage must be one of {', '.join(DAMAGES)}, got {damage!r}")
    totals = profile_totals(profile)
    if axis not in totals:
        raise PlanError(f"this profile has no {AXES[axis].words} totals (made before kronsearch counted them): make "
                        "it again with `kronsearch profile` for a budget on that axis")
    from .methods import get_method

    wanted = {get_method(m).name for m in methods} if methods is not None else None
    items = []
    dense_total = 0
    for name, mx in profile["matrices"].items():
        is_emb = mx.get("group") == "embedding"
        if is_emb and embeddings is False:
            continue
        allowed = None if embeddings is True or not is_emb else {int(f) for f in embeddings}
        opts = []
        values = kl_damages(mx, name=name) if damage == "kl" else [c["damage"] for c in mx["candidates"]]
        for c, value in zip(mx["candidates"], values):
            uses = c.get("methods") or ([get_method(c["method"]).name] if c["method"] != "keep" else [])
            if wanted is not None and not is_emb and not set(uses) <= wanted:
                continue
            if allowed is not None and c["method"] != "keep" and c["spec"].get("embedding_factor") not in allowed:
                continue
            spec = "keep" if c["method"] == "keep" else dict(c["spec"], method=c["method"])
            opts.append(Option(c["label"], spec, candidate_cost(mx, c, axis), float(value)))
        items.append(Item(name, opts))
        dense_total += _dense_cost(mx, axis)
    return items, int(totals[axis]) - dense_total


def budget_room(profile: Mapping, budget: Budget, fixed: int) -> int:
    """The cost the profiled matrices may take under a one-limit `budget` (its bound minus what stays as it is)."""
    return int(math.floor(budget.single.bound(profile_totals(profile)))) - fixed


def smallest_reachable(profile: Mapping, budget: Budget, items: Sequence[Item], fixed: int) -> str:
    """The smallest size any plan over these candidates reaches, worded for the budget's axis."""
    lim = budget.single
    lo = fixed + sum(min(o.cost for o in it.options) for it in items)
    if lim.ratio:
        excl = profile_totals(profile)[RATIO_AXIS]
        return f"ratio={excl / lo:.3f} ({lo:,} parameters excluding the output embedding)"
    return f"{AXES[lim.axis].spellings[0]}={lo:,}"


def auto_plan(profile: Mapping, budget: Budget, *, methods: Iterable[str] | None = None, solver: str = "dp",
              max_cells: int = DEFAULT_MAX_CELLS, damage: str = "proxy",
              embeddings: bool | Iterable[int] = True) -> Solution:
    """The plan (a Solution; `.choice` name -> Option) minimising the profile's summed damage under a one-limit
    `budget` (damage "proxy": relative output errors; "kl": model-level KL, `kl_damages`). PlanError naming the
    smallest reachable size when no plan meets the budget."""
    items, fixed = items_from_profile(profile, budget.axis, methods=methods, damage=damage, embeddings=embeddings)
    room = budget_room(profile, budget, fixed)
    lo = sum(min(o.cost for o in it.options) for it in items)
    if lo > room:
        raise PlanError(f"budget {budget} is unreachable with these candidates: the smallest reachable size is "
                        f"{smallest_reachable(profile, budget, items, fixed)} (a profile with a larger "
                        f"--max-compression, more --ranks or --methods{_embedding_hint(profile, embeddings)} "
                        "reaches further; or give a larger budget)")
    sol = solve(items, room, solver=solver, max_cells=max_cells)
    sol.cost += fixed
    sol.room += fixed
    return sol


def _embedding_hint(profile: Mapping, embeddings: bool | Iterable[int]) -> str:
    if embeddings is False or not any(mx.get("group") == "embedding" for mx in profile["matrices"].values()):
        return ", or the word embedding's factors (--embedding-factors),"
    return ""


def resolved_specs(sol: Solution) -> dict[str, Any]:
    """name -> spec dict (with its method) or "keep", for `CompressionPlan.from_resolved`."""
    return {n: o.spec for n, o in sol.choice.items()}
