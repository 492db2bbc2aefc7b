"""kron.evo: the evolutionary plan search on the model (after EvoPress) — within the budget and never worse than the
knapsack's plan, reproducible from a seed, resumable from its state file (and refusing one made with other settings),
budget-keeping switches, clear errors for bad settings, and `kronsearch plan --auto --search evo` end to end."""
from __future__ import annotations

import copy
import json
import random

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from kron.autoplan import Constraints, auto_plan, items_from_profile, parse_budget, resolved_specs
from kron.errors import ConfigError, PlanError
from kron.evo import check_evo_settings, evolve_plan, mutate
from kron.measure import ModelMeasure
from kron.plan import CompressionPlan
from kron.profile import profile_model
from kron.refine import PlanEvaluator, plan_choice, staircase
from kron.surgery import apply_specs

LEVELS = (32, 128)  # screening, full: the held-out batches hold 128 tokens
FAST = dict(generations=4, offspring=6, token_levels=LEVELS, embeddings=False)


pytestmark = pytest.mark.usefixtures("one_thread")  # every test of this file (tests/kron/conftest.py)


@pytest.fixture(scope="module")
def setup(make_calibrated_gpt2):
    model, stats, held = make_calibrated_gpt2(4, 2)
    prof = profile_model(model, stats, constraints=Constraints(max_shapes=3, max_compression=8), kl_subset=0)
    budget = parse_budget("ratio=2")
    start = auto_plan(prof, budget, damage="proxy", embeddings=False)
    return model, stats, held, prof, budget, start


def _labels(sol):
    return {n: o.label for n, o in sol.choice.items()}


def test_the_evolved_plan_keeps_the_budget_and_beats_the_start(setup):
    model, stats, held, prof, budget, start = setup
    params_before = sum(p.numel() for p in model.parameters())
    r = evolve_plan(model, stats, prof, budget, start, held, **FAST)
    assert sum(p.numel() for p in model.parameters()) == params_before  # the model is given back as it was
    assert r.generations == 4 and r.stopped == "generations" and len(r.history) == 5
    assert r.history[0] == r.start_kl and r.history[-1] == r.kl
    assert all(a >= b for a, b in zip(r.history, r.history[1:]))  # elitist: the parent never gets worse
    assert r.kl < r.start_kl and r.solution.damage == r.kl and r.solution.solver == "dp+evo"
    assert r.solution.cost <= r.solution.room
    # the start's KL is the knapsack plan's, measured at the full level
    items, _ = items_from_profile(prof, "params_excl_output_embedding", damage="proxy", embeddings=False)
    ev = PlanEvaluator(model, stats, held, LEVELS, prof.get("ridge"))
    assert ev(plan_choice(items, start)) == pytest.approx(r.start_kl, rel=1e-6)
    # the cost it reports: per level, the tokens one measurement reads and the measurements made
    assert r.level_tokens == [32, 128] == [ev.tokens(0), ev.tokens(1)]
    assert r.evals_per_level[0] >= r.evals_per_level[1] >= 4 and r.evals == sum(r.evals_per_level)
    assert r.tokens_per_level == [e * n for e, n in zip(r.evals_per_level, r.level_tokens)]
    d = r.to_dict()
    assert {"start_kl", "kl", "evals", "tokens", "seconds", "workers", "levels", "history"} <= d.keys()
    assert d["workers"] == 1 and d["levels"][1] == {"tokens": 128, "tokens_per_eval": 128,
                                                     "evals": r.evals_per_level[1], "tokens_read": r.tokens_per_level[1]}
    # what it reports is what the built plan measures, and the built plan meets the budget
    m = copy.deepcopy(model)
    rep = apply_specs(m, CompressionPlan.from_resolved(resolved_specs(r.solution)).resolve(m), init="data",
                      calib=stats)
    assert not budget.breaches(rep.sizes(), rep.sizes(before=True)) and rep.compression_ratio >= 2
    measure = ModelMeasure(model, held, 128)
    measure.model = m.eval()
    assert measure() == pytest.approx(r.kl, rel=1e-4)


