"""Ray Tune + Optuna wiring: multi-objective plan search with ASHA early stopping, resumable.

Measured traps this module handles (../shared/notes/ray-tune.md):
* metric/mode go to the searcher (lists) and to ASHA (one scalar), never to TuneConfig, which would silently make
  the search single-objective;
* a trial ASHA stopped early reaches the searcher as a normal completion: `PlanSearcher` tells Optuna PRUNED
  instead, FAIL for errors and diverged trials, and never trains a plan over the budget (it is told FAIL, marked
  "rejected", and a new one is asked for);
* Ctrl-C makes `Tuner.fit()` return normally: `run_search` checks the trial states and says what is unfinished;
* every trial calls `torch.set_num_threads` with its CPU share, and actors are reused so torch/transformers and
  the teacher are loaded once per worker.

`trainable` is the Ray function trainable; it is a thin wrapper around `trials.trial.run_trial`.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kron.errors import CheckpointError, ConfigError, UserError
from kron.fsutil import atomic_write_json

from .config import SearchConfig, base_trial_config, config_fingerprint, is_remote_storage
from .space import SearchSpace

__all__ = [
    "PlanSearcher",
    "ProgressCallback",
    "SearchOutcome",
    "TrialSetup",
    "experiment_path",
    "finalize_experiment",
    "make_searcher",
    "prepare_locally",
    "run_search",
    "start_ray",
    "trainable",
]

log = logging.getLogger(__name__)

META_NAME = "search_meta.json"
SUMMARY_NAME = "trial_summary.json"
TIME_ATTR = "search_step"  # steps of the final stage: the clock ASHA and the searcher read
FINISHED = "trial_finished"  # set on the one result a trial reports after run_trial returned

# Environment for the driver and (inherited) local workers: quiet, offline-friendly Ray.
RAY_ENV = {
    "RAY_AUTH_MODE": "disabled",  # no token file, no warning on every init
    "RAY_USAGE_STATS_ENABLED": "0",  # no usage reporting attempts
    "RAY_AIR_NEW_OUTPUT": "0",  # the legacy reporter honours verbose=0; our callback prints the progress
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",  # JSON + CSV loggers are added explicitly (no TensorBoard files)
    "TUNE_GLOBAL_CHECKPOINT_S": "2",  # experiment state saved often, so a killed driver loses little
    "TUNE_FUNCTION_THREAD_TIMEOUT_S": "30",  # time a reused actor waits for a stopped trial to reach a report
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "100",
    "TUNE_RESULT_BUFFER_LENGTH": "1",  # results reach the console as they happen, not in bursts
    "TOKENIZERS_PARALLELISM": "false",
}


# ----------------------------------------------------------------------------------------------- trainable


@dataclass
class TrialSetup:
    """Everything a trial needs besides its sampled parameters (shipped once through the object store)."""

    name: str
    base_trial: dict  # TrialConfig dict without `plan`
    space: SearchSpace
    cpus: float
    final_stage: str  # "lm" or "glue"
    experiment_dir: str | None  # local experiment folder, or None for remote storage (write to the trial dir)
    max_t: int | None  # ASHA's max_t (None: no ASHA)
    fault_inject: str | None = None  # testing aid: the driver's KRONSEARCH_FAULT_INJECT, for the workers


def _threads(cpus: float) -> int:
    return max(1, int(cpus))


def trainable(config: dict, setup: TrialSetup) -> None:
    """Ray function trainable: one compression trial for the plan sampled in `config`.

    Reports every evaluation of `trials.run_trial` to Ray with `quality` = the best quality of the final stage so
    far (NaN before that stage starts), `search_step` = steps into the final stage, the size metrics, and one last
    result flagged `trial_finished` once run_trial has returned (so a trial that ends on its own is told apart from
    one the scheduler stopped).
    """
    t_enter = time.time()
    import torch
    import transformers  # noqa: F401  (imported here so the timing below separates imports from set-up)
    from ray import tune

    from trials.trial import run_trial

    t_imported = time.time()
    torch.set_num_threads(_threads(setup.cpus))
    # testing aid (trials.trial._fault_inject): a reused worker follows the driver of the search it now runs
    if setup.fault_inject:
        os.environ["KRONSEARCH_FAULT_INJECT"] = setup.fault_inject
    else:
        os.environ.pop("KRONSEARCH_FAULT_INJECT", None)
    space = setup.space
    params = {k: config[k] for k in space.param_names() if k in config}
    costs = space.plan_costs(params)
    context = tune.get_context()
    trial_id = context.get_trial_id()
    trial_dir = Path(context.get_trial_dir())
    if setup.experiment_dir:  # local storage: straight into the experiment folder, visible at once
        out_dir = Path(setup.experiment_dir) / trial_dir.name
    else:  # remote storage: the trial's working directory, which Ray uploads (SyncConfig(sync_artifacts=True))
        out_dir = Path.cwd() if Path.cwd().name == trial_dir.name else trial_dir
    trial_cfg = {**setup.base_trial, "name": trial_id, "threads": _threads(setup.cpus),
                 "plan": {"rules": space.to_plan_rules(params)}}

    state: dict[str, Any] = {"offset": None, "last": None}
    timing = {"trial_started_at": t_enter, "trial_imported_at": t_imported, "worker_started_at": _process_start(),
              "worker_pid": os.getpid()}

    def report(metrics: dict, checkpoint_dir=None) -> None:
        m = _search_metrics(metrics, costs, setup.final_stage, state)
        m.update(timing, reported_at=time.time())  # for overhead accounting (benchmarks/search_overhead.py)
        state["last"] = m
        tune.report(m)

    summary = run_trial(trial_cfg, report=report, output_dir=out_dir, progress=False)
    final = dict(state["last"] or {})
    if summary.get("quality") is not None:
        final["quality"] = float(summary["quality"])
    for k, v in costs.items():
        final.setdefault(k, v)
    final.setdefault("quality", math.nan)
    final.setdefault(TIME_ATTR, 0)
    final.setdefault("latency_us_per_token", math.nan)
    final[FINISHED] = True
    final["trial_status"] = summary.get("status", "complete")
    final.update(timing, reported_at=time.time())
    tune.report(final)


def _process_start() -> float | None:
    """When this worker process started (epoch seconds; Linux /proc), to tell fresh workers from reused ones."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22 of stat: start time in clock ticks after boot
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _search_metrics(metrics: dict, costs: dict, final_stage: str, state: dict) -> dict:
    """The trial's evaluation record, with the searched objectives under their metric names."""
    m = {k: v for k, v in metrics.items() if v is None or isinstance(v, (int, float, str, bool))}
    m["eval_quality"] = metrics.get("quality")
    if metrics.get("stage") == final_stage:
        if state["offset"] is None:
            state["offset"] = int(metrics.get("step", 0))
        m[TIME_ATTR] = int(metrics.get("step", 0)) - state["offset"]
        best = metrics.get("best_quality")
        m["quality"] = float(best if best is not None else metrics.get("quality", math.nan))
    else:  # an earlier stage: its quality is another metric (perplexity before a GLUE stage)
        m[TIME_ATTR] = 0
        m["quality"] = math.nan
    if m["quality"] is None:
        m["quality"] = math.nan
    # the size metrics are fixed by the plan; take the analytic ones where the trial did not report them
    reported = metrics.get("params")
    if reported is not None and int(reported) != costs["params"]:
        print(f"kronsearch: warning: trial reports {reported} parameters, the space predicted {costs['params']}",
              file=sys.stderr)
    for k in ("params", "params_excl_output_embedding", "macs_per_token", "compression_ratio"):
        if m.get(k) is None:
            m[k] = costs[k]
    tput = metrics.get("throughput_tokens_per_s")
    m["latency_us_per_token"] = 1e6 / tput if tput else math.nan
    return m


