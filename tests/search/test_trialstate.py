"""search.trialstate: what Ray Tune keeps of an ended trial is trimmed without losing what anything reads."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

pytest.importorskip("ray.tune")

from ray.tune.experiment import Trial  # noqa: E402
from ray.tune.trainable.metadata import _TrainingRunMetadata  # noqa: E402

from search.trialstate import TrimEndedTrials, trim_trial_state  # noqa: E402


def _trial_with_results(n: int = 7) -> Trial:
    trial = Trial("__fake", stub=True)
    for i in range(1, n + 1):
        trial.update_last_result({"quality": 10.0 - i, "loss": 1.0 / i, "params": 1234, "training_iteration": i,
                                  "config": {"L0.on": 1}})
    return trial


def test_an_ended_trial_loses_its_windows_not_its_statistics():
    trial = _trial_with_results()
    meta = trial.run_metadata
    assert set(meta.metric_n_steps) >= {"quality", "loss", "params"}  # Ray keeps windows (the thing trimmed)
    analysis = json.loads(json.dumps(meta.metric_analysis))
    last = dict(trial.last_result)
    before = len(meta.get_json_state())

    assert trim_trial_state(trial) is True
    assert dict(meta.metric_n_steps) == {}
    assert meta.metric_analysis == analysis  # last-5-avg / last-10-avg included, as computed before the trim
    assert meta.metric_analysis["quality"]["last-5-avg"] == pytest.approx(sum(10.0 - i for i in range(3, 8)) / 5)
    assert trial.last_result == last
    after = meta.get_json_state()  # the cached JSON was dropped and rebuilt smaller
    assert len(after) < before
    restored = _TrainingRunMetadata.from_json_state(after)  # what --resume reads back
    assert restored.metric_analysis == analysis and restored.metric_n_steps == {}

    assert trim_trial_state(trial) is False  # nothing left to trim


def test_a_result_after_the_trim_refills_the_windows_instead_of_failing():
    trial = _trial_with_results(3)
    trim_trial_state(trial)
    trial.update_last_result({"quality": 1.0, "training_iteration": 4})  # Ray drops these; must not raise if not
    windows = trial.run_metadata.metric_n_steps["quality"]
    assert list(windows["5"]) == [1.0] and windows["10"].maxlen == 10


def test_a_trimmed_trial_pickles_and_copies():
    # Ray may pickle or copy a Trial (its experiment state, result grids): the stand-in must survive both
    import copy
    import pickle

    trial = _trial_with_results(3)
    trim_trial_state(trial)
    for clone in (pickle.loads(pickle.dumps(trial.run_metadata.metric_n_steps)),
                  copy.deepcopy(trial.run_metadata.metric_n_steps)):
        assert dict(clone) == {} and list(clone["loss"]["10"]) == []


def test_objects_without_ray_run_metadata_are_left_alone():
    assert trim_trial_state(SimpleNamespace()) is False
    assert trim_trial_state(SimpleNamespace(run_metadata=SimpleNamespace())) is False


def test_the_callback_trims_completed_and_failed_trials():
    cb = TrimEndedTrials()
    done, failed = _trial_with_results(), _trial_with_results()
    cb.on_trial_complete(iteration=1, trials=[done, failed], trial=done)
    cb.on_trial_error(iteration=1, trials=[done, failed], trial=failed)
    assert dict(done.run_metadata.metric_n_steps) == {} and dict(failed.run_metadata.metric_n_steps) == {}