def test_a_seeded_run_is_reproducible(setup):
    model, stats, held, prof, budget, start = setup
    a = evolve_plan(model, stats, prof, budget, start, held, seed=3, **FAST)
    b = evolve_plan(model, stats, prof, budget, start, held, seed=3, **FAST)
    assert _labels(a.solution) == _labels(b.solution) and a.history == b.history
    assert a.evals_per_level == b.evals_per_level


def test_resume_ends_as_an_uninterrupted_run_and_other_settings_are_refused(setup, tmp_path):
    model, stats, held, prof, budget, start = setup
    whole = evolve_plan(model, stats, prof, budget, start, held, **FAST)
    state = tmp_path / "evo.json"
    first = evolve_plan(model, stats, prof, budget, start, held, state_path=state, **dict(FAST, generations=2))
    saved = json.loads(state.read_text())
    assert saved["generation"] == 2 and saved["header"]["seed"] == 0 and saved["kl"] == first.kl
    assert saved["parent"] == _labels(first.solution)
    rest = evolve_plan(model, stats, prof, budget, start, held, state_path=state, **FAST)
    assert rest.resumed_from == 2 and rest.generations == 4
    assert _labels(rest.solution) == _labels(whole.solution) and rest.history == whole.history
    assert rest.kl == whole.kl and rest.start_kl == whole.start_kl
    assert rest.evals >= first.evals  # an earlier run's measurements count
    # a finished state: nothing is measured again
    calls = []

    def hook(choices, level):
        calls.append(level)
        return [0.0] * len(choices)

    again = evolve_plan(None, None, prof, budget, start, held, state_path=state, evaluate_many=hook, **FAST)
    assert not calls and again.kl == whole.kl and again.evals == rest.evals
    # a changed setting is refused, naming it; so is a damaged file
    for change, key in ((dict(seed=1), "seed"), (dict(offspring=5), "offspring"),
                        (dict(token_levels=(64, 128)), "token_levels"), (dict(embeddings=True), "embeddings")):
        with pytest.raises(ConfigError, match=f"{key} is .* there"):
            evolve_plan(model, stats, prof, budget, start, held, state_path=state, **dict(FAST, **change))
    other = parse_budget("ratio=1.5")
    with pytest.raises(ConfigError, match="budget is"):
        evolve_plan(model, stats, prof, other, auto_plan(prof, other, damage="proxy", embeddings=False), held,
                    state_path=state, **FAST)
    saved["parent"] = {"nope": "keep"}
    state.write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match="damaged evolution state"):
        evolve_plan(model, stats, prof, budget, start, held, state_path=state, **FAST)
    state.write_text("{")
    with pytest.raises(ConfigError, match="not a readable evolution state"):
        evolve_plan(model, stats, prof, budget, start, held, state_path=state, **FAST)


def test_a_hook_measures_in_batches_per_level(setup):
    """evaluate_many: what a caller with workers plugs in; the search asks it for each level's batch once."""
    model, stats, held, prof, budget, start = setup
    ev = PlanEvaluator(model, stats, held, LEVELS, prof.get("ridge"))
    batches = []

    def hook(choices, level):
        batches.append((level, len(choices)))
        return [ev(c, level) for c in choices]

    r = evolve_plan(None, None, prof, budget, start, held, evaluate_many=hook, **FAST)
    ref = evolve_plan(model, stats, prof, budget, start, held, **FAST)
    assert _labels(r.solution) == _labels(ref.solution) and r.kl == ref.kl
    assert batches[0] == (1, 1)  # the start, at the full level
    assert max(n for lv, n in batches if lv == 0) <= 6 and max(n for lv, n in batches if lv == 1) <= 2
    assert ev.evals_per_level == r.evals_per_level
    with pytest.raises(Exception, match="one finite KL each"):
        evolve_plan(None, None, prof, budget, start, held, evaluate_many=lambda c, lv: [float("nan")] * len(c),
                    **FAST)


