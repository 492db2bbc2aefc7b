"""Structured pruning (`prune`): whole heads (key/value groups under GQA) and FFN neurons removed, leaving a smaller
dense model. Tiny GPT-2, BERT and Llama (4 query heads over 2 key/value heads) built from configs."""
from __future__ import annotations

import copy

import pytest
import torch

from kron.errors import PlanError
from kron.io import load_compressed, merge, save_compressed
from kron.methods import get_method, parse_label, parse_option, spec_from_dict
from kron.methods.prune import PruneSpec, removed_units
from kron.methods.prune.layer import PrunedLinear
from kron.methods.prune.structure import kept_heads
from kron.plan import CompressionPlan
from kron.presets import preset_plan
from kron.surgery import apply_specs, compress, count_params, macs_per_token

SELECT = {
    "gpt2": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
    "bert": ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
             "intermediate.dense", r"re:(.*\.)?layer\.\d+\.output\.dense"],
    "llama": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
              "mlp.up_proj", "mlp.down_proj"],
}
ATTN = {k: v[:2] if k == "gpt2" else v[:4] for k, v in SELECT.items()}
FFN = {k: v[len(ATTN[k]):] for k, v in SELECT.items()}


def plan(kind, heads=None, ffn=None, scope=None, select=None):
    fractions = {k: v for k, v in (("heads", heads), ("ffn", ffn), ("scope", scope)) if v is not None}
    if select is None:
        select = (ATTN[kind] if heads is not None else []) + (FFN[kind] if ffn is not None else [])
    return CompressionPlan([{"select": select, "prune": fractions}])


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def calib_for(model, kind, tiny_inputs):
    from kron.calibration import collect_input_stats

    batches = [tiny_inputs(kind, batch=4, length=12, seed=s) for s in range(3)]
    return collect_input_stats(model, batches)


# ----------------------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("kind", ["gpt2", "bert", "llama"])
@pytest.mark.parametrize("init", ["svd", "data"])
def test_fraction_zero_reproduces_the_teacher_exactly(kind, init, make_tiny_model, tiny_inputs):
    teacher = make_tiny_model(kind)
    inputs = tiny_inputs(kind)
    calib = calib_for(teacher, kind, tiny_inputs) if init == "data" else None
    report = compress(teacher, plan(kind, heads=0, ffn=0), inplace=False, init=init, calib=calib)
    assert all(isinstance(m, PrunedLinear) for n, m in report.model.named_modules() if n in
               {r.name for r in report.modules})
    assert torch.equal(logits(report.model, inputs), logits(teacher, inputs))
    assert report.params_after == report.params_before


