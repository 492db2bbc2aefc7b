"""Ray Tune + Optuna wiring: `run_search` runs (or resumes) a multi-objective plan search with ASHA early stopping.

This module is the orchestrator; each part it puts together has its own module:
`search.trainable` (the Ray trainable and its metrics), `search.searcher` (Optuna, told PRUNED/FAIL truthfully),
`search.scheduler` (ASHA within size strata), `search.progress` (console lines), `search.raystart` (Ray start-up),
`search.storage` (local or remote experiments), `search.resume` (search_meta.json and --resume checks),
`search.tracking` (TensorBoard / MLflow / W&B logger callbacks, `search.loggers`), `search.trialstate` (what Ray
Tune keeps of ended trials, trimmed),
`search.reference` (the driver's data preparation and the teacher reference) and `search.finalize` (trial
statuses and the Optuna export after the fit).

Measured traps handled (../shared/notes/ray-tune.md): no metric/mode in TuneConfig (it would make the searcher
single-objective); Ctrl-C makes `Tuner.fit()` return normally, so the saved trial states are checked and unfinished
trials reported; every trial sets its torch threads and actors are reused, so torch/transformers and the teacher
load once per worker.
"""
from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

from kron.errors import ConfigError, DiskFullError, disk_full
from kron.vocab import META_NAME, SUMMARY_NAME

from .config import SearchConfig, is_remote_storage, with_search_defaults
from .finalize import SearchOutcome, finalize_experiment
from .progress import ProgressCallback  # noqa: F401 (also re-exported, see below)
from .raystart import ray_env, ray_running, start_ray
from .reference import prepare_locally, run_teacher_reference
from .resume import (adopt_saved_defaults, check_remote_resume, check_resume, refuse_failed_restore, unfinished,
                     write_meta)
from .scheduler import ParetoAwareASHA, SizeStratifiedASHA, make_scheduler
from .prepare import prepare_space
from .lock import search_lock
from .statesign import StateSigner, check_state, sign_state
from .searcher import STUDY_JOURNAL, PlanSearcher, make_searcher, resuming_into
from .space import SearchSpace
from .storage import (download_file, experiment_path, local_experiment_dir, remote_experiment_exists, storage_args,
                      upload)
from .tracking import check_loggers, logger_callbacks
from .trainable import TrialSetup, make_trainable, trainable
from .trialstate import StopOnFullDisk, TrimEndedTrials, quiet_full_disk_errors, take_full_disk

__all__ = ["run_search"]
# Ray pickles the searcher (and the scheduler, callbacks, trial set-up) into tuner.pkl by module path: searches
# written before these classes had modules of their own name them `search.tuner.<class>`, and `--resume` unpickles
# them. Kept importable from here for that reason only; new code imports them from their modules.
_PICKLED_BY_EARLIER_RELEASES = (PlanSearcher, SizeStratifiedASHA, ProgressCallback, TrialSetup, trainable)


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def check_experiment_folder(cfg: SearchConfig, resume: bool) -> tuple[str, bool, Path]:
    """(experiment path, remote?, local folder) after the checks that need neither the model nor Ray: with `resume`,
    an experiment to resume whose config matches; without, no experiment of that name already there. ConfigError
    otherwise. `kronsearch search` calls it before building the space too (whose sensitivity profile can take
    minutes), so that a mistaken --resume or a name already used fails at once."""
    path = experiment_path(cfg)
    remote = is_remote_storage(cfg.search.storage)
    local_dir = local_experiment_dir(cfg)
    if resume:
        if remote:
            check_remote_resume(cfg, path)
        else:
            check_resume(cfg, local_dir)
    elif (not remote and local_dir.exists() and any(local_dir.glob("experiment_state-*.json"))) or (
            remote and remote_experiment_exists(path)):
        raise ConfigError(f"an experiment named {cfg.name!r} already exists in {cfg.search.storage}; pass --resume "
                          "to continue it, or --name to start a new one")
    return path, remote, local_dir


