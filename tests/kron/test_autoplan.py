"""kron.autoplan: the multiple-choice knapsack behind `kronsearch plan --auto` (torch-free)."""
import random
import sys

import pytest

from kron.autoplan import (Budget, Constraints, Item, Option, auto_plan, kl_damages, lagrangian_bound,
                           parse_budget, resolved_specs, solve, solve_brute, solve_dp, solve_lagrange)
from kron.errors import ConfigError, PlanError


def items_of(table):
    return [Item(name, [Option(f"{name}{k}", "keep" if k == 0 else {"lowrank_rank": k}, c, d)
                        for k, (c, d) in enumerate(opts)]) for name, opts in table.items()]


HAND = {  # (cost, damage); option 0 is "keep"
    "a": [(10, 0.0), (6, 0.1), (3, 0.5)],
    "b": [(10, 0.0), (5, 0.3), (2, 0.9)],
}


@pytest.mark.parametrize("room,labels,damage", [
    (20, {"a0", "b0"}, 0.0),  # everything fits
    (16, {"a1", "b0"}, 0.1),  # 6 + 10
    (15, {"a0", "b1"}, 0.3),  # 10 + 5 (0.3) beats 6 + 5 (0.4)? no: 6+5=11 costs 0.4 > 0.3
    (11, {"a1", "b1"}, 0.4),
    (8, {"a1", "b2"}, 1.0),  # 6 + 2 (1.0) beats 3 + 5 (0.8)? 3+5=8 -> 0.8 wins
])
def test_hand_computed(room, labels, damage):
    items = items_of(HAND)
    brute = solve_brute(items, room)
    for sol in (solve_dp(items, room), brute):
        assert sol.damage == pytest.approx(brute.damage)
        assert sol.cost <= room
    if room == 8:
        assert {o.label for o in brute.choice.values()} == {"a2", "b1"} and brute.damage == pytest.approx(0.8)
    else:
        assert {o.label for o in brute.choice.values()} == labels and brute.damage == pytest.approx(damage)
    dp = solve_dp(items, room)
    assert dp.exact and dp.gap == 0


def test_ties_pick_a_cheapest_optimum_deterministically():
    items = items_of({"a": [(4, 0.0), (2, 0.0), (1, 0.5)], "b": [(4, 0.0), (2, 0.2), (1, 0.2)]})
    sol = solve_dp(items, 8)
    assert sol.damage == 0.0 and sol.cost <= 8
    again = solve_dp(items, 8)
    assert [o.label for o in sol.choice.values()] == [o.label for o in again.choice.values()]
    sol = solve_dp(items, 3)  # a1 (2) + b2 (1): 0.2; a2 + b1 = 0.7
    assert sol.damage == pytest.approx(0.2) and sol.cost == 3


def test_unreachable_budget():
    with pytest.raises(PlanError, match="unreachable"):
        solve(items_of(HAND), 4)
    with pytest.raises(PlanError, match="unreachable"):
        solve_lagrange(items_of(HAND), 4)


@pytest.mark.parametrize("seed", range(30))
def test_dp_and_lagrange_against_brute_force(seed):
    rng = random.Random(seed)
    table = {}
    for i in range(rng.randint(1, 4)):
        dense = rng.randint(20, 60)
        opts = [(dense, 0.0)] + [(rng.randint(1, dense), rng.random()) for _ in range(rng.randint(1, 4))]
        table[f"m{i}"] = opts
    items = items_of(table)
    lo = sum(min(c for c, _ in o) for o in table.values())
    hi = sum(max(c for c, _ in o) for o in table.values())
    room = rng.randint(lo, hi)
    brute = solve_brute(items, room)
    dp = solve_dp(items, room)
    assert dp.exact and dp.damage == pytest.approx(brute.damage) and dp.cost <= room
    lag = solve_lagrange(items, room)
    assert lag.cost <= room and lag.damage >= brute.damage - 1e-12
    bound = lagrangian_bound(items, room)
    assert bound <= brute.damage + 1e-9  # a true lower bound
    assert lag.damage - lag.bound >= -1e-12 and lag.bound <= brute.damage + 1e-9
    # rounded DP: still within budget, never better than the optimum, gap stated against a true bound
    coarse = solve_dp(items, room, max_cells=3)
    assert coarse.cost <= room and coarse.damage >= brute.damage - 1e-12
    assert coarse.bound <= brute.damage + 1e-9 and (coarse.exact or coarse.notes)


def test_dp_without_numpy_matches(monkeypatch):
    rng = random.Random(7)
    table = {f"m{i}": [(30, 0.0)] + [(rng.randint(1, 30), rng.random()) for _ in range(3)] for i in range(4)}
    items = items_of(table)
    with_np = solve_dp(items, 70)
    monkeypatch.setitem(sys.modules, "numpy", None)
    without = solve_dp(items, 70)
    assert without.damage == pytest.approx(with_np.damage)


def test_parse_budget():
    assert parse_budget("params=3.5M") == Budget.on("params", 3.5e6, "params=3.5M")
    assert parse_budget("macs=2.1G").value == pytest.approx(2.1e9)
    assert parse_budget("ratio=2").value == 2
    assert parse_budget("PARAMS=1_000".replace("_", "")).value == 1000
    for bad in ("3.5M", "size=3", "params=abc", "ratio=0.5", "ratio=2k", "params=0"):
        with pytest.raises(ConfigError):
            parse_budget(bad)