@pytest.mark.parametrize("kind", ["gpt2", "bert", "llama"])
def test_pruned_model_equals_the_teacher_with_those_heads_and_neurons_zeroed(kind, make_tiny_model, tiny_inputs):
    """Removing a head = zeroing its rows in Q, K, V and its columns in the output projection; a neuron likewise."""
    teacher = make_tiny_model(kind)
    inputs = tiny_inputs(kind)
    pruned = compress(teacher, plan(kind, heads=0.5, ffn=0.5), inplace=False).model
    masked = copy.deepcopy(teacher)
    modules = dict(masked.named_modules())
    from kron.methods.layers import linear_weight

    with torch.no_grad():
        for name, layer in pruned.named_modules():
            if not isinstance(layer, PrunedLinear):
                continue
            W, b = linear_weight(modules[name])
            full = layer.to_full()
            keep = full != 0
            W.mul_(keep.to(W.dtype))  # a view for Conv1D: zeroes the stored (in, out) weight
            if layer.side == "out" and b is not None:
                b.mul_(keep.any(1).to(b.dtype))
    # attention probabilities over kept heads are unchanged; a zeroed head adds nothing through the output matrix
    torch.testing.assert_close(logits(pruned, inputs), logits(masked, inputs), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------- counts


def test_parameter_and_mac_counts_by_hand_gpt2(make_tiny_model):
    # GPT-2 tiny: d 16, 2 heads of 8, FFN 64, 4 layers, LM head 96 x 16 tied to wte (not a linear-layer MAC? it is)
    model = make_tiny_model("gpt2")
    report = compress(model, plan("gpt2", heads=0.5, ffn=0.5))
    # per layer: c_attn 48x16 -> 24x16 (+24 bias), c_proj 16x16 -> 16x8 (+16), c_fc 64x16 -> 32x16 (+32),
    # c_proj 16x64 -> 16x32 (+16)
    per_layer_before = (48 * 16 + 48) + (16 * 16 + 16) + (64 * 16 + 64) + (16 * 64 + 16)
    per_layer_after = (24 * 16 + 24) + (16 * 8 + 16) + (32 * 16 + 32) + (16 * 32 + 16)
    assert report.params_before - report.params_after == 4 * (per_layer_before - per_layer_after) == 6368
    assert report.params_after == count_params(model) == 8832
    macs_head = 96 * 16
    assert report.macs_per_token_before == 4 * (48 * 16 + 16 * 16 + 64 * 16 + 16 * 64) + macs_head
    assert report.macs_per_token_after == macs_per_token(model) == 4 * (24 * 16 + 16 * 8 + 32 * 16 + 16 * 32) + macs_head
    by_name = {r.name: r for r in report.modules}
    from kron.surgery import count_bytes

    # bytes: the dense rest, the pruned matrices' biases, and each spec's bytes (weight + int32 kept-unit ids)
    rest = 4 * sum(p.numel() for n, p in model.named_parameters() if ".attn." not in n and ".mlp." not in n)
    biases = 4 * sum(p.numel() for n, p in model.named_parameters() if n.endswith(".bias") and (".attn." in n or
                                                                                              ".mlp." in n))
    assert count_bytes(model) == rest + biases + sum(spec_from_dict(r.spec).bytes(*r.dense_shape)
                                                     for r in report.modules)
    r = by_name["transformer.h.0.attn.c_attn"]
    assert (r.params_before, r.params_after, r.macs_after) == (816, 408, 384)
    assert spec_from_dict(r.spec).params(48, 16) == 384


def test_parameter_counts_by_hand_llama_gqa(make_tiny_model):
    # Llama tiny: d 16, 4 query heads of 4 over 2 KV heads (groups of 2), FFN 24, 2 layers, no biases
    model = make_tiny_model("llama")
    resolved = plan("llama", heads=0.5, ffn=0.5).resolve(model)
    q, k, o = (resolved[f"model.layers.0.self_attn.{p}_proj"] for p in "qko")
    assert (q.units, q.kept, k.units, k.kept) == (2, 1, 2, 1)  # one of the two KV groups stays
    assert q.params(16, 16) == 8 * 16 and k.params(8, 16) == 4 * 16 and o.params(16, 16) == 16 * 8
    report = apply_specs(model, resolved)
    removed = 2 * ((16 * 16 - 8 * 16) + 2 * (8 * 16 - 4 * 16) + (16 * 16 - 16 * 8) + 3 * (24 * 16 - 12 * 16))
    assert report.params_before - report.params_after == removed == 1920
    out = model(input_ids=torch.tensor([[1, 2, 3]]), output_attentions=True)
    assert out.attentions[0].shape[1] == 2  # two query heads (one group) remain
    assert kept_heads(model) in ([[0, 1], [0, 1]], [[0, 1], [2, 3]], [[2, 3], [0, 1]], [[2, 3], [2, 3]])


def test_preset_prune_f_halves_the_attention_and_ffn_matrices(make_tiny_model):
    model = make_tiny_model("bert")
    p = preset_plan("prune:2", model.config)
    resolved = p.resolve(model)
    assert {s.kept * 2 == s.units for s in resolved.values() if s != "keep"} == {True}
    report = apply_specs(model, resolved)
    for r in report.modules:  # weights exactly halved; biases of "out" matrices halved too
        m, n = r.dense_shape
        assert spec_from_dict(r.spec).params(m, n) * 2 == m * n
    fresh = make_tiny_model("bert")
    assert preset_plan("prune:1", fresh.config).resolve(fresh)["bert.encoder.layer.0.intermediate.dense"].kept == 32


def test_plan_counts_on_the_meta_device_match_the_pruned_model(make_tiny_model, tiny_config):
    from kron.models import build_from_config

    meta = build_from_config(tiny_config("llama"), device="meta")
    p = plan("llama", heads=0.5, ffn=0.25)
    meta_report = apply_specs(meta, p.resolve(meta), init="none")
    real = compress(make_tiny_model("llama"), p)
    assert (meta_report.params_after, meta_report.macs_per_token_after) == (real.params_after,
                                                                            real.macs_per_token_after)


# ----------------------------------------------------------------------------------------------- importance


def _dominated_llama(make_tiny_model):
    """Llama whose second KV group and FFN neurons 12-23 contribute almost nothing to the layer outputs."""
    model = make_tiny_model("llama", seed=3)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[:, 8:] *= 0.02  # query heads 2, 3 = KV group 1
            layer.mlp.down_proj.weight[:, 12:] *= 0.02
    return model


def _prune_keeping(model, p, keep_heads, keep_ffn):
    """The plan's pruning, with the kept units forced (bypassing importance)."""
    resolved = p.resolve(model)
    out = copy.deepcopy(model)
    modules = dict(out.named_modules())
    method = get_method("prune")
    for name, spec in resolved.items():
        if spec == "keep":
            continue
        keep = keep_heads if spec.part == "heads" else keep_ffn
        new = method.build(modules[name], spec, "svd", keep=keep, source="svd")
        parent, _, child = name.rpartition(".")
        setattr(out.get_submodule(parent), child, new)
    method.finish(out, [n for n, s in resolved.items() if s != "keep"])
    return out


@pytest.mark.parametrize("init", ["svd", "data"])
def test_importance_keeps_what_matters(init, make_tiny_model, tiny_inputs):
    teacher = _dominated_llama(make_tiny_model)
    inputs = tiny_inputs("llama")
    ref = logits(teacher, inputs)
    p = plan("llama", heads=0.5, ffn=0.5)
    calib = calib_for(teacher, "llama", tiny_inputs) if init == "data" else None
    chosen = compress(teacher, p, inplace=False, init=init, calib=calib)
    assert {r.init for r in chosen.modules} == {init}
    assert kept_heads(chosen.model) == [[0, 1], [0, 1]]
    assert chosen.model.model.layers[0].mlp.down_proj.kept_units() == list(range(12))
    least = (logits(chosen.model, inputs) - ref).norm()
    most = (logits(_prune_keeping(teacher, p, [1], list(range(12, 24))), inputs) - ref).norm()
    assert least < 0.5 * most


def test_global_scope_moves_the_budget_to_the_layer_that_needs_it(make_tiny_model, tiny_inputs):
    teacher = make_tiny_model("llama", seed=3)
    with torch.no_grad():
        teacher.model.layers[0].mlp.down_proj.weight[:, :20] *= 0.01  # layer 0 needs only 4 of its 24 neurons
    calib = calib_for(teacher, "llama", tiny_inputs)
    report = compress(teacher, plan("llama", ffn=0.5, scope="global"), inplace=False, init="data", calib=calib)
    kept = [report.model.model.layers[i].mlp.up_proj.kept for i in (0, 1)]
    assert sum(kept) == 24 and kept[0] < 12 < kept[1]
    per_layer = compress(teacher, plan("llama", ffn=0.5), inplace=False, init="data", calib=calib)
    assert per_layer.params_after == report.params_after  # the same total, spread differently
    with pytest.raises(PlanError, match="one intermediate size"):
        merge(report.model, inplace=False)


# ----------------------------------------------------------------------------------------------- save, load, merge


@pytest.mark.parametrize("kind", ["gpt2", "bert", "llama"])
def test_save_load_reproduces_the_pruned_model(kind, make_tiny_model, tiny_inputs, tmp_path):
    model = make_tiny_model(kind)
    inputs = tiny_inputs(kind)
    p = plan(kind, heads=0.5, ffn=0.25)
    report = compress(model, p, init="svd")
    save_compressed(model, p, tmp_path / "m", report=report)
    back = load_compressed(tmp_path / "m", device="cpu")
    assert torch.equal(logits(back, inputs), logits(model, inputs))
    assert kept_heads(back) == kept_heads(model)
    info = back.kron_info
    assert info["methods"]["prune"] == PruneSpec.version
    spec = info["modules"][f"{'transformer.h' if kind == 'gpt2' else 'model.layers' if kind == 'llama' else 'bert.encoder.layer'}.0."
                           f"{ {'gpt2': 'attn.c_attn', 'bert': 'attention.self.query', 'llama': 'self_attn.q_proj'}[kind]}"]
    assert spec["prune"]["part"] == "heads" and spec["prune"]["kept"] == 1
    assert count_params(back) == report.params_after


def test_merge_llama_reloads_with_automodel(make_tiny_model, tiny_inputs, tmp_path):
    import transformers

    model = make_tiny_model("llama")
    inputs = tiny_inputs("llama")
    compress(model, plan("llama", heads=0.5, ffn=0.5))
    expected = logits(model, inputs)
    merged = merge(model, inplace=False)
    assert not any(isinstance(m, PrunedLinear) for m in merged.modules())
    assert (merged.config.num_attention_heads, merged.config.num_key_value_heads, merged.config.head_dim,
            merged.config.intermediate_size) == (2, 1, 4, 12)
    merged.save_pretrained(tmp_path / "dense")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense", attn_implementation="eager").eval()
    torch.testing.assert_close(logits(back, inputs), expected)
    assert count_params(back) == count_params(model)
    assert isinstance(transformers.AutoModel.from_pretrained(tmp_path / "dense"), transformers.LlamaModel)


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_merge_of_an_ffn_pruned_model_reloads_and_head_pruning_is_refused(kind, make_tiny_model, tiny_inputs,
                                                                          tmp_path):
    import transformers

    inputs = tiny_inputs(kind)
    model = make_tiny_model(kind)
    compress(model, plan(kind, ffn=0.5))
    merged = merge(model, inplace=False)
    merged.save_pretrained(tmp_path / "dense")
    cls = transformers.AutoModelForCausalLM if kind == "gpt2" else transformers.AutoModelForSequenceClassification
    back = cls.from_pretrained(tmp_path / "dense", attn_implementation="eager").eval()
    torch.testing.assert_close(logits(back, inputs), logits(model, inputs))

    heads = make_tiny_model(kind)
    compress(heads, plan(kind, heads=0.5))
    before = {k: v.clone() for k, v in heads.state_dict().items()}
    with pytest.raises(PlanError, match="cannot describe"):
        merge(heads)
    assert any(isinstance(m, PrunedLinear) for m in heads.modules())  # nothing changed
    assert all(torch.equal(v, heads.state_dict()[k]) for k, v in before.items())


# ----------------------------------------------------------------------------------------------- specs and labels


def test_spec_round_trips():
    spec = PruneSpec(part="heads", side="out", units=12, kept=6, blocks=3, scope="global")
    assert spec_from_dict(spec.to_dict()) == spec
    assert parse_label(spec.label()) == spec
    assert parse_option(spec.option()) == PruneSpec(part="heads", side="out", units=12, kept=6, blocks=3)
    assert spec.params(2304, 768) == 1152 * 768 and spec.compression() == 2
    assert spec.weight_shapes(2304, 768) == [(1152, 768)] and spec.bytes(2304, 768) == 4 * 1152 * 768 + 4 * 6
    assert PruneSpec(part="ffn", side="in", units=3072, kept=1024).params(768, 3072) == 768 * 1024
    assert removed_units(0.5, 3) == 2 and removed_units(1 - 1 / 3, 12) == 8 and removed_units(0, 5) == 0


def test_plan_rule_round_trips_through_yaml(make_tiny_model):
    p = plan("gpt2", heads=0.5, ffn=0.25, scope="global")
    again = CompressionPlan.from_yaml(p.to_yaml())
    assert again == p
    model = make_tiny_model("gpt2")
    resolved = p.resolve(model)
    assert CompressionPlan.from_resolved(resolved).resolve(model) == {
        n: s if s == "keep" else PruneSpec(s.part, s.side, s.units, s.kept, s.blocks) for n, s in resolved.items()}


# ----------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("value, message", [
    ({"heads": 1.0}, r"prune heads must be a fraction removed in \[0, 1\)"),
    ({"ffn": -0.1}, r"prune ffn must be a fraction removed in \[0, 1\)"),
    ({"heads": "half"}, "prune heads must be a fraction"),
    ({"heads": True}, "prune heads must be a fraction"),
    ({}, "needs heads and/or ffn"),
    ({"heads": 0.5, "neurons": 0.5}, "unknown key 'neurons'"),
    ({"heads": 0.5, "scope": "model"}, "scope must be 'layer'"),
    (0.5, "prune takes a mapping"),
])
def test_bad_rules(value, message):
    with pytest.raises(PlanError, match=message):
        CompressionPlan([{"select": "attn.c_attn", "prune": value}])
    with pytest.raises(PlanError, match="blocks do not apply to prune"):
        CompressionPlan([{"select": "attn.c_attn", "prune": {"heads": 0.5}, "blocks": 3}])
    with pytest.raises(PlanError, match="quantize must be 'int8'"):
        CompressionPlan([{"select": "attn.c_attn", "prune": {"heads": 0.5}, "quantize": "int3"}])


