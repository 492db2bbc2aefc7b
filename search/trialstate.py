"""Keep the driver's memory in check over long searches: trim what Ray Tune holds for trials that have ended.

Ray Tune keeps, for the whole experiment, each trial's run metadata (`trial.run_metadata`): the last result, and
for every numeric metric of a result (the config left out) min/max/avg/last plus two running-window deques
(`metric_n_steps`, 5 and 10 results long) from which it computes `last-5-avg` / `last-10-avg`. It also caches
that metadata as indented JSON for its experiment-state saves. Measured (`benchmarks/search_scale.py
--tracemalloc`): this was most of the driver's growth; a deque costs a ~0.6 KB block however short, and a kronsearch
result has ~30 numeric metrics, so the windows were the larger part of it.

`TrimEndedTrials` is a Ray Tune callback: once a trial has ended (completed, stopped by the scheduler, or failed —
a search runs with `max_failures=0`, so nothing restarts it) it drops the trial's running windows (the averages they
fed stay in `metric_analysis`). `last_result` and the metrics' statistics stay, so Ray's
`ResultGrid`, the progress lines and `search.finalize` see what they saw before, and `result.json`, `progress.csv`
and the trial summaries are written as before. It uses Ray Tune internals (`Trial.run_metadata`): where they are
missing (another Ray release) it does nothing. Ray pickles its callbacks into a search's tuner.pkl, which `--resume`
unpickles by module path: `search.trialstate.TrimEndedTrials` must stay importable under this name.
"""
from __future__ import annotations

from collections import deque

from .progress import callback_base

__all__ = ["TrimEndedTrials", "trim_trial_state"]

class _RefillingWindows(dict):
    """Stand-in for a trimmed `metric_n_steps`: empty, and a metric updated again gets fresh windows instead of a
    KeyError (Ray ignores results after stopping a trial, so this is a safety net, not a code path in use)."""

    __slots__ = ("n_steps",)  # one per ended trial: no instance __dict__

    def __init__(self, n_steps):
        super().__init__()
        self.n_steps = tuple(n_steps)

    def __missing__(self, metric):
        windows = {str(n): deque(maxlen=n) for n in self.n_steps}
        self[metric] = windows
        return windows


def trim_trial_state(trial) -> bool:
    """Drop an ended trial's running windows from Ray's run metadata; True if it had any."""
    meta = getattr(trial, "run_metadata", None)
    windows = getattr(meta, "metric_n_steps", None)
    if not isinstance(windows, dict) or not windows:
        return False  # another Ray release, or nothing (left) to trim
    # setattr: the metadata object drops its cached JSON on every attribute set
    meta.metric_n_steps = _RefillingWindows(getattr(meta, "_n_steps", (5, 10)))
    return True


class TrimEndedTrials(callback_base()):
    """Ray Tune callback: `trim_trial_state` for every trial that completes or fails."""

    def on_trial_complete(self, iteration, trials, trial, **info):
        trim_trial_state(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        trim_trial_state(trial)
