"""Calibration data from trial sources (trials.calibration): token budget, held-out split, disk cache keyed by model,
data and budget, bad sources; `init: data` in trial configs; `kronsearch compress --init data --calib` end to end."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from kron.errors import ConfigError, DataError
from trials.calibration import calibration_batches, calibration_stats
from trials.config import load_trial_config


@pytest.fixture
def teacher_and_tok(tiny_lm_teacher):
    from kron.models import load_model, load_tokenizer

    return load_model(str(tiny_lm_teacher), device="cpu"), load_tokenizer(str(tiny_lm_teacher))


def test_budget_and_heldout_split(teacher_and_tok, text_corpus):
    model, tok = teacher_and_tok
    fit, held = calibration_batches(model, tok, str(text_corpus), 512, seq_len=32)
    assert sum(b.numel() for b in fit) + sum(b.numel() for b in held) == 512
    assert sum(b.numel() for b in held) == 64  # 1/8 of the 16 blocks


def test_cache_hit_and_miss(teacher_and_tok, text_corpus, tmp_path):
    model, tok = teacher_and_tok
    first = calibration_stats(model, tok, str(text_corpus), 512, seq_len=32, cache_dir=tmp_path)
    assert not first.from_cache and first.tokens == 448 and first.heldout_tokens == 64
    again = calibration_stats(model, tok, str(text_corpus), 512, seq_len=32, cache_dir=tmp_path)
    assert again.from_cache and again.directory == first.directory
    name = "transformer.h.0.mlp.c_proj"
    assert torch.equal(again.S(name), first.S(name))
    other = [calibration_stats(model, tok, str(text_corpus), 768, seq_len=32, cache_dir=tmp_path),  # budget
             calibration_stats(model, tok, str(text_corpus), 512, seq_len=16, cache_dir=tmp_path)]  # seq len
    changed = model.__class__(model.config)  # other weights, same config
    other.append(calibration_stats(changed, tok, str(text_corpus), 512, seq_len=32, cache_dir=tmp_path))
    assert all(not s.from_cache for s in other)
    assert len({s.directory for s in [first, *other]}) == 4
    train = text_corpus / "train.txt"
    st = train.stat()
    os.utime(train, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the data changed: collect again
    try:
        assert not calibration_stats(model, tok, str(text_corpus), 512, seq_len=32, cache_dir=tmp_path).from_cache
    finally:
        os.utime(train, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_teacher_samples_source(teacher_and_tok, tmp_path, monkeypatch):
    monkeypatch.setenv("KRONSEARCH_CACHE", str(tmp_path))
    model, tok = teacher_and_tok
    stats = calibration_stats(model, tok, "teacher-samples", 256, seq_len=32, cache_dir=tmp_path)
    assert stats.tokens + stats.heldout_tokens == 256 and stats.key["source"] == {"teacher_samples": True}


def test_glue_sentences_source(tiny_bert_classifier, sst2_dir, tmp_path):
    from kron.models import load_model, load_tokenizer

    model = load_model(str(tiny_bert_classifier), device="cpu")
    tok = load_tokenizer(str(tiny_bert_classifier))
    stats = calibration_stats(model, tok, f"glue:sst2:{sst2_dir}", 200, cache_dir=tmp_path)
    assert stats.tokens + stats.heldout_tokens >= 200 and stats.heldout_tokens > 0
    name = next(n for n in stats.names if n.endswith("attention.self.query"))
    assert torch.isfinite(stats.S(name)).all()


@pytest.mark.parametrize("source, tokens, error, message", [
    ("/nonexistent/corpus.txt", 512, DataError, "does not exist"),
    ("CORPUS", 10**7, DataError, r"has [\d,]+ tokens \(\d+ blocks of 32\), fewer than the 10,000,000 asked for"),
    ("CORPUS", 40, ConfigError, "below two blocks of 32 tokens"),
    ("", 512, ConfigError, "calibration source is empty"),
    ("glue:", 512, ConfigError, "name a GLUE task"),
])
def test_bad_sources(teacher_and_tok, text_corpus, tmp_path, source, tokens, error, message):
    model, tok = teacher_and_tok
    source = str(text_corpus) if source == "CORPUS" else source
    with pytest.raises(error, match=message):
        calibration_stats(model, tok, source, tokens, seq_len=32, cache_dir=tmp_path)


def test_trial_config_init():
    base = {"teacher": "demo", "plan": {"preset": "uniform:2"}}
    assert load_trial_config(base).init_config.method == "svd"
    assert load_trial_config({**base, "init": "data"}).init_config.calib is None
    cfg = load_trial_config({**base, "init": {"method": "data", "calib": "teacher-samples", "calib_tokens": 1024}})
    assert cfg.init_config.calib == "teacher-samples" and cfg.init_config.calib_tokens == 1024
    with pytest.raises(ConfigError, match="calib is for init method 'data'"):
        load_trial_config({**base, "init": {"method": "svd", "calib": "x"}})
    with pytest.raises(ConfigError, match="init"):
        load_trial_config({**base, "init": "random"})


def test_build_student_with_data_init(tiny_lm_teacher, text_corpus, tmp_path, monkeypatch):
    from trials.inputs import build_student, load_teacher

    monkeypatch.setenv("KRONSEARCH_CACHE", str(tmp_path))
    cfg = load_trial_config({
        "teacher": str(tiny_lm_teacher), "plan": {"preset": "uniform:2"},
        "data": {"source": str(text_corpus), "seq_len": 32},
        "init": {"method": "data", "calib_tokens": 512}})  # calibrated on the stage-1 data by default
    teacher, _ = load_teacher(cfg, torch.device("cpu"))
    student, comp, _ = build_student(cfg, teacher)
    assert comp["init"] == "data" and comp["calib"]["tokens"] == 448
    assert all(m["output_error"] is not None and m["init"] in ("data", "svd") for m in comp["modules"])
    assert all(m["spec"]["shape"][2] == 1 for m in comp["modules"])  # input splits under data-aware init
    # a second trial with the same teacher and statistics restores the layers (kron.initcache): the same student
    from kron.initcache import process_init_cache

    hits = process_init_cache().hits
    again, comp2, _ = build_student(cfg, teacher)
    assert process_init_cache().hits - hits == len(comp["modules"])
    assert [(m["output_error"], m["init_error"]) for m in comp2["modules"]] == \
           [(m["output_error"], m["init_error"]) for m in comp["modules"]]
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), again.state_dict().values()))
    svd_cfg = load_trial_config({**cfg.model_dump(mode="json"), "init": "svd"})
    _, svd_comp, _ = build_student(svd_cfg, teacher)
    assert svd_comp["init"] == "svd" and svd_comp["calib"] is None
    assert [m["spec"] for m in svd_comp["modules"]] != [m["spec"] for m in comp["modules"]]


def test_cli_compress_init_data(tiny_lm_teacher, text_corpus, tmp_path, monkeypatch, capsys):
    from kron.io import load_compressed
    from search.cli import main

    monkeypatch.setenv("KRONSEARCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "student"
    rc = main(["compress", "--model", str(tiny_lm_teacher), "--plan", "uniform:2", "--out", str(out), "--init",
               "data", "--calib", str(text_corpus), "--calib-tokens", "512", "--calib-seq-len", "32", "--json",
               "--device", "cpu"])
    o, e = capsys.readouterr()
    assert rc == 0, e
    d = json.loads(o)
    assert d["init"] == "data" and all(math.isfinite(v) for v in d["output_errors"].values())
    assert all(m["output_error"] is not None for m in d["modules"])
    model = load_compressed(out, device="cpu")
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()
    rc = main(["compress", "--model", str(tiny_lm_teacher), "--plan", "uniform:2", "--out", str(out), "--init",
               "data", "--calib", str(text_corpus), "--calib-tokens", "512", "--calib-seq-len", "32", "--overwrite"])
    o, e = capsys.readouterr()
    assert rc == 0 and "out_err" in o and "held-out tokens" in o
    for argv, message in [
        (["--init", "data"], "--init data needs calibration data: --calib SRC"),
        (["--init", "data", "--calib", str(tmp_path / "missing")], "does not exist"),
        (["--calib-tokens", "100"], "--calib-tokens and --calib-config describe --calib"),
    ]:
        rc = main(["compress", "--model", str(tiny_lm_teacher), "--plan", "uniform:2", "--out", str(tmp_path / "x"),
                   *argv])
        _, e = capsys.readouterr()
        assert rc == 2 and message in e and "Traceback" not in e


def test_the_init_ridge_is_validated_with_the_trial_config():
    from pydantic import ValidationError

    from trials.config import InitConfig

    assert InitConfig(method="data", ridge=0.0).ridge == 0.0
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValidationError):
            InitConfig(method="data", ridge=bad)
    with pytest.raises(ValidationError, match="ridge is for init method 'data'"):
        InitConfig(method="svd", ridge=0.1)


def test_compress_cli_ridge_needs_the_data_init(capsys):
    from search.cli import main

    assert main(["compress", "--model", "demo", "--plan", "uniform:2", "--out", "x", "--ridge", "0.1"]) == 2
    assert "--ridge is the data-aware init's" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["compress", "--model", "demo", "--plan", "uniform:2", "--out", "x", "--ridge", "-1"])
