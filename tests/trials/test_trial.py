"""One trial end to end on tiny teachers, early stopping, divergence, config errors."""
import json
import math

import pytest
import torch

from kron.errors import ConfigError
from trials.config import load_trial_config
from trials.trial import SUMMARY_NAME, clear_caches, run_trial


def _lm_config(teacher, corpus, **over):
    cfg = {
        "teacher": str(teacher),
        "plan": {"rules": [{"select": "h.*.mlp.c_fc", "shape": [64, 16, 2, 2]},
                           {"select": "attn.c_attn", "layers": "odd", "shape": [16, 16, 2, 2], "blocks": 3},
                           {"select": "transformer.wte", "embedding_factor": 2}]},
        "data": {"source": str(corpus), "seq_len": 32, "val_blocks": 8},
        "stage1": {"lr": 3e-3, "batch_size": 4, "max_steps": 12, "eval_every": 4,
                   "early_stopping": {"patience": 5}},
        "seed": 0,
    }
    cfg.update(over)
    return cfg


def test_lm_trial_end_to_end(tiny_lm_teacher, text_corpus, tmp_path):
    seen = []
    summary = run_trial(_lm_config(tiny_lm_teacher, text_corpus), report=lambda m, c: seen.append(m),
                        output_dir=tmp_path)
    assert summary["status"] == "complete"
    # the device the trial ran on ("auto" here: CUDA when there is one)
    assert summary["device"] == (f"{torch.cuda.get_device_name(0)} (cuda)" if torch.cuda.is_available() else "cpu")
    assert summary["quality_name"] == "val_ppl" and summary["quality_mode"] == "min"
    assert summary["params"] < summary["params_teacher"]
    assert summary["compression_ratio"] > 1
    assert math.isfinite(summary["quality"]) and math.isfinite(summary["quality_at_init"])
    assert summary["quality"] <= summary["quality_at_init"]  # best of the evaluations, including step 0
    steps = [h["step"] for h in summary["history"]]
    assert steps == [0, 4, 8, 12]
    for h in summary["history"][1:]:
        for key in ("loss", "loss_emb", "loss_att", "loss_hid", "loss_ce", "tokens_seen", "wall_time_s",
                    "throughput_tokens_per_s"):
            assert key in h, key
    assert [m["step"] for m in seen] == steps
    assert all(m["params"] == summary["params"] for m in seen)
    on_disk = json.loads((tmp_path / SUMMARY_NAME).read_text())
    assert on_disk["status"] == "complete" and on_disk["quality"] == summary["quality"]
    assert on_disk["plan_resolved"]["transformer.h.1.attn.c_attn"]["blocks"] == 3
    # The best checkpoint reloads without the teacher and reproduces the recorded validation perplexity.
    from kron.io import load_compressed
    from trials.evaluate import evaluate_lm  # noqa: F401
    from trials.inputs import load_lm_data

    student = load_compressed(tmp_path / "checkpoint")
    cfg = load_trial_config(_lm_config(tiny_lm_teacher, text_corpus))
    from trials.inputs import load_teacher

    teacher, tok = load_teacher(cfg, torch.device("cpu"))
    _, val = load_lm_data(cfg, teacher, tok, torch.device("cpu"))
    again = evaluate_lm(student, val, 4, torch.device("cpu"))["quality"]
    assert again == pytest.approx(summary["quality"], rel=1e-4)


def test_trial_from_teacher_samples_and_preset(tiny_lm_teacher, tmp_path):
    cfg = _lm_config(tiny_lm_teacher, None, plan={"preset": "uniform:2"},
                     data={"source": "teacher-samples", "seq_len": 32, "num_samples": 16, "val_blocks": 4})
    cfg["stage1"]["max_steps"] = 4
    summary = run_trial(cfg, output_dir=tmp_path, progress=False)
    assert summary["status"] == "complete"
    assert 1.5 < summary["compression_ratio"] < 2.5 or summary["params"] < summary["params_teacher"]


def test_early_stopping_on_plateau(tiny_lm_teacher, text_corpus, tmp_path):
    # lr 0: the validation perplexity never improves after step 0, so patience 2 stops after two more evaluations.
    cfg = _lm_config(tiny_lm_teacher, text_corpus)
    cfg["stage1"].update(lr=1e-12, max_steps=40, eval_every=2, early_stopping={"patience": 2, "min_delta": 0.01})
    summary = run_trial(cfg, output_dir=tmp_path, progress=False)
    assert summary["status"] == "complete"
    assert [h["step"] for h in summary["history"]] == [0, 2, 4]
    assert summary["steps"] == 4