def _unchanged(model, fn):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    fn()
    assert [type(m) for m in model.modules()] == types
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_removing_every_head_of_a_layer_is_refused_naming_it(make_tiny_model):
    model = make_tiny_model("gpt2")  # 2 heads: 0.75 would remove both
    with pytest.raises(PlanError, match=r"would remove all 2 heads of layer 0 \(module transformer.h.0.attn.c_attn\)"):
        _unchanged(model, lambda: compress(model, plan("gpt2", heads=0.75)))
    llama = make_tiny_model("llama")
    with pytest.raises(PlanError, match="all 2 key/value groups"):
        compress(llama, plan("llama", heads=0.9))
    with pytest.raises(PlanError, match="prune:8"):
        compress(llama, "prune:8")


def test_an_incomplete_block_is_refused_before_anything_changes(make_tiny_model):
    model = make_tiny_model("gpt2")
    p = CompressionPlan([{"select": "attn.c_attn", "prune": {"heads": 0.5}}])
    with pytest.raises(PlanError, match=r"prunes transformer.h.0.attn.c_attn but not transformer.h.0.attn.c_proj"):
        _unchanged(model, lambda: compress(model, p))
    p = CompressionPlan([{"select": ATTN["gpt2"], "prune": {"heads": 0.5}},
                         {"select": "attn.c_proj", "layers": 1, "lowrank_rank": 2}])
    with pytest.raises(PlanError, match="layer 1: the plan prunes transformer.h.1.attn.c_attn but not"):
        _unchanged(model, lambda: compress(model, p))


