"""Trials that fit big models (`trials.memory`): a half-precision teacher, mixed precision, gradient checkpointing,
and the memory check that refuses a trial before anything is loaded."""
from __future__ import annotations

import pytest
import torch

from kron.errors import ConfigError, DataError
from trials.config import load_trial_config
from trials.memory import check_trial_memory, trial_memory
from trials.trial import clear_caches, run_trial

from .test_trial import _lm_config


def _losses(summary) -> list[float]:
    return [h["loss"] for h in summary["history"][1:]]


@pytest.fixture(autouse=True)
def _fresh():
    clear_caches()
    yield
    clear_caches()


def test_gradient_checkpointing_gives_the_same_training(tiny_lm_teacher, text_corpus):
    """Recomputing activations in the backward pass changes memory, not the numbers: the loss curve and the final
    quality match the plain trial's (same seed, same batches)."""
    cfg = _lm_config(tiny_lm_teacher, text_corpus, device="cpu", save_checkpoint=False)
    plain = run_trial(cfg)
    ckpt, student = run_trial({**cfg, "gradient_checkpointing": True}, return_student=True)
    on = getattr(student, "is_activation_checkpointing", None)  # transformers 5's name
    assert on if on is not None else student.is_gradient_checkpointing  # on: the equality is not two plain runs
    assert plain["status"] == ckpt["status"] == "complete"
    assert _losses(ckpt) == pytest.approx(_losses(plain), rel=1e-5, abs=1e-6)
    assert ckpt["quality"] == pytest.approx(plain["quality"], rel=1e-5)


def test_a_bfloat16_teacher_and_bfloat16_autocast_train_a_float32_student(tiny_lm_teacher, text_corpus):
    from trials.inputs import build_student, load_teacher

    cfg = _lm_config(tiny_lm_teacher, text_corpus, device="cpu", save_checkpoint=False, teacher_dtype="bfloat16")
    c = load_trial_config(cfg)
    teacher, _ = load_teacher(c, torch.device("cpu"))
    student, _, _ = build_student(c, teacher)
    assert next(teacher.parameters()).dtype == torch.bfloat16
    assert {p.dtype for p in student.parameters()} == {torch.float32}
    half = run_trial(cfg)
    amp = run_trial({**cfg, "teacher_dtype": None, "amp": "bfloat16"})
    plain = run_trial({**cfg, "teacher_dtype": None})
    for s in (half, amp):
        assert s["status"] == "complete" and all(torch.isfinite(torch.tensor(_losses(s))))
        # lower precision moves the numbers a little, not the training: the same trial within a few percent
        assert s["quality"] == pytest.approx(plain["quality"], rel=0.05)
        assert s["quality"] < s["quality_at_init"]
    assert _losses(amp) != _losses(plain)  # autocast did run in bfloat16


def test_precision_settings_that_cannot_work_are_config_errors(tiny_lm_teacher, text_corpus):
    base = _lm_config(tiny_lm_teacher, text_corpus)
    with pytest.raises(ConfigError, match="amp float16 needs a CUDA device"):
        load_trial_config({**base, "device": "cpu", "amp": "float16"})
    with pytest.raises(ConfigError, match="dtype bfloat16"):
        load_trial_config({**base, "amp": "bfloat16", "dtype": "bfloat16"})
    with pytest.raises(ConfigError, match="teacher_dtype"):
        load_trial_config({**base, "teacher_dtype": "int8"})


def test_memory_check_refuses_before_loading_and_names_the_sizes(tiny_lm_teacher, text_corpus, monkeypatch):
    from trials.inputs import build_student, load_teacher
    from trials.memory import _sizes

    cfg = load_trial_config(_lm_config(tiny_lm_teacher, text_corpus, device="cpu"))
    teacher = load_teacher(cfg, torch.device("cpu"))[0]
    n = sum(p.numel() for p in teacher.parameters())
    # the sizes come from the config on the meta device and the plan: the teacher's exact, the student's at least
    # what it is (its factored embedding counted with the table it keeps for the tied LM head)
    assert _sizes(cfg)[0] == n
    built = sum(p.numel() for p in build_student(cfg, teacher)[0].parameters())
    n_student = _sizes(cfg)[1]
    assert built <= n_student < n
    need = trial_memory(cfg, n, n_student)
    s4 = 4 * n_student
    assert need == {"teacher": 4 * n, "student": s4, "gradients": s4, "optimizer": 2 * s4, "total": 4 * n + 4 * s4}
    half = load_trial_config(_lm_config(tiny_lm_teacher, text_corpus, device="cpu", teacher_dtype="bfloat16"))
    assert trial_memory(half, n)["teacher"] == 2 * n
    assert check_trial_memory(cfg, torch.device("cpu"), free=need["total"])["total"] == need["total"]
    with pytest.raises(DataError, match=r"needs at least .* GiB on cpu .* teacher 0\.\d+M parameters in float32.*"
                                        r"teacher_dtype: bfloat16"):
        check_trial_memory(cfg, torch.device("cpu"), free=need["total"] - 1)
    # a trial refused this way loads nothing: the error comes before the teacher
    import trials.trial as tt

    clear_caches()
    monkeypatch.setenv("KRONSEARCH_FREE_MEMORY_GB", "0.0001")
    monkeypatch.setattr(tt, "load_teacher", lambda *a, **k: pytest.fail("loaded the teacher"))
    with pytest.raises(DataError, match="needs at least"):
        run_trial(_lm_config(tiny_lm_teacher, text_corpus, device="cpu"))
    monkeypatch.undo()
    monkeypatch.setenv("KRONSEARCH_FREE_MEMORY_GB", "0.0001")  # memory_check false: the same trial runs
    ok = run_trial({**_lm_config(tiny_lm_teacher, text_corpus, device="cpu"), "memory_check": False})
    assert ok["status"] == "complete" and "memory_estimate_gib" not in ok
    monkeypatch.delenv("KRONSEARCH_FREE_MEMORY_GB")
    checked = run_trial(_lm_config(tiny_lm_teacher, text_corpus, device="cpu"))
    assert checked["memory_estimate_gib"] == pytest.approx(need["total"] / 2**30, abs=1e-3)
