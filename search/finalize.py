"""After `Tuner.fit()`: every trial's summary patched with its final status, the searcher's Optuna trials exported,
minimal summaries for trials that crashed before writing one, and interrupted searches detected."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from kron.fsutil import atomic_write_json
from kron.vocab import SCHEMA, SUMMARY_NAME

from .config import SearchConfig, is_remote_storage
from analysis.textfmt import error_line
from .resume import UNFINISHED, saved_trial_states
from .storage import download, experiment_path
from .trainable import searched_method, trial_outcome

if TYPE_CHECKING:
    from .space import SearchSpace

__all__ = ["SearchOutcome", "finalize_experiment"]

log = logging.getLogger(__name__)


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


def finalize_experiment(cfg: SearchConfig, space: SearchSpace, grid, *, local_dir: Path) -> SearchOutcome:
    """Patch every trial's summary (status "pruned" for stopped trials, "error" for crashed ones, "search" set to
    the search name), export the searcher's Optuna trials, and report unfinished trials (an interrupted search)."""
    remote = is_remote_storage(cfg.search.storage)
    if remote:
        download(experiment_path(cfg), local_dir)
    out = SearchOutcome(experiment=experiment_path(cfg), local_dir=local_dir)
    max_t = cfg.asha_max_t
    ray_status = saved_trial_states(local_dir)  # only TERMINATED trials are patched to "pruned"
    for result in grid:
        trial_dir = local_dir / Path(result.path).name
        last = result.metrics or {}
        error = result.error
        # the sampled parameters; None for a trial Ray added but never ran (the time budget ran out while pending)
        params = space.params_of(result.config)
        outcome, _ = trial_outcome(last, error is not None, ["quality"], max_t)
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
                summary["error"] = summary.get("error") or error_line(error)
            elif (error is None and outcome == "pruned" and status in ("running", "complete") and last
                  and ray_status.get(trial_dir.name, "TERMINATED") == "TERMINATED"):
                summary["status"] = "pruned"  # stopped by ASHA or the time budget before it finished
            elif error is None and outcome == "complete" and status == "running":
                summary["status"] = "complete"  # stopped by ASHA at max_t, after its last evaluation
            summary["search"] = cfg.name
            if "search_params" not in summary:
                summary["search_params"] = params
            atomic_write_json(summary_path, summary)
            state = summary["status"]
        out.trials.append({"trial_id": trial_id, "dir": str(trial_dir), "outcome": outcome if error is None else
                           "fail", "status": state, "config": params})
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
    out.interrupted = any(s in UNFINISHED for s in ray_status.values())
    study = _saved_study(local_dir, cfg.name)
    if study is not None:
        out.study_trials = study
        out.rejected = sum(1 for t in study if t.get("user_attrs", {}).get("rejected"))
        atomic_write_json(local_dir / "optuna_trials.json", study)
    return out


def _saved_study(local_dir: Path, study_name: str | None = None) -> list[dict] | None:
    """The searcher's Optuna trials (state, values, params, attributes): from the study's journal
    (`optuna_study.journal`, what the searcher told Optuna up to its last word), else from the searcher's latest
    saved state (searches of releases without a journal)."""
    import pickle

    from .searcher import STUDY_JOURNAL, load_journal_study

    try:
        journal = load_journal_study(local_dir / STUDY_JOURNAL, study_name)
    except Exception as exc:  # a damaged journal: fall back to the searcher's own saved state
        log.warning("cannot read %s: %s", local_dir / STUDY_JOURNAL, exc)
        journal = None
    if journal is not None:
        return _study_rows(journal)

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
    try:
        return _study_rows(study)
    except Exception as exc:  # a pickled study on a journal that is not there any more
        log.warning("cannot read the Optuna trials of %s: %s", files[-1], exc)
        return None


def _study_rows(study) -> list[dict]:
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


def _error_summary(cfg: SearchConfig, space: SearchSpace, result, trial_id: str) -> dict:
    """A minimal summary for a trial that crashed before run_trial wrote one (so it shows up in the results)."""
    trial = cfg.trial
    params = space.params_of(result.config)
    try:
        costs = space.plan_costs(params)
        plan = space.to_plan_dict(params)
    except Exception:
        costs, plan = {}, None
    return {"schema": SCHEMA, "trial_id": trial_id, "search": cfg.name, "method": searched_method(cfg),
            "label": trial_id, "status": "error", "error": error_line(result.error), "quality_name": trial.quality_name,
            "quality_mode": trial.quality_mode, "quality": None, "params": costs.get("params"),
            "params_excl_output_embedding": costs.get("params_excl_output_embedding"),
            "macs_per_token": costs.get("macs_per_token"), "compression_ratio": costs.get("compression_ratio"),
            "plan": plan, "history": []}
