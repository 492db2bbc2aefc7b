"""The searcher: multi-objective Optuna behind Ray Tune, told the truth about every trial.

Measured traps handled here (../shared/notes/ray-tune.md): metric/mode go to the searcher as lists, never to
TuneConfig (which would silently make the search single-objective); a trial ASHA stopped early reaches the searcher
as a normal completion, so `PlanSearcher` tells Optuna PRUNED instead, FAIL for errors and diverged trials, and never
trains a plan over the budget (it is told FAIL, marked "rejected", and a new one is asked for).
"""
from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING

from .config import SearchConfig
from .trainable import trial_outcome

if TYPE_CHECKING:
    from .space import SearchSpace

__all__ = ["PlanSearcher", "make_sampler", "make_searcher"]

log = logging.getLogger(__name__)


def _searcher_base():
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch


class PlanSearcher(_searcher_base()):
    """OptunaSearch that (1) never hands out a plan over the budget (or an empty one, or one already tried): it tells
    Optuna FAIL (with a "rejected" user attribute) and asks again, up to `max_resamples` times, then repairs the last
    sample greedily; (2) tells Optuna PRUNED for trials stopped before
    they finished (ASHA, the time budget) and FAIL for errors and diverged trials, instead of COMPLETE with
    partial metrics."""

    def __init__(self, space: SearchSpace, *, metric: list[str], mode: list[str], sampler, max_t: int | None,
                 max_resamples: int = 200, initial_params: list[dict] | None = None):
        super().__init__(space=space.define_by_run, metric=metric, mode=mode, sampler=sampler,
                         points_to_evaluate=[dict(p) for p in initial_params or []] or None)
        self.plan_space = space
        self.max_t = max_t
        self.max_resamples = max_resamples
        self.rejected = 0
        self.repaired = 0
        self.duplicates = 0
        self._seen: set = set()  # plans handed out so far (as resolved module -> spec)

    def _plan_key(self, params: dict):
        return tuple(sorted((k, repr(sorted(v.items()))) for k, v in self.plan_space.resolved(params).items()))

    def suggest(self, trial_id: str):
        import optuna
        from ray.tune.utils.util import unflatten_dict

        space = self.plan_space
        if trial_id in self._ot_trials:  # asked again for the same trial (a resumed search)
            ot_trial = self._ot_trials[trial_id]
            return unflatten_dict(self._suggest_from_define_by_run_func(self._space, ot_trial))
        params = last = duplicate = None
        for _ in range(self.max_resamples):
            ot_trial = self._ot_study.ask()
            last = self._suggest_from_define_by_run_func(self._space, ot_trial)
            reasons = space.rejection_reasons(last)
            if not reasons and self._plan_key(last) not in self._seen:
                params = last
                break
            if not reasons:  # a plan already trained or running: ask for another, keep it as the fallback
                reasons = ["duplicate of an earlier plan"]
                duplicate = duplicate or last
                self.duplicates += 1
            else:
                self.rejected += 1
            # FAIL, not PRUNED: samplers ignore failed trials, so a rejected plan neither uses up TPE's random
            # start-up trials nor becomes a (valueless) point its density model is fitted to
            ot_trial.set_user_attr("rejected", "; ".join(reasons))
            self._ot_study.tell(ot_trial, state=optuna.trial.TrialState.FAIL)
        if params is None and duplicate is not None:  # a small space, nearly exhausted: run a duplicate
            last = duplicate
        if params is None:
            fixed = space.repair(last) if space.rejection_reasons(last) else last
            self._ot_study.enqueue_trial(fixed, user_attrs={"repaired": fixed is not last}, skip_if_exists=False)
            ot_trial = self._ot_study.ask()
            params = self._suggest_from_define_by_run_func(self._space, ot_trial)
            self.repaired += fixed is not last
        self._seen.add(self._plan_key(params))
        ot_trial.set_user_attr("ray_trial_id", trial_id)
        self._ot_trials[trial_id] = ot_trial
        return unflatten_dict(params)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        return  # multi-objective Optuna keeps no intermediate values; ASHA is the early stopper

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        import optuna

        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        ot_trial = self._ot_trials[trial_id]
        outcome, values = trial_outcome(result, error, self._metric if isinstance(self._metric, list) else
                                   [self._metric], self.max_t)
        ot_trial.set_user_attr("outcome", outcome)
        state = {"complete": optuna.trial.TrialState.COMPLETE, "pruned": optuna.trial.TrialState.PRUNED,
                 "fail": optuna.trial.TrialState.FAIL}[outcome]
        try:
            if outcome == "complete":
                self._ot_study.tell(ot_trial, values)
            else:
                self._ot_study.tell(ot_trial, state=state)
        except Exception as exc:  # e.g. told twice after a resume; never take the search down for bookkeeping
            log.warning("could not tell Optuna about trial %s: %s", trial_id, exc)
        self._completed_trials.add(trial_id)

    @property
    def study(self):
        return self._ot_study


def make_sampler(cfg: SearchConfig):
    """The Optuna sampler of `search.algorithm` (tpe, nsga2 or random), seeded with `search.seed`."""
    import optuna

    s = cfg.search
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if s.algorithm == "random":
            return optuna.samplers.RandomSampler(seed=s.seed)
        if s.algorithm == "nsga2":
            pop = s.population_size or max(4, 4 * s.max_concurrent)
            return optuna.samplers.NSGAIISampler(seed=s.seed, population_size=pop)
        startup = s.startup_trials or min(10, max(2, s.num_samples // 4))
        # constant_liar: concurrent trials are not all drawn from the same density; group: conditional params
        return optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=startup, multivariate=True, group=True,
                                          constant_liar=True)


def make_searcher(cfg: SearchConfig, space: SearchSpace, initial_params: list[dict] | None = None) -> PlanSearcher:
    """The search's `PlanSearcher` over all its objectives; `initial_params` are evaluated first."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    metrics, modes = cfg.objective_metrics()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return PlanSearcher(space, metric=metrics, mode=modes, sampler=make_sampler(cfg), max_t=cfg.asha_max_t,
                            max_resamples=cfg.search.max_resamples, initial_params=initial_params)
