"""Early stopping: ASHA on the trial's quality, run separately within strata of the size objective."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from analysis.textfmt import human
from kron.vocab import AXES

from .config import SearchConfig
from .searcher import resumed_space
from .trainable import TIME_ATTR

if TYPE_CHECKING:
    from .space import SearchSpace

__all__ = ["ParetoAwareASHA", "SizeStratifiedASHA", "explicit_rungs", "make_scheduler", "milestones"]


def _scheduler_base():
    from ray.tune.schedulers import FIFOScheduler

    return FIFOScheduler


class _Delegating(_scheduler_base()):
    """A scheduler that hands every trial event to the scheduler `_sched(trial)` picks for that trial."""

    def __setstate__(self, state: dict) -> None:
        """Unpickled from a resumed search's tuner.pkl: the space is the one rebuilt from its config
        (`search.searcher.resuming_into`), not the pickled object an earlier release laid out."""
        self.__dict__.update(state)
        if "space" in state:
            self.space = resumed_space(state["space"])

    def _sched(self, trial):
        raise NotImplementedError

    def on_trial_add(self, tune_controller, trial):
        self._sched(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        return self._sched(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result):
        self._sched(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_error(self, tune_controller, trial):
        self._sched(trial).on_trial_error(tune_controller, trial)

    def on_trial_remove(self, tune_controller, trial):
        self._sched(trial).on_trial_remove(tune_controller, trial)


class SizeStratifiedASHA(_Delegating):
    """ASHA within size strata: one asynchronous successive-halving scheduler per stratum of the size objective.

    Plain ASHA ranks trials by quality alone, so in a quality/size search it stops the small plans first (they are
    worse at every rung) and the Pareto front loses its small end. Here the range of the size metric, from the
    cheapest plan of the space to the teacher (log scale), is cut into `n` equal strata and a trial only competes
    with trials of its own stratum.
    """

    def __init__(self, space: SearchSpace, *, size_metric: str, n: int, metric: str, mode: str, time_attr: str,
                 max_t: int, grace_period: int, reduction_factor: float, stop_last_trials: bool):
        from ray.tune.schedulers import ASHAScheduler

        super().__init__()
        self._metric, self._mode = metric, mode
        self.space, self.size_metric, self.n = space, size_metric, n
        lo = max(space.plan_costs(space.cheapest(size_metric))[size_metric], 1)
        hi = max(space.size_cap(size_metric), lo + 1)
        self.edges = [math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * i / n) for i in range(1, n)]
        self.strata = [ASHAScheduler(metric=metric, mode=mode, time_attr=time_attr, max_t=max_t,
                                     grace_period=grace_period, reduction_factor=reduction_factor,
                                     stop_last_trials=stop_last_trials) for _ in range(n)]
        self._of: dict[str, int] = {}

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True  # metric and mode are fixed at construction

    def stratum(self, config: dict) -> int:
        value = self.space.plan_costs(self.space.params_of(config))[self.size_metric]
        return sum(value > e for e in self.edges)

    def describe(self) -> str:
        edges = [human(e, '?') for e in self.edges]
        cells = [f"<{edges[0]}"] + [f"{a}-{b}" for a, b in zip(edges, edges[1:])] + [f">{edges[-1]}"]
        return f"ASHA within {self.n} {AXES[self.size_metric].short} strata: " + ", ".join(cells)

    def _sched(self, trial):
        if trial.trial_id not in self._of:
            self._of[trial.trial_id] = self.stratum(trial.config)
        return self.strata[self._of[trial.trial_id]]

    def debug_string(self) -> str:
        return "\n".join(f"stratum {i}: {s.debug_string()}" for i, s in enumerate(self.strata))


class ParetoAwareASHA(_Delegating):
    """`inner` (ASHA), except where a stop would lose a plan worth finishing; every result still goes through `inner`,
    so it still sets the rungs' cutoffs.

    - protect_seeds: a seed plan (search.seed_plans) is never stopped before `max_t`. Seeds are few and chosen on
      purpose (presets, the automatic plans at given sizes); stopping one at an early rung loses the comparison it
      was seeded for.
    - keep_front: a trial is not stopped while its (quality, size) at this step is on the Pareto front of every
      result reported at the same step (all strata): ASHA ranks by quality within a size stratum, so it stops a plan
      that is worse than larger plans of its stratum yet better than every smaller one — one that would extend the
      front (the idea of multi-objective ASHA, Schmucker et al. 2021, in its simplest form: the rung's
      non-dominated trials go on).
    """

    def __init__(self, inner, space: SearchSpace, *, time_attr: str, max_t: int, metric: str, mode: str,
                 size_metric: str, protect_seeds: bool = True, keep_front: bool = True):
        super().__init__()
        self.inner, self.space, self.time_attr, self.max_t = inner, space, time_attr, max_t
        self._metric, self._mode, self.size_metric = metric, mode, size_metric
        self.protect_seeds, self.keep_front = protect_seeds, keep_front
        self._seed: dict[str, bool] = {}
        self._size: dict[str, float] = {}
        self._at: dict[float, dict[str, tuple[float, float]]] = {}  # step -> trial id -> (quality, size)
        self.kept: dict[str, str] = {}  # trial id -> why a stop was overridden last ("seed" / "front")

    def is_seed(self, trial) -> bool:
        if trial.trial_id not in self._seed:
            self._seed[trial.trial_id] = self.space.seed_label(trial.config) is not None
        return self._seed[trial.trial_id]

    def size(self, trial) -> float:
        if trial.trial_id not in self._size:
            costs = self.space.plan_costs(self.space.params_of(trial.config))
            self._size[trial.trial_id] = float(costs[self.size_metric])
        return self._size[trial.trial_id]

    def _on_front(self, trial_id: str, step: float) -> bool:
        q, s = self._at[step][trial_id]
        sign = 1.0 if self._mode == "min" else -1.0
        return not any(s2 <= s and sign * q2 <= sign * q and (s2 < s or sign * q2 < sign * q)
                       for other, (q2, s2) in self._at[step].items() if other != trial_id)

    def _sched(self, trial):
        return self.inner

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return self.inner.set_search_properties(metric, mode, **spec)

    def on_trial_result(self, tune_controller, trial, result):
        action = super().on_trial_result(tune_controller, trial, result)
        step, quality = result.get(self.time_attr), result.get(self._metric)
        if step is None or quality is None or quality != quality:  # no step or no quality yet (NaN): ASHA's call
            return action
        step = float(step)
        self._at.setdefault(step, {})[trial.trial_id] = (float(quality), self.size(trial))
        if action != self.STOP or step >= self.max_t:
            return action
        if self.protect_seeds and self.is_seed(trial):
            self.kept[trial.trial_id] = "seed"
            return self.CONTINUE
        if self.keep_front and self._on_front(trial.trial_id, step):
            self.kept[trial.trial_id] = "front"
            return self.CONTINUE
        return action

    def describe(self) -> str:
        inner = getattr(self.inner, "describe", None)
        kept = [w for w, on in (("seed plans run to max_t", self.protect_seeds and self.space.seeds),
                                ("trials on the front at their step are not stopped", self.keep_front)) if on]
        return "; ".join(([inner()] if inner else []) + kept)

    def debug_string(self) -> str:
        why = list(self.kept.values())
        return (self.inner.debug_string() + f"\nstops overridden: {why.count('seed')} seeds, "
                f"{why.count('front')} trials on the front")


def explicit_rungs(asha, rungs) -> None:
    """Give each bracket of Ray's ASHAScheduler `asha` the milestones `rungs` (increasing steps, the last max_t) in
    place of its geometric ones (grace_period x reduction_factor^k): a trial is judged at each of them against the
    results recorded there, the best 1/reduction_factor going on."""
    for bracket in asha._brackets:
        bracket._rungs = [(int(r), {}) for r in reversed(list(rungs))]


def milestones(sched) -> list[list[int]]:
    """The milestones of every ASHA bracket under `sched` (for describing and testing a schedule)."""
    found = []
    for s in [getattr(sched, "inner", sched)]:
        for a in getattr(s, "strata", [s]):
            found += [sorted(int(m) for m, _ in b._rungs) for b in getattr(a, "_brackets", [])]
    return found


def make_scheduler(cfg: SearchConfig, space: SearchSpace):
    """FIFO without ASHA; plain ASHA for one size stratum; `SizeStratifiedASHA` otherwise; wrapped in
    `ParetoAwareASHA` for `asha.protect_seeds` (when the space has seed plans) and `asha.keep_front`. A trial that
    survives every rung runs to its own end (run_trial writes its final summary), unless asha.max_t is below the stage's
    steps, in which case ASHA stops it at max_t and it counts as complete."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    a = cfg.search.asha
    if a is None:
        return FIFOScheduler()
    kwargs = dict(metric="quality", mode=cfg.quality_mode(), time_attr=TIME_ATTR, max_t=cfg.asha_max_t,
                  grace_period=a.grace_period, reduction_factor=a.reduction_factor,
                  stop_last_trials=cfg.asha_max_t < cfg.final_stage_steps)
    if a.size_buckets == 1:
        sched = ASHAScheduler(**kwargs)
        inner = [sched]
    else:  # latency is measured, not known in advance: cfg.size_metric stratifies by parameters then
        sched = SizeStratifiedASHA(space, size_metric=cfg.size_metric, n=a.size_buckets, **kwargs)
        inner = sched.strata
    if a.rungs is not None:
        for s in inner:
            explicit_rungs(s, a.rungs)
    protect = a.protect_seeds and bool(space.seeds)
    if protect or a.keep_front:
        sched = ParetoAwareASHA(sched, space, time_attr=TIME_ATTR, max_t=cfg.asha_max_t, metric="quality",
                                mode=cfg.quality_mode(), size_metric=cfg.size_metric, protect_seeds=protect,
                                keep_front=a.keep_front)
    return sched