def test_unsupported_modules_and_families_are_named(make_tiny_model):
    model = make_tiny_model("llama")
    with pytest.raises(PlanError, match="module lm_head is not an attention or FFN matrix"):
        compress(model, CompressionPlan([{"select": "lm_head", "prune": {"ffn": 0.5}}]))
    with pytest.raises(PlanError, match="embed_tokens is an nn.Embedding"):
        compress(model, CompressionPlan([{"select": "embed_tokens", "prune": {"ffn": 0.5}}]))
    with pytest.raises(PlanError, match="is an attention matrix of layer 0, but the rule's prune gives no heads"):
        compress(model, CompressionPlan([{"select": SELECT["llama"], "prune": {"ffn": 0.5}}]))

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

    with pytest.raises(PlanError, match="module fc belongs to a Tiny of model_type None"):
        compress(Tiny(), CompressionPlan([{"select": "fc", "prune": {"ffn": 0.5}}]))


def test_a_saved_spec_that_does_not_fit_is_a_plan_error(make_tiny_model):
    model = make_tiny_model("gpt2")
    with pytest.raises(PlanError, match="do not split into 3 x 5 heads"):
        apply_specs(model, {"transformer.h.0.attn.c_attn": {"prune": {"part": "heads", "side": "out", "units": 5,
                                                                       "kept": 2, "blocks": 3}}})
    with pytest.raises(PlanError, match="lacks kept"):
        spec_from_dict({"prune": {"part": "heads", "side": "out", "units": 5}})


