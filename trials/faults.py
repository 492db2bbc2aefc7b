"""Testing aid: trial hooks that make chosen trials fail on purpose, driven by the KRONSEARCH_FAULT_INJECT variable.

The variable holds comma-separated `kind:pattern` rules, e.g. "raise:*trial_a*,nan:*/exp/trial_*_00001"; a rule
applies when its fnmatch pattern matches the trial's name, its output directory or `plan_digest` of its inline
plan rules ("plan-<12 hex>"; Ray's trial ids are random, a plan given through initial_params is not). A pattern
without '*' or '?' matches as a substring. The search forwards the driver's value to its Ray workers.
'raise' raises a RuntimeError before the first stage, 'oom' a MemoryError, 'nospace' the OSError of a full disk
(ENOSPC), 'nan' makes the training loss NaN (the trial ends 'diverged' at its first step). Unset (the default) `default_hooks` gives hooks that do nothing. Used by
tests/search/test_faults.py and tests/trials/test_trial_faults.py to fail chosen trials.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .hooks import FAULT_ENV, TrialHooks

if TYPE_CHECKING:
    from .config import TrialConfig

__all__ = ["FAULT_KINDS", "FaultInjection", "default_hooks", "plan_digest"]

FAULT_KINDS = ("raise", "nan", "oom", "nospace")


def plan_digest(rules) -> str:
    """'plan-<12 hex>': a short stable name for a list of inline plan rules (what fault patterns can match)."""
    return "plan-" + hashlib.sha256(json.dumps(rules, sort_keys=True, default=str).encode()).hexdigest()[:12]


class FaultInjection(TrialHooks):
    """Hooks that inject one fault: 'raise', 'oom', 'nospace' (before training) or 'nan' (every training loss)."""

    def __init__(self, kind: str):
        if kind not in FAULT_KINDS:
            raise ValueError(f"fault kind must be one of {FAULT_KINDS}, got {kind!r}")
        self.kind = kind

    @classmethod
    def from_environment(cls, cfg: "TrialConfig", out_dir: Path | None) -> "FaultInjection | None":
        """The fault KRONSEARCH_FAULT_INJECT asks for this trial, or None (unset, or no rule matches)."""
        spec = os.environ.get(FAULT_ENV, "").strip()
        if not spec:
            return None
        names = [x for x in (cfg.name, str(out_dir) if out_dir is not None else None) if x]
        if cfg.plan is not None and cfg.plan.rules is not None:
            names.append(plan_digest(cfg.plan.rules))
        for rule in spec.split(","):
            kind, _, pat = rule.strip().partition(":")
            if kind not in FAULT_KINDS or not pat:
                continue
            glob = any(c in pat for c in "*?")
            if any(fnmatch.fnmatchcase(n, pat) if glob else pat in n for n in names):
                return cls(kind)
        return None

    def before_training(self, cfg, out_dir) -> None:
        if self.kind == "raise":
            raise RuntimeError(f"injected fault ({FAULT_ENV}): trial raised on purpose")
        if self.kind == "oom":
            raise MemoryError(f"injected fault ({FAULT_ENV})")
        if self.kind == "nospace":
            import errno

            raise OSError(errno.ENOSPC, f"No space left on device (injected fault, {FAULT_ENV})",
                          str(out_dir) if out_dir is not None else None)

    def loss_fn(self, fn: Callable) -> Callable:
        if self.kind != "nan":
            return fn

        def nan_loss(*args, **kwargs):
            out = fn(*args, **kwargs)
            out.loss = out.loss * float("nan")
            return out

        return nan_loss


def default_hooks(cfg: "TrialConfig", out_dir: Path | None) -> TrialHooks:
    """The hooks of a trial run without explicit ones: fault injection when KRONSEARCH_FAULT_INJECT names this
    trial (a testing aid), else none."""
    hooks = FaultInjection.from_environment(cfg, out_dir)
    return hooks if hooks is not None else TrialHooks()
