"""Budgets of a search space: which plans break a hard limit (`kron.budget.Budget`: parameters, multiply-adds,
bytes, ...), the nearest plan within budget by greedy local moves, the cheapest plan on a size axis, and the check
that a budget can be met at all — before Ray starts.

`BudgetMixin` is mixed into `search.space.SearchSpace`, whose choices, costs (dicts keyed by size axis, `kron.vocab.
AXES`) and normalisation it uses.
"""
from __future__ import annotations

import random
import re
from typing import Any, Iterable

from kron.errors import ConfigError
from kron.vocab import AXES, SIZE_AXES

__all__ = ["BudgetMixin", "NO_PRUNE"]

NO_PRUNE = "none"  # a block choice's option that leaves the block to its matrices' own choices


def _cost_key(deltas: dict, axis: str) -> tuple:
    """Order options by their cost on `axis`, ties by the costs on every axis in table order."""
    return (deltas[axis], tuple(deltas[a] for a in SIZE_AXES))


class BudgetMixin:
    """Budget checks and repairs of a SearchSpace (see the module docstring)."""

    def teacher_sizes(self) -> dict[str, int]:
        """The uncompressed model's size on every axis (`kron.vocab.AXES`)."""
        # a space pickled by 0.1.0 has no byte counts: float32 weights then
        info = self.info
        return {a.name: (getattr(info, a.totals_key, None) or (4 * info.params if a.name == "bytes" else 0))
                for a in AXES.values()}

    def size_cap(self, axis: str) -> float:
        """The largest size a plan may have on `axis`: the teacher's, or the budget's bound on it where lower."""
        teacher = self.teacher_sizes()
        bounds = [lim.bound(teacher) for lim in (self.budget.limits if self.budget is not None else ())
                  if lim.axis == axis]
        return min([teacher[axis], *bounds])

    def over_budget(self, params: dict) -> list[str]:
        """The budget limits a plan breaks, as readable strings (empty: within budget)."""
        if self.budget is None:
            return []
        return self.budget.breaches(self.plan_costs(params), self.teacher_sizes())

    def within_budget(self, params: dict) -> bool:
        return not self.over_budget(params)

    def _excess(self, params: dict) -> float:
        return self.budget.excess(self.plan_costs(params), self.teacher_sizes())

    def _neighbours(self, params: dict) -> Iterable[dict]:
        on = self.active_layers(params)
        if self.layer_mode == "free":
            for i in self.fixed_layers:
                if i not in on:
                    p = dict(params)
                    p[f"L{i}.on"] = True
                    for c in self.choices:  # a switched-on layer takes each choice's cheapest option
                        if c.layer == i:
                            p[c.key] = min(c.options, key=lambda o: c.deltas[o]["params"])
                    for b in self.blocks:  # and prunes its blocks where that is cheaper
                        if b.layer == i:
                            p[b.key] = self._block_best(b, "params", {i})
                    yield p
        if self.layer_mode == "count":
            for i in on:
                for j in self.fixed_layers:
                    if j in on:
                        continue
                    p = dict(params)
                    p[f"L{i}.priority"], p[f"L{j}.priority"] = 0.0, 1.0
                    for c in self.choices:
                        if c.layer == i:
                            p.pop(c.key, None)
                        if c.layer == j:
                            p[c.key] = min(c.options, key=lambda o: c.deltas[o]["params"])
                    for b in self.blocks:
                        if b.layer == i:
                            p.pop(b.key, None)
                        if b.layer == j:
                            p[b.key] = self._block_best(b, "params", {j})
                    yield p
        for b in self.blocks:  # prune a block, change its fraction, or leave it to its matrices again
            if b.key in params:
                for o in b.options:
                    if o != params[b.key]:
                        yield {**params, b.key: o}
        skip = self.pruned_members(params)
        for c in self.choices:
            if c.key in skip:
                continue
            if c.key in params:
                for o in c.options:
                    if o != params[c.key]:
                        yield {**params, c.key: o}
            elif c.tied and any(mx.layer in on for mx in c.matrices):
                yield {**params, c.key: min(c.options, key=lambda o: c.deltas[o]["params"])}

    def _block_best(self, b, axis: str, layers: set[int]) -> str:
        """The option of block choice `b` with the least cost on `axis` over `layers`: a fraction, or "none" when
        its matrices' own cheapest options cost less (ties: "none")."""
        members = [self._by_key[k] for k in b.members]
        own = sum(min(c.deltas[o][axis] for o in c.options) * sum(1 for mx in c.matrices if mx.layer in layers)
                  for c in members)
        best, cost = NO_PRUNE, own
        for o in b.options[1:]:
            v = sum(d[axis] for i, d in b.deltas[o].items() if i in layers)
            if v < cost:
                best, cost = o, v
        return best

    def repair(self, params: dict, max_moves: int = 10_000) -> dict:
        """The nearest plan within budget by greedy local moves (each move lowers the budget excess most);
        falls back to the cheapest feasible plan found when the budget was checked."""
        if self.budget is None:
            return dict(params)
        params = self._normalise(params)
        for _ in range(max_moves):
            excess = self._excess(params)
            if excess <= 0 and not self.is_empty(params):
                return params
            best, best_excess = None, excess
            for cand in self._neighbours(params):
                cand = self._normalise(cand)
                e = self._excess(cand)
                if e < best_excess - 1e-15:
                    best, best_excess = cand, e
            if best is None:
                break
            params = best
        return dict(self.feasible_plan)

    def _normalise(self, params: dict) -> dict:
        """Drop parameters of switched-off layers and add missing ones for switched-on layers (cheapest option),
        so the dict is exactly what `define_by_run` would have produced."""
        out = {k: v for k, v in params.items() if re.fullmatch(r"L\d+\.(on|priority)", k)}
        on = self.active_layers(out)
        for b in self.blocks:
            if self._block_live(b, on):
                out[b.key] = params.get(b.key, self._block_best(b, "params", on))
        skip = self.pruned_members(out)
        for c in self.choices:
            needed = ((c.layer is None and not c.tied) or (c.layer is not None and c.layer in on)
                      or (c.tied and any(mx.layer in on for mx in c.matrices))) and c.key not in skip
            if needed:
                out[c.key] = params.get(c.key, min(c.options, key=lambda o: c.deltas[o]["params"]))
        return out

    def cheapest(self, metric: str = "params") -> dict:
        """The plan with the fewest `metric` (a size axis of `kron.vocab.AXES`)."""
        axis = metric

        def best(c) -> str:
            return min(c.options, key=lambda o: _cost_key(c.deltas[o], axis))

        params: dict[str, Any] = {}
        # each block pruned where that is cheaper than its matrices' cheapest options (tied: over all its layers)
        blocks = {b.key: self._block_best(b, axis, set(b.names)) for b in self.blocks}
        params.update(blocks)
        skip = self.pruned_members(blocks)
        if self.layer_mode in ("free", "count"):
            # a layer's saving when decomposed with its cheapest options (tied groups: per-matrix share)
            saving = {}
            for i in self.fixed_layers:
                saving[i] = sum(c.deltas[best(c)][axis] * sum(1 for mx in c.matrices if mx.layer == i)
                                for c in self.choices if c.key not in skip)
                saving[i] += sum(b.deltas[blocks[b.key]][i][axis] for b in self.blocks
                                 if blocks[b.key] != NO_PRUNE and i in b.deltas[blocks[b.key]])
            if self.layer_mode == "free":
                for i in self.fixed_layers:
                    params[f"L{i}.on"] = saving[i] < 0
            else:
                ranked = sorted(self.fixed_layers, key=lambda i: (saving[i], i))[: self.count]
                for i in self.fixed_layers:
                    params[f"L{i}.priority"] = 1.0 if i in ranked else 0.0
        for c in self.choices:
            params[c.key] = best(c)
        return self._normalise(params)

    def _check_budget(self) -> dict:
        """Raise ConfigError when no plan meets the budget; return a plan that does (the repair fallback)."""
        candidates = []
        teacher = self.teacher_sizes()
        for limit in self.budget.limits:
            metric = limit.axis
            plan = self.cheapest(metric)
            value = self.plan_costs(plan)[metric]
            if value > limit.bound(teacher):
                raise ConfigError(
                    f"space.budget.{AXES[metric].budget_key}: {limit.value:,} cannot be met — the cheapest plan of "
                    f"this space has {value:,} {metric.replace('_', ' ')} (teacher: {teacher[metric]:,}); raise the "
                    "limit or widen the space (more groups or layers, higher max_compression, more embedding "
                    "factors)")
            candidates.append(plan)
        for plan in candidates:
            if self.within_budget(plan):
                return plan
        rng = random.Random(0)
        for _ in range(200):
            plan = self.repair_from(candidates[0], rng)
            if plan is not None:
                return plan
        costs = "; ".join(f"{k}: {v:,}" for k, v in self.plan_costs(candidates[0]).items()
                          if k != "compression_ratio")
        raise ConfigError(f"space.budget: each limit can be met on its own but no plan meeting all of them together "
                          f"was found (the plan with the fewest parameters has {costs}); relax one limit")

    def repair_from(self, params: dict, rng: random.Random) -> dict | None:
        params = self._normalise(params)
        for _ in range(1000):
            if self.within_budget(params):
                return params
            moves = [self._normalise(p) for p in self._neighbours(params)]
            better = [p for p in moves if self._excess(p) < self._excess(params)]
            if not better:
                return None
            params = rng.choice(better)
        return None
