"""lm-evaluation-harness on models in memory (trials.harness), `kronsearch eval --lm-eval`, and a trial whose quality
is a harness score — offline, on a tiny multiple-choice task written from local files, checked against a hand
computation of the same log-likelihoods."""
from __future__ import annotations

import json
import math
import random
import sys

import pytest
import torch
import yaml

from kron.errors import ConfigError
from search.cli import main

from .conftest import WORDS

N_DOCS = 12


@pytest.fixture
def lm_eval_installed(monkeypatch):
    pytest.importorskip("lm_eval", reason='lm-evaluation-harness is an optional extra: pip install '
                                          '"kronsearch[lm-eval]"')
    # nothing may download: the task's data are local files, the model and tokenizer are on disk
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _docs() -> list[dict]:
    rng = random.Random(7)
    docs = []
    for _ in range(N_DOCS):
        k = rng.randint(2, 4)
        # choices of one to three words, so length normalisation (acc_norm) can change the pick
        choices = list(dict.fromkeys(" ".join(rng.sample(WORDS, rng.randint(1, 3))) for _ in range(k)))
        docs.append({"question": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 7))),
                     "choices": choices, "label": rng.randrange(len(choices))})
    return docs


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A folder with one lm-eval task, tiny_choice, over a local JSON-lines file (one folder for the module, so
    lm-eval's task index of it is built once)."""
    root = tmp_path_factory.mktemp("lm-eval-tasks")
    data = root / "tiny_choice.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in _docs()))
    task = {
        "task": "tiny_choice",
        # cache_dir: the json builder's cache stays in the test's folder, not ~/.cache/huggingface
        "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(root / "hf")},
        "test_split": "test", "output_type": "multiple_choice",
        "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}", "doc_to_target": "label",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
    }
    (root / "tiny_choice.yaml").write_text(yaml.safe_dump(task))
    return root


@torch.no_grad()
def hand_accuracy(model, tokenizer, docs: list[dict]) -> dict[str, float]:
    """acc and acc_norm computed by hand: per choice, the summed log-likelihood of the continuation tokens
    (" " + choice after the question; the continuation is what tokenising the whole adds to the question's tokens),
    the pick is the highest (acc) or the highest per character of the choice (acc_norm); `changed`: the documents
    where the two picks differ."""
    hits = {"acc": 0, "acc_norm": 0}
    changed = 0
    for doc in docs:
        context = tokenizer(doc["question"])["input_ids"]
        lls = []
        for choice in doc["choices"]:
            whole = tokenizer(doc["question"] + " " + choice)["input_ids"]
            logp = model(input_ids=torch.tensor([whole])).logits[0].double().log_softmax(-1)
            lls.append(sum(float(logp[len(context) - 1 + i, t]) for i, t in enumerate(whole[len(context):])))
        for name, scores in (("acc", lls), ("acc_norm", [ll / len(c) for ll, c in zip(lls, doc["choices"])])):
            top = sorted(scores, reverse=True)
            assert top[0] - top[1] > 1e-4, "a near tie: float noise could flip the pick; change the documents"
            hits[name] += scores.index(top[0]) == doc["label"]
        changed += lls.index(max(lls)) != scores.index(top[0])
    return {**{k: v / len(docs) for k, v in hits.items()}, "changed": changed}


def _save_kngpt2(teacher_dir, out):
    """The tiny teacher compressed by the kngpt2 preset (the embedding factored, so the LM head is untied) and saved
    as a compressed-model folder."""
    from kron.io import save_compressed
    from kron.models import load_model
    from kron.surgery import compress

    model = load_model(str(teacher_dir), device="cpu")
    compress(model, "kngpt2")
    save_compressed(model, None, out)
    return out


@pytest.fixture
def models(tiny_lm_teacher, tmp_path):
    """({"plain": the tiny teacher's folder, "compressed": a kngpt2 compressed-model folder}, the tokenizer)."""
    from kron.models import load_tokenizer

    folders = {"plain": tiny_lm_teacher, "compressed": _save_kngpt2(tiny_lm_teacher, tmp_path / "kngpt2")}
    return folders, load_tokenizer(str(tiny_lm_teacher))


@pytest.mark.parametrize("kind", ["plain", "compressed"])
def test_harness_scores_equal_the_hand_computation(kind, models, task_dir, lm_eval_installed):
    from kron.models import load_model
    from trials.harness import harness_quality, main_metric, run_harness

    folders, tokenizer = models
    model = load_model(str(folders[kind]), device="cpu")
    probe = torch.arange(20).unsqueeze(0)
    with torch.no_grad():
        before = model(input_ids=probe).logits
    docs = _docs()
    hand = hand_accuracy(model, tokenizer, docs)
    assert 0 < hand["acc"] < 1 and hand["changed"]  # a test that can tell the picks apart

    result = run_harness(model, tokenizer, ["tiny_choice"], batch_size=3, include_path=str(task_dir))
    metrics = result["tasks"]["tiny_choice"]
    assert metrics["acc"] == pytest.approx(hand["acc"]) and metrics["acc_norm"] == pytest.approx(hand["acc_norm"])
    p = hand["acc"]  # lm-eval's stderr of a mean: the sample standard deviation over sqrt(n)
    assert metrics["acc_stderr"] == pytest.approx(math.sqrt(p * (1 - p) * N_DOCS / (N_DOCS - 1) / N_DOCS))
    assert metrics["samples"] == N_DOCS and result["limit"] is None and result["lm_eval_version"]
    assert main_metric(metrics) == ("acc_norm", metrics["acc_norm"]) and main_metric(metrics, "acc")[0] == "acc"
    assert harness_quality(result, ["tiny_choice"]) == pytest.approx(hand["acc_norm"])
    with torch.no_grad():  # HFLM's tie_weights() left the (untied, factored) LM head as it was
        assert torch.equal(model(input_ids=probe).logits, before)

    limited = run_harness(model, tokenizer, "tiny_choice", limit=5, include_path=str(task_dir))
    assert limited["tasks"]["tiny_choice"]["acc"] == pytest.approx(hand_accuracy(model, tokenizer, docs[:5])["acc"])
    assert limited["tasks"]["tiny_choice"]["samples"] == 5 and limited["limit"] == 5


def test_eval_cli_prints_the_harness_metrics(models, task_dir, lm_eval_installed, capsys):
    from kron.models import load_model

    folders, tokenizer = models
    argv = ["eval", "--model", str(folders["compressed"]), "--tokenizer", str(folders["plain"]), "--lm-eval",
            "tiny_choice", "--lm-eval-include", str(task_dir), "--limit", "2", "--device", "cpu"]
    rc = main(argv + ["--json"])
    result = json.loads(capsys.readouterr().out)
    hand = hand_accuracy(load_model(str(folders["compressed"]), device="cpu"), tokenizer, _docs()[:2])
    assert rc == 0 and result["model"] == str(folders["compressed"]) and result["limit"] == 2
    assert result["tasks"]["tiny_choice"]["acc"] == pytest.approx(hand["acc"])
    assert result["tasks"]["tiny_choice"]["samples"] == 2 and result["params"] > 0

    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"tasks.tiny_choice.acc: {hand['acc']:.4f}" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lm-eval", "no_such_task", "--lm-eval-include", "{tasks}"], "unknown lm-eval task 'no_such_task'"),
        (["--lm-eval", "tiny_choice", "--lm-eval-include", "{tasks}/missing"], "include path"),
        (["--lm-eval", " , "], "no task names"),
        (["--lm-eval", "tiny_choice", "--data", "x"], "give exactly one of --data"),
    ],
)
def test_eval_cli_user_errors_exit_2_with_one_line(argv, message, tiny_lm_teacher, task_dir, lm_eval_installed,
                                                   capsys):
    rc = main(["eval", "--model", str(tiny_lm_teacher)] + [a.replace("{tasks}", str(task_dir)) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and len(err.strip().splitlines()) == 1


def test_missing_lm_eval_says_how_to_install(monkeypatch, tiny_gpt2):
    from trials.harness import run_harness

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    with pytest.raises(ConfigError, match=r'pip install "kronsearch\[lm-eval\]"'):
        run_harness(tiny_gpt2, None, ["arc_easy"])


def test_trial_quality_is_the_harness_score_of_the_best_checkpoint(tiny_lm_teacher, text_corpus, task_dir,
                                                                   lm_eval_installed, tmp_path):
    from kron.io import load_compressed
    from kron.models import load_model, load_tokenizer
    from trials.trial import run_trial

    cfg = {
        "teacher": str(tiny_lm_teacher),
        "plan": {"preset": "uniform:2"},
        "data": {"source": str(text_corpus), "seq_len": 32, "val_blocks": 6},
        # a learning rate far too high: perplexity rises after the first steps, so the best checkpoint is not the
        # last weights and has to be put back before the harness scores it
        "stage1": {"lr": 0.5, "batch_size": 4, "max_steps": 4, "eval_every": 1, "early_stopping": None},
        "lm_eval": {"tasks": ["tiny_choice"], "include_path": str(task_dir), "limit": 6},
    }
    summary, student = run_trial(cfg, output_dir=tmp_path / "run", progress=False, return_student=True)
    assert summary["status"] == "complete"
    assert summary["quality_name"] == "lm_eval_acc" and summary["quality_mode"] == "max"
    val = [h["quality"] for h in summary["history"]]
    assert summary["val_ppl"] == min(val) and val[-1] != min(val)

    best = load_compressed(tmp_path / "run" / "checkpoint", device="cpu")
    probe = torch.arange(20).unsqueeze(0)
    with torch.no_grad():
        assert torch.allclose(student.to("cpu")(input_ids=probe).logits, best(input_ids=probe).logits, atol=1e-5)
    tokenizer = load_tokenizer(str(tiny_lm_teacher))
    docs = _docs()[:6]
    assert summary["quality"] == pytest.approx(hand_accuracy(best, tokenizer, docs)["acc_norm"])
    teacher = load_model(str(tiny_lm_teacher), device="cpu")
    assert summary["teacher_quality"] == pytest.approx(hand_accuracy(teacher, tokenizer, docs)["acc_norm"])
    assert summary["lm_eval"]["tasks"]["tiny_choice"]["samples"] == 6 and summary["quality_at_init"] is None


@pytest.mark.parametrize(
    "section, message",
    [
        ({"tasks": []}, "lm_eval.tasks"),
        ({"tasks": ["arc_easy"], "limit": 0}, "lm_eval.limit"),
        ({"tasks": ["arc_easy"], "batch": 4}, "lm_eval.batch: unknown key"),
    ],
)
def test_bad_lm_eval_sections_are_config_errors(section, message):
    from trials.config import load_trial_config

    with pytest.raises(ConfigError, match=message):
        load_trial_config({"teacher": "demo", "plan": {"preset": "kngpt2"}, "lm_eval": section})


def test_lm_eval_quality_and_its_search(tmp_path):
    from search.config import load_search_config
    from trials.config import load_trial_config

    base = {"teacher": "demo", "plan": {"preset": "kngpt2"}}
    cfg = load_trial_config({**base, "lm_eval": {"tasks": ["arc_easy", "piqa"], "metric": "acc_norm"}})
    assert (cfg.quality_name, cfg.quality_mode) == ("lm_eval_acc_norm", "max")
    with pytest.raises(ConfigError, match="remove lm_eval or glue"):
        load_trial_config({**base, "lm_eval": {"tasks": ["arc_easy"]}, "glue": {"task": "sst2"}})

    trial = {"teacher": "demo", "lm_eval": {"tasks": ["arc_easy"], "include_path": str(tmp_path)}}
    with pytest.raises(ConfigError, match="set search.asha: null"):  # ASHA would rank on a quality not yet known
        load_search_config({"name": "h", "trial": trial})
    search = load_search_config({"name": "h", "trial": trial, "search": {"asha": None}})
    assert search.objective_metrics() == (["quality", "params"], ["max", "min"])
    assert search.trial_section["lm_eval"]["include_path"] == str(tmp_path.resolve())