def test_constraints_validate():
    assert Constraints(ranks=(2, 1, 2)).ranks == (1, 2)
    with pytest.raises(PlanError):
        Constraints(min_compression=4, max_compression=2)
    c = Constraints(max_aspect=8)
    assert Constraints.from_dict(c.to_dict()) == c


def _profile():
    def cand(method, label, spec, p, d):
        return {"method": method, "label": label, "spec": spec, "params": p, "macs": p, "compression": 100 / p,
                "damage": d}

    mats = {}
    for name, (d1, d2) in {"x": (0.1, 0.4), "y": (0.2, 0.25)}.items():
        mats[name] = {"dense_params": 100, "dense_macs": 100, "candidates": [
            cand("keep", "keep", None, 100, 0.0),
            cand("lowrank", "lowrank r10", {"lowrank_rank": 10}, 50, d1),
            cand("kronecker", "2x1⊗5x10 r1", {"shape": [2, 1, 5, 10], "rank": 1}, 25, d2)]}
    return {"model": {"params": 1000, "params_excl_output_embedding": 500, "macs": 400}, "methods": ["kronecker", "lowrank"],
            "matrices": mats}


def test_auto_plan_on_a_profile():
    prof = _profile()
    # params: fixed part 800; room 100 -> x lowrank (50, 0.1) + y kronecker (25, 0.25) = 0.35 vs lr+lr 0.3 at 100
    sol = auto_plan(prof, parse_budget("params=900"))
    assert sol.cost <= 900 and sol.damage == pytest.approx(0.3)
    assert resolved_specs(sol) == {"x": {"lowrank_rank": 10, "method": "lowrank"},
                                   "y": {"lowrank_rank": 10, "method": "lowrank"}}
    sol = auto_plan(prof, parse_budget("ratio=1.25"))  # excl 500 -> 400: room 100 over 300 fixed
    assert sol.damage == pytest.approx(0.3)
    sol = auto_plan(prof, parse_budget("params=900"), methods=["kronecker"])
    assert sol.damage == pytest.approx(0.4 + 0.25) and sol.cost <= 900  # keep + kron would cost 125
    with pytest.raises(PlanError, match=r"smallest reachable size is params=850"):
        auto_plan(prof, parse_budget("params=849"))
    with pytest.raises(PlanError, match=r"smallest reachable size is ratio=1\.429"):
        auto_plan(prof, parse_budget("ratio=3"))


def _entry(points):
    """One profiled matrix: (label, proxy damage, measured KL or None) per candidate, keep first."""
    cands = [{"method": "keep", "label": "keep", "spec": None, "params": 100, "macs": 100, "damage": 0.0,
              "model_damage": 0.0}]
    for k, (label, d, kl) in enumerate(points):
        cands.append({"method": "lowrank", "label": label, "spec": {"lowrank_rank": 10 - k}, "params": 50 - k,
                      "macs": 50 - k, "damage": d, "model_damage": kl})
    return {"dense_params": 100, "dense_macs": 100, "candidates": cands}


def test_kl_damages_interpolates_in_log_log_and_keeps_measurements():
    e = _entry([("a", 0.01, 1e-4), ("b", 0.04, None), ("c", 0.16, 1e-2), ("d", 0.32, None), ("e", 0.001, None)])
    got = kl_damages(e)
    assert got[0] == 0.0  # keep
    assert got[1] == 1e-4 and got[3] == 1e-2  # measured: as measured
    # b: halfway between a and c in log proxy -> halfway in log KL (geometric mean)
    assert got[2] == pytest.approx(1e-3)
    # beyond the measured range: the nearest measured KL/proxy ratio (proportional)
    assert got[4] == pytest.approx(0.32 * 1e-2 / 0.16)
    assert got[5] == pytest.approx(0.001 * 1e-4 / 0.01)
    # one measured point: every other candidate proportional to it
    one = kl_damages(_entry([("a", 0.1, 0.02), ("b", 0.4, None)]))
    assert one[2] == pytest.approx(0.08)
    # equal proxies measured twice: their log KLs are averaged
    two = kl_damages(_entry([("a", 0.1, 0.01), ("b", 0.1, 0.04), ("c", 0.2, None)]))
    assert two[3] == pytest.approx(0.02 * 2)
    with pytest.raises(PlanError, match="kl-subset"):
        kl_damages(_entry([("a", 0.1, None)]), name="h.0.mlp")


def test_auto_plan_damage_kl_follows_model_sensitivity():
    # x: small proxy but the model is sensitive to it; y: larger proxy, the model barely notices
    prof = {"model": {"params": 1000, "params_excl_output_embedding": 500, "macs": 400},
            "matrices": {"x": _entry([("x1", 0.1, 0.05), ("x2", 0.3, 0.2)]),
                         "y": _entry([("y1", 0.2, 0.001), ("y2", 0.5, 0.003)])}}
    budget = parse_budget("params=950")  # room 150 over 800 fixed: one matrix kept, the other at 50
    by_proxy = auto_plan(prof, budget)
    by_kl = auto_plan(prof, budget, damage="kl")
    assert {n: o.label for n, o in by_proxy.choice.items()} == {"x": "x1", "y": "keep"}
    assert {n: o.label for n, o in by_kl.choice.items()} == {"x": "keep", "y": "y1"}
    assert by_kl.damage == pytest.approx(0.001)
    with pytest.raises(ConfigError, match="damage"):
        auto_plan(prof, budget, damage="fisher")
    del prof["matrices"]["y"]["candidates"][1]["model_damage"], prof["matrices"]["y"]["candidates"][2]["model_damage"]
    with pytest.raises(PlanError, match="y has no candidate measured"):
        auto_plan(prof, budget, damage="kl")
