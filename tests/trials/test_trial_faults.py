"""Every failure of a trial after its summary exists is recorded in trial_summary.json before it propagates:
a UserError only seen at run time, running out of memory, an exception, a NaN loss."""
import json
import shutil

import pytest

from kron.errors import UserError
from trials.trial import SUMMARY_NAME, clear_caches, run_trial


def _cfg(teacher, corpus, **over):
    cfg = {
        "teacher": str(teacher), "name": "faulty",
        "plan": {"rules": [{"select": "h.*.mlp.c_fc", "shape": [64, 16, 2, 2]}]},
        "data": {"source": str(corpus), "seq_len": 32, "val_blocks": 2},
        "stage1": {"lr": 3e-3, "batch_size": 4, "max_steps": 2, "eval_every": 1, "early_stopping": None},
        "save_checkpoint": False,
    }
    cfg.update(over)
    return cfg


def _summary(out):
    return json.loads((out / SUMMARY_NAME).read_text())


def test_a_user_error_at_run_time_is_recorded_then_raised(tiny_lm_teacher, text_corpus, tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(text_corpus, corpus)
    cfg = _cfg(tiny_lm_teacher, corpus)
    (corpus / "valid.txt").write_text("too short\n")  # valid when configured, fewer tokens than one block
    clear_caches()
    with pytest.raises(UserError, match="fewer than one block") as info:
        run_trial(cfg, output_dir=tmp_path / "out")
    s = _summary(tmp_path / "out")
    assert s["status"] == "error" and "fewer than one block" in s["error"] and type(info.value).__name__ in s["error"]


@pytest.mark.parametrize("kind, exc, fragment", [
    ("oom", MemoryError, "out of memory: MemoryError"),
    ("raise", RuntimeError, "RuntimeError: injected fault"),
    ("nospace", OSError, "OSError: [Errno 28] No space left on device"),
])
def test_injected_exceptions_are_recorded(tiny_lm_teacher, text_corpus, tmp_path, monkeypatch, kind, exc, fragment):
    monkeypatch.setenv("KRONSEARCH_FAULT_INJECT", f"{kind}:faul*,nan:other")
    with pytest.raises(exc):
        run_trial(_cfg(tiny_lm_teacher, text_corpus), output_dir=tmp_path)
    s = _summary(tmp_path)
    assert s["status"] == "error" and s["error"].startswith(fragment) and "Traceback" in s["traceback"]


def test_cuda_out_of_memory_is_named(monkeypatch):
    import torch

    from trials.trial import _error_text

    assert _error_text(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")).startswith(
        "out of memory: OutOfMemoryError")
    assert _error_text(ValueError("x")) == "ValueError: x"


def test_an_injected_nan_ends_the_trial_diverged(tiny_lm_teacher, text_corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("KRONSEARCH_FAULT_INJECT", "nan:faulty")
    s = run_trial(_cfg(tiny_lm_teacher, text_corpus), output_dir=tmp_path)
    assert s["status"] == "diverged" and "non-finite loss nan at step 1" in s["error"]
    assert _summary(tmp_path)["status"] == "diverged"


def test_without_the_variable_nothing_is_injected(tiny_lm_teacher, text_corpus, tmp_path, monkeypatch):
    monkeypatch.delenv("KRONSEARCH_FAULT_INJECT", raising=False)
    assert run_trial(_cfg(tiny_lm_teacher, text_corpus), output_dir=tmp_path)["status"] == "complete"


def test_hooks_given_to_run_trial_need_no_environment(tiny_lm_teacher, text_corpus, tmp_path, monkeypatch):
    """The fault plugin is ordinary trial hooks: passed explicitly, it acts without KRONSEARCH_FAULT_INJECT; and
    without the variable a trial gets hooks that do nothing."""
    from trials.config import load_trial_config
    from trials.faults import FaultInjection, default_hooks
    from trials.hooks import TrialHooks

    monkeypatch.delenv("KRONSEARCH_FAULT_INJECT", raising=False)
    assert type(default_hooks(load_trial_config(_cfg(tiny_lm_teacher, text_corpus)), tmp_path)) is TrialHooks
    s = run_trial(_cfg(tiny_lm_teacher, text_corpus), output_dir=tmp_path, hooks=FaultInjection("nan"))
    assert s["status"] == "diverged" and "non-finite loss nan at step 1" in s["error"]
    with pytest.raises(ValueError, match="fault kind"):
        FaultInjection("segfault")
