"""Pareto front, ranks, hypervolume and knee point: hand-computed tables plus hypothesis properties."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from analysis import pareto
from analysis.pareto import hypervolume, knee_point, nondominated_ranks, pareto_mask, to_minimisation
from kron.errors import UserError

INF, NAN = math.inf, math.nan
MIN2, MAX2 = ["min", "min"], ["max", "max"]


# --- to_minimisation ----------------------------------------------------------------------------------------


def test_to_minimisation_negates_max_columns_and_copies():
    values = np.array([[1.0, 2.0, 3.0]])
    out = to_minimisation(values, ["min", "max", "maximize"])
    np.testing.assert_array_equal(out, [[1.0, -2.0, -3.0]])
    assert values[0, 1] == 2.0  # input untouched


def test_to_minimisation_keeps_nan_and_flips_inf():
    out = to_minimisation([[NAN, -INF]], ["max", "max"])
    assert math.isnan(out[0, 0]) and out[0, 1] == INF


@pytest.mark.parametrize(
    "values, directions, match",
    [
        ([[1.0, 2.0]], ["min"], "2 objective columns"),
        ([[1.0, 2.0]], ["min", "up"], "unknown objective direction 'up'"),
        ([1.0, 2.0], ["min", "min"], "2-D"),
        ([[1.0, 2.0]], "mm", "sequence"),
    ],
)
def test_to_minimisation_rejects_bad_input(values, directions, match):
    with pytest.raises(UserError, match=match):
        to_minimisation(values, directions)


def test_empty_input():
    assert pareto_mask(np.empty((0, 2)), MIN2).shape == (0,)
    assert nondominated_ranks(np.empty((0, 2)), MIN2).shape == (0,)
    assert hypervolume(np.empty((0, 2)), MIN2, [1, 1]) == 0.0
    assert pareto_mask([], MIN2).shape == (0,)


# --- pareto_mask --------------------------------------------------------------------------------------------

MASK_CASES = [
    # (values, directions, expected mask), all hand-checked
    ([[1, 4], [2, 2], [4, 1], [3, 3], [4, 4]], MIN2, [1, 1, 1, 0, 0]),
    ([[5, 5]], MIN2, [1]),
    # exact duplicates of a front point are all on the front; duplicates of a dominated point are not
    ([[1, 1], [1, 1], [2, 2], [2, 2]], MIN2, [1, 1, 0, 0]),
    # ties in one objective: equal x, worse y is dominated (no worse everywhere, strictly better once)
    ([[1, 2], [1, 3]], MIN2, [1, 0]),
    ([[1, 2], [2, 2]], MIN2, [1, 0]),
    # maximise: params (min) vs accuracy (max)
    ([[1, 0.9], [2, 0.95], [3, 0.8]], ["min", "max"], [1, 1, 0]),
    ([[1, 0.9], [2, 0.95], [3, 0.8]], MAX2, [0, 1, 1]),
    # NaN: never on the front, never dominates (the NaN row is 'better' in its finite column)
    ([[NAN, 1], [2, 2], [1, NAN]], MIN2, [0, 1, 0]),
    ([[0, NAN], [5, 5]], MIN2, [0, 1]),
    ([[NAN, NAN], [NAN, 0]], MIN2, [0, 0]),
    # inf is an ordinary (worst for min) value
    ([[INF, 0], [1, 1]], MIN2, [1, 1]),
    ([[INF, 1], [1, 1]], MIN2, [0, 1]),
    ([[-INF, 5], [0, 0]], MIN2, [1, 1]),
    ([[-INF, 0], [0, 0]], ["max", "min"], [0, 1]),
    ([[INF, INF], [INF, INF]], MIN2, [1, 1]),
    ([[INF, INF], [1e300, 1e300]], MIN2, [0, 1]),
    # three objectives
    ([[1, 2, 3], [2, 1, 3], [3, 3, 1], [2, 2, 3], [1, 2, 4]], ["min"] * 3, [1, 1, 1, 0, 0]),
    ([[1, 2, 3], [2, 1, 3], [3, 3, 1], [2, 2, 3], [1, 2, 4]], ["min", "min", "max"], [0, 1, 0, 0, 1]),
    # one objective: the minimum (and its copies)
    ([[3], [1], [2], [1]], ["min"], [0, 1, 0, 1]),
]


@pytest.mark.parametrize("values, directions, expected", MASK_CASES)
def test_pareto_mask_table(values, directions, expected):
    np.testing.assert_array_equal(pareto_mask(values, directions), np.array(expected, dtype=bool))


# --- nondominated_ranks -------------------------------------------------------------------------------------

RANK_CASES = [
    ([[1, 4], [2, 2], [4, 1], [3, 3], [4, 4], [5, 5]], MIN2, [0, 0, 0, 1, 2, 3]),
    ([[1, 1], [1, 1], [2, 2]], MIN2, [0, 0, 1]),
    ([[1, 1], [NAN, 0], [2, 2]], MIN2, [0, 2, 1]),  # NaN row: max rank + 1
    ([[NAN, 1], [1, NAN]], MIN2, [0, 0]),  # nothing valid: every NaN row gets 0
    ([[1, 0.5], [1, 0.7], [1, 0.6]], ["min", "max"], [2, 0, 1]),
    ([[INF, INF], [1, 1], [INF, 1]], MIN2, [2, 0, 1]),
]


@pytest.mark.parametrize("values, directions, expected", RANK_CASES)
def test_nondominated_ranks_table(values, directions, expected):
    ranks = nondominated_ranks(values, directions)
    assert ranks.dtype.kind == "i"
    np.testing.assert_array_equal(ranks, expected)


# --- hypervolume --------------------------------------------------------------------------------------------

HV_CASES = [
    # staircase: 3*1 + 2*1 + 1*1
    ([[1, 3], [2, 2], [3, 1]], MIN2, [4, 4], 6.0),
    ([[1, 3], [2, 2], [3, 1], [3, 3]], MIN2, [4, 4], 6.0),  # dominated point adds nothing
    ([[1, 3], [1, 3]], MIN2, [4, 4], 3.0),  # duplicates count once
    ([[4, 0]], MIN2, [4, 4], 0.0),  # on the reference boundary: not strictly better
    ([[5, 0], [1, 1]], MIN2, [4, 4], 9.0),  # outside the reference box: ignored
    ([[1, 0.9]], ["min", "max"], [2, 0.5], 0.4),  # accuracy is maximised: (2-1)*(0.9-0.5)
    ([[NAN, 0], [1, 1]], MIN2, [2, 2], 1.0),  # NaN rows ignored
    ([[-INF, 1]], MIN2, [2, 2], INF),
    ([[INF, 0]], MIN2, [2, 2], 0.0),
    ([[3], [1]], ["min"], [5], 4.0),
    ([[1, 1, 1]], ["min"] * 3, [2, 3, 4], 6.0),
    # two boxes of 4 and 2 overlapping in a unit cube
    ([[0, 0, 1], [1, 1, 0]], ["min"] * 3, [2, 2, 2], 5.0),
    ([[0, 0, 1], [1, 1, 0], [1, 1, 1]], ["min"] * 3, [2, 2, 2], 5.0),
    # 4-D: a 2x2x2x2 box plus a 1x1x1x2 box sticking out along the last axis by 1 -> 16 + 1
    ([[0, 0, 0, 1], [1, 1, 1, 0]], ["min"] * 4, [2, 2, 2, 3], 16.0 + 1.0),
    # maximise everything = minimise the negation
    ([[1, 1, 1]], ["max"] * 3, [0, 0, 0], 1.0),
]


@pytest.mark.parametrize("values, directions, reference, expected", HV_CASES)
@pytest.mark.parametrize("use_optuna", [True, False])
def test_hypervolume_table(values, directions, reference, expected, use_optuna, monkeypatch):
    if not use_optuna:
        monkeypatch.setattr(pareto, "_optuna_hypervolume", lambda: None)
    assert hypervolume(values, directions, reference) == pytest.approx(expected)


def test_optuna_hypervolume_is_available_in_this_optuna():
    # optuna 5 has optuna._hypervolume.compute_hypervolume; if this fails the fallback is what runs.
    assert pareto._optuna_hypervolume() is not None


@pytest.mark.parametrize(
    "reference, match", [([1, INF], "finite"), ([1, NAN], "finite"), ([1, 2, 3], "3 values for 2 objectives")]
)
def test_hypervolume_rejects_bad_reference(reference, match):
    with pytest.raises(UserError, match=match):
        hypervolume([[0, 0]], MIN2, reference)


# --- knee_point ---------------------------------------------------------------------------------------------

KNEE_CASES = [
    ([[0, 10], [1, 2], [10, 0]], MIN2, 1),
    # normalised sums 1, 1, 1, 0.5: the point inside the chord is the knee
    ([[0, 10], [5, 5], [10, 0], [2, 3]], MIN2, 3),
    ([[0, 10], [1, 2], [10, 0], [9, 9]], MIN2, 1),  # dominated points are not candidates
    ([[0, 0.0], [1, 0.8], [10, 1.0]], ["min", "max"], 1),
    ([[7, 7]], MIN2, 0),
    ([[3, 3], [1, 1], [1, 1]], MIN2, 1),  # duplicates: lowest row index
    ([[0, 1], [1, 0]], MIN2, 0),  # two points: equally good, lowest index
    ([[5, 0], [0, 5]], MIN2, 0),
    ([[NAN, 0], [0, 10], [2, 2], [10, 0]], MIN2, 2),
    ([[-INF, 5], [1, 1]], MIN2, 1),  # knee among the finite front points
    ([[INF, 0], [0, INF]], MIN2, 0),  # nothing finite: first front row
    # 3-D: nearest to the ideal point after normalisation
    ([[0, 0, 1], [1, 0, 0], [0, 1, 0], [0.3, 0.3, 0.3]], ["min"] * 3, 3),
    ([[0, 0, 1], [1, 0, 0], [0, 1, 0], [0.3, 0.3, 0.3]], ["max"] * 3, 3),
]


@pytest.mark.parametrize("values, directions, expected", KNEE_CASES)
def test_knee_point_table(values, directions, expected):
    knee = knee_point(values, directions)
    assert isinstance(knee, int) and knee == expected


def test_knee_point_without_valid_rows():
    with pytest.raises(UserError, match="without NaN"):
        knee_point([[NAN, 1]], MIN2)


def test_knee_point_is_scale_invariant():
    values = np.array([[2e6, 400.0], [3e6, 150.0], [4e6, 120.0], [6e6, 100.0]])
    assert knee_point(values, MIN2) == knee_point(values * [1e-6, 1e3], MIN2) == 1


# --- properties ---------------------------------------------------------------------------------------------

# Small integer grids make ties and duplicates common; inf and NaN appear too.
_cell = st.sampled_from([0.0, 1.0, 2.0, 3.0, 4.0, INF, -INF, NAN])
_finite_cell = st.integers(0, 4).map(float)


@st.composite
def objective_tables(draw, cell=_cell, max_k=4, max_n=14):
    k = draw(st.integers(1, max_k))
    n = draw(st.integers(0, max_n))
    values = draw(hnp.arrays(float, (n, k), elements=cell))
    directions = draw(st.lists(st.sampled_from(["min", "max"]), min_size=k, max_size=k))
    return values, directions


def _dominates(a, b) -> bool:
    return bool(np.all(a <= b) and np.any(a < b))


@given(objective_tables())
@settings(max_examples=300, deadline=None)
def test_front_is_mutually_nondominated_and_covers_the_rest(table):
    values, directions = table
    mask = pareto_mask(values, directions)
    losses = to_minimisation(values, directions)
    valid = ~np.isnan(losses).any(axis=1)
    assert not np.any(mask & ~valid)
    front = losses[mask]
    for a, b in itertools.product(front, repeat=2):
        assert not _dominates(a, b)
    for i in np.flatnonzero(valid & ~mask):
        assert any(_dominates(f, losses[i]) for f in front)


@given(objective_tables())
@settings(max_examples=200, deadline=None)
def test_ranks_match_repeated_peeling(table):
    values, directions = table
    ranks = nondominated_ranks(values, directions)
    valid = ~np.isnan(values).any(axis=1)
    remaining = np.flatnonzero(valid)
    rank = 0
    while remaining.size:
        front = remaining[pareto_mask(values[remaining], directions)]
        assert np.all(ranks[front] == rank)
        remaining = np.setdiff1d(remaining, front)
        rank += 1
    assert np.all(ranks[~valid] == rank)


def _grid_hypervolume(losses: np.ndarray, ref: np.ndarray) -> float:
    """Brute force for integer points: count the unit cells [c, c+1) dominated by some point."""
    lo = losses.min(axis=0).astype(int) if len(losses) else ref.astype(int)
    count = 0
    for cell in itertools.product(*(range(int(a), int(b)) for a, b in zip(lo, ref))):
        count += bool(np.any(np.all(losses <= np.array(cell), axis=1)))
    return float(count)


@given(objective_tables(cell=_finite_cell, max_k=4, max_n=8), st.data())
@settings(max_examples=150, deadline=None)
def test_hypervolume_matches_brute_force_and_both_backends(table, data):
    values, directions = table
    k = values.shape[1]
    ref_loss = np.array(data.draw(st.lists(st.integers(1, 5), min_size=k, max_size=k)), dtype=float)
    reference = ref_loss * np.where(np.array(directions) == "max", -1.0, 1.0)
    losses = to_minimisation(values, directions)
    inside = losses[np.all(losses < ref_loss, axis=1)]
    expected = _grid_hypervolume(inside, ref_loss) if len(inside) else 0.0
    assert hypervolume(values, directions, reference) == pytest.approx(expected)
    if len(inside):
        assert pareto._hypervolume_slicing(inside, ref_loss) == pytest.approx(expected)


@given(objective_tables(cell=st.floats(0, 10, allow_nan=False), max_k=4, max_n=10),
       st.lists(st.floats(0, 10), min_size=4, max_size=4))
@settings(max_examples=150, deadline=None)
def test_hypervolume_monotone_when_adding_a_point(table, extra):
    values, directions = table
    k = values.shape[1]
    reference = [11.0 if d == "min" else -1.0 for d in directions]
    before = hypervolume(values, directions, reference)
    after = hypervolume(np.vstack([values, [extra[:k]]]), directions, reference)
    assert after >= before - 1e-9 * max(1.0, before)
    shuffled = values[np.random.default_rng(0).permutation(len(values))]
    assert hypervolume(shuffled, directions, reference) == pytest.approx(before)


@given(objective_tables(cell=st.floats(0, 10, allow_nan=False), max_k=4, max_n=10))
@settings(max_examples=100, deadline=None)
def test_knee_point_is_a_front_point(table):
    values, directions = table
    if len(values) == 0:
        return
    assert pareto_mask(values, directions)[knee_point(values, directions)]
