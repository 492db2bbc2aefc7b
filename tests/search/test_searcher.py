"""PlanSearcher (the OptunaSearch subclass) without a running Ray: budget rejection and how trial outcomes reach
Optuna (complete / pruned / failed), plus saving and restoring its state."""
from __future__ import annotations

import math

import optuna
import pytest

from search.config import load_search_config
from search.prepare import prepared_space
from search.searcher import PlanSearcher, make_searcher
from search.trainable import FINISHED, TIME_ATTR

State = optuna.trial.TrialState


@pytest.fixture
def cfg_space(tiny_search):
    def make(**space):
        raw = tiny_search()
        raw["space"].update(space)
        cfg = load_search_config(raw)
        return cfg, prepared_space(cfg)

    return make


def _result(q=100.0, params=1000, step=6, finished=True, **extra):
    r = {"quality": q, "params": params, TIME_ATTR: step, "trial_status": "complete", **extra}
    if finished:
        r[FINISHED] = True
    return r


def test_budget_breaking_samples_are_never_handed_out(cfg_space):
    cfg, loose = cfg_space()
    limit = sorted(loose.plan_costs(loose.sample(i))["params"] for i in range(100))[15]
    cfg, space = cfg_space(budget={"max_params": limit})
    searcher = make_searcher(cfg, space)
    configs = [searcher.suggest(f"t{i}") for i in range(12)]
    for c in configs:
        assert space.plan_costs(c)["params"] <= limit
        assert not space.is_empty(c)
    trials = searcher.study.get_trials(deepcopy=False)
    rejected = [t for t in trials if "rejected" in t.user_attrs]
    assert rejected, "a tight budget must reject some samples"
    assert all(t.state == State.FAIL for t in rejected)  # samplers ignore FAIL trials
    assert all("params" in t.user_attrs["rejected"] or "empty" in t.user_attrs["rejected"] for t in rejected)
    handed_out = [t for t in trials if "ray_trial_id" in t.user_attrs]
    assert len(handed_out) == 12 and all(t.state == State.RUNNING for t in handed_out)
    assert searcher.rejected == len(rejected)


def test_repair_after_max_resamples(cfg_space):
    cfg, loose = cfg_space()
    limit = sorted(loose.plan_costs(loose.sample(i))["params"] for i in range(100))[3]
    cfg, space = cfg_space(budget={"max_params": limit})
    metrics, modes = cfg.objective_metrics()
    searcher = PlanSearcher(space, metric=metrics, mode=modes, sampler=optuna.samplers.RandomSampler(seed=1),
                            max_t=6, max_resamples=1)
    for i in range(8):
        c = searcher.suggest(f"t{i}")
        assert space.within_budget(c)
    assert searcher.repaired >= 1
    assert any(t.user_attrs.get("repaired") for t in searcher.study.get_trials(deepcopy=False))


@pytest.mark.parametrize(("result", "error", "state", "values"), [
    (_result(), False, State.COMPLETE, [100.0, 1000.0]),
    (_result(step=6, finished=False), False, State.COMPLETE, [100.0, 1000.0]),  # reached max_t, stopped there
    (_result(step=2, finished=False), False, State.PRUNED, None),  # ASHA stopped it early
    (None, False, State.PRUNED, None),
    (_result(), True, State.FAIL, None),  # raised
    (_result(trial_status="diverged"), False, State.FAIL, None),
    (_result(q=math.nan), False, State.FAIL, None),
    (_result(q=math.inf), False, State.FAIL, None),
])
def test_outcomes_reach_optuna_correctly(cfg_space, result, error, state, values):
    cfg, space = cfg_space()
    searcher = make_searcher(cfg, space)
    searcher.suggest("a")
    searcher.on_trial_result("a", _result(step=2, finished=False))  # ignored: multi-objective
    searcher.on_trial_complete("a", result=result, error=error)
    searcher.on_trial_complete("a", result=_result(), error=False)  # a second completion is ignored
    (trial,) = [t for t in searcher.study.get_trials(deepcopy=False) if t.user_attrs.get("ray_trial_id") == "a"]
    assert trial.state == state
    assert trial.values == values