@pytest.mark.parametrize("change, match", [
    (dict(generations=0), "generations must be a positive integer"),
    (dict(offspring=0), "offspring must be a positive integer"),
    (dict(offspring=2.5), "offspring must be a positive integer"),
    (dict(max_switches=0), "max_switches must be a positive integer"),
    (dict(token_levels=(128, 32)), "token levels must increase"),
    (dict(token_levels=(64, 64)), "token levels must increase"),
    (dict(token_levels=(None, 64)), "None: all of them, last"),
    (dict(token_levels=(0, 64)), "positive numbers of held-out tokens"),
    (dict(token_levels=()), "at least one token level"),
    (dict(survivors=(2,)), "one count per token level"),
    (dict(survivors=(2, 3)), "end with 1"),
    (dict(time_budget_s=0), "time_budget_s must be a positive"),
    (dict(patience=0), "patience must be a positive"),
])
def test_bad_settings_are_refused_before_any_work(setup, change, match):
    _, _, held, prof, budget, start = setup
    with pytest.raises(ConfigError, match=match):
        evolve_plan(None, None, prof, budget, start, held, **dict(FAST, **change))  # no model: nothing ran


def test_a_plan_over_the_budget_or_from_another_profile_is_refused(setup):
    model, stats, held, prof, budget, start = setup
    with pytest.raises(PlanError, match="over its budget"):
        evolve_plan(model, stats, prof, parse_budget("ratio=3"), start, held, **FAST)
    bad = copy.copy(start)
    bad.choice = dict(start.choice)
    bad.choice.pop(next(iter(bad.choice)))
    with pytest.raises(PlanError, match="has no choice for"):
        evolve_plan(model, stats, prof, budget, bad, held, **FAST)


def test_patience_and_the_time_budget_stop_early(setup):
    model, stats, held, prof, budget, start = setup
    r = evolve_plan(model, stats, prof, budget, start, held, **dict(FAST, generations=50, patience=1, offspring=1))
    assert r.stopped == "patience" and r.generations < 50 and r.history[-1] == r.history[-2]
    r = evolve_plan(model, stats, prof, budget, start, held, **dict(FAST, time_budget_s=1e-9))
    assert r.stopped == "time budget" and r.generations == 0 and r.kl == r.start_kl
    assert check_evo_settings(1, 16, 1, (512, 4096)) == ((512, 4096), (4, 1))
    assert check_evo_settings(1, 16, 1, (256, 1024, None)) == ((256, 1024, None), (4, 1, 1))


def _next_stair(stair, old, up):
    """Brute force: the staircase option one step above (below) `old`."""
    if up:
        above = [o for o in stair if o.cost > old.cost and o.damage < old.damage]
        return min(above, key=lambda o: o.cost) if above else None
    below = [o for o in stair if o.cost < old.cost]
    return max(below, key=lambda o: o.cost) if below else None