# ----------------------------------------------------------------------------------------------- searcher


def _outcome(result: dict | None, error: bool, metrics: list[str], max_t: int | None) -> tuple[str, list | None]:
    """("complete" | "pruned" | "fail", objective values) of a trial the way Optuna should hear it."""
    if error:
        return "fail", None
    if not result:
        return "pruned", None
    if result.get("trial_status") in ("diverged", "error"):
        return "fail", None
    finished = bool(result.get(FINISHED)) or (max_t is not None and (result.get(TIME_ATTR) or 0) >= max_t)
    if not finished:
        return "pruned", None
    values = []
    for name in metrics:
        v = result.get(name)
        try:
            v = float(v)
        except (TypeError, ValueError):
            return "fail", None
        if not math.isfinite(v):
            return "fail", None
        values.append(v)
    return "complete", values


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
        outcome, values = _outcome(result, error, self._metric if isinstance(self._metric, list) else
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


def _scheduler_base():
    from ray.tune.schedulers import FIFOScheduler

    return FIFOScheduler


class SizeStratifiedASHA(_scheduler_base()):
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
        hi = max(space._teacher_value(size_metric), lo + 1)  # noqa: SLF001
        if space.budget is not None:
            limit = {"params": space.budget.max_params, "macs_per_token": space.budget.max_macs,
                     "params_excl_output_embedding": space.budget.max_params_excl_output_embedding}[size_metric]
            if limit is not None:
                hi = max(min(hi, limit), lo + 1)
        self.edges = [math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * i / n) for i in range(1, n)]
        self.strata = [ASHAScheduler(metric=metric, mode=mode, time_attr=time_attr, max_t=max_t,
                                     grace_period=grace_period, reduction_factor=reduction_factor,
                                     stop_last_trials=stop_last_trials) for _ in range(n)]
        self._of: dict[str, int] = {}

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True  # metric and mode are fixed at construction

    def stratum(self, config: dict) -> int:
        params = {k: config[k] for k in self.space.param_names() if k in config}
        value = self.space.plan_costs(params)[self.size_metric]
        return sum(value > e for e in self.edges)

    def describe(self) -> str:
        names = {"params": "params", "params_excl_output_embedding": "params excl. output embedding",
                 "macs_per_token": "MACs/token"}
        edges = [_fmt_n(e) for e in self.edges]
        cells = [f"<{edges[0]}"] + [f"{a}-{b}" for a, b in zip(edges, edges[1:])] + [f">{edges[-1]}"]
        return f"ASHA within {self.n} {names[self.size_metric]} strata: " + ", ".join(cells)

    def _sched(self, trial):
        if trial.trial_id not in self._of:
            self._of[trial.trial_id] = self.stratum(trial.config)
        return self.strata[self._of[trial.trial_id]]

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

    def debug_string(self) -> str:
        return "\n".join(f"stratum {i}: {s.debug_string()}" for i, s in enumerate(self.strata))