def test_multi_objective_directions_follow_the_config(cfg_space, tiny_search):
    cfg, space = cfg_space()
    searcher = make_searcher(cfg, space)
    assert [d.name for d in searcher.study.directions] == ["MINIMIZE", "MINIMIZE"]
    raw = tiny_search()
    raw["search"]["objectives"] = ["quality", "params", "macs"]
    raw["search"]["algorithm"] = "nsga2"
    cfg3 = load_search_config(raw)
    s3 = make_searcher(cfg3, space)
    assert len(s3.study.directions) == 3
    assert isinstance(s3.study.sampler, optuna.samplers.NSGAIISampler)
    raw["search"]["algorithm"] = "random"
    assert isinstance(make_searcher(load_search_config(raw), space).study.sampler, optuna.samplers.RandomSampler)


def test_state_survives_save_and_restore(cfg_space, tmp_path):
    cfg, space = cfg_space()
    searcher = make_searcher(cfg, space)
    for i in range(3):
        searcher.suggest(f"t{i}")
    searcher.on_trial_complete("t0", _result())
    searcher.on_trial_complete("t1", _result(step=2, finished=False))
    searcher.save(str(tmp_path / "s.pkl"))
    again = make_searcher(cfg, space)
    again.restore(str(tmp_path / "s.pkl"))
    def handed_out():
        return [t for t in again.study.get_trials(deepcopy=False) if "ray_trial_id" in t.user_attrs]

    assert [t.state for t in handed_out()] == [State.COMPLETE, State.PRUNED, State.RUNNING]
    again.on_trial_complete("t2", _result(q=50.0))  # the trial running at save time can still finish
    assert handed_out()[2].values == [50.0, 1000.0]
    assert again.suggest("t3")


class _Trial:
    def __init__(self, trial_id, config):
        self.trial_id, self.config = trial_id, config


def test_size_stratified_asha_compares_trials_of_similar_size_only(cfg_space, tiny_search):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

    from search.scheduler import SizeStratifiedASHA, make_scheduler

    raw = tiny_search()
    raw["search"]["asha"] = {"grace_period": 2, "reduction_factor": 2, "size_buckets": 2, "keep_front": False}
    cfg = load_search_config(raw)
    space = prepared_space(cfg)
    sched = make_scheduler(cfg, space)
    assert isinstance(sched, SizeStratifiedASHA) and sched.metric == "quality"
    assert "ASHA within 2 params strata" in sched.describe()
    small, large = space.cheapest("params"), max((space.sample(i) for i in range(50)),
                                                   key=lambda p: space.plan_costs(p)["params"])
    assert sched.stratum(small) == 0 and sched.stratum(large) == 1
    # a good large plan first, then a much worse small one: different strata, so the small one goes on
    big, tiny_bad, tiny_worse = _Trial("big", large), _Trial("s1", small), _Trial("s2", small)
    for t in (big, tiny_bad, tiny_worse):
        sched.on_trial_add(None, t)
    assert sched.on_trial_result(None, big, {"quality": 10.0, TIME_ATTR: 2}) == TrialScheduler.CONTINUE
    assert sched.on_trial_result(None, tiny_bad, {"quality": 100.0, TIME_ATTR: 2}) == TrialScheduler.CONTINUE
    # ... but a worse trial of the same stratum is stopped
    assert sched.on_trial_result(None, tiny_worse, {"quality": 200.0, TIME_ATTR: 2}) == TrialScheduler.STOP
    raw["search"]["asha"]["size_buckets"] = 1
    assert isinstance(make_scheduler(load_search_config(raw), space), ASHAScheduler)
    raw["search"]["asha"] = None
    assert type(make_scheduler(load_search_config(raw), space)) is FIFOScheduler


