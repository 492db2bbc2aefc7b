"""Live console progress of a running search (a Ray Tune callback): one line per trial event."""
from __future__ import annotations

import math
import sys
import time

from analysis.textfmt import fmt_quality, fmt_ratio, human
from .trainable import FINISHED, trial_outcome

__all__ = ["ProgressCallback"]


def callback_base():
    from ray.tune import Callback

    return Callback


_SIZE_WORDS = {"params": "params", "params_excl_output_embedding": "params excl. output embedding",
               "macs_per_token": "MACs/token"}


def _size_text(value, metric: str) -> str:
    if metric == "bytes":
        return "? MB" if value is None else f"{float(value) / 1e6:.1f} MB"
    return f"{human(value, '?')} {_SIZE_WORDS.get(metric, metric)}"


class ProgressCallback(callback_base()):
    """One console line per event: a trial started, evaluated, finished, was pruned or failed; with the counts
    and the best quality so far per size bucket (tenths of the teacher's size on the search's size axis:
    `size_metric`, parameters by default)."""

    # class-level defaults: a callback pickled by an earlier release (tuner.pkl) has neither attribute
    size_metric = "params"
    teacher_size: int | None = None

    def __init__(self, *, quality_name: str, quality_mode: str, teacher_params: int, max_t: int | None,
                 stream=None, size_metric: str = "params", teacher_size: int | None = None):
        self.quality_name, self.quality_mode = quality_name, quality_mode
        self.teacher_params = max(int(teacher_params), 1)
        self.size_metric = size_metric
        self.teacher_size = max(int(teacher_size), 1) if teacher_size else None
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

    def _size(self, result: dict):
        value = result.get(self.size_metric)
        return (value, self.size_metric) if value is not None else (result.get("params"), "params")

    def _bucket(self, result: dict) -> int | None:
        value, metric = self._size(result)
        if value is None:
            return None
        base = self.teacher_size if metric == self.size_metric and self.teacher_size else self.teacher_params
        return min(9, int(10 * float(value) / base))

    def _better(self, a: float, b: float | None) -> bool:
        return b is None or (a < b if self.quality_mode == "min" else a > b)

    def _status(self) -> str:
        c = self.counts
        text = f"running {len(self.running)}, done {c['complete']}, pruned {c['pruned']}, failed {c['fail']}"
        if self.best:
            cells = [f"{10 * b}-{10 * b + 10}%: {fmt_quality(q, '-', nonfinite=True)}"
                     for b, q in sorted(self.best.items())]
            text += f" | best {self.quality_name} by size: " + ", ".join(cells)
        return text

    def on_trial_start(self, iteration, trials, trial, **info):
        self.running.add(trial.trial_id)
        self._print(f"trial {self._num(trial)} started | {self._status()}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get(FINISHED):
            return
        q = result.get("quality")
        qtext = (fmt_quality(q, '-', nonfinite=True) if q is not None and math.isfinite(q)
                 else f"({fmt_quality(result.get('eval_quality'), '-', nonfinite=True)})")
        self._print(f"trial {self._num(trial)} step {result.get('step')} {self.quality_name} {qtext}, "
                    f"{_size_text(*self._size(result))} ({fmt_ratio(result.get('compression_ratio'), 'x', '?x')})")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        result = trial.last_result or {}
        outcome, _ = trial_outcome(result, False, ["quality"], self.max_t)
        self.counts[outcome] += 1
        q = result.get("quality")
        b = self._bucket(result)
        if outcome == "complete" and q is not None and math.isfinite(q) and b is not None:
            if self._better(q, self.best.get(b)):
                self.best[b] = q
        word = {"complete": "finished", "pruned": "pruned (stopped early)", "fail": "failed (diverged)"}[outcome]
        self._print(f"trial {self._num(trial)} {word} at step {result.get('step')}: {self.quality_name} "
                    f"{fmt_quality(q, '-', nonfinite=True)} | {self._status()}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        self.counts["fail"] += 1
        self._print(f"trial {self._num(trial)} failed with an error (see its error.txt) | {self._status()}")