def test_divergence_ends_the_trial_with_status_diverged(tiny_lm_teacher, text_corpus, tmp_path):
    cfg = _lm_config(tiny_lm_teacher, text_corpus)
    cfg["stage1"].update(lr=1e6, grad_clip=None, max_steps=40, eval_every=2, early_stopping=None)
    summary = run_trial(cfg, output_dir=tmp_path, progress=False)
    assert summary["status"] == "diverged"
    assert "non-finite loss" in summary["error"]
    assert summary["steps"] < 40
    assert json.loads((tmp_path / SUMMARY_NAME).read_text())["status"] == "diverged"


def test_glue_trial_on_tiny_bert_classifier(tiny_bert_classifier, sst2_dir, tmp_path):
    cfg = {
        "teacher": str(tiny_bert_classifier),
        "plan": {"rules": [{"select": "re:.*attention\\.self\\.(query|key|value)", "shape": [8, 8, 4, 4]},
                           {"select": "intermediate.dense", "shape": [8, 4, 8, 8]},
                           {"select": "re:.*layer\\.\\d+\\.output\\.dense", "layers": "all", "shape": [4, 8, 8, 8]}]},
        "stage1": None,
        "glue": {"task": "sst2", "source": str(sst2_dir), "max_len": 32},
        "stage2": {"lr": 1e-3, "batch_size": 8, "max_steps": 6, "eval_every": 3,
                   "distill": {"ce": 1.0, "logits": 1.0}},
    }
    summary = run_trial(cfg, output_dir=tmp_path, progress=False)
    assert summary["status"] == "complete"
    assert summary["quality_name"] == "accuracy" and summary["quality_mode"] == "max"
    assert 0.0 <= summary["quality"] <= 1.0
    assert [h["step"] for h in summary["history"]] == [0, 3, 6]
    assert "loss_logits" in summary["history"][-1] and "glue_accuracy" in summary["history"][-1]


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"stage1": {"lr": -1}}, "stage1.lr"),
        ({"teacher_model": "x"}, "teacher_model: unknown key"),
        ({"plan": None}, "needs a plan"),
        ({"plan": {"preset": "kngpt2", "file": "p.yaml"}}, "exactly one of preset, file or rules"),
        ({"method": "pruning"}, "method"),
        ({"stage2": {"max_steps": 3}}, "stage2 (task distillation) needs a glue task"),
        ({"method": "lowrank", "plan": None}, "method 'lowrank' needs exactly one of lowrank_ratio"),
        ({"method": "lowrank", "lowrank_ratio": 2}, "(got both)"),
        ({"method": "lowrank", "plan": None, "lowrank_ratio": 1}, "lowrank_ratio: Input should be greater than 1"),
        ({"method": "layerdrop", "plan": None}, "method 'layerdrop' needs keep_layers"),
        ({"method": "layerdrop", "keep_layers": "odd"}, "method 'layerdrop' keeps whole teacher layers"),
        ({"method": "layerdrop", "plan": None, "keep_layers": []}, "keep_layers is empty"),
        ({"method": "layerdrop", "plan": None, "keep_layers": "first"}, "keep_layers"),
        ({"lowrank_ratio": 2}, "method 'lowrank' needs exactly one of lowrank_ratio"),
        ({"keep_layers": "odd"}, "method 'layerdrop' keeps whole teacher layers and takes no plan"),
    ],
)
def test_bad_configs_name_the_field(patch, message):
    cfg = {"teacher": "demo", "plan": {"preset": "kngpt2"}}
    cfg.update(patch)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_trial_config(cfg)


def _baseline_config(teacher, corpus, **over):
    cfg = _lm_config(teacher, corpus, **{"plan": None, **over})
    cfg["stage1"].update(max_steps=8)
    return cfg


def _reload_and_check(tmp_path, summary, teacher, corpus):
    """The best checkpoint reloads through kron.models.load_model with the recorded size and perplexity."""
    from kron.models import load_model
    from kron.surgery import count_params
    from trials.evaluate import evaluate_lm
    from trials.inputs import load_lm_data, load_teacher

    student = load_model(tmp_path / "checkpoint", device="cpu", attn_implementation="eager")
    assert count_params(student) == summary["params"]
    cfg = load_trial_config(_lm_config(teacher, corpus))
    t, tok = load_teacher(cfg, torch.device("cpu"))
    _, val = load_lm_data(cfg, t, tok, torch.device("cpu"))
    assert evaluate_lm(student, val, 4, torch.device("cpu"))["quality"] == pytest.approx(summary["quality"], rel=1e-4)
    return student