def test_attention_distillation_compares_the_heads_that_remain(make_tiny_model, tiny_inputs):
    from trials.distill import DistillWeights, forward_for_distillation, ilkd_loss

    teacher = make_tiny_model("llama")
    student = compress(teacher, plan("llama", heads=0.5), inplace=False, init="svd").model
    ids = tiny_inputs("llama")["input_ids"]
    t, s = forward_for_distillation(teacher, ids), forward_for_distillation(student, ids)
    heads = kept_heads(student)
    out = ilkd_loss(s, t, DistillWeights(), head_map=heads)
    assert torch.isfinite(torch.tensor(out.parts["att"]))
    # a student that is the teacher with those heads: zero attention KL on them
    same = ilkd_loss(t, t, DistillWeights(), head_map=None)
    assert same.parts["att"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(RuntimeError):
        ilkd_loss(s, t, DistillWeights())  # without the map the head counts differ


# ----------------------------------------------------------------------------------------------- pruning + int8


def int8_plan(kind, heads=None, ffn=None, scope=None):
    """The same rule as `plan`, with quantize: int8 beside prune."""
    rule = plan(kind, heads, ffn, scope).to_dict()["rules"][0]
    return CompressionPlan([{**rule, "quantize": "int8"}])


def _dequantised_copy(pruned):
    """The float pruned model with every pruned weight replaced by its int8 round trip (per-row scales)."""
    from kron.methods.quant.layer import dequantize_rows, quantize_rows

    out = copy.deepcopy(pruned)
    with torch.no_grad():
        for m in out.modules():
            if isinstance(m, PrunedLinear):
                m.weight.copy_(dequantize_rows(*quantize_rows(m.weight), m.weight.dtype))
    return out


@pytest.mark.parametrize("kind, init", [("gpt2", "svd"), ("gpt2", "data"), ("bert", "svd"), ("llama", "svd")])
def test_prune_int8_is_the_pruned_model_with_dequantised_weights(kind, init, make_tiny_model, tiny_inputs):
    from kron.methods.quant import QuantizedSpec, quantized_bytes
    from kron.methods.quant.layer import QuantizedLinear
    from kron.plan import dense_dims
    from kron.surgery import count_bytes

    teacher = make_tiny_model(kind)
    inputs = tiny_inputs(kind)
    calib = calib_for(teacher, kind, tiny_inputs) if init == "data" else None
    p = int8_plan(kind, heads=0.5, ffn=0.5)
    resolved = p.resolve(teacher)
    q = compress(teacher, p, inplace=False, init=init, calib=calib)
    f = compress(teacher, plan(kind, heads=0.5, ffn=0.5), inplace=False, init=init, calib=calib)
    layers = {n: m for n, m in q.model.named_modules() if isinstance(m, QuantizedLinear)}
    assert set(layers) == {r.name for r in q.modules} and len(layers) == len(f.modules)
    floats = dict(f.model.named_modules())
    for name, layer in layers.items():
        assert isinstance(layer.inner, PrunedLinear) and layer.inner.weight.dtype == torch.int8
        assert layer.inner.weight_scale.shape == (layer.out_features,)
        assert layer.inner.kept_units() == floats[name].kept_units()  # the same units as the float pruning
    # the int8 model runs exactly the pruned model's weights after an int8 round trip, and stays close to it
    torch.testing.assert_close(logits(q.model, inputs), logits(_dequantised_copy(f.model), inputs),
                               rtol=1e-6, atol=1e-6)
    pruned, quant = logits(f.model, inputs), logits(q.model, inputs)
    assert 0 < (quant - pruned).norm() / pruned.norm() < 2e-2
    # sizes: parameters as the pruned model; bytes = int8 elements + float32 scales (+ bias, kept indices)
    assert q.params_after == f.params_after and q.macs_per_token_after == f.macs_per_token_after
    assert q.bytes_after == count_bytes(q.model) < f.bytes_after
    teacher_modules = dict(teacher.named_modules())
    analytic = q.bytes_before
    for r in q.modules:
        spec = resolved[r.name]
        assert isinstance(spec, QuantizedSpec) and isinstance(spec.inner, PruneSpec)
        m, n = dense_dims(teacher_modules[r.name])
        rows, cols = spec.inner.pruned_dims(m, n)
        bias = layers[r.name].bias
        bias_bytes = 0 if bias is None else 4 * bias.numel()
        assert spec.bytes(m, n) == quantized_bytes([(rows, cols)]) + 4 * spec.inner.kept == rows * cols + 4 * rows \
            + 4 * spec.inner.kept
        assert r.bytes_after == spec.bytes(m, n) + bias_bytes
        analytic += r.bytes_after - r.bytes_before
    assert analytic == q.bytes_after


def test_prune_int8_saves_reloads_exactly(make_tiny_model, tiny_inputs, tmp_path):
    from safetensors.torch import load_file

    from kron.methods.quant import QuantizedSpec
    from kron.methods.quant.layer import QuantizedLinear

    model = make_tiny_model("gpt2")
    inputs = tiny_inputs("gpt2")
    p = int8_plan("gpt2", heads=0.5, ffn=0.25)
    report = compress(model, p)
    save_compressed(model, p, tmp_path / "m", report=report)
    assert CompressionPlan.load(tmp_path / "m" / "plan.yaml") == p
    stored = load_file(tmp_path / "m" / "model.safetensors")
    assert stored["transformer.h.0.attn.c_attn.inner.weight"].dtype == torch.int8
    assert stored["transformer.h.0.attn.c_attn.inner.weight_scale"].shape == (24,)
    assert stored["transformer.h.0.attn.c_attn.inner.kept_ids"].dtype == torch.int32
    back = load_compressed(tmp_path / "m", device="cpu")
    info = back.kron_info
    assert info["modules"]["transformer.h.0.attn.c_attn"] == {
        "prune": {"part": "heads", "side": "out", "units": 2, "kept": 1, "blocks": 3}, "quantize": "int8"}
    assert info["methods"] == {"int8": QuantizedSpec.version, "prune": PruneSpec.version}
    layer = back.transformer.h[1].mlp.c_proj
    assert isinstance(layer, QuantizedLinear) and isinstance(layer.inner, PrunedLinear)
    before, after = model.state_dict(), back.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]), k
    assert torch.equal(logits(back, inputs), logits(model, inputs))
    assert kept_heads(back) == kept_heads(model) and all(h is not None for h in kept_heads(back))
    assert count_params(back) == report.params_after


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("transformer.h.1.mlp.c_fc.inner.weight_scale"), "transformer.h.1.mlp.c_fc.*no scales"),
    (lambda t: t.__setitem__("transformer.h.1.mlp.c_fc.inner.weight_scale", torch.ones(64)),
     "transformer.h.1.mlp.c_fc.*scales.*shape"),
    (lambda t: t.__setitem__("transformer.h.1.mlp.c_fc.inner.weight",
                             t["transformer.h.1.mlp.c_fc.inner.weight"].float()), "transformer.h.1.mlp.c_fc.*not int8"),
])
def test_prune_int8_checkpoint_with_missing_or_mismatched_scales_is_refused(edit, message, make_tiny_model,
                                                                            tmp_path):
    from kron.errors import CheckpointError

    from .test_quant import tampered_checkpoint

    out = tampered_checkpoint(tmp_path, make_tiny_model("gpt2"), edit, int8_plan("gpt2", ffn=0.5))
    with pytest.raises(CheckpointError, match=message):
        load_compressed(out, device="cpu", verify=False)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_prune_int8_merges_to_a_smaller_dense_model_where_prune_does(kind, make_tiny_model, tiny_inputs, tmp_path):
    import transformers

    from kron.methods.quant.layer import QuantizedLinear

    inputs = tiny_inputs(kind)
    model = make_tiny_model(kind)
    # GPT-2: FFN only (its config cannot describe fewer heads); Llama: heads (key/value groups) and FFN
    compress(model, int8_plan(kind, heads=0.5 if kind == "llama" else None, ffn=0.5))
    expected = logits(model, inputs)
    merged = merge(model, inplace=False)
    assert not any(isinstance(m, (QuantizedLinear, PrunedLinear)) for m in merged.modules())
    dense = merged.transformer.h[0].mlp.c_fc if kind == "gpt2" else merged.model.layers[0].mlp.up_proj
    w = dense.weight.T if kind == "gpt2" else dense.weight
    assert w.dtype == torch.float32 and tuple(w.shape) == ((32, 16) if kind == "gpt2" else (12, 16))
    # the dequantised floats of the int8 layer, at the pruned size
    src = model.transformer.h[0].mlp.c_fc if kind == "gpt2" else model.model.layers[0].mlp.up_proj
    assert torch.equal(w, src.to_dense())
    torch.testing.assert_close(logits(merged, inputs), expected, rtol=1e-5, atol=1e-5)
    merged.save_pretrained(tmp_path / "dense")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense", attn_implementation="eager").eval()
    torch.testing.assert_close(logits(back, inputs), expected, rtol=1e-5, atol=1e-5)
    assert count_params(back) == count_params(model)