def make_sampler(cfg: SearchConfig):
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
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    metrics, modes = cfg.objective_metrics()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return PlanSearcher(space, metric=metrics, mode=modes, sampler=make_sampler(cfg), max_t=cfg.asha_max_t,
                            max_resamples=cfg.search.max_resamples, initial_params=initial_params)


# ----------------------------------------------------------------------------------------------- progress


def _callback_base():
    from ray.tune import Callback

    return Callback


class ProgressCallback(_callback_base()):
    """One console line per event: a trial started, evaluated, finished, was pruned or failed; with the counts
    and the best quality so far per size bucket (tenths of the teacher's parameter count)."""

    def __init__(self, *, quality_name: str, quality_mode: str, teacher_params: int, max_t: int | None,
                 stream=None):
        self.quality_name, self.quality_mode = quality_name, quality_mode
        self.teacher_params = max(int(teacher_params), 1)
        self.max_t = max_t
        self.stream = stream
        self._reset()

    def _reset(self):
        self.t0 = time.time()
        self.running: set[str] = set()
        self.counts = {"complete": 0, "pruned": 0, "fail": 0}
        self.best: dict[int, float] = {}
        self.numbers: dict[str, int] = {}

    def __getstate__(self):  # pickled into tuner.pkl: no stream handle
        d = dict(self.__dict__)
        d["stream"] = None
        return d

    def setup(self, stop=None, num_samples=None, total_num_samples=None, **info):
        self._reset()
        self.total = total_num_samples

    def _print(self, text: str) -> None:
        elapsed = int(time.time() - self.t0)
        print(f"[{elapsed // 60:02d}:{elapsed % 60:02d}] {text}", file=self.stream or sys.stdout, flush=True)

    def _num(self, trial) -> str:
        if trial.trial_id not in self.numbers:
            self.numbers[trial.trial_id] = len(self.numbers) + 1
        return f"#{self.numbers[trial.trial_id]} {trial.trial_id}"

    def _bucket(self, params) -> int:
        return min(9, int(10 * float(params) / self.teacher_params))

    def _better(self, a: float, b: float | None) -> bool:
        return b is None or (a < b if self.quality_mode == "min" else a > b)

    def _status(self) -> str:
        c = self.counts
        text = f"running {len(self.running)}, done {c['complete']}, pruned {c['pruned']}, failed {c['fail']}"
        if self.best:
            cells = [f"{10 * b}-{10 * b + 10}%: {_fmt_q(q)}" for b, q in sorted(self.best.items())]
            text += f" | best {self.quality_name} by size: " + ", ".join(cells)
        return text

    def on_trial_start(self, iteration, trials, trial, **info):
        self.running.add(trial.trial_id)
        self._print(f"trial {self._num(trial)} started | {self._status()}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get(FINISHED):
            return
        q = result.get("quality")
        qtext = _fmt_q(q) if q is not None and math.isfinite(q) else f"({_fmt_q(result.get('eval_quality'))})"
        self._print(f"trial {self._num(trial)} step {result.get('step')} {self.quality_name} {qtext}, "
                    f"{_fmt_n(result.get('params'))} params ({_fmt_x(result.get('compression_ratio'))})")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        result = trial.last_result or {}
        outcome, _ = _outcome(result, False, ["quality"], self.max_t)
        self.counts[outcome] += 1
        q = result.get("quality")
        if outcome == "complete" and q is not None and math.isfinite(q) and result.get("params") is not None:
            b = self._bucket(result["params"])
            if self._better(q, self.best.get(b)):
                self.best[b] = q
        word = {"complete": "finished", "pruned": "pruned (stopped early)", "fail": "failed (diverged)"}[outcome]
        self._print(f"trial {self._num(trial)} {word} at step {result.get('step')}: {self.quality_name} "
                    f"{_fmt_q(q)} | {self._status()}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        self.counts["fail"] += 1
        self._print(f"trial {self._num(trial)} failed with an error (see its error.txt) | {self._status()}")


def _fmt_q(q) -> str:
    try:
        q = float(q)
    except (TypeError, ValueError):
        return "-"
    if not math.isfinite(q):
        return str(q)
    return f"{q:.4g}" if abs(q) < 1e5 else f"{q:.3e}"


def _fmt_n(n) -> str:
    if n is None:
        return "?"
    n = float(n)
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return f"{int(n)}"


def _fmt_x(x) -> str:
    try:
        return f"{float(x):.2f}x"
    except (TypeError, ValueError):
        return "?x"


# ----------------------------------------------------------------------------------------------- ray


def _ray_env() -> None:
    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)


def _repo_root_on_pythonpath() -> None:
    """Let local workers import kronsearch when it runs from a source tree that was never installed."""
    # this file's tree, not `search.__file__`: an editable install can make `search` a namespace package (no
    # __file__) when run from another directory
    root = str(Path(__file__).resolve().parents[1])
    if "site-packages" in root or "dist-packages" in root:
        return
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *paths])


def _ray_temp_dir(storage: str) -> str | None:
    """`<storage>/.ray` when the storage is local and that path is short enough for Ray's unix sockets."""
    if is_remote_storage(storage):
        return None
    path = Path(storage) / ".ray"
    # Ray's longest socket is <temp>/session_<date>_<time>_<us>_<pid>/sockets/plasma_store (~64 chars past <temp>)
    return str(path) if len(str(path)) <= 40 else None