def test_lowrank_trial_from_ratio(tiny_lm_teacher, text_corpus, tmp_path):
    summary = run_trial(_baseline_config(tiny_lm_teacher, text_corpus, method="lowrank", lowrank_ratio=2),
                        output_dir=tmp_path, progress=False)
    assert summary["status"] == "complete" and summary["method"] == "lowrank"
    assert summary["plan_summary"] == "lowrank 2x on attention+FFN"
    assert summary["plan"]["name"] == "lowrank:2"
    # d=32: Q, K, V blocks 32x32 -> rank floor(1024 / (2·64)) = 8; c_fc 128x32 -> floor(4096 / 320) = 12
    assert summary["plan_resolved"]["transformer.h.0.attn.c_attn"] == {"lowrank_rank": 8, "blocks": 3}
    assert summary["plan_resolved"]["transformer.h.1.mlp.c_fc"] == {"lowrank_rank": 12}
    assert summary["params"] < summary["params_teacher"] and summary["compression_ratio"] > 1
    assert math.isfinite(summary["quality"]) and summary["quality"] <= summary["quality_at_init"]
    assert set(summary["init_errors"]) == set(summary["plan_resolved"])
    assert (tmp_path / "checkpoint" / "kronsearch.json").is_file()
    from kron.layers import FusedLowRankLinear

    student = _reload_and_check(tmp_path, summary, tiny_lm_teacher, text_corpus)
    assert isinstance(student.transformer.h[0].attn.c_attn, FusedLowRankLinear)


def test_lowrank_trial_from_plan_rules(tiny_lm_teacher, text_corpus, tmp_path):
    cfg = _baseline_config(tiny_lm_teacher, text_corpus, method="lowrank",
                           plan={"rules": [{"select": "mlp.c_fc", "lowrank_rank": 4},
                                           {"select": "attn.c_attn", "layers": "odd", "lowrank_rank": 2, "blocks": 3}]})
    cfg["stage1"]["max_steps"] = 4
    summary = run_trial(cfg, output_dir=tmp_path, progress=False)
    assert summary["status"] == "complete"
    assert summary["plan_summary"] == "lowrank: 3 matrices, rank 2-4"
    assert summary["plan_resolved"]["transformer.h.1.attn.c_attn"] == {"lowrank_rank": 2, "blocks": 3}
    assert "transformer.h.0.attn.c_attn" not in summary["plan_resolved"]  # it lists the factored modules


@pytest.mark.parametrize("method, rules, message", [
    ("lowrank", [{"select": "mlp.c_fc", "factor": 2}],
     r"method 'lowrank': the plan makes module transformer.h.0.mlp.c_fc A .* \(kronecker\)"),
    ("kronecker", [{"select": "mlp.c_fc", "lowrank_rank": 2}],
     r"method 'kronecker': the plan makes module transformer.h.0.mlp.c_fc U·V .* \(lowrank\)"),
])
def test_a_named_method_must_be_what_the_plan_is(method, rules, message, tiny_lm_teacher, text_corpus, tmp_path):
    from kron.errors import UserError

    cfg = _lm_config(tiny_lm_teacher, text_corpus, method=method, plan={"rules": rules})
    with pytest.raises(UserError, match=message):
        run_trial(cfg, output_dir=tmp_path, progress=False)


@pytest.mark.parametrize("rules, method", [
    ([{"select": ["mlp.c_fc", "mlp.c_proj"], "lowrank_rank": 2}], "lowrank"),
    ([{"select": "mlp.c_fc", "factor": 2}, {"select": "wte", "embedding_factor": 2}], "kronecker"),
    ([{"select": "mlp.c_fc", "factor": 2}, {"select": "mlp.c_proj", "lowrank_rank": 2, "quantize": "int8"}], "mixed"),
])
def test_the_plan_says_what_a_trial_is(rules, method, tiny_lm_teacher, text_corpus, tmp_path):
    """No `method` in the config: a plan that is all low-rank is a low-rank trial (the baseline), Kronecker factors
    with a Kronecker embedding a Kronecker trial, and one that mixes structures a mixed trial."""
    cfg = _lm_config(tiny_lm_teacher, text_corpus, plan={"rules": rules})
    cfg.pop("method", None)
    summary = run_trial(cfg, output_dir=tmp_path, progress=False)
    assert summary["status"] == "complete" and summary["method"] == method


