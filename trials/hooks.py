"""Hooks: the points where code outside a trial may act on it, without the trial knowing what that code is.

`run_trial(config, hooks=...)` calls, in order:

* `before_training(cfg, out_dir)` once the student is built, before it moves to the device and trains (may raise:
  the trial is then recorded with status 'error' and the exception re-raised, like any failure of the run);
* `loss_fn(ilkd_loss)` once per stage: the function the training loop computes its loss with (return it unchanged,
  or a wrapper).

`TrialHooks` itself does nothing. A trial run without hooks gets `trials.faults.default_hooks(cfg, out_dir)`:
nothing, unless the testing aid KRONSEARCH_FAULT_INJECT is set.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from .config import TrialConfig

__all__ = ["FAULT_ENV", "TrialHooks"]

FAULT_ENV = "KRONSEARCH_FAULT_INJECT"


class TrialHooks:
    """No-op hooks; subclass and override what you need."""

    def before_training(self, cfg: "TrialConfig", out_dir: Path | None) -> None:
        """Called after the student is built, before training starts."""

    def loss_fn(self, fn: Callable) -> Callable:
        """The loss function a stage trains with (`trials.distill.ilkd_loss` or a wrapper of it)."""
        return fn
