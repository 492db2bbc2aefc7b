"""The Ray function trainable (one compression trial per sampled plan) and what it reports.

`trainable` is a thin wrapper around `trials.trial.run_trial`; Ray pickles `TrialSetup` and finds `trainable` on
its workers by this module's path, so both must stay importable here. The metrics protocol lives here too:
`TIME_ATTR` is the clock ASHA and the searcher read, `FINISHED` flags the one result a trial reports after
run_trial returned, and `trial_outcome` reads a trial's last result the way Optuna should hear it.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kron.vocab import SIZE_AXES, latency_us_per_token

from .config import SearchConfig, is_remote_storage, with_search_defaults
from .storage import experiment_path

if TYPE_CHECKING:
    from .space import SearchSpace

__all__ = ["FINISHED", "TIME_ATTR", "TrialSetup", "make_trainable", "threads_for", "trainable", "trial_outcome",
           "trial_setup"]

TIME_ATTR = "search_step"  # steps of the final stage: the clock ASHA and the searcher read
FINISHED = "trial_finished"  # set on the one result a trial reports after run_trial returned


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


def threads_for(cpus: float) -> int:
    """Torch threads for a trial with `cpus` CPUs from Ray (fractions round down, at least one)."""
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
    torch.set_num_threads(threads_for(setup.cpus))
    # testing aid (trials.faults): a reused worker follows the driver of the search it now runs
    if setup.fault_inject:
        os.environ["KRONSEARCH_FAULT_INJECT"] = setup.fault_inject
    else:
        os.environ.pop("KRONSEARCH_FAULT_INJECT", None)
    space = setup.space
    params = space.params_of(config)
    costs = space.plan_costs(params)
    context = tune.get_context()
    trial_id = context.get_trial_id()
    trial_dir = Path(context.get_trial_dir())
    if setup.experiment_dir:  # local storage: straight into the experiment folder, visible at once
        out_dir = Path(setup.experiment_dir) / trial_dir.name
    else:  # remote storage: the trial's working directory, which Ray uploads (SyncConfig(sync_artifacts=True))
        out_dir = Path.cwd() if Path.cwd().name == trial_dir.name else trial_dir
    trial_cfg = {**setup.base_trial, "name": trial_id, "threads": threads_for(setup.cpus),
                 "plan": {"rules": space.to_plan_rules(params)}}
    seed = space.seed_label(params)
    if seed is not None:  # a seed plan (search.seed_plans), evaluated first: named so in results and plots
        trial_cfg["label"] = seed

    state: dict[str, Any] = {"offset": None, "last": None}
    timing = {"trial_started_at": t_enter, "trial_imported_at": t_imported, "worker_started_at": _process_start(),
              "worker_pid": os.getpid(), "node_id": _node_id()}

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


def _node_id() -> str | None:
    """The Ray node this trial runs on (which machine of a cluster: results and the cluster test read it)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:
        return None


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
    for k in (*SIZE_AXES, "compression_ratio"):
        if m.get(k) is None:
            m[k] = costs[k]
    m["latency_us_per_token"] = latency_us_per_token(metrics.get("throughput_tokens_per_s"))
    return m


def searched_method(cfg: SearchConfig) -> str:
    """The `method` a search's trials (and their error summaries) record: "kronecker" for a Kronecker-only space,
    "mixed" for any other (its plans may combine methods per matrix)."""
    return "kronecker" if cfg.space.method_names() == ["kronecker"] else "mixed"


def trial_setup(cfg: SearchConfig, space: SearchSpace) -> TrialSetup:
    """What every trial of the search `cfg` over `space` shares (with the driver's KRONSEARCH_FAULT_INJECT)."""
    remote = is_remote_storage(cfg.search.storage)
    base = with_search_defaults(cfg.trial_section)
    # how results tables name the search's trials: as the space's one structure, or mixed (whatever one plan uses)
    base = {**base, "method": searched_method(cfg)}
    return TrialSetup(name=cfg.name, base_trial=base, space=space, cpus=cfg.search.resources.cpu,
                      final_stage=cfg.final_stage, experiment_dir=None if remote else experiment_path(cfg),
                      max_t=cfg.asha_max_t, fault_inject=os.environ.get("KRONSEARCH_FAULT_INJECT") or None)


def make_trainable(cfg: SearchConfig, space: SearchSpace):
    """`trainable` bound to the search's `TrialSetup` and asking Ray for one trial's resources (`search.resources`)."""
    from ray import tune

    r = cfg.search.resources
    resources = {"cpu": r.cpu, "gpu": r.gpu}
    return tune.with_resources(tune.with_parameters(trainable, setup=trial_setup(cfg, space)), resources)


def trial_outcome(result: dict | None, error: bool, metrics: list[str], max_t: int | None) -> tuple[str, list | None]:
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