def test_layerdrop_trial(tiny_lm_teacher, text_corpus, tmp_path):
    summary = run_trial(_baseline_config(tiny_lm_teacher, text_corpus, method="layerdrop", keep_layers="odd"),
                        output_dir=tmp_path, progress=False)
    assert summary["status"] == "complete" and summary["method"] == "layerdrop"
    assert summary["plan_summary"] == "layerdrop keep [1] of 2 layers"
    assert summary["plan"] == {"method": "layerdrop", "keep_layers": [1], "teacher_layers": 2}
    assert summary["plan_resolved"] == {} and summary["init_errors"] == {}
    assert summary["params"] < summary["params_teacher"] and summary["compression_ratio"] > 1
    # the ILKD terms ran: student layer 0 was matched to teacher layer 1 (without a layer_map the depths differ)
    assert all("loss_att" in h and "loss_hid" in h for h in summary["history"][1:])
    assert math.isfinite(summary["quality"]) and summary["quality"] <= summary["quality_at_init"]
    ckpt = tmp_path / "checkpoint"
    assert (ckpt / "config.json").is_file() and (ckpt / "model.safetensors").is_file()
    assert not (ckpt / "kronsearch.json").exists()  # a plain transformers directory
    assert json.loads((ckpt / "layerdrop.json").read_text())["layer_map"] == [1]
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(str(ckpt)).config.n_layer == 1
    _reload_and_check(tmp_path, summary, tiny_lm_teacher, text_corpus)


def test_layerdrop_stage_layer_map_overrides(tiny_lm_teacher, text_corpus, tmp_path):
    cfg = _baseline_config(tiny_lm_teacher, text_corpus, method="layerdrop", keep_layers=[1])
    cfg["stage1"].update(max_steps=2, eval_every=2, distill={"layer_map": [5]})  # not a teacher layer: shows it is used
    with pytest.raises(ValueError, match=r"layer_map \[5\] must give one teacher layer in \[0, 2\)"):
        run_trial(cfg, output_dir=tmp_path, progress=False)


def test_layerdrop_glue_trial_on_tiny_bert(tiny_bert_classifier, sst2_dir, tmp_path):
    cfg = {"teacher": str(tiny_bert_classifier), "method": "layerdrop", "keep_layers": [0], "stage1": None,
           "glue": {"task": "sst2", "source": str(sst2_dir), "max_len": 32},
           "stage2": {"lr": 1e-3, "batch_size": 8, "max_steps": 4, "eval_every": 2,
                      "distill": {"ce": 1.0, "logits": 1.0}}}
    summary = run_trial(cfg, output_dir=tmp_path, progress=False)
    assert summary["status"] == "complete" and 0.0 <= summary["quality"] <= 1.0
    from kron.models import load_model
    from kron.surgery import count_params

    student = load_model(tmp_path / "checkpoint", device="cpu")
    assert type(student).__name__ == "BertForSequenceClassification" and student.config.num_hidden_layers == 1
    assert count_params(student) == summary["params"]


@pytest.fixture(autouse=True)
def _fresh_caches():
    clear_caches()
    yield
    clear_caches()


def test_a_hand_made_plan_marked_reference_is_a_baseline_in_analysis(tiny_lm_teacher, text_corpus, tmp_path):
    """`reference: true`: a hand-written plan (not a preset) is listed with the baselines, not as a search member;
    without it the same trial is a plain kronecker trial; a search's trials cannot be references."""
    from analysis.results import is_reference, load_results
    from search.config import load_search_config

    cfg = _lm_config(tiny_lm_teacher, text_corpus, reference=True, label="my-plan")
    cfg["stage1"]["max_steps"] = 2
    summary = run_trial(cfg, output_dir=tmp_path / "ref", progress=False)
    assert summary["status"] == "complete" and summary["method"] == "preset" and summary["label"] == "my-plan"
    plain = run_trial({**cfg, "reference": False}, output_dir=tmp_path / "plain", progress=False)
    assert plain["method"] == "kronecker"
    df = load_results(tmp_path)
    assert sorted(df[is_reference(df)]["label"]) == ["my-plan"]
    with pytest.raises(Exception, match="trial.reference"):
        load_search_config({"name": "s", "trial": {"teacher": "demo", "reference": True},
                            "space": {"groups": ["ffn_in"]}, "search": {"num_samples": 2}})
