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
unpickles by module path: `search.trialstate.TrimEndedTrials` and `StopOnFullDisk` must stay importable under
these names.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
from collections import deque

from .progress import callback_base

__all__ = ["StopOnFullDisk", "TrimEndedTrials", "quiet_full_disk_errors", "take_full_disk", "trial_error_text",
           "trim_trial_state"]

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


_ERROR_TAIL = 65536  # bytes of a trial's error.txt read: the exception's own line is at its end
_FULL_BYTES = 1 << 20  # a trial that failed while its disk had less than this free failed because of it


def trial_error_text(trial) -> str | None:
    """The last `_ERROR_TAIL` bytes of a failed trial's error.txt, or None when Ray could not write or we cannot read
    it (on a full disk, either)."""
    path = getattr(trial, "error_file", None)
    if not path:
        return None
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            fh.seek(max(0, fh.tell() - _ERROR_TAIL))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return None


def _full_disk(trial) -> str | None:
    from kron.errors import disk_full

    found = disk_full(trial_error_text(trial) or "")
    if found is None and getattr(trial, "local_path", None):
        try:  # no error text to read: a disk with (almost) nothing left says it
            if shutil.disk_usage(trial.local_path).free < _FULL_BYTES:
                found = "No space left on device"
        except OSError:
            pass
    return found


_STOPPED_FULL: list[str] = []  # what StopOnFullDisk saw, for the driver to say once Ray's loop has ended


class StopOnFullDisk(callback_base()):
    """Ray Tune callback: a trial that failed because the disk is full stops the search at once — every later trial
    would fail the same way and be counted as done. It ends Ray's loop the way Ctrl-C does (Tune's own SIGUSR1
    handler: the experiment state is saved one last time, finished trials TERMINATED, running ones left to rerun
    on `--resume`), and `take_full_disk` tells the driver why. The trial that hit the full disk is recorded as
    failed, with the reason in its summary."""

    def on_trial_error(self, iteration, trials, trial, **info):
        found = _full_disk(trial)
        if found is None:
            return
        _STOPPED_FULL.append(f"{found} (trial {getattr(trial, 'trial_id', '?')} could not write its results)")
        handler = signal.getsignal(signal.SIGUSR1) if hasattr(signal, "SIGUSR1") else None
        if callable(handler):  # Tune installed its stop handler (it does when it runs on the main thread)
            os.kill(os.getpid(), signal.SIGUSR1)
            return
        from kron.errors import DiskFullError

        raise DiskFullError(f"the disk is full: {_STOPPED_FULL[-1]}")  # no handler: end the loop by raising


def take_full_disk() -> str | None:
    """What stopped the search on a full disk since the last call, or None."""
    found = _STOPPED_FULL[0] if _STOPPED_FULL else None
    _STOPPED_FULL.clear()
    return found


class _DropFullDiskTracebacks(logging.Filter):
    """Ray logs a failed trial's whole remote traceback before any callback sees it: for a full disk the one-line
    error the search prints says all of it."""

    def filter(self, record: logging.LogRecord) -> bool:
        from kron.errors import disk_full

        exc = record.exc_info[1] if record.exc_info else None
        return not (exc is not None and disk_full(exc) is not None)


class _DropFullDiskUnhandled(logging.Filter):
    """After the search stops on a full disk, Ray reports the other running trials' errors nobody fetched as
    "Unhandled error" with their remote tracebacks: for a full disk, those too."""

    def filter(self, record: logging.LogRecord) -> bool:
        from kron.errors import disk_full

        msg = record.getMessage()
        return not (msg.startswith("Unhandled error") and disk_full(msg[:_ERROR_TAIL]) is not None)


class _DropStopNotice(logging.Filter):
    """Tune's notices of an interrupted run ("Stop signal received", "Trials did not complete", "Experiment has been
    interrupted ... Tuner.restore(...)"), when the stop was StopOnFullDisk's: the search's own line says what to do."""

    NOTICES = ("Stop signal received", "Trials did not complete", "Experiment has been interrupted")

    def filter(self, record: logging.LogRecord) -> bool:
        return not (_STOPPED_FULL and record.getMessage().startswith(self.NOTICES))


_QUIET = (("ray.tune.execution.tune_controller", _DropFullDiskTracebacks()),
          ("ray._private.worker", _DropFullDiskUnhandled()),
          ("ray.tune.tune", _DropStopNotice()))


@contextlib.contextmanager
def quiet_full_disk_errors():
    """While active, Ray logs no traceback of a trial that failed on a full disk (the search's one-line error says
    it)."""
    for name, drop in _QUIET:
        logging.getLogger(name).addFilter(drop)
    try:
        yield
    finally:
        for name, drop in _QUIET:
            logging.getLogger(name).removeFilter(drop)