def init_local_ray(num_cpus: int | None = None, temp_dir: str | None = None) -> None:
    """Start a local Ray the kronsearch way: no dashboard, worker logs not forwarded, quiet, offline-friendly, and
    the source tree importable by the workers."""
    _ray_env()
    import ray

    logging.getLogger("ray").setLevel(logging.WARNING)
    _repo_root_on_pythonpath()
    kwargs: dict[str, Any] = {"num_cpus": num_cpus or os.cpu_count(), "include_dashboard": False,
                              "log_to_driver": False, "logging_level": logging.WARNING}
    if temp_dir:
        Path(temp_dir).mkdir(parents=True, exist_ok=True)
        kwargs["_temp_dir"] = temp_dir
    ray.init(**kwargs)


def start_ray(cfg: SearchConfig) -> bool:
    """Start (or connect to) Ray unless it is running in this process already; returns True if started here."""
    _ray_env()
    import ray

    if ray.is_initialized():
        return False
    s = cfg.search
    if s.address:
        logging.getLogger("ray").setLevel(logging.WARNING)
        ray.init(address=s.address, log_to_driver=False, logging_level=logging.WARNING,
                 runtime_env={"env_vars": {k: v for k, v in RAY_ENV.items() if k.startswith(("TUNE_", "TOKEN"))}})
        return True
    init_local_ray(s.num_cpus, _ray_temp_dir(s.storage))
    return True


# ----------------------------------------------------------------------------------------------- the search


def experiment_path(cfg: SearchConfig) -> str:
    """`<storage>/<name>` (a local path or a URI; a URI's query, e.g. `?endpoint_override=host:9000&scheme=http`
    for MinIO or Ceph, stays at the end)."""
    storage, sep, query = cfg.search.storage.partition("?")
    return f"{storage.rstrip('/')}/{cfg.name}{sep}{query}"


def _storage_args(uri: str) -> dict:
    """Ray Tune's storage arguments for a local path or a URI. A URI is resolved to a pyarrow filesystem here, so
    that its query options (endpoint, scheme, region) reach every reader and writer, Ray's included."""
    if not is_remote_storage(uri):
        return {"storage_path": uri}
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    return {"storage_path": path, "storage_filesystem": fs}


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


@dataclass
class SearchOutcome:
    experiment: str  # experiment path or URI
    local_dir: Path  # local folder holding the trials' summaries (a download for remote storage)
    trials: list[dict] = field(default_factory=list)  # {trial_id, state, outcome, summary}
    interrupted: bool = False
    wall_time_s: float = 0.0
    study_trials: list[dict] = field(default_factory=list)
    rejected: int = 0
    timings: dict[str, float] = field(default_factory=dict)  # seconds: validate, teacher/data, reference, ray, fit


def _setup(cfg: SearchConfig, space: SearchSpace) -> TrialSetup:
    trial = base_trial_config(cfg)
    final_stage = "glue" if trial.stage2 is not None else "lm"
    remote = is_remote_storage(cfg.search.storage)
    return TrialSetup(name=cfg.name, base_trial=dict(cfg.trial), space=space, cpus=cfg.search.resources.cpu,
                      final_stage=final_stage, experiment_dir=None if remote else experiment_path(cfg),
                      max_t=cfg.asha_max_t, fault_inject=os.environ.get("KRONSEARCH_FAULT_INJECT") or None)


def _wrapped_trainable(cfg: SearchConfig, space: SearchSpace):
    from ray import tune

    r = cfg.search.resources
    resources = {"cpu": r.cpu, "gpu": r.gpu}
    return tune.with_resources(tune.with_parameters(trainable, setup=_setup(cfg, space)), resources)