def run_search(cfg: SearchConfig, space: SearchSpace | None = None, *, resume: bool = False, stream=None,
               keep_ray: bool = False, initial_params: list[dict] | None = None,
               callbacks: list | None = None, trust_state: bool = False) -> SearchOutcome:
    """Run (or resume) a search and post-process its trial summaries; returns what happened.

    trust_state: resume without checking the state files' signatures (`search.statesign`) — for a folder the
    user trusts that this kronsearch did not sign (an earlier release's, another machine's).

    initial_params: plans (parameter dicts as `SearchSpace.sample` returns) to evaluate first, e.g. a known good
    configuration to start the search from.
    callbacks: extra Ray Tune callbacks (new searches only), e.g. for timing.
    Raises ConfigError before Ray starts when the config, the space or the budget is invalid, or when
    `resume` finds nothing to resume. Ray is shut down at the end if it was started here (unless keep_ray).
    """
    # one process per search folder, from its checks to its end; Ray's tracebacks of a full disk left out
    with search_lock(local_experiment_dir(cfg), cfg.name, stream), quiet_full_disk_errors():
        return _run_search(cfg, space, resume=resume, stream=stream, keep_ray=keep_ray,
                           initial_params=initial_params, callbacks=callbacks, trust_state=trust_state)


def _run_search(cfg: SearchConfig, space: SearchSpace | None, *, resume: bool, stream, keep_ray: bool,
                initial_params: list[dict] | None, callbacks: list | None, trust_state: bool) -> SearchOutcome:
    t0 = time.time()
    if resume:  # a search an earlier release started keeps the defaults it ran with
        adopted = adopt_saved_defaults(cfg, stream)
        if adopted is not cfg:
            cfg, space = adopted, None
    path, remote, local_dir = check_experiment_folder(cfg, resume)  # before the space: its profile takes minutes
    if resume and not trust_state:
        check_state(path)  # Ray's restore unpickles these files: only ones this user's kronsearch signed
    space = prepare_space(cfg, SearchSpace.from_config(cfg) if space is None else space, stream)
    if not resume and space.seeds:  # seed plans first (a resumed searcher keeps its own queue)
        initial_params = [p for _, p in space.seeds] + list(initial_params or [])
    _validate_plan_format(cfg, space)
    loggers = cfg.search.logger_names
    if not resume:  # a resumed search keeps the loggers it was started with (Ray restores its callbacks)
        check_loggers(loggers, local_dir)  # a missing extra or an unwritable folder: before any work
    timings: dict[str, float] = {"validate_s": time.time() - t0}
    # before a local Ray: the data once here instead of in every fresh worker at the same time, and the teacher
    # reference in this process instead of in a worker of its own after the search
    prepared = not remote and not cfg.search.address and not ray_running()
    if prepared:
        timings.update(prepare_locally(cfg, local_dir, stream))
    ray_env()
    from .raystart import set_checkpoint_period

    set_checkpoint_period(cfg.search.num_samples)  # experiment-state saves: less often in long searches
    t_ray = time.time()
    started = start_ray(cfg)
    timings["ray_start_s"] = time.time() - t_ray
    try:
        from ray import tune

        # a restored searcher re-attaches to its journal; restored searchers and schedulers use this space
        with resuming_into(local_dir / STUDY_JOURNAL, cfg.name, space if resume else None):
            if resume:
                where = storage_args(path)
                fs = where.get("storage_filesystem")
                if not tune.Tuner.can_restore(where["storage_path"], storage_filesystem=fs):
                    raise ConfigError(f"--resume: nothing to resume at {path} (no experiment state); run without "
                                      "--resume to start the search")
                tuner = tune.Tuner.restore(where["storage_path"], trainable=make_trainable(cfg, space),
                                           resume_unfinished=True, resume_errored=False, restart_errored=False,
                                           storage_filesystem=fs)
                journal = local_dir / STUDY_JOURNAL
                if remote and not journal.is_file():  # another machine started it: continue the bucket's journal
                    local_dir.mkdir(parents=True, exist_ok=True)
                    download_file(path, STUDY_JOURNAL, local_dir)
            else:
                local_dir.mkdir(parents=True, exist_ok=True)
                write_meta(cfg, space, local_dir)
                if remote:  # in the bucket from the start: a later --resume checks the config against it
                    upload(local_dir, path, [META_NAME])
                tuner = _new_tuner(cfg, space, stream, initial_params, callbacks, spent_s=time.time() - t0,
                                   local_dir=local_dir)
            t_fit = time.time()
            take_full_disk()  # clears what an earlier search in this process may have left
            full = None
            try:
                with refuse_failed_restore(str(path)) if resume else contextlib.nullcontext():
                    grid = tuner.fit()
                full = take_full_disk()  # the search ended early because a trial found the disk full
            except Exception as exc:
                full = disk_full(exc)
                if full is None:
                    raise
            finally:  # finished or interrupted: the state it leaves is signed for the next --resume
                try:
                    sign_state(path)
                    unsigned = False
                except OSError as exc:
                    unsigned = True
                    if full is None:
                        print(f"search {cfg.name}: warning: could not sign its state ({exc}); a --resume will "
                              "need --trust-state", file=stream or sys.stderr)
            if full is not None:  # one line, exit 2: the trials that finished stay, a --resume goes on
                raise DiskFullError(f"the disk is full: {full}; the search stopped, the trials that finished are "
                                    "kept: free space and run it again with --resume"
                                    + (" --trust-state (its state could not be signed)" if unsigned else ""))
        timings["fit_s"] = time.time() - t_fit
        if cfg.search.reference and not remote and not prepared and not unfinished(local_dir):
            t_ref = time.time()  # Ray already running here, or a cluster: the reference as a Ray task
            if run_teacher_reference(cfg, local_dir, stream) is not None:
                timings["reference_s"] = time.time() - t_ref
    finally:
        if started and not keep_ray:
            import ray

            ray.shutdown()
    outcome = finalize_experiment(cfg, space, grid, local_dir=local_dir)
    outcome.wall_time_s = time.time() - t0
    outcome.timings = {k: round(v, 3) for k, v in timings.items()}
    if remote:  # what the driver wrote or patched goes back next to Ray's files, for anyone reading the bucket
        write_meta(cfg, space, local_dir)
        upload(local_dir, experiment_path(cfg), [META_NAME, "optuna_trials.json", STUDY_JOURNAL, f"*/{SUMMARY_NAME}"])
    return outcome


