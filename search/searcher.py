"""The searcher: multi-objective Optuna behind Ray Tune, told the truth about every trial.

Measured traps handled here (../shared/notes/ray-tune.md): metric/mode go to the searcher as lists, never to
TuneConfig (which would silently make the search single-objective); a trial ASHA stopped early reaches the searcher
as a normal completion, so `PlanSearcher` tells Optuna PRUNED instead, FAIL for errors and diverged trials, and never
trains a plan over the budget (it is told FAIL, marked "rejected", and a new one is asked for).

The study lives in a journal file next to the results (`<run>/optuna_study.journal`, Optuna's JournalStorage:
append-only, every write flushed to disk), so `optuna.load_study` and `optuna-dashboard` read a running or
finished search, and a killed driver loses nothing it told Optuna. `--resume` re-attaches the restored searcher to
that journal (`PlanSearcher.attach_journal`): trials are never copied twice, trials a killed driver left RUNNING that
the resumed search will not rerun are closed as FAIL ("orphaned"), and a searcher saved by a release without a
journal (an in-memory study) gets one, with every trial it knew.
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from kron.vocab import SIZE_AXES

from .config import SearchConfig
from .trainable import trial_outcome

if TYPE_CHECKING:
    from .space import SearchSpace

__all__ = ["STUDY_JOURNAL", "PlanSearcher", "journal_storage", "load_journal_study", "make_sampler", "resumed_space",
           "make_searcher", "resuming_into"]

STUDY_JOURNAL = "optuna_study.journal"  # the Optuna study of a search, in its run folder
# Plans asked of Optuna per trial before the rest of the `max_resamples` draws come from the space's own sampler.
# TPE that has learnt "fewer decomposed layers, fewer parameters" can keep proposing the empty plan (or one over the
# budget); a rejected plan teaches it nothing (told FAIL), so it asked again and again, up to max_resamples times a
# trial, each ask a FAIL trial in the study: in a 200-trial search the study, the journal and every later ask grew
# with them (benchmarks/search_scale.py: 631 rejected asks after 12 trials, 3 s per suggestion).
OPTUNA_RESAMPLES = 8
# set by run_search around a resumed search: (journal path, study name) the restored searcher re-attaches to, and
# the space rebuilt from the config that restored searchers and schedulers use instead of the one they pickled
_RESUME: tuple[str, str, object] | None = None

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
                 max_resamples: int = 200, initial_params: list[dict] | None = None, journal: Path | None = None,
                 study_name: str | None = None):
        super().__init__(space=space.define_by_run, metric=metric, mode=mode, sampler=sampler,
                         points_to_evaluate=[dict(p) for p in initial_params or []] or None,
                         storage=journal_storage(journal) if journal is not None else None, study_name=study_name)
        self.journal_path = str(journal) if journal is not None else None
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
        params = last = duplicate = drawn = None
        rng = random.Random(f"fallback:{trial_id}")
        for attempt in range(self.max_resamples):
            from_optuna = attempt < OPTUNA_RESAMPLES
            if from_optuna:
                ot_trial = self._ot_study.ask()
                last = self._suggest_from_define_by_run_func(self._space, ot_trial)
            else:  # Optuna keeps proposing plans that cannot run: draw from the space (no Optuna trial per draw)
                last = space.sample(rng)
            reasons = space.rejection_reasons(last)
            if not reasons and self._plan_key(last) not in self._seen:
                params, drawn = (last, None) if from_optuna else (None, last)
                break
            if not from_optuna:
                continue
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
        if params is None and drawn is None and duplicate is not None:  # a small space, nearly exhausted
            last = duplicate
        if params is None:
            fixed = drawn if drawn is not None else space.repair(last) if space.rejection_reasons(last) else last
            self._ot_study.enqueue_trial(fixed, user_attrs={"repaired": drawn is None and fixed is not last,
                                                            "drawn_at_random": drawn is not None},
                                         skip_if_exists=False)
            ot_trial = self._ot_study.ask()
            params = self._suggest_from_define_by_run_func(self._space, ot_trial)
            self.repaired += drawn is None and fixed is not last
        self._seen.add(self._plan_key(params))
        ot_trial.set_user_attr("ray_trial_id", trial_id)
        self._ot_trials[trial_id] = ot_trial
        return {**unflatten_dict(params), **self._plan_info(params)}

    def _plan_info(self, params: dict) -> dict:
        """The plan's summary and sizes, added to the trial's Ray config (not to Optuna's parameters) so that
        every experiment tracker records them with the sampled parameters; the trainable ignores them."""
        try:
            costs = self.plan_space.plan_costs(params)
            text = self.plan_space.describe(params)
        except Exception:  # never fail a suggestion for a label
            return {}
        return {"plan_summary": text if len(text) <= 250 else text[:247] + "...",
                **{f"plan_{axis}": int(costs[axis]) for axis in SIZE_AXES},
                "plan_compression_ratio": round(float(costs["compression_ratio"]), 4)}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        return  # multi-objective Optuna keeps no intermediate values; ASHA is the early stopper

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        import optuna

        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        ot_trial = self._ot_trials[trial_id]
        outcome, values = trial_outcome(result, error, self._metric if isinstance(self._metric, list) else
                                   [self._metric], self.max_t)
        state = {"complete": optuna.trial.TrialState.COMPLETE, "pruned": optuna.trial.TrialState.PRUNED,
                 "fail": optuna.trial.TrialState.FAIL}[outcome]
        try:
            if self._ot_study._storage.get_trial(ot_trial._trial_id).state.is_finished():
                # told before a kill that the saved searcher state did not see; the journal keeps that answer (a
                # finished trial takes no more attributes either: Optuna raises UpdateFinishedTrialError)
                log.info("trial %s was already told to Optuna", trial_id)
                self._completed_trials.add(trial_id)
                return
            ot_trial.set_user_attr("outcome", outcome)
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

    def restore(self, checkpoint_path: str):
        super().restore(checkpoint_path)
        self.__setstate__({})  # the state just loaded holds the space it pickled: use the rebuilt one
        if _RESUME is not None:
            self.attach_journal(Path(_RESUME[0]), _RESUME[1])

    def __setstate__(self, state: dict) -> None:
        """Unpickled (tuner.pkl) or restored: the space is the one `resuming_into` gives, built from the search's
        config by this release, not the pickled object (whose layout an earlier release wrote; the resume check has
        made sure the config is the same)."""
        self.__dict__.update(state)
        space = resumed_space(None)
        if space is not None:
            self.plan_space = space
            self._space = space.define_by_run

    def attach_journal(self, path: Path, study_name: str) -> None:
        """Point the (restored) searcher's study at the journal `path`: the study already there when it has one
        named `study_name`, else a new one holding every trial of the restored study (a searcher saved without a
        journal, or a journal that was not copied along). Trials left RUNNING there that the resumed search will
        not finish (asked for by a driver killed before it saved its state) are closed as FAIL ("orphaned")."""
        import optuna

        old = self._ot_study
        path = Path(path)
        _repair_journal(path)
        storage = journal_storage(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            names = {st.study_name for st in storage.get_all_studies()}
            if study_name in names:
                new = optuna.load_study(study_name=study_name, storage=storage, sampler=old.sampler,
                                        pruner=old.pruner)
            else:
                try:
                    trials = old.get_trials(deepcopy=True)
                except Exception as exc:  # the old journal is gone: the resumed search starts a new history
                    log.warning("the searcher's saved Optuna trials cannot be read (%s); %s starts empty", exc, path)
                    trials = []
                new = optuna.create_study(storage=storage, study_name=study_name, directions=old.directions,
                                          sampler=old.sampler, pruner=old.pruner)
                new.add_trials(trials)
        ids = {t.number: t._trial_id for t in new.get_trials(deepcopy=False)}
        for ot_trial in self._ot_trials.values():  # optuna.trial.Trial handles of the trials Ray knows
            number = ot_trial._cached_frozen_trial.number
            if number in ids:
                ot_trial.study, ot_trial.storage, ot_trial._trial_id = new, new._storage, ids[number]
                ot_trial._cached_frozen_trial = new._storage.get_trial(ids[number])
        live = {t._trial_id for rid, t in self._ot_trials.items() if rid not in self._completed_trials}
        for t in new.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            if t._trial_id not in live:
                new._storage.set_trial_user_attr(t._trial_id, "orphaned", "asked for by a search driver that was "
                                                 "killed before it saved its state; not rerun")
                new.tell(t.number, state=optuna.trial.TrialState.FAIL)
        self._ot_study, self._storage, self._study_name = new, new._storage, study_name
        self.journal_path = str(path)


def journal_storage(path: Path):
    """Optuna's JournalStorage on the file `path` (created if missing)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(path)))


def load_journal_study(path: Path, study_name: str | None = None):
    """The study in the journal `path` (the only one there when `study_name` is None), or None without one."""
    import optuna

    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return None
    storage = journal_storage(path)
    names = [st.study_name for st in storage.get_all_studies()]
    if not names:
        return None
    name = study_name if study_name in names else names[-1]
    return optuna.load_study(study_name=name, storage=storage)


def _repair_journal(path: Path) -> None:
    """Make a journal a killed driver left behind appendable again: drop a last line cut short by the kill (it
    was never acknowledged; appending after it would corrupt the next record) and a stale lock link."""
    lock = Path(f"{path}.lock")
    if lock.is_symlink() or lock.exists():
        with contextlib.suppress(OSError):
            lock.unlink()
    if not path.is_file():
        return
    with open(path, "rb+") as fh:
        data = fh.read()
        if data and not data.endswith(b"\n"):
            fh.truncate(data.rfind(b"\n") + 1)
            fh.flush()
            os.fsync(fh.fileno())


@contextlib.contextmanager
def resuming_into(path: Path, study_name: str, space=None):
    """While active, a searcher Ray restores from its saved state re-attaches to the journal `path`, and restored
    searchers and schedulers use `space` (when given) instead of the space they pickled."""
    global _RESUME
    _RESUME = (str(path), study_name, space)
    try:
        yield
    finally:
        _RESUME = None


def resumed_space(default):
    """The space of the search being resumed (`resuming_into`), else `default`."""
    return _RESUME[2] if _RESUME is not None and _RESUME[2] is not None else default


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


def make_searcher(cfg: SearchConfig, space: SearchSpace, initial_params: list[dict] | None = None,
                  journal: Path | None = None) -> PlanSearcher:
    """The search's `PlanSearcher` over all its objectives; `initial_params` are evaluated first. With `journal`
    the study (named after the search) is kept in that file; a journal left there by a search that never got as
    far as saving its state is moved aside first."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    metrics, modes = cfg.objective_metrics()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if journal is not None:
            _repair_journal(journal)
            if journal.is_file() and journal.stat().st_size:
                journal.rename(journal.with_name(f"{journal.name}.stale-{int(journal.stat().st_mtime)}"))
        return PlanSearcher(space, metric=metrics, mode=modes, sampler=make_sampler(cfg), max_t=cfg.asha_max_t,
                            max_resamples=cfg.search.max_resamples, initial_params=initial_params, journal=journal,
                            study_name=cfg.name if journal is not None else None)