def test_pareto_aware_asha_keeps_seeds_and_the_front(cfg_space, tiny_search):
    """asha.protect_seeds (default): ASHA never stops a seed plan before max_t, though its results still set the
    rung cutoffs sampled trials must meet. asha.keep_front (default): a trial on the front of its step's results
    (quality and size) goes on where ASHA's within-stratum ranking would stop it; a dominated one stops. Both off:
    plain ASHA."""
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    from search.scheduler import ParetoAwareASHA, make_scheduler

    raw = tiny_search(seed_plans=["uniform:2"])
    raw["space"]["groups"] = ["attention", "attention_output", "ffn_in", "ffn_out"]  # all that uniform:2 compresses
    raw["search"]["asha"] = {"grace_period": 2, "reduction_factor": 2, "size_buckets": 1}
    cfg = load_search_config(raw)
    space = prepared_space(cfg)
    (label, seed_params), = space.seeds
    assert space.seed_label(seed_params) == label
    samples = sorted((p for p in (space.sample(i) for i in range(80)) if p != seed_params),
                     key=lambda p: space.plan_costs(p)["params"])
    small, large = samples[0], samples[-1]
    assert space.plan_costs(small)["params"] < space.plan_costs(large)["params"]
    assert space.seed_label(small) is None

    def fresh(**asha):
        raw["search"]["asha"].update(asha)
        sched = make_scheduler(load_search_config(raw), space)
        trials = {"seed": _Trial("seed", seed_params), "small": _Trial("small", small),
                  "large": _Trial("large", large), "large2": _Trial("large2", large)}
        for t in trials.values():
            sched.on_trial_add(None, t)
        return sched, trials

    def result(q):
        return {"quality": q, TIME_ATTR: 2}

    stop, go = TrialScheduler.STOP, TrialScheduler.CONTINUE
    sched, t = fresh(keep_front=False)
    assert isinstance(sched, ParetoAwareASHA) and isinstance(sched.inner, ASHAScheduler)
    assert "seed plans run to max_t" in sched.describe()
    # a good trial, then a much worse seed at the same rung: ASHA would stop the seed, it goes on
    assert sched.on_trial_result(None, t["large"], result(10.0)) == go
    assert sched.inner.on_trial_result(None, t["large2"], result(200.0)) == stop
    assert sched.on_trial_result(None, t["seed"], result(190.0)) == go
    assert sched.kept == {"seed": "seed"}
    # the seed's results count in the rungs: a good seed first makes a worse sampled trial stop
    sched, t = fresh(keep_front=False)
    assert sched.on_trial_result(None, t["seed"], result(10.0)) == go
    assert sched.on_trial_result(None, t["large"], result(100.0)) == stop

    # keep_front: the small plan is worse than the large ones but better than anything as small: it goes on
    sched, t = fresh(protect_seeds=False, keep_front=True)
    assert "trials on the front at their step are not stopped" in sched.describe()
    assert sched.on_trial_result(None, t["large"], result(10.0)) == go
    assert sched.on_trial_result(None, t["large2"], result(20.0)) in (go, stop)
    assert sched.inner.on_trial_result(None, t["small"], result(150.0)) == stop  # what ASHA alone decides ...
    sched, t = fresh(protect_seeds=False, keep_front=True)
    sched.on_trial_result(None, t["large"], result(10.0))
    sched.on_trial_result(None, t["large2"], result(20.0))
    assert sched.on_trial_result(None, t["small"], result(150.0)) == go  # ... and what it does here
    assert sched.kept == {"small": "front"}
    # a large plan worse than an equally large one is dominated: stopped
    sched, t = fresh(protect_seeds=False, keep_front=True)
    sched.on_trial_result(None, t["small"], result(10.0))
    sched.on_trial_result(None, t["large"], result(10.0))
    assert sched.on_trial_result(None, t["large2"], result(200.0)) == stop
    # both off: plain ASHA, the bad seed is stopped
    sched, t = fresh(protect_seeds=False, keep_front=False)
    assert isinstance(sched, ASHAScheduler)
    sched.on_trial_result(None, t["large"], result(10.0))
    sched.on_trial_result(None, t["large2"], result(200.0))
    assert sched.on_trial_result(None, t["seed"], result(190.0)) == stop
    # no seed plans and keep_front off: nothing to wrap
    raw["search"]["asha"].update(protect_seeds=True)
    raw["search"]["seed_plans"] = []
    assert isinstance(make_scheduler(load_search_config(raw), prepared_space(load_search_config(raw))),
                      ASHAScheduler)


def _journal_trials(path, name):
    from search.searcher import load_journal_study

    return load_journal_study(path, name).get_trials(deepcopy=False)