def write_meta(cfg: SearchConfig, space: SearchSpace, local_dir: Path, *, extra: dict | None = None) -> Path:
    """`search_meta.json` at the experiment root: name, objectives with modes, method, the full config."""
    metrics, modes = cfg.objective_metrics()
    trial = base_trial_config(cfg)
    meta = {
        "name": cfg.name,
        "objectives": [{"name": o, "metric": m, "mode": d} for o, m, d in zip(cfg.search.objectives, metrics, modes)],
        "quality_name": trial.quality_name,
        "method": f"kronsearch search: {cfg.search.algorithm} (Optuna via Ray Tune)"
                  + (f", ASHA grace {cfg.search.asha.grace_period} rf {cfg.search.asha.reduction_factor} max_t "
                     f"{cfg.asha_max_t}" if cfg.search.asha else ", no early stopping"),
        "space_size": str(space.size()),
        "space_size_log10": round(space.size_log10(), 3),
        "teacher": {"params": space.info.params,
                    "params_excl_output_embedding": space.info.params_excl_output_embedding,
                    "macs_per_token": space.info.macs, "model_type": space.info.model_type},
        "config": cfg.model_dump(mode="json"),
        "fingerprint": config_fingerprint(cfg),
        "versions": _versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    meta.update(extra or {})
    return atomic_write_json(local_dir / META_NAME, meta)


def _versions() -> dict:
    out = {}
    for mod in ("ray", "optuna", "torch", "transformers"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            out[mod] = None
    return out


def _check_resume(cfg: SearchConfig, local_dir: Path) -> None:
    if not any(local_dir.glob("experiment_state-*.json")):  # checked here too, so that no Ray starts for nothing
        raise ConfigError(f"--resume: nothing to resume at {local_dir} (no experiment state); run without "
                          "--resume to start the search")
    meta_path = local_dir / META_NAME
    if meta_path.is_file():
        _check_fingerprint(cfg, meta_path.read_bytes, str(meta_path))


def _check_remote_resume(cfg: SearchConfig, uri: str) -> None:
    """The fingerprint check of `_check_resume` against the search_meta.json in a remote experiment, if any."""
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(uri)
    meta = f"{root}/{META_NAME}"
    try:
        if fs.get_file_info(meta).type != pyarrow.fs.FileType.File:
            return
    except OSError as exc:
        raise ConfigError(f"storage {uri!r} cannot be read: {exc}") from None

    def read() -> bytes:
        with fs.open_input_file(meta) as f:
            return f.read()

    _check_fingerprint(cfg, read, f"{uri.partition('?')[0]}/{META_NAME}")


def _check_fingerprint(cfg: SearchConfig, read, where: str) -> None:
    try:
        old = json.loads(read())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"--resume: {where} is truncated or corrupt ({exc}); it records the search's "
                              "config: restore it, or start a new search with --name") from None
    if not isinstance(old, dict):
        raise CheckpointError(f"--resume: {where} is corrupt (a JSON {type(old).__name__}, expected an object)")
    fp = old.get("fingerprint")
    new = json.loads(json.dumps(config_fingerprint(cfg)))
    if fp is not None and fp != new:
        changed = [k for k in ("trial", "space") if fp.get(k) != new.get(k)]
        raise ConfigError(f"--resume: the {' and '.join(changed)} section(s) of the config changed since the search "
                          f"{cfg.name!r} started; resume with the original config, or start a new search with --name")


def run_search(cfg: SearchConfig, space: SearchSpace | None = None, *, resume: bool = False, stream=None,
               keep_ray: bool = False, initial_params: list[dict] | None = None,
               callbacks: list | None = None) -> SearchOutcome:
    """Run (or resume) a search and post-process its trial summaries; returns what happened.

    initial_params: plans (parameter dicts as `SearchSpace.sample` returns) to evaluate first, e.g. a known good
    configuration to start the search from.
    callbacks: extra Ray Tune callbacks (new searches only), e.g. for timing.
    Raises ConfigError before Ray starts when the config, the space or the budget is invalid, or when
    `resume` finds nothing to resume. Ray is shut down at the end if it was started here (unless keep_ray).
    """
    t0 = time.time()
    if space is None:
        space = SearchSpace.from_config(cfg)
    _validate_plan_format(cfg, space)
    path = experiment_path(cfg)
    remote = is_remote_storage(cfg.search.storage)
    local_dir = Path(path) if not remote else _local_mirror(cfg)
    if resume:
        if remote:
            _check_remote_resume(cfg, path)
        else:
            _check_resume(cfg, local_dir)
    elif (not remote and local_dir.exists() and any(local_dir.glob("experiment_state-*.json"))) or (
            remote and _remote_experiment_exists(path)):
        raise ConfigError(f"an experiment named {cfg.name!r} already exists in {cfg.search.storage}; pass --resume "
                          "to continue it, or --name to start a new one")
    timings: dict[str, float] = {"validate_s": time.time() - t0}
    # before a local Ray: the data once here instead of in every fresh worker at the same time, and the teacher
    # reference in this process instead of in a worker of its own after the search
    prepared = not remote and not cfg.search.address and not _ray_running()
    if prepared:
        timings.update(prepare_locally(cfg, local_dir, stream))
    _ray_env()
    t_ray = time.time()
    started = start_ray(cfg)
    timings["ray_start_s"] = time.time() - t_ray
    try:
        from ray import tune

        if resume:
            where = _storage_args(path)
            fs = where.get("storage_filesystem")
            if not tune.Tuner.can_restore(where["storage_path"], storage_filesystem=fs):
                raise ConfigError(f"--resume: nothing to resume at {path} (no experiment state); run without "
                                  "--resume to start the search")
            tuner = tune.Tuner.restore(where["storage_path"], trainable=_wrapped_trainable(cfg, space),
                                       resume_unfinished=True, resume_errored=False, restart_errored=False,
                                       storage_filesystem=fs)
        else:
            local_dir.mkdir(parents=True, exist_ok=True)
            write_meta(cfg, space, local_dir)
            if remote:  # in the bucket from the start: a later --resume checks the config against it
                _upload(local_dir, path, [META_NAME])
            tuner = _new_tuner(cfg, space, stream, initial_params, callbacks, spent_s=time.time() - t0)
        t_fit = time.time()
        grid = tuner.fit()
        timings["fit_s"] = time.time() - t_fit
        if cfg.search.reference and not remote and not prepared and not _unfinished(local_dir):
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
        _upload(local_dir, experiment_path(cfg), [META_NAME, "optuna_trials.json", f"*/{SUMMARY_NAME}"])
    return outcome


REFERENCE_DIR = "reference_teacher"


def _ray_running() -> bool:
    import ray

    return ray.is_initialized()


def _prepare_device(cfg: SearchConfig) -> str:
    """The device the workers will use: "auto" means the CPU when the trials get no GPU from Ray."""
    device = cfg.trial.get("device") or "auto"
    return "cpu" if device == "auto" and not cfg.search.resources.gpu else device


def prepare_locally(cfg: SearchConfig, local_dir: Path, stream=None) -> dict[str, float]:
    """Work done once in the driver before a local Ray starts; returns its timings (seconds).

    * the teacher and every stage's data are loaded here (`trials.trial.prepare_data`), so the on-disk caches of
      teacher samples and token blocks exist before the workers start; without this each fresh worker built the
      same data at the same time in its first trial (~4 s per worker for the quickstart's samples on one core);
    * the teacher reference (the uncompressed teacher evaluated on the same data, `search.reference`) is run here
      with the process caches just filled, instead of in a fresh Ray worker after the search (~5 s);
    with the trial's thread count and device, so the data and the reference are the ones a worker would produce.
    Bad data (a missing corpus, an encoder with teacher samples) is reported here, before Ray starts. The driver's
    copies of the teacher and data are dropped afterwards (on a GPU the driver keeps its CUDA context). The time
    counts towards `search.time_budget_minutes`.
    """
    import gc

    import torch

    from trials.trial import clear_caches, prepare_data

    trial = base_trial_config(cfg)
    device = _prepare_device(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(_threads(cfg.search.resources.cpu))
    try:
        timings = prepare_data(trial, device=device)
        ref = local_dir / REFERENCE_DIR
        if cfg.search.reference and not (ref / SUMMARY_NAME).is_file():
            t0 = time.time()
            try:
                summary = _reference_task({**_reference_trial(cfg), "device": device}, str(ref))
            except UserError:
                raise
            except Exception as exc:  # the search's results stand on their own
                print(f"warning: the teacher reference evaluation failed: {_one_line(exc)}", file=stream or sys.stderr)
            else:
                _write_reference(cfg, ref, summary, stream)
                timings["reference_s"] = time.time() - t0
    finally:
        torch.set_num_threads(threads)
        clear_caches()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return timings


def _reference_trial(cfg: SearchConfig) -> dict:
    """The trial config of the teacher reference: the teacher itself, every stage with max_steps 0."""
    trial = base_trial_config(cfg).model_dump(mode="json")
    trial.update(method="teacher", plan=None, name="teacher", save_checkpoint=False,
                 threads=_threads(cfg.search.resources.cpu))
    for stage in ("stage1", "stage2"):
        if trial.get(stage) is not None:
            trial[stage] = {**trial[stage], "max_steps": 0}
    return trial


def _write_reference(cfg: SearchConfig, out: Path, summary: dict, stream=None) -> None:
    summary["search"] = cfg.name
    atomic_write_json(out / SUMMARY_NAME, summary)
    print(f"teacher reference: {summary.get('quality_name')} {_fmt_q(summary.get('quality'))}, "
          f"{_fmt_n(summary.get('params'))} params", file=stream or sys.stdout, flush=True)


def _reference_task(trial: dict, out_dir: str) -> dict:
    from trials.trial import run_trial

    return run_trial(trial, output_dir=out_dir, progress=False)


def run_teacher_reference(cfg: SearchConfig, local_dir: Path, stream=None) -> Path | None:
    """Evaluate the uncompressed teacher on the search's validation data (every stage with max_steps 0), as a Ray
    task with one trial's resources, into `<experiment>/reference_teacher/`. Skipped when it exists already (a
    resumed search); a failure is reported and ignored."""
    import ray

    out = local_dir / REFERENCE_DIR
    if (out / SUMMARY_NAME).is_file():
        return out
    r = cfg.search.resources
    task = ray.remote(_reference_task).options(num_cpus=r.cpu, num_gpus=r.gpu, max_retries=0)
    try:
        summary = ray.get(task.remote(_reference_trial(cfg), str(out)))
    except Exception as exc:  # the search's results stand on their own
        print(f"warning: the teacher reference evaluation failed: {_one_line(exc)}", file=stream or sys.stderr)
        return None
    _write_reference(cfg, out, summary, stream)
    return out


def _new_tuner(cfg: SearchConfig, space: SearchSpace, stream, initial_params=None, callbacks=None,
               spent_s: float = 0.0):
    """spent_s: seconds of the search's wall-time budget already used (validation, data, Ray start-up)."""
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    s = cfg.search
    trial = base_trial_config(cfg)
    searcher = make_searcher(cfg, space, initial_params)
    scheduler = make_scheduler(cfg, space)
    if isinstance(scheduler, SizeStratifiedASHA):
        print(scheduler.describe(), file=stream or sys.stdout, flush=True)
    progress = ProgressCallback(quality_name=trial.quality_name, quality_mode=trial.quality_mode,
                                teacher_params=space.info.params, max_t=cfg.asha_max_t, stream=stream)
    tune_config = tune.TuneConfig(
        search_alg=searcher, scheduler=scheduler, num_samples=s.num_samples, max_concurrent_trials=s.max_concurrent,
        reuse_actors=True,
        time_budget_s=max(1.0, s.time_budget_minutes * 60 - spent_s) if s.time_budget_minutes else None,
        trial_name_creator=_trial_dirname, trial_dirname_creator=_trial_dirname,
    )  # no metric/mode here: it would make the searcher single-objective
    run_config = tune.RunConfig(
        name=cfg.name, **_storage_args(cfg.search.storage), verbose=0,
        callbacks=[progress, JsonLoggerCallback(), CSVLoggerCallback(), *(callbacks or [])],
        failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
        sync_config=tune.SyncConfig(sync_artifacts=is_remote_storage(cfg.search.storage)),
    )
    return tune.Tuner(_wrapped_trainable(cfg, space), tune_config=tune_config, run_config=run_config)


def make_scheduler(cfg: SearchConfig, space: SearchSpace):
    """FIFO without ASHA; plain ASHA for one size stratum; `SizeStratifiedASHA` otherwise. A trial that survives
    every rung runs to its own end (run_trial writes its final summary), unless asha.max_t is below the stage's
    steps, in which case ASHA stops it at max_t and it counts as complete."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    a = cfg.search.asha
    if a is None:
        return FIFOScheduler()
    kwargs = dict(metric="quality", mode=cfg.quality_mode(), time_attr=TIME_ATTR, max_t=cfg.asha_max_t,
                  grace_period=a.grace_period, reduction_factor=a.reduction_factor,
                  stop_last_trials=cfg.asha_max_t < cfg.final_stage_steps)
    if a.size_buckets == 1:
        return ASHAScheduler(**kwargs)
    size_metric = next(m for m in cfg.objective_metrics()[0] if m != "quality")
    if size_metric not in ("params", "params_excl_output_embedding", "macs_per_token"):
        size_metric = "params"  # latency is measured, not known in advance: stratify by parameters
    return SizeStratifiedASHA(space, size_metric=size_metric, n=a.size_buckets, **kwargs)


def _validate_plan_format(cfg: SearchConfig, space: SearchSpace) -> None:
    """Check, before Ray starts, that the trials' configs and plans are accepted (one sampled plan, the trial
    config validator and the plan resolver on the meta-device teacher)."""
    from kron.plan import CompressionPlan
    from trials.config import load_trial_config

    from .space import teacher_skeleton

    params = space.sample_within_budget(0) if space.budget is not None else space.sample(0)
    trial = load_trial_config({**cfg.trial, "plan": {"rules": space.to_plan_rules(params)}})
    plan = CompressionPlan.from_dict({"rules": trial.plan.rules})
    plan.resolve(teacher_skeleton(trial))


def _local_mirror(cfg: SearchConfig) -> Path:
    return Path("kronsearch_results") / cfg.name


# ----------------------------------------------------------------------------------------------- after fit


_UNFINISHED = ("RUNNING", "PENDING", "PAUSED")


def _saved_trial_states(local_dir: Path) -> dict[str, str]:
    """Trial folder -> status in the latest saved experiment state: what a resume will see. After Ctrl-C the
    in-memory trials read TERMINATED, but the saved state keeps the interrupted ones RUNNING (and resumes them)."""
    files = sorted(Path(local_dir).glob("experiment_state-*.json"))  # named by start time: the last is current
    if not files:
        return {}
    try:
        state = json.loads(files[-1].read_text())
        out = {}
        for trial_json, _ in state["trial_data"]:
            t = json.loads(trial_json) if isinstance(trial_json, str) else trial_json
            out[f"trial_{t['trial_id']}"] = t["status"]
        return out
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        return {}


def _unfinished(local_dir: Path) -> bool:
    """Trials left running or pending: fit() returned early (Ctrl-C returns normally, see ray-tune notes)."""
    return any(s in _UNFINISHED for s in _saved_trial_states(local_dir).values())


def finalize_experiment(cfg: SearchConfig, space: SearchSpace, grid, *, local_dir: Path) -> SearchOutcome:
    """Patch every trial's summary (status "pruned" for stopped trials, "error" for crashed ones, "search" set to
    the search name), export the searcher's Optuna trials, and report unfinished trials (an interrupted search)."""
    remote = is_remote_storage(cfg.search.storage)
    if remote:
        _download(experiment_path(cfg), local_dir)
    out = SearchOutcome(experiment=experiment_path(cfg), local_dir=local_dir)
    max_t = cfg.asha_max_t
    ray_status = _saved_trial_states(local_dir)  # only TERMINATED trials are patched to "pruned"
    for result in grid:
        trial_dir = local_dir / Path(result.path).name
        last = result.metrics or {}
        error = result.error
        outcome, _ = _outcome(last, error is not None, ["quality"], max_t)
        summary_path = trial_dir / SUMMARY_NAME
        summary = _read_json(summary_path)
        trial_id = last.get("trial_id") or Path(result.path).name.removeprefix("trial_")
        state = None
        if summary is None and error is not None:
            summary = _error_summary(cfg, space, result, trial_id)
        if summary is not None:
            status = summary.get("status")
            if error is not None and status in ("running", None):
                summary["status"] = "error"
                summary["error"] = summary.get("error") or _one_line(error)
            elif (error is None and outcome == "pruned" and status in ("running", "complete") and last
                  and ray_status.get(trial_dir.name, "TERMINATED") == "TERMINATED"):
                summary["status"] = "pruned"  # stopped by ASHA or the time budget before it finished
            elif error is None and outcome == "complete" and status == "running":
                summary["status"] = "complete"  # stopped by ASHA at max_t, after its last evaluation
            summary["search"] = cfg.name
            if "search_params" not in summary:
                summary["search_params"] = {k: result.config[k] for k in space.param_names() if k in result.config}
            atomic_write_json(summary_path, summary)
            state = summary["status"]
        out.trials.append({"trial_id": trial_id, "dir": str(trial_dir), "outcome": outcome if error is None else
                           "fail", "status": state, "config": {k: result.config.get(k) for k in space.param_names()
                                                               if k in result.config}})
    # trial folders Ray does not know: started by a driver that was killed before it recorded them; a resumed
    # search does not rerun them (it samples new trials), so they are closed here rather than left "running"
    known = {Path(r.path).name for r in grid}
    for path in sorted(local_dir.glob(f"trial_*/{SUMMARY_NAME}")):
        if path.parent.name in known:
            continue
        summary = _read_json(path)
        if summary is not None and summary.get("status") == "running":
            summary.update(status="error", search=cfg.name,
                           error="orphaned: started by a search driver that was killed before recording the trial; "
                                 "the resumed search did not rerun it")
            atomic_write_json(path, summary)
            out.trials.append({"trial_id": summary.get("trial_id"), "dir": str(path.parent), "outcome": "fail",
                               "status": "error", "config": summary.get("search_params") or {}})
    # trials Ray did not finish (Ctrl-C, time budget while pending): the search can be resumed
    out.interrupted = any(s in _UNFINISHED for s in ray_status.values())
    study = _saved_study(local_dir)
    if study is not None:
        out.study_trials = study
        out.rejected = sum(1 for t in study if t.get("user_attrs", {}).get("rejected"))
        atomic_write_json(local_dir / "optuna_trials.json", study)
    return out


