"""Pareto fronts, non-dominated ranks, hypervolume and knee points over an (n, k) table of objectives.

Pure numpy, following optuna's multi-objective code: every function first turns its objectives into
"lower is better" with `to_minimisation` and then works on minimisation only.

Semantics shared by every function here:

* `a` dominates `b` when `a` is no worse than `b` in every objective and strictly better in at least one.
* Exact duplicates do not dominate each other, so every copy of a front point is on the front.
* A row with NaN in any objective is never on the front and never dominates anything; it gets the worst rank.
* +inf and -inf are ordinary values: +inf is the worst value of a "min" objective, -inf the worst of a "max" one.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kron.errors import UserError

# Accepted spellings of an objective direction: Ray Tune's ("min"/"max") and optuna's ("minimize"/"maximize").
_DIRECTIONS = {"min": 1.0, "minimize": 1.0, "max": -1.0, "maximize": -1.0}


def to_minimisation(values, directions: Sequence[str]) -> np.ndarray:
    """Return a float copy of `values` (n, k) with every "max" column negated, so that lower is better everywhere.

    `directions` has one entry per column, each "min" or "max" ("minimize"/"maximize" are accepted too).
    """
    array = np.array(values, dtype=float)  # always a copy: callers may keep using `values`
    if array.ndim == 1 and array.size == 0:
        array = array.reshape(0, len(directions))
    if array.ndim != 2:
        raise UserError(f"objective values must be a 2-D (n_points, n_objectives) array, got shape {array.shape}")
    if isinstance(directions, str):
        raise UserError(f"directions must be a sequence of 'min'/'max', one per objective, got the string {directions!r}")
    if len(directions) != array.shape[1]:
        raise UserError(
            f"got {len(directions)} directions {list(directions)} for {array.shape[1]} objective columns"
        )
    signs = []
    for direction in directions:
        if direction not in _DIRECTIONS:
            raise UserError(f"unknown objective direction {direction!r}; expected 'min' or 'max'")
        signs.append(_DIRECTIONS[direction])
    return array * np.asarray(signs)


def pareto_mask(values, directions: Sequence[str]) -> np.ndarray:
    """Boolean mask (n,) of the non-dominated rows of `values` (n, k) under `directions`.

    Duplicates of a front point are all on the front; rows with NaN never are.
    """
    losses = to_minimisation(values, directions)
    mask = np.zeros(len(losses), dtype=bool)
    valid = np.flatnonzero(~np.isnan(losses).any(axis=1))
    mask[valid] = _front_mask(losses[valid])
    return mask


def nondominated_ranks(values, directions: Sequence[str]) -> np.ndarray:
    """Front index of each row (int, (n,)): 0 = Pareto front, 1 = front after removing front 0, and so on.

    Rows with NaN get `max rank + 1` (0 if every row has a NaN).
    """
    losses = to_minimisation(values, directions)
    ranks = np.full(len(losses), -1, dtype=int)
    remaining = np.flatnonzero(~np.isnan(losses).any(axis=1))
    rank = 0
    while remaining.size:
        on_front = _front_mask(losses[remaining])
        ranks[remaining[on_front]] = rank
        remaining = remaining[~on_front]
        rank += 1
    ranks[ranks < 0] = rank  # NaN rows: one past the last real front
    return ranks


def hypervolume(values, directions: Sequence[str], reference) -> float:
    """Volume of objective space dominated by `values` (n, k) and bounded by the `reference` point (k,).

    `reference` is given in the objectives' own units and directions (e.g. the largest acceptable params and the
    worst acceptable perplexity); it must be finite. Points not strictly better than the reference in every
    objective contribute nothing, NaN rows are ignored, and a -inf/+inf that beats the reference gives inf.
    Exact: a sort-and-sweep in 2-D, optuna's `compute_hypervolume` (WFG) for k >= 3 when available, else
    `_hypervolume_slicing`.
    """
    losses = to_minimisation(values, directions)
    reference = np.asarray(reference, dtype=float).ravel()
    if reference.shape != (losses.shape[1],):
        raise UserError(f"hypervolume reference has {reference.size} values for {losses.shape[1]} objectives")
    ref = to_minimisation(reference.reshape(1, -1), directions)[0]
    if not np.all(np.isfinite(ref)):
        raise UserError(f"hypervolume reference point must be finite, got {list(np.asarray(reference))}")
    inside = ~np.isnan(losses).any(axis=1) & np.all(losses < ref, axis=1)
    losses = losses[inside]
    if len(losses) == 0:
        return 0.0
    if np.isinf(losses).any():  # only -inf can remain (inf is never < a finite reference)
        return float("inf")
    k = losses.shape[1]
    if k == 1:
        return float(ref[0] - losses[:, 0].min())
    if k == 2:
        return _hypervolume_2d(losses, ref)
    compute = _optuna_hypervolume()
    if compute is not None:
        return float(compute(losses, ref))
    return _hypervolume_slicing(losses, ref)


def knee_point(values, directions: Sequence[str]) -> int:
    """Row index of the knee of the Pareto front of `values` (n, k): the best trade-off point.

    Each objective is normalised to [0, 1] over the finite front points (0 = best). In 2-D the knee is the point
    farthest from the chord through the two extreme points, on the ideal side (i.e. the smallest normalised
    `x + y`); for k >= 3 it is the point nearest to the ideal point (all zeros). Degenerate fronts: a single
    distinct point is returned as is; with two distinct points both are equally far, and ties always go to the
    point nearest the ideal point, then to the lowest row index. Fronts whose points all contain +-inf fall back
    to the first front row. Raises `UserError` when no row is free of NaN.
    """
    losses = to_minimisation(values, directions)
    front = np.flatnonzero(pareto_mask(values, directions))
    if front.size == 0:
        raise UserError("knee_point needs at least one row without NaN objectives")
    # One representative (the lowest row index) per distinct finite front point.
    finite = front[np.all(np.isfinite(losses[front]), axis=1)]
    if finite.size == 0:
        return int(front[0])
    _, first = np.unique(losses[finite], axis=0, return_index=True)
    candidates = np.sort(finite[first])
    if candidates.size == 1:
        return int(candidates[0])
    points = losses[candidates]
    low, high = points.min(axis=0), points.max(axis=0)
    span = np.where(high > low, high - low, 1.0)
    normed = (points - low) / span
    to_ideal = np.linalg.norm(normed, axis=1)
    if normed.shape[1] == 2:
        # The extremes of a 2-D front normalise to (0, 1) and (1, 0): the chord is x + y = 1, so the signed
        # distance towards the ideal point is (1 - x - y) / sqrt(2).
        primary = normed.sum(axis=1)
    else:
        primary = to_ideal
    best = np.lexsort((candidates, to_ideal, primary))[0]  # last key is the primary sort key
    return int(candidates[best])


# --- internals ----------------------------------------------------------------------------------------------


def _front_mask(losses: np.ndarray) -> np.ndarray:
    """Non-dominated mask of NaN-free minimisation rows.

    Repeatedly takes the lexicographically smallest remaining point (nothing remaining can dominate it: a
    dominator would sort before it) and drops every point it dominates. Its duplicates stay and are taken next.
    """
    mask = np.zeros(len(losses), dtype=bool)
    remaining = np.lexsort(losses.T[::-1])  # sort by column 0, then 1, ...
    while remaining.size:
        best = losses[remaining[0]]
        mask[remaining[0]] = True
        rest = losses[remaining[1:]]
        dominated = np.all(rest >= best, axis=1) & np.any(rest > best, axis=1)
        remaining = remaining[1:][~dominated]
    return mask


def _hypervolume_2d(losses: np.ndarray, ref: np.ndarray) -> float:
    """Sweep in x order: each point that lowers the best y so far adds the band [y, best_y) x [x, ref_x)."""
    order = np.lexsort((losses[:, 1], losses[:, 0]))
    volume, best_y = 0.0, ref[1]
    for x, y in losses[order]:
        if y < best_y:
            volume += (ref[0] - x) * (best_y - y)
            best_y = y
    return float(volume)


def _hypervolume_slicing(losses: np.ndarray, ref: np.ndarray) -> float:
    """Exact hypervolume by slicing along the last objective (HSO); every point must be strictly inside `ref`.

    Between consecutive values of the last objective, the slab's cross-section is the (k-1)-D hypervolume of the
    points already passed. Exponential in k, fine for the few objectives and hundreds of points used here.
    """
    k = losses.shape[1]
    if k == 1:
        return float(ref[0] - losses[:, 0].min())
    if k == 2:
        return _hypervolume_2d(losses, ref)
    losses = losses[_front_mask(losses)]
    losses = losses[np.argsort(losses[:, -1], kind="stable")]
    volume = 0.0
    for i in range(len(losses)):
        top = losses[i + 1, -1] if i + 1 < len(losses) else ref[-1]
        depth = top - losses[i, -1]
        if depth > 0:
            volume += depth * _hypervolume_slicing(losses[: i + 1, :-1], ref[:-1])
    return float(volume)


def _optuna_hypervolume():
    """optuna's exact `compute_hypervolume(loss_vals, reference_point)` if this optuna has it, else None."""
    try:
        from optuna._hypervolume import compute_hypervolume
    except ImportError:  # optuna absent, or a version that moved its private module
        return None
    return compute_hypervolume
