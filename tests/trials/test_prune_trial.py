"""A structured-pruning trial (`method: prune`) end to end on tiny teachers: the pruned student trains with ILKD
(attention distillation on the heads that remain), is evaluated, saved and reloads with the recorded size."""
import math

import pytest
import torch

from kron.errors import UserError
from trials.trial import run_trial

from .test_trial import _lm_config


@pytest.mark.parametrize("init", ["svd", "data"])
def test_prune_trial_end_to_end(init, tiny_lm_teacher, text_corpus, tmp_path):
    from kron.io import load_compressed
    from kron.methods.prune.layer import PrunedLinear
    from kron.methods.prune.structure import kept_heads

    cfg = _lm_config(tiny_lm_teacher, text_corpus, method="prune", plan={"preset": "prune:2"}, init=init)
    cfg["stage1"].update(max_steps=4, eval_every=2)
    summary, student = run_trial(cfg, output_dir=tmp_path, progress=False, return_student=True)
    # a preset is a hand-made plan: a reference point for analysis, like the Kronecker presets
    assert summary["status"] == "complete" and summary["method"] == "preset" and summary["label"] == "prune:2"
    # d=32, 2 heads, FFN 128: every attention and FFN matrix halves
    assert summary["plan_resolved"]["transformer.h.0.attn.c_attn"] == {
        "prune": {"part": "heads", "side": "out", "units": 2, "kept": 1, "blocks": 3}}
    assert summary["plan_resolved"]["transformer.h.1.mlp.c_proj"]["prune"]["kept"] == 64
    assert summary["params"] < summary["params_teacher"]
    assert math.isfinite(summary["quality"])
    assert all(math.isfinite(h["loss_att"]) for h in summary["history"] if "loss_att" in h)
    assert len(kept_heads(student)) == 2 and all(len(h) == 1 for h in kept_heads(student))
    back = load_compressed(tmp_path / "checkpoint", device="cpu")
    assert isinstance(back.transformer.h[0].attn.c_attn, PrunedLinear)
    from kron.surgery import count_params

    assert count_params(back) == summary["params"]


def test_prune_trial_with_int8_rules(tiny_lm_teacher, text_corpus, tmp_path):
    """Pruning + int8 in one rule is a prune trial: the pruned matrices are stored as int8, the attention ILKD still
    compares the heads that remain, and the checkpoint reloads with the recorded size in bytes."""
    from kron.io import load_compressed
    from kron.methods.prune.layer import PrunedLinear
    from kron.methods.prune.structure import kept_heads
    from kron.methods.quant.layer import QuantizedLinear
    from kron.surgery import count_bytes, count_params

    rules = [{"select": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"], "prune": {"heads": 0.5, "ffn": 0.5},
              "quantize": "int8"}]
    cfg = _lm_config(tiny_lm_teacher, text_corpus, method="prune", plan={"rules": rules})
    cfg["stage1"].update(max_steps=2, eval_every=2)
    summary, student = run_trial(cfg, output_dir=tmp_path, progress=False, return_student=True)
    assert summary["status"] == "complete" and summary["method"] == "prune"
    assert summary["plan_resolved"]["transformer.h.0.attn.c_attn"] == {
        "prune": {"part": "heads", "side": "out", "units": 2, "kept": 1, "blocks": 3}, "quantize": "int8"}
    assert math.isfinite(summary["quality"])
    assert all(math.isfinite(h["loss_att"]) for h in summary["history"] if "loss_att" in h)
    layer = student.transformer.h[0].attn.c_attn
    assert isinstance(layer, QuantizedLinear) and isinstance(layer.inner, PrunedLinear)
    assert all(len(h) == 1 for h in kept_heads(student))
    back = load_compressed(tmp_path / "checkpoint", device="cpu")
    assert count_params(back) == summary["params"] and count_bytes(back) == summary["bytes"]
    # int8 of the pruned matrices: 1 byte per weight against float32's 4, plus the scales
    assert summary["bytes"] < summary["bytes_teacher"] / 2