def _saved_study(local_dir: Path) -> list[dict] | None:
    """The searcher's Optuna trials (state, values, params, attributes) from its latest saved state."""
    import pickle

    files = sorted(local_dir.glob("searcher-state-*.pkl"), key=lambda p: p.stat().st_mtime)
    if not files:
        return None
    try:
        with open(files[-1], "rb") as fh:
            state = pickle.load(fh)  # security-reviewed: Ray Tune's own searcher state, which Ray unpickles on resume
    except Exception as exc:  # a half-written file after a crash: skip the export, not the search
        log.warning("cannot read %s: %s", files[-1], exc)
        return None
    study = _find_study(state)
    if study is None:
        return None
    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append({"number": t.number, "state": t.state.name, "values": t.values, "params": t.params,
                     "user_attrs": t.user_attrs})
    return rows


def _find_study(obj, depth: int = 0):
    import optuna

    if isinstance(obj, optuna.study.Study):
        return obj
    if depth > 4:
        return None
    items = obj.values() if isinstance(obj, dict) else getattr(obj, "__dict__", {}).values()
    for v in items:
        found = _find_study(v, depth + 1)
        if found is not None:
            return found
    return None


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _one_line(exc) -> str:
    text = str(exc).strip().splitlines()
    # Ray wraps the trial's exception; its last line is the original "Type: message"
    return (text[-1] if text else type(exc).__name__)[:500]