def test_the_study_is_kept_in_a_journal_that_a_resume_reattaches_to(cfg_space, tmp_path):
    """The study lives in optuna_study.journal (every tell is on disk at once); a searcher restored from a state
    saved before the driver was killed re-attaches to it: nothing copied twice, the running trial can still finish,
    and a trial asked for after the save (unknown to the resumed search) is closed as FAIL."""
    from search.searcher import resuming_into

    cfg, space = cfg_space()
    journal = tmp_path / "optuna_study.journal"
    searcher = make_searcher(cfg, space, journal=journal)
    configs = [searcher.suggest(f"t{i}") for i in range(3)]
    assert configs[0]["plan_params"] == space.plan_costs(configs[0])["params"] and configs[0]["plan_summary"]
    searcher.on_trial_complete("t0", _result())
    searcher.on_trial_complete("t1", _result(step=2, finished=False))
    assert {t.user_attrs.get("ray_trial_id"): t.state for t in _journal_trials(journal, cfg.name)
            if "ray_trial_id" in t.user_attrs} == {"t0": State.COMPLETE, "t1": State.PRUNED, "t2": State.RUNNING}
    searcher.save(str(tmp_path / "s.pkl"))
    searcher.suggest("t3")  # after the last save: the killed driver's secret
    with open(journal, "ab") as fh:  # and the kill cut a record short
        fh.write(b'{"op_code":4,"worker_id":"x"')
    before = len(journal.read_bytes().splitlines())

    again = make_searcher(cfg, space)  # as Ray unpickles tuner.pkl, then restores the saved state
    with resuming_into(journal, cfg.name):
        again.restore(str(tmp_path / "s.pkl"))
    trials = _journal_trials(journal, cfg.name)
    by_ray = {t.user_attrs["ray_trial_id"]: t for t in trials if "ray_trial_id" in t.user_attrs}
    assert journal.read_bytes().endswith(b"\n") and len(journal.read_bytes().splitlines()) > before - 1
    assert [t.number for t in trials] == list(range(len(trials)))  # no trial copied twice
    assert by_ray["t3"].state == State.FAIL and "orphaned" in by_ray["t3"].user_attrs
    assert by_ray["t2"].state == State.RUNNING
    again.on_trial_complete("t2", _result(q=50.0))
    assert _journal_trials(journal, cfg.name)[by_ray["t2"].number].values == [50.0, 1000.0]
    assert again.suggest("t4")
    # what a user reads with Optuna itself
    study = optuna.load_study(study_name=cfg.name, storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(journal))))
    assert [t.state for t in study.trials if t.user_attrs.get("ray_trial_id") == "t4"] == [State.RUNNING]
    assert [t.number for t in study.trials] == list(range(len(study.trials)))


def test_a_searcher_saved_without_a_journal_gets_one_on_resume(cfg_space, tmp_path):
    """Searches of 0.1.0 kept the study in memory (pickled in the searcher state): a resume writes it, with every
    trial, into a journal and goes on there."""
    from search.searcher import resuming_into

    cfg, space = cfg_space()
    old = make_searcher(cfg, space)  # no journal, as 0.1.0
    for i in range(2):
        old.suggest(f"t{i}")
    old.on_trial_complete("t0", _result())
    old.save(str(tmp_path / "s.pkl"))
    n = len(old.study.trials)
    journal = tmp_path / "optuna_study.journal"
    again = make_searcher(cfg, space)
    with resuming_into(journal, cfg.name):
        again.restore(str(tmp_path / "s.pkl"))
    trials = _journal_trials(journal, cfg.name)
    assert [(t.number, t.state) for t in trials] == [(t.number, t.state) for t in old.study.trials]
    assert len(trials) == n
    again.on_trial_complete("t1", _result(q=7.0))
    t1 = next(t for t in _journal_trials(journal, cfg.name) if t.user_attrs.get("ray_trial_id") == "t1")
    assert t1.state == State.COMPLETE and t1.values == [7.0, 1000.0]


def test_a_sampler_stuck_on_unrunnable_plans_costs_a_bounded_number_of_asks(cfg_space):
    """TPE can keep proposing the empty plan (fewer layers, fewer parameters); each rejected ask is a FAIL trial in
    the study, so after OPTUNA_RESAMPLES asks the searcher draws from the space itself instead of asking again."""
    from search.searcher import OPTUNA_RESAMPLES

    class NothingOn(optuna.samplers.RandomSampler):
        def sample_independent(self, study, trial, name, dist):
            return False if name.endswith(".on") else super().sample_independent(study, trial, name, dist)

    cfg, space = cfg_space()
    metrics, modes = cfg.objective_metrics()
    searcher = PlanSearcher(space, metric=metrics, mode=modes, sampler=NothingOn(seed=0), max_t=6, max_resamples=200)
    configs = [searcher.suggest(f"t{i}") for i in range(5)]
    assert all(not space.is_empty(c) for c in configs)
    trials = searcher.study.get_trials(deepcopy=False)
    assert len(trials) == 5 * (OPTUNA_RESAMPLES + 1)  # not 5 * 200
    handed_out = [t for t in trials if "ray_trial_id" in t.user_attrs]
    assert len(handed_out) == 5 and all(t.user_attrs["drawn_at_random"] for t in handed_out)
    assert searcher.rejected == 5 * OPTUNA_RESAMPLES