def test_prune_trial_on_a_bert_classifier(tiny_bert_classifier, sst2_dir, tmp_path):
    cfg = {
        "teacher": str(tiny_bert_classifier), "method": "prune",
        "plan": {"rules": [{"select": ["intermediate.dense", "re:.*layer\\.\\d+\\.output\\.dense",
                                       "re:.*attention\\.(self\\.(query|key|value)|output\\.dense)"],
                            "prune": {"heads": 0.5, "ffn": 0.5}}]},
        "stage1": None,
        "glue": {"task": "sst2", "source": str(sst2_dir), "max_len": 32},
        "stage2": {"lr": 1e-3, "batch_size": 8, "max_steps": 4, "eval_every": 2},
    }
    summary = run_trial(cfg, output_dir=tmp_path, progress=False)
    assert summary["status"] == "complete"
    assert 0.0 <= summary["quality"] <= 1.0
    assert summary["params"] < summary["params_teacher"]


@pytest.mark.parametrize("method, rules, message", [
    ("prune", [{"select": "mlp.c_fc", "shape": [64, 16, 2, 2]}], r"method 'prune': the plan makes .* \(kronecker\)"),
    ("kronecker", [{"select": ["mlp.c_fc", "mlp.c_proj"], "prune": {"ffn": 0.5}}],
     r"method 'kronecker': the plan makes .* \(prune\)"),
    ("kronecker", [{"select": ["mlp.c_fc", "mlp.c_proj"], "prune": {"ffn": 0.5}, "quantize": "int8"}],
     r"method 'kronecker': the plan makes .* \(prune\)"),
    ("prune", [{"select": "mlp.c_fc", "quantize": "int8"}], r"method 'prune': the plan makes .* \(quant\)"),
])
def test_prune_and_other_methods_do_not_mix(method, rules, message, tiny_lm_teacher, text_corpus, tmp_path):
    cfg = _lm_config(tiny_lm_teacher, text_corpus, method=method, plan={"rules": rules})
    with pytest.raises(UserError, match=message):
        run_trial(cfg, output_dir=tmp_path, progress=False)


@pytest.mark.parametrize("qat", [True, False])
def test_int8_matrices_train_through_fake_quantisation_unless_qat_is_off(qat, tiny_lm_teacher, text_corpus, tmp_path):
    """With qat (the default) the int8 weights of a pruned + int8 student move during distillation and the saved
    checkpoint holds the trained int8 weights, no float masters; with qat: false they stay as initialised."""
    from kron.io import load_compressed
    from kron.methods.quant.layer import QuantizedLinear

    rules = [{"select": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"], "prune": {"heads": 0.5, "ffn": 0.5},
              "quantize": "int8"}]
    cfg = _lm_config(tiny_lm_teacher, text_corpus, method="prune", plan={"rules": rules}, qat=qat)
    cfg["stage1"].update(max_steps=4, eval_every=4, early_stopping=None)
    at_init = _lm_config(tiny_lm_teacher, text_corpus, method="prune", plan={"rules": rules})
    at_init["stage1"].update(max_steps=0)
    _, init_student = run_trial(at_init, output_dir=tmp_path / "init", progress=False, return_student=True)
    summary, student = run_trial(cfg, output_dir=tmp_path / "run", progress=False, return_student=True)
    assert summary["status"] == "complete"
    layers = {n: m for n, m in student.named_modules() if isinstance(m, QuantizedLinear)}
    assert layers and not any(m.qat for m in layers.values())  # back to plain int8 after training
    before = dict(init_student.named_modules())
    moved = [n for n, m in layers.items()
             if any(not torch.equal(q, before[n].quantized()[k][0]) for k, (q, _) in m.quantized().items())]
    assert bool(moved) == qat
    saved = load_compressed(tmp_path / "run" / "checkpoint", device="cpu")
    assert not any(".master." in k for k in saved.state_dict())
    for n, m in layers.items():
        got = dict(saved.named_modules())[n].quantized()
        assert all(torch.equal(q, got[k][0]) for k, (q, _) in m.quantized().items())