def test_a_switch_keeps_the_budget_and_steps_along_the_staircases(setup):
    """Over random plans (any candidate per matrix, on the staircase or not) and rooms: every child fits the room.
    One switch without fill moves exactly one matrix one step up and pays with others moved down their staircases,
    or changes nothing when no step up can be paid for (checked by brute force); with fill, no further step up
    fits the child."""
    _, _, _, prof, _, _ = setup
    items, _ = items_from_profile(prof, "params", damage="proxy")
    stairs = {it.name: staircase(it) for it in items}
    floor = {n: min(o.cost for o in st) for n, st in stairs.items()}
    rnd = random.Random(0)
    changed = 0
    for trial in range(300):
        plan = {it.name: rnd.choice(it.options) for it in items}
        kept = dict(plan)
        cost = sum(o.cost for o in plan.values())
        room = cost + rnd.choice([0, 0, 100, 1000, 5000])
        child = mutate(plan, stairs, room, random.Random(trial), rnd.randint(1, 3))
        assert sum(o.cost for o in child.values()) <= room and child.keys() == plan.keys() and plan == kept
        if child != plan:
            assert not any(sum(o.cost for o in child.values()) + up.cost - child[n].cost <= room
                           for n in child for up in [_next_stair(stairs[n], child[n], True)] if up is not None)
        one = mutate(plan, stairs, room, random.Random(trial), 1, fill=False)
        assert sum(o.cost for o in one.values()) <= room
        spare = sum(plan[n].cost - floor[n] for n in plan)
        payable = [n for n in plan if _next_stair(stairs[n], plan[n], True) is not None
                   and cost + _next_stair(stairs[n], plan[n], True).cost - plan[n].cost
                   - (spare - (plan[n].cost - floor[n])) <= room]
        moved = [n for n in plan if one[n] != plan[n]]
        if not payable:
            assert not moved and child == plan
            continue
        changed += 1
        up = [n for n in moved if one[n].cost > plan[n].cost]
        assert len(up) == 1 and up[0] in payable
        assert one[up[0]] == _next_stair(stairs[up[0]], plan[up[0]], True)
        for n in moved:
            if n != up[0]:
                assert one[n].cost < plan[n].cost and one[n] in stairs[n]
    assert changed > 100  # the random plans did exercise switches


# ----------------------------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def saved_teacher(tmp_path_factory):
    """A tiny GPT-2 with a byte-level BPE, saved, and a small text file to calibrate on."""
    from trials.teacher import train_bpe_tokenizer

    root = tmp_path_factory.mktemp("evo-cli")
    rng = random.Random(0)
    words = "the model compresses every weight into two small factors while the student learns".split()
    text = root / "train.txt"
    text.write_text("\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(5, 14)))
                              for _ in range(300)) + "\n")
    tok = train_bpe_tokenizer(text.read_text().splitlines(), 300, min_frequency=1)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(str(root / "model"))
    tok.save_pretrained(str(root / "model"))
    return root / "model", text


