"""The driver's work before a local Ray starts (`search.reference.prepare_locally`): the data once, the teacher reference
in-process, errors before Ray. No Ray needed."""
from __future__ import annotations

import io
import json

import pytest
import torch

from kron.vocab import SUMMARY_NAME
from search.config import load_search_config
from search.reference import REFERENCE_DIR, _prepare_device, prepare_locally
from search.tuner import run_search


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("KRONSEARCH_CACHE", str(path))
    return path


def _cfg(tiny_search, **search):
    return load_search_config(tiny_search(**search))


def test_prepare_builds_the_data_cache_and_the_reference(tiny_search, fresh_cache, tmp_path):
    import trials.inputs as tt

    cfg = _cfg(tiny_search, reference=True)
    threads = torch.get_num_threads()
    out = io.StringIO()
    timings = prepare_locally(cfg, tmp_path / "exp", out)
    # the teacher samples (train, validation, and the calibration text of the data-aware init) are on disk
    assert len(list((fresh_cache / "teacher_samples").glob("*.safetensors"))) == 3
    assert any((fresh_cache / "calibration").iterdir())
    ref = json.loads((tmp_path / "exp" / REFERENCE_DIR / SUMMARY_NAME).read_text())
    assert ref["method"] == "teacher" and ref["status"] == "complete" and ref["search"] == cfg.name
    assert ref["quality"] > 1 and ref["steps"] == 0
    assert "teacher reference: val_ppl" in out.getvalue()
    assert set(timings) == {"teacher_s", "data_s", "calibration_s", "reference_s"}
    assert all(v >= 0 for v in timings.values())
    # the driver keeps neither the teacher nor the data, and its thread count is restored
    assert not tt._TEACHERS and not tt._DATA
    assert torch.get_num_threads() == threads


def test_trials_after_prepare_read_the_cached_samples(tiny_search, fresh_cache, tmp_path, monkeypatch):
    """What the driver sampled is what a worker finds: a trial afterwards samples nothing itself."""
    from search.space import SearchSpace
    from trials.trial import run_trial

    cfg = _cfg(tiny_search)
    prepare_locally(cfg, tmp_path / "exp")
    space = SearchSpace.from_config(cfg)
    from search.config import with_search_defaults

    trial = {**with_search_defaults(cfg.trial_section), "plan": {"rules": space.to_plan_rules(space.sample(0))},
             "method": "mixed"}  # as the trainable builds it: data-aware init, calibrated from the driver's cache

    def no_sampling(*a, **k):
        raise AssertionError("the trial sampled teacher text again instead of reading the driver's cache")

    monkeypatch.setattr(torch, "multinomial", no_sampling)
    summary = run_trial(trial, output_dir=tmp_path / "t")
    assert summary["status"] == "complete"


def test_existing_reference_is_kept(tiny_search, fresh_cache, tmp_path):
    cfg = _cfg(tiny_search, reference=True)
    ref = tmp_path / "exp" / REFERENCE_DIR / SUMMARY_NAME
    ref.parent.mkdir(parents=True)
    ref.write_text('{"kept": true}')
    timings = prepare_locally(cfg, tmp_path / "exp")
    assert "reference_s" not in timings and json.loads(ref.read_text()) == {"kept": True}


def test_failing_reference_is_a_warning(tiny_search, fresh_cache, tmp_path, monkeypatch):
    import search.reference as reference

    def broken(trial, out_dir):
        raise RuntimeError("teacher evaluation broke")

    monkeypatch.setattr(reference, "_reference_task", broken)
    err = io.StringIO()
    timings = prepare_locally(_cfg(tiny_search, reference=True), tmp_path / "exp", err)
    assert "reference_s" not in timings and "data_s" in timings
    assert "warning: the teacher reference evaluation failed: teacher evaluation broke" in err.getvalue()


def test_bad_data_fails_before_ray_starts(tiny_search, fresh_cache, tmp_path, monkeypatch):
    """A corpus too short for one block is reported by the driver's preparation; Ray is never started."""
    import search.tuner as tuner
    from kron.errors import UserError

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for split in ("train", "valid"):
        (corpus / f"{split}.txt").write_text("the teacher\n")
    raw = tiny_search()
    raw["trial"]["data"] = {"source": str(corpus), "seq_len": 16, "val_blocks": 4}
    cfg = load_search_config(raw)
    monkeypatch.setattr(tuner, "ray_running", lambda: False)

    def no_ray(cfg):
        raise AssertionError("Ray was started although the data is unusable")

    monkeypatch.setattr(tuner, "start_ray", no_ray)
    with pytest.raises(UserError, match="fewer than one block"):
        run_search(cfg)


@pytest.mark.parametrize("device,gpu,expected", [("auto", 0, "cpu"), ("auto", 0.5, "auto"), ("cuda:1", 1, "cuda:1"),
                                                 ("cpu", 0, "cpu")])
def test_prepare_device_follows_the_trials(tiny_search, device, gpu, expected):
    raw = tiny_search()
    raw["trial"]["device"] = device
    raw["search"]["resources"] = {"cpu": 1, "gpu": gpu}
    assert _prepare_device(load_search_config(raw)) == expected


def test_a_space_is_data_and_its_preparation_a_named_step(tiny_search, fresh_cache, monkeypatch):
    """`SearchSpace.from_config` reads no weights and no data, whatever the config asks for; the prior's damages and
    the automatic seeds come from `prepare_space`, which says what it does on its own line (and is done once)."""
    import trials.inputs as tt
    from search.prepare import prepare_space
    from search.space import SearchSpace

    cfg = _cfg(tiny_search, seed_plans=["auto:2"], seed_damage="proxy")
    real_load = tt.load_teacher
    monkeypatch.setattr(tt, "load_teacher", lambda *a, **k: pytest.fail("read the teacher's weights"))
    space = SearchSpace.from_config(cfg)
    assert not space.seeds and space.damages is None and not space.prepared
    monkeypatch.setattr(tt, "load_teacher", real_load)
    out = io.StringIO()
    prepared = prepare_space(cfg, space, stream=out)
    assert prepared.prepared and len(prepared.seeds) == 2 and prepared.damages
    lines = out.getvalue().splitlines()
    assert lines[0] == (f"preparing the space of {cfg.name}: the teacher's sensitivity to every option and 1 seed "
                        "plan(s) ...")
    assert lines[-1].startswith(f"prepared the space of {cfg.name} in ") and lines[-1].endswith(": 2 seed plan(s)")
    assert prepare_space(cfg, prepared, stream=out) is prepared  # once