def _error_summary(cfg: SearchConfig, space: SearchSpace, result, trial_id: str) -> dict:
    """A minimal summary for a trial that crashed before run_trial wrote one (so it shows up in the results)."""
    trial = base_trial_config(cfg)
    params = {k: result.config[k] for k in space.param_names() if k in result.config}
    try:
        costs = space.plan_costs(params)
        plan = space.to_plan_dict(params)
    except Exception:
        costs, plan = {}, None
    return {"schema": "kronsearch.trial/1", "trial_id": trial_id, "search": cfg.name, "method": "kronecker",
            "label": trial_id, "status": "error", "error": _one_line(result.error), "quality_name": trial.quality_name,
            "quality_mode": trial.quality_mode, "quality": None, "params": costs.get("params"),
            "params_excl_output_embedding": costs.get("params_excl_output_embedding"),
            "macs_per_token": costs.get("macs_per_token"), "compression_ratio": costs.get("compression_ratio"),
            "plan": plan, "history": []}


def _remote_experiment_exists(uri: str) -> bool:
    """Whether Ray's experiment state is already under a remote experiment URI (checked before Ray starts)."""
    import pyarrow.fs

    try:
        fs, root = pyarrow.fs.FileSystem.from_uri(uri)
        infos = fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"storage {uri!r} cannot be read: {exc}") from None
    return any(Path(i.path).name.startswith("experiment_state-") for i in infos)


def _upload(local_dir: Path, uri: str, patterns: list[str]) -> None:
    """Copy the local files matching `patterns` (relative to local_dir) to the same places under a remote URI."""
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(uri)
    for pattern in patterns:
        for path in sorted(local_dir.glob(pattern)):
            if path.is_file():
                with fs.open_output_stream(f"{root}/{path.relative_to(local_dir).as_posix()}") as out:
                    out.write(path.read_bytes())


def _download(uri: str, local_dir: Path) -> None:
    """Copy a remote experiment (s3://, gs://, ...) to a local folder for the analysis."""
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(uri)
    local_dir.mkdir(parents=True, exist_ok=True)
    pyarrow.fs.copy_files(root, str(local_dir.resolve()), source_filesystem=fs,
                          destination_filesystem=pyarrow.fs.LocalFileSystem())