def _run(capsys, *argv):
    from search.cli import main

    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_plan_auto_search_evo_end_to_end(saved_teacher, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KRONSEARCH_CACHE", str(tmp_path / "cache"))
    model, text = saved_teacher
    base = ["plan", "--model", model, "--auto", "--calib", text, "--calib-tokens", "512", "--calib-seq-len", "32",
            "--profile", tmp_path / "p.json", "--max-shapes", "2", "--shapes-per-level", "1", "--max-compression", "8",
            "--embedding-factors", "none", "--threads", "1"]
    evo = ["--search", "evo", "--generations", "2", "--offspring", "3", "--evo-tokens", "32,all"]
    state = tmp_path / "evo.json"
    rc, out, err = _run(capsys, *base, "--budget", "ratio=1.3", *evo, "--evo-state", state, "--json", "--out",
                        tmp_path / "e.yaml")
    assert rc == 0, err
    p = json.loads(out)["plans"][0]
    e = p["evolution"]
    assert p["refinement"] is None and p["solver"].endswith("+evo") and p["damage"] == e["kl"]
    assert e["kl"] <= e["start_kl"] and e["generations"] == 2 and e["workers"] == 1
    assert e["evals"] >= 3 and e["tokens"] > 0 and e["seconds"] >= 0
    assert e["levels"][0]["tokens"] == 32 and e["levels"][1]["tokens"] is None
    assert e["levels"][1]["tokens_per_eval"] == 64  # the held-out eighth of 512 tokens
    assert p["ratio"] >= 1.3 and p["damage_kind"] == "kl, measured jointly"
    assert CompressionPlan.load(tmp_path / "e.yaml").rules and json.loads(state.read_text())["generation"] == 2
    # again with the same state file: resumed, nothing left to do, the same plan
    rc, out, err = _run(capsys, *base, "--budget", "ratio=1.3", *evo, "--evo-state", state, "--json")
    again = json.loads(out)["plans"][0]
    assert rc == 0 and again["evolution"]["resumed_from"] == 2 and again["choice"] == p["choice"]
    # another seed is another run: refused by a state file made with seed 0, fine without one
    rc, _, err = _run(capsys, *base, "--budget", "ratio=1.3", *evo, "--evo-seed", "1", "--evo-state", state)
    assert rc == 2 and "seed" in err, err
    rc, out, err = _run(capsys, *base, "--budget", "ratio=1.3", *evo, "--evo-seed", "1", "--json")
    assert rc == 0 and json.loads(out)["plans"][0]["evolution"]["generations"] == 2, err
    # text output and a front of budgets, one state file each
    rc, out, err = _run(capsys, *base, "--budgets", "ratio=1.2,ratio=1.4", *evo, "--evo-state", state)
    assert rc == 0, err
    assert out.count("evolved from the knapsack's plan: 2 generations") == 2 and "cost: " in out and "1 worker" in out
    assert "evolve ratio=1.2: generation 1/2" in err and "front:" in out
    assert (tmp_path / "evo-ratio1.2.json").is_file() and (tmp_path / "evo-ratio1.4.json").is_file()
    # bad values and combinations: exit 2 before any work
    for extra, msg in ((["--search", "evo", "--refine", "3"], "two searches on the model"),
                       (["--generations", "2"], "--generations goes with --search evo"),
                       (["--search", "evo", "--generations", "0"], "generations must be a positive integer"),
                       (["--search", "evo", "--offspring", "-1"], "offspring must be a positive integer"),
                       (["--search", "evo", "--evo-tokens", "4096,512"], "token levels must increase"),
                       (["--search", "evo", "--evo-tokens", "abc"], "--evo-tokens takes positive token counts"),
                       (["--search", "evo", "--time-budget-s", "-1"], "time_budget_s must be a positive"),
                       (["--search", "evo", "--evo-workers", "0"], "--evo-workers takes a number of workers >= 1"),
                       (["--evo-workers", "2"], "--evo-workers goes with --search evo"),
                       (["--evo-seed", "2"], "--evo-seed goes with --search evo")):
        rc, _, err = _run(capsys, *base, "--budget", "ratio=1.3", *extra)
        assert rc == 2 and msg in err and "Traceback" not in err, (extra, err)
    rc, _, err = _run(capsys, "plan", "--model", model, "--auto", "--budget", "ratio=1.3", "--profile",
                      tmp_path / "nope.json", "--search", "evo")
    assert rc == 2 and "--search evo measures plans on the model: give --calib" in err
    rc, _, err = _run(capsys, "plan", "--model", model, "--preset", "uniform:2", "--search", "evo")
    assert rc == 2 and "--search goes with --auto" in err


@pytest.mark.ray
def test_ray_workers_give_the_in_process_evolution(setup):
    """Two Ray workers (search.evo_workers), each with a copy of the model and its own built layers, measure the same
    plans as the in-process evaluator: a seeded evolution ends with the same plan and KL, and reports 2 workers."""
    from search.evo_workers import EvoWorkers

    model, stats, held, prof, budget, start = setup
    alone = evolve_plan(model, stats, prof, budget, start, held, **FAST)
    with EvoWorkers(model, stats, held, LEVELS, prof.get("ridge"), 2) as pool:
        spread = evolve_plan(model, stats, prof, budget, start, held, evaluate_many=pool.evaluate_many, workers=2,
                             **FAST)
        counts = pool.counts()
    assert _labels(spread.solution) == _labels(alone.solution)
    assert spread.kl == pytest.approx(alone.kl, rel=1e-5) and spread.history == pytest.approx(alone.history, rel=1e-5)
    assert spread.evals_per_level == alone.evals_per_level and spread.to_dict()["workers"] == 2
    assert counts["workers"] == 2 and counts["evals_per_level"] == alone.evals_per_level  # each plan measured once
    with pytest.raises(Exception, match="--evo-workers takes a number of workers >= 1"):
        EvoWorkers(model, stats, held, LEVELS, None, 0)