def test_prune_int8_merge_is_refused_naming_the_modules_where_prune_merge_is(make_tiny_model):
    heads = make_tiny_model("gpt2")
    compress(heads, int8_plan("gpt2", heads=0.5))
    with pytest.raises(PlanError, match=r"cannot describe") as err:
        _unchanged(heads, lambda: merge(heads))
    assert "transformer.h.0.attn.c_attn" in str(err.value)


def test_prune_int8_global_scope_and_mixed_blocks_keep_the_units_of_float_pruning(make_tiny_model, tiny_inputs):
    """The block-wide steps see a block's matrices whether int8 or not: global scope pools the same blocks, a block
    with some matrices int8 and others float keeps one set of units, a partial block is still refused."""
    teacher = make_tiny_model("llama", seed=3)
    with torch.no_grad():
        teacher.model.layers[0].mlp.down_proj.weight[:, :20] *= 0.01
    calib = calib_for(teacher, "llama", tiny_inputs)

    def kept(model):
        return {n: getattr(m, "inner", m).kept_units() for n, m in model.named_modules()
                if isinstance(getattr(m, "inner", m), PrunedLinear) and not n.endswith(".inner")}

    f = compress(teacher, plan("llama", ffn=0.5, scope="global"), inplace=False, init="data", calib=calib).model
    q = compress(teacher, int8_plan("llama", ffn=0.5, scope="global"), inplace=False, init="data", calib=calib).model
    assert kept(q) == kept(f) and len(kept(f)["model.layers.0.mlp.up_proj"]) < 12
    with pytest.raises(PlanError, match=r"one intermediate size") as err:  # per-layer widths: as prune alone
        _unchanged(q, lambda: merge(q))
    assert "model.layers.0.mlp.gate_proj" in str(err.value)
    # FFN down_proj in int8, gate/up in float: one block, one set of units
    mixed = CompressionPlan([{"select": FFN["llama"], "prune": {"ffn": 0.5}},
                             {"select": "mlp.down_proj", "prune": {"ffn": 0.5}, "quantize": "int8"}])
    m = compress(teacher, mixed, inplace=False, init="data", calib=calib).model
    ref = compress(teacher, plan("llama", ffn=0.5), inplace=False, init="data", calib=calib).model
    assert kept(m) == kept(ref)
    assert type(m.model.layers[0].mlp.down_proj).__name__ == "QuantizedLinear"
    assert isinstance(m.model.layers[0].mlp.up_proj, PrunedLinear)
    partial = CompressionPlan([{"select": "mlp.down_proj", "prune": {"ffn": 0.5}, "quantize": "int8"}])
    with pytest.raises(PlanError, match="prunes model.layers.0.mlp.down_proj but not model.layers.0.mlp.gate_proj"):
        _unchanged(teacher, lambda: compress(teacher, partial))


def test_prune_int8_rule_spec_label_and_option_round_trip(make_tiny_model):
    from kron.methods.quant import QuantizedSpec

    p = int8_plan("gpt2", heads=0.5, ffn=0.25)
    assert CompressionPlan.from_yaml(p.to_yaml()) == p
    assert p.to_dict()["rules"][0] == {"select": SELECT["gpt2"], "prune": {"heads": 0.5, "ffn": 0.25},
                                       "quantize": "int8"}
    model = make_tiny_model("gpt2")
    resolved = p.resolve(model)
    spec = resolved["transformer.h.0.attn.c_attn"]
    assert spec == QuantizedSpec(PruneSpec(part="heads", side="out", units=2, kept=1, blocks=3))
    assert spec_from_dict(spec.to_dict()) == spec and parse_label(spec.label()) == spec
    assert spec.label() == "prune heads out 1/2 b3 int8" and spec.describe(48, 16) == "1 of 2 heads kept: 24x16, int8"
    assert parse_option(spec.option()) == spec and spec.option() == "pr:heads:out:1/2:b3+int8"
    assert CompressionPlan.from_resolved(resolved).resolve(model) == resolved