def _new_tuner(cfg: SearchConfig, space: SearchSpace, stream, initial_params=None, callbacks=None,
               spent_s: float = 0.0, local_dir: Path | None = None):
    """spent_s: seconds of the search's wall-time budget already used (validation, data, Ray start-up).
    local_dir: the run folder (the driver's mirror for remote storage): the Optuna journal and the trackers' files."""
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    s = cfg.search
    trial = cfg.trial
    local_dir = Path(local_dir) if local_dir is not None else Path(experiment_path(cfg))
    searcher = make_searcher(cfg, space, initial_params, journal=local_dir / STUDY_JOURNAL)
    scheduler = make_scheduler(cfg, space)
    if isinstance(scheduler, (SizeStratifiedASHA, ParetoAwareASHA)):
        print(scheduler.describe(), file=stream or sys.stdout, flush=True)
    from .prior import teacher_size

    progress = ProgressCallback(quality_name=trial.quality_name, quality_mode=trial.quality_mode,
                                teacher_params=space.info.params, max_t=cfg.asha_max_t, stream=stream,
                                size_metric=cfg.size_metric, teacher_size=teacher_size(space, cfg.size_metric))
    tune_config = tune.TuneConfig(
        search_alg=searcher, scheduler=scheduler, num_samples=s.num_samples, max_concurrent_trials=s.max_concurrent,
        reuse_actors=True,
        time_budget_s=max(1.0, s.time_budget_minutes * 60 - spent_s) if s.time_budget_minutes else None,
        trial_name_creator=_trial_dirname, trial_dirname_creator=_trial_dirname,
    )  # no metric/mode here: it would make the searcher single-objective
    run_config = tune.RunConfig(
        name=cfg.name, **storage_args(cfg.search.storage), verbose=0,
        callbacks=[progress, JsonLoggerCallback(), CSVLoggerCallback(),
                   *logger_callbacks(cfg.search.logger_names, cfg.name, local_dir), *(callbacks or []),
                   StateSigner(experiment_path(cfg)), StopOnFullDisk(),
                   TrimEndedTrials()],  # last: the others see an ended trial's state untrimmed
        failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
        sync_config=tune.SyncConfig(sync_artifacts=is_remote_storage(cfg.search.storage)),
    )
    return tune.Tuner(make_trainable(cfg, space), tune_config=tune_config, run_config=run_config)


def _validate_plan_format(cfg: SearchConfig, space: SearchSpace) -> None:
    """Check, before Ray starts, that the trials' configs and plans are accepted (one sampled plan, the trial
    config validator and the plan resolver on the meta-device teacher)."""
    from kron.plan import CompressionPlan
    from trials.config import load_trial_config

    from .space import teacher_skeleton

    params = space.sample_within_budget(0) if space.budget is not None else space.sample(0)
    trial = load_trial_config({**with_search_defaults(cfg.trial_section), "plan": {"rules": space.to_plan_rules(params)}})
    plan = CompressionPlan.from_dict({"rules": trial.plan.rules})
    plan.resolve(teacher_skeleton(trial))
