"""4-bit weights (`quantize: int4`, `kron.methods.quant`): group-wise symmetric quantisation packed two values a byte,
the same modifier as int8 over dense, Kronecker, low-rank and pruned layers of tiny GPT-2, BERT and Llama models."""
from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch
from torch import nn

from kron.errors import CheckpointError, PlanError
from kron.methods import ModuleSpec, get_method, parse_label, parse_option, spec_from_dict
from kron.methods.kronecker import KroneckerSpec
from kron.methods.lowrank import LowRankSpec
from kron.methods.prune import PruneSpec
from kron.methods.quant import QuantizedSpec, quantized_bytes
from kron.methods.quant.layer import (QuantizedLinear, dequantize_groups, dequantize_int4, dequantize_rows,
                                      disable_qat, enable_qat, fake_quantize, pack_int4, quantize_groups,
                                      quantize_int4, quantize_rows, unpack_int4)
from kron.plan import KEEP, CompressionPlan, dense_dims



def q4(inner=None, group_size=None):
    return QuantizedSpec(inner=inner, bits=4, group_size=group_size)


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


# ------------------------------------------------------------------------------------------------ packing


@pytest.mark.parametrize("shape", [(1,), (2,), (7,), (3, 5), (2, 3, 8), (4, 1), (6, 33)])
def test_pack_unpack_round_trip_with_odd_lengths_padded(shape):
    q = torch.randint(-8, 8, shape, generator=torch.Generator().manual_seed(sum(shape)), dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (*shape[:-1], math.ceil(shape[-1] / 2))
    assert torch.equal(unpack_int4(packed, shape[-1]), q)
    if shape[-1] % 2:  # the padding nibble is q = 0 (8) in the high half of the last byte
        assert torch.all(packed[..., -1] >> 4 == 8)


def test_pack_layout_by_hand():
    # q + 8 per nibble, element 2i low, 2i+1 high: [-7, 0] -> 0x81, [7, pad] -> 0x8F, [-8, 1] -> 0x90
    q = torch.tensor([[-7, 0, 7], [-8, 1, 0]], dtype=torch.int8)
    assert pack_int4(q).tolist() == [[0x81, 0x8F], [0x90, 0x88]]


@pytest.mark.parametrize("bad, message", [
    (torch.tensor([8], dtype=torch.int8), r"\[-8, 7\]"), (torch.tensor([-9], dtype=torch.int16), r"\[-8, 7\]"),
    (torch.tensor([0.5]), "integer"),
])
def test_pack_refuses_values_it_cannot_hold(bad, message):
    with pytest.raises(ValueError, match=message):
        pack_int4(bad)


def test_unpack_refuses_a_wrong_dtype_or_length():
    with pytest.raises(ValueError, match="uint8"):
        unpack_int4(torch.zeros(3, dtype=torch.int8), 6)
    with pytest.raises(ValueError, match="5 values pack into 3 bytes"):
        unpack_int4(torch.zeros(2, dtype=torch.uint8), 5)


# ------------------------------------------------------------------------------------------------ quantisation


@pytest.mark.parametrize("shape, group", [
    ((7, 13), 4),  # 13 = 4 + 4 + 4 + 1: a last group of one
    ((3, 5, 9), 128),  # rows shorter than the group: one group each
    ((4, 256), 128),  # a multiple
    ((2, 130), 128),  # a last group of two
    ((5, 6), 1),  # every element its own group: exact
    ((8,), 3),
])
def test_error_is_at_most_half_a_step_of_its_group(shape, group):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 2, shape[-1])
    q, s = quantize_groups(w, 4, group)
    n = shape[-1]
    groups = math.ceil(n / group)
    assert q.dtype == torch.int8 and q.shape == shape and s.dtype == torch.float32 and s.shape == (*shape[:-1], groups)
    assert int(q.abs().max()) <= 7
    per_element = s.repeat_interleave(group, dim=-1)[..., :n]  # each element's own group scale
    err = (dequantize_groups(q, s, group) - w).abs()
    assert torch.all(err <= per_element / 2 * (1 + 1e-6))
    # symmetric, each group's full range used: its largest magnitude maps to ±7
    for g in range(groups):
        assert torch.all(q[..., g * group:(g + 1) * group].abs().amax(-1) == 7)
    if group == 1:
        torch.testing.assert_close(dequantize_groups(q, s, group), w, rtol=1e-6, atol=0)


def test_group_boundaries_by_hand():
    # row of 5 in groups of 2: [1, -7] s=1, [14, 0.5] s=2, [-0.7] s=0.1; 0.5/2 = 0.25 rounds to 0
    w = torch.tensor([[1.0, -7.0, 14.0, 0.5, -0.7], [0.0, 0.0, 0.0, 0.0, 3.5]])
    q, s = quantize_groups(w, 4, 2)
    torch.testing.assert_close(s, torch.tensor([[1.0, 2.0, 0.1], [1.0, 1.0, 0.5]]))
    assert q.tolist() == [[1, -7, 7, 0, -7], [0, 0, 0, 0, 7]]  # all-zero groups: scale 1, q 0
    # a group's scale depends on its own elements only
    w2 = w.clone()
    w2[0, 3] = 100.0
    _, s2 = quantize_groups(w2, 4, 2)
    assert s2[0, 0] == s[0, 0] and s2[0, 2] == s[0, 2] and s2[0, 1] != s[0, 1]
    with pytest.raises(ValueError, match="do not fit"):
        dequantize_groups(q, s, 3)  # groups of 3 need 2 scales per row


def test_eight_bits_per_row_is_quantize_rows_and_int4_helpers_agree():
    w = torch.randn(6, 11, generator=torch.Generator().manual_seed(3))
    q8, s8 = quantize_rows(w)
    q, s = quantize_groups(w, 8, None)
    assert torch.equal(q, q8) and torch.equal(s[:, 0], s8) and s.shape == (6, 1)
    packed, scale = quantize_int4(w, 4)
    qg, sg = quantize_groups(w, 4, 4)
    assert torch.equal(packed, pack_int4(qg)) and torch.equal(scale, sg) and packed.shape == (6, 6)
    assert torch.equal(dequantize_int4(packed, scale, 11, 4), dequantize_groups(qg, sg, 4))
    assert torch.equal(fake_quantize(w, 4, 4), dequantize_groups(qg, sg, 4))
    assert torch.equal(fake_quantize(w), dequantize_rows(q8, s8))
    with pytest.raises(ValueError, match="group_size"):
        quantize_groups(w, 4, 0)


def test_layer_stores_packed_values_and_runs_the_dequantised_weight():
    torch.manual_seed(0)
    dense = nn.Linear(7, 5)
    layer = QuantizedLinear.from_module(copy.deepcopy(dense), bits=4, group_size=3)
    assert layer.inner.weight.dtype == torch.uint8 and layer.inner.weight.shape == (5, 4)  # ceil(7 / 2)
    assert layer.inner.weight_scale.shape == (5, 3)  # ceil(7 / 3)
    assert layer.stored_weight_count() == 35  # logical elements, not the 20 bytes
    expected_w = fake_quantize(dense.weight.detach(), 4, 3)
    assert torch.equal(layer.to_dense(), expected_w) and torch.equal(layer.to_full(), expected_w)
    x = torch.randn(2, 7)
    with torch.no_grad():
        assert torch.equal(layer(x), nn.functional.linear(x, expected_w, dense.bias))
    assert QuantizedLinear(nn.Linear(7, 5)).inner.weight.dtype == torch.int8  # 8 bits stays the default
    with pytest.raises(ValueError, match="group_size"):
        QuantizedLinear(nn.Linear(7, 5), bits=8, group_size=4)
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        QuantizedLinear(nn.Linear(7, 5), bits=2)


# ------------------------------------------------------------------------------------------------ specs


@pytest.mark.parametrize("spec, m, n, expected", [
    # dense 8 x 4, one group per row: 2 bytes + 1 scale a row
    (q4(), 8, 4, 8 * (2 + 4)),
    # dense 8 x 300 in groups of 128: 150 bytes + 3 scales a row
    (q4(), 8, 300, 8 * (150 + 3 * 4)),
    # dense 3 x 5 in groups of 2: 3 bytes + 3 scales a row
    (q4(group_size=2), 3, 5, 3 * (3 + 3 * 4)),
    # A (1, 2, 2): 2 rows of 1 byte + 1 scale; B (1, 4, 2): 4 rows of 1 byte + 1 scale
    (q4(KroneckerSpec(shape=(2, 2, 4, 2))), 8, 4, 2 * 5 + 4 * 5),
    # U 8x2: 8 rows of 1 byte + 1 scale; V 2x4: 2 rows of 2 bytes + 1 scale (groups of 2: 2 scales)
    (q4(LowRankSpec(rank=2)), 8, 4, 8 * 5 + 2 * 6),
    (q4(LowRankSpec(rank=2), group_size=2), 8, 4, 8 * 5 + 2 * (2 + 8)),
    # pruned to 3 of 4 FFN rows of a 4 x 6 matrix: 3 rows of 3 bytes + 1 scale, and the kept rows' int32 indices
    (q4(PruneSpec(part="ffn", side="out", units=4, kept=3)), 4, 6, 3 * (3 + 4) + 3 * 4),
    # int8 unchanged: one byte per element + a scale per row
    (QuantizedSpec(None), 8, 4, 32 + 8 * 4),
    (QuantizedSpec(LowRankSpec(rank=2)), 8, 4, 16 + 32 + 8 + 8),
])
def test_bytes_hand_computed(spec, m, n, expected):
    assert spec.bytes(m, n) == expected
    assert spec.params(m, n) == (m * n if spec.inner is None else spec.inner.params(m, n))


def test_quantized_bytes_keeps_the_int8_count():
    shapes = [(8, 4), (2, 3, 5), (7, 1)]
    assert quantized_bytes(shapes) == sum(math.prod(s) + 4 * math.prod(s[:-1]) for s in shapes)
    assert quantized_bytes(shapes, 4, 2) == 8 * (2 + 8) + 6 * (3 + 12) + 7 * (1 + 4)


@pytest.mark.parametrize("d, label, option", [
    ({"quantize": "int4"}, "dense int4", "int4"),
    ({"quantize": "int4", "group_size": 64}, "dense int4 g64", "int4:g64"),
    ({"shape": [2, 3, 4, 5], "rank": 2, "blocks": 3, "quantize": "int4"}, "2x3⊗4x5 r2 b3 int4", None),
    ({"shape": [2, 3, 4, 5], "rank": 1, "quantize": "int4", "group_size": 8}, "2x3⊗4x5 r1 int4 g8", None),
    ({"lowrank_rank": 7, "quantize": "int4", "group_size": 32}, "lowrank r7 int4 g32", "lr7+int4:g32"),
    ({"prune": {"part": "heads", "side": "out", "units": 2, "kept": 1, "blocks": 3}, "quantize": "int4"},
     "prune heads out 1/2 b3 int4", "pr:heads:out:1/2:b3+int4"),
    ({"lowrank_rank": 7, "quantize": "int8"}, "lowrank r7 int8", "lr7+int8"),
])
def test_spec_dicts_labels_and_options_round_trip(d, label, option):
    spec = spec_from_dict(d)
    assert isinstance(spec, QuantizedSpec) and spec.to_dict() == d and spec.method == d["quantize"]
    assert ModuleSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert spec.label() == label and parse_label(label) == spec
    if option is not None:
        assert spec.option() == option and parse_option(option) == spec
    elif getattr(spec.inner, "blocks", 1) == 1:
        assert parse_option(spec.option()) == spec
    assert get_method(spec.method) is get_method("quant") and get_method("quant").modifier


def test_spec_fields_equality_and_hash():
    assert QuantizedSpec(inner=None) == QuantizedSpec(None, 8) and QuantizedSpec(inner=None).method == "int8"
    assert QuantizedSpec(inner=None).group_size is None and QuantizedSpec(inner=None).to_dict() == {"quantize": "int8"}
    assert q4() == q4(group_size=128) and q4().group_size == 128 and hash(q4()) == hash(q4(group_size=128))
    assert len({q4(), q4(group_size=128), q4(group_size=64), QuantizedSpec(None)}) == 3
    assert [f.name for f in dataclasses.fields(QuantizedSpec)] == ["inner", "bits", "blocks", "group_size"]
    assert dataclasses.replace(QuantizedSpec(None), bits=4).group_size == 128
    fused = dataclasses.replace(q4(LowRankSpec(rank=2)), blocks=3)
    assert fused.inner == LowRankSpec(rank=2, blocks=3) and fused.bits == 4
    assert q4().describe(8, 4) == "dense 8x4 int4 (groups of 128)"


@pytest.mark.parametrize("kw, message", [
    ({"bits": 3}, "8- and 4-bit"), ({"bits": 8, "group_size": 64}, "group_size applies to int4 only"),
    ({"bits": 4, "group_size": 0}, "group_size must be a positive integer"),
])
def test_bad_specs(kw, message):
    with pytest.raises(PlanError, match=message):
        QuantizedSpec(None, **kw)


@pytest.mark.parametrize("d, message", [
    ({"quantize": "int3"}, "quantize must be 'int8' or 'int4'"),
    ({"quantize": "int8", "group_size": 64}, "group_size applies to quantize: int4 only"),
    ({"lowrank_rank": 2, "quantize": "int4", "group_size": -1}, "group_size must be a positive integer"),
])
def test_bad_spec_dicts(d, message):
    with pytest.raises(PlanError, match=message):
        spec_from_dict(d)


# ------------------------------------------------------------------------------------------------ plan rules


def test_plan_rules_combine_int4_with_any_structure(tiny_gpt2):
    plan = CompressionPlan([
        {"select": "mlp.c_fc", "shape": [16, 4, 4, 4], "quantize": "int4"},
        {"select": "attn.c_proj", "quantize": "int4", "group_size": 8},
        {"select": "mlp.c_proj", "lowrank_rank": 4, "quantize": "int4", "group_size": 128},
        {"select": "attn.c_attn", "layers": [0], "factor": 2, "blocks": 3, "quantize": "int4"},
        {"select": "attn.c_attn", "layers": [1], "quantize": "int8"},
    ])
    rules = plan.to_dict()["rules"]
    assert rules[1] == {"select": "attn.c_proj", "quantize": "int4", "group_size": 8}
    assert rules[2] == {"select": "mlp.c_proj", "lowrank_rank": 4, "quantize": "int4"}  # the default left out
    assert CompressionPlan.from_yaml(plan.to_yaml()) == plan
    resolved = plan.resolve(tiny_gpt2)
    assert resolved["transformer.h.1.mlp.c_fc"] == q4(KroneckerSpec(shape=(16, 4, 4, 4)))
    assert resolved["transformer.h.1.attn.c_proj"] == q4(group_size=8)
    assert resolved["transformer.h.1.mlp.c_proj"] == q4(LowRankSpec(rank=4))
    fused = resolved["transformer.h.0.attn.c_attn"]
    assert fused.inner.blocks == 3 and fused.bits == 4 and fused.group_size == 128
    assert resolved["transformer.h.1.attn.c_attn"] == QuantizedSpec(None)
    assert resolved["transformer.h.2.attn.c_attn"] == KEEP
    exact = CompressionPlan.from_resolved(resolved)
    assert exact.resolve(tiny_gpt2) == resolved


@pytest.mark.parametrize("rule, message", [
    ({"select": "c_fc", "quantize": "int3"}, "quantize must be 'int8'.*or 'int4'"),
    ({"select": "c_fc", "group_size": 64}, "rule 1: group_size .*needs quantize: int4"),
    ({"select": "c_fc", "lowrank_rank": 2, "group_size": 64}, "rule 1: group_size .*needs quantize: int4"),
    ({"select": "c_fc", "quantize": "int8", "group_size": 64}, "rule 1: group_size applies to quantize: int4 only"),
    ({"select": "c_fc", "quantize": "int4", "group_size": 0}, "rule 1: group_size must be a positive integer"),
    ({"select": "c_fc", "quantize": "int4", "group_size": "64"}, "rule 1: group_size must be a positive integer"),
    ({"select": "c_fc", "quantize": "int4", "group_size": True}, "rule 1: group_size must be a positive integer"),
    ({"select": "c_fc", "keep": True, "group_size": 64}, "keep: true cannot be combined with group_size"),
    ({"select": "c_fc", "quantize": "int4", "keep": True}, "keep: true cannot be combined with quantize"),
    ({"select": "c_fc", "quantize": "int4", "grup_size": 64}, "did you mean 'group_size'"),
])
def test_bad_rules(rule, message):
    with pytest.raises(PlanError, match=message):
        CompressionPlan([rule])


def test_embeddings_are_refused_naming_the_module(tiny_gpt2):
    with pytest.raises(PlanError, match="transformer.wte is an nn.Embedding.*quantize: int4 supports linear"):
        CompressionPlan([{"select": "wte", "quantize": "int4"}]).resolve(tiny_gpt2)
    with pytest.raises(PlanError, match="transformer.wte"):
        CompressionPlan([{"select": "wte", "embedding_factor": 2, "quantize": "int4"}]).resolve(tiny_gpt2)


# ------------------------------------------------------------------------------------------------ models

CASES = {
    "gpt2 dense, kronecker, low-rank, fused": ("gpt2", [
        {"select": "mlp.c_fc", "quantize": "int4", "group_size": 6},  # rows of 16: groups 6, 6, 4
        {"select": "attn.c_proj", "shape": [4, 4, 4, 4], "quantize": "int4"},
        {"select": "mlp.c_proj", "lowrank_rank": 4, "quantize": "int4", "group_size": 16},  # V rows of 64: 4 groups
        {"select": "attn.c_attn", "factor": 2, "blocks": 3, "quantize": "int4", "group_size": 3},
    ]),
    "gpt2 pruned": ("gpt2", [{"select": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
                              "prune": {"heads": 0.5, "ffn": 0.5}, "quantize": "int4", "group_size": 8}]),
    "bert": ("bert", [
        {"select": "intermediate.dense", "quantize": "int4"},
        {"select": "attention.self.query", "factor": 2, "quantize": "int4", "group_size": 2},
        {"select": "attention.output.dense", "lowrank_rank": 4, "quantize": "int4", "group_size": 5},
    ]),
    "llama": ("llama", [
        {"select": "mlp.up_proj", "quantize": "int4", "group_size": 8},
        {"select": "self_attn.k_proj", "factor": 2, "quantize": "int4"},
        {"select": "mlp.down_proj", "lowrank_rank": 4, "quantize": "int4", "group_size": 5},  # V rows of 24
    ]),
    "llama pruned": ("llama", [{"select": ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"], "prune": {"ffn": 0.5},
                                "quantize": "int4", "group_size": 4}]),
}


def _float_rules(rules):
    """The same rules without quantisation (rules that only quantise dropped)."""
    out = [{k: v for k, v in r.items() if k not in ("quantize", "group_size")} for r in rules]
    return [r for r in out if set(r) - {"select", "layers"}]


def _fake_quantised(float_model, quantised_model):
    """The float model with each weight tensor of the modules quantised in `quantised_model` replaced by its 4-bit
    round trip, grouped along the input side as the layer stores it."""
    out = copy.deepcopy(float_model)
    modules = dict(out.named_modules())
    with torch.no_grad():
        for name, layer in quantised_model.named_modules():
            if not isinstance(layer, QuantizedLinear):
                continue
            mod = modules[name]
            for pname, p in mod.named_parameters():
                if pname.rsplit(".", 1)[-1] == "bias":
                    continue
                if type(mod).__name__ == "Conv1D":  # (in, out): the layer quantises the (out, in) copy
                    p.copy_(fake_quantize(p.T, 4, layer.group_size).T)
                else:
                    p.copy_(fake_quantize(p, 4, layer.group_size))
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_int4_runs_the_float_structure_with_grouped_4bit_weights(case, make_tiny_model, tiny_inputs):
    from kron.surgery import compress, count_bytes, count_params

    kind, rules = CASES[case]
    teacher = make_tiny_model(kind)
    inputs = tiny_inputs(kind)
    plan = CompressionPlan(rules)
    resolved = plan.resolve(teacher)
    q = compress(teacher, plan, inplace=False)
    f = compress(teacher, CompressionPlan(_float_rules(rules)), inplace=False)
    layers = {n: m for n, m in q.model.named_modules() if isinstance(m, QuantizedLinear)}
    assert set(layers) == {n for n, s in resolved.items() if s != KEEP} == {r.name for r in q.modules}
    for name, layer in layers.items():
        spec = resolved[name]
        assert layer.bits == 4 and layer.group_size == spec.group_size and spec.method == "int4"
        assert get_method("int4").recognise(layer) == spec
        for wname, (packed, scale) in layer.quantized().items():
            shape = layer.weight_shapes[wname]
            n = shape[-1]
            assert packed.dtype == torch.uint8 and packed.shape == (*shape[:-1], math.ceil(n / 2)), (name, wname)
            assert scale.dtype == torch.float32 and scale.shape == (*shape[:-1], math.ceil(n / spec.group_size))
    # exactly the float structure's weights after a 4-bit round trip, and close to the float structure
    ref = _fake_quantised(f.model, q.model)
    torch.testing.assert_close(logits(q.model, inputs), logits(ref, inputs), rtol=1e-5, atol=1e-5)
    floats, quant = logits(f.model, inputs), logits(q.model, inputs)
    assert 0 < (quant - floats).norm() / floats.norm() < 0.3
    # sizes: parameters count the logical elements (as the float structure); bytes = what the specs predict
    assert q.params_after == count_params(q.model) == f.params_after
    assert q.macs_per_token_after == f.macs_per_token_after
    assert q.bytes_after == count_bytes(q.model) < f.bytes_after
    teacher_modules = dict(teacher.named_modules())
    analytic = q.bytes_before
    for r in q.modules:
        m, n = dense_dims(teacher_modules[r.name])
        bias = layers[r.name].bias
        assert r.bytes_after == resolved[r.name].bytes(m, n) + (0 if bias is None else 4 * bias.numel()), r.name
        analytic += r.bytes_after - r.bytes_before
    assert analytic == count_bytes(q.model)


def test_int4_and_int8_save_reload_bit_exactly_and_merge(tiny_gpt2, tmp_path):
    from safetensors.torch import load_file

    from kron.io import load_compressed, merge, read_info, save_compressed
    from kron.surgery import compress, count_bytes, count_params

    plan = CompressionPlan([{"select": "mlp.c_fc", "shape": [16, 4, 4, 4], "quantize": "int4", "group_size": 3},
                            {"select": "attn.c_proj", "quantize": "int4"},
                            {"select": "mlp.c_proj", "lowrank_rank": 4, "quantize": "int8"}])
    ids = torch.randint(0, tiny_gpt2.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    report = compress(tiny_gpt2, plan)
    with torch.no_grad():
        out = tiny_gpt2(ids).logits
    saved = save_compressed(tiny_gpt2, plan, tmp_path / "m", report=report)
    info = read_info(saved)
    assert info["modules"]["transformer.h.0.attn.c_proj"] == {"quantize": "int4"}
    assert info["modules"]["transformer.h.0.mlp.c_fc"] == {"shape": [16, 4, 4, 4], "rank": 1, "quantize": "int4",
                                                           "group_size": 3}
    assert info["modules"]["transformer.h.0.mlp.c_proj"] == {"lowrank_rank": 4, "quantize": "int8"}
    assert set(info["methods"]) == {"int4", "int8", "kronecker", "lowrank"}
    stored = load_file(saved / "model.safetensors")
    assert stored["transformer.h.0.attn.c_proj.inner.weight"].dtype == torch.uint8
    assert stored["transformer.h.0.attn.c_proj.inner.weight"].shape == (16, 8)
    assert stored["transformer.h.0.mlp.c_fc.inner.A_scale"].dtype == torch.float32
    assert stored["transformer.h.0.mlp.c_proj.inner.U"].dtype == torch.int8
    loaded = load_compressed(saved, device="cpu")
    assert loaded.kron_plan == plan
    before, after = tiny_gpt2.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]), k
    assert count_params(loaded) == report.params_after and count_bytes(loaded) == report.bytes_after
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, out)
        src = loaded.get_submodule("transformer.h.0.attn.c_proj").to_dense()
        dense = merge(loaded)
        merged = dense.get_submodule("transformer.h.0.attn.c_proj")
        assert type(merged).__name__ == "Conv1D" and merged.weight.dtype == torch.float32
        assert torch.equal(merged.weight.T, src)  # the dequantised 4-bit weight
        assert not any(isinstance(m, QuantizedLinear) for m in dense.modules())
        torch.testing.assert_close(dense(ids).logits, out, rtol=1e-5, atol=1e-5)


def test_int4_file_is_smaller_than_int8(tiny_gpt2, tmp_path):
    from kron.io import save_compressed
    from kron.surgery import compress, count_bytes

    rule = {"select": "re:.*\\.(c_attn|c_proj|c_fc)"}
    i8 = compress(tiny_gpt2, CompressionPlan([{**rule, "quantize": "int8"}]), inplace=False).model
    i4 = compress(tiny_gpt2, CompressionPlan([{**rule, "quantize": "int4"}]), inplace=False).model
    a = (save_compressed(i8, None, tmp_path / "i8") / "model.safetensors").stat().st_size
    b = (save_compressed(i4, None, tmp_path / "i4") / "model.safetensors").stat().st_size
    linear = sum(m.weight.numel() for m in tiny_gpt2.modules() if type(m).__name__ == "Conv1D")
    # each weight: 1 byte -> half a byte, the same scales (rows of at most 64: one group each)
    assert count_bytes(i8) - count_bytes(i4) == linear // 2
    assert a - b > 0.9 * (linear // 2)


def test_quantisation_aware_training_keeps_packed_values_only(tiny_gpt2, tmp_path):
    from kron.io import load_compressed, save_compressed
    from kron.surgery import compress, count_params

    compress(tiny_gpt2, CompressionPlan([{"select": "mlp.c_fc", "lowrank_rank": 4, "quantize": "int4",
                                          "group_size": 8}]))
    n = count_params(tiny_gpt2)
    assert enable_qat(tiny_gpt2) == 4 and count_params(tiny_gpt2) == n  # masters stand in for the packed tensors
    layer = tiny_gpt2.get_submodule("transformer.h.0.mlp.c_fc")
    assert layer.master["V"].shape == (4, 16) and layer.master["V"].dtype == torch.float32
    q0 = {k: t.clone() for k, t in layer.inner.state_dict().items()}
    ids = torch.randint(0, tiny_gpt2.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(2))
    tiny_gpt2.train()
    opt = torch.optim.SGD([p for p in tiny_gpt2.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        tiny_gpt2(ids, labels=ids).loss.backward()
        assert layer.master["V"].grad is not None and layer.master["V"].grad.abs().sum() > 0  # straight through
        opt.step()
    state = tiny_gpt2.state_dict()
    assert not any(".master." in k for k in state)  # a checkpoint never holds the float masters
    v, v_scale = state["transformer.h.0.mlp.c_fc.inner.V"], state["transformer.h.0.mlp.c_fc.inner.V_scale"]
    assert v.dtype == torch.uint8 and v.shape == (4, 8) and v_scale.shape == (4, 2)
    assert state["transformer.h.0.mlp.c_fc.inner.U"].shape == (64, 2)
    moved = [k for k, t in q0.items() if not torch.equal(t, state[f"transformer.h.0.mlp.c_fc.inner.{k}"])]
    assert {"U", "V"} & set(moved) and "V_scale" in moved  # training moved the stored 4-bit weights
    # the stored values are the masters' 4-bit round trip, as the forward saw them
    assert torch.equal(dequantize_int4(v, v_scale, 16, 8), fake_quantize(layer.master["V"].detach(), 4, 8))
    tiny_gpt2.eval()
    with torch.no_grad():
        under_qat = tiny_gpt2(ids).logits
    tiny_gpt2.load_state_dict(state)  # loading into QAT layers: masters follow the stored weights, none missing
    out = save_compressed(tiny_gpt2, None, tmp_path / "qat")
    loaded = load_compressed(out, device="cpu")
    assert torch.equal(loaded.state_dict()["transformer.h.0.mlp.c_fc.inner.V"], v)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, under_qat, rtol=1e-6, atol=1e-6)
    disable_qat(tiny_gpt2)
    assert len(layer.master) == 0 and torch.equal(layer.inner.V, v) and count_params(tiny_gpt2) == n


def tampered_checkpoint(tmp_path, model, edit):
    """`model` with mlp.c_fc in int4 (groups of 8: scales (64, 2), packed (64, 8)), saved under tmp_path/m, its
    weights file then rewritten with `edit` applied to its tensors; returns the folder."""
    from safetensors.torch import load_file, save_file

    from kron.io import save_compressed
    from kron.surgery import compress

    compress(model, CompressionPlan([{"select": "mlp.c_fc", "quantize": "int4", "group_size": 8}]))
    out = save_compressed(model, None, tmp_path / "m")
    tensors = load_file(out / "model.safetensors")
    edit(tensors)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


W = "transformer.h.1.mlp.c_fc.inner.weight"


def _unpacked_float(t):
    t[W] = dequantize_int4(t[W], t[W + "_scale"], 16, 8)  # the float (64, 16) weight instead of its packed bytes


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop(W + "_scale"), "int4 module transformer.h.1.mlp.c_fc: .*no scales"),
    (lambda t: t.__setitem__(W + "_scale", torch.ones(64, 1)), r"transformer.h.1.mlp.c_fc: the scales .*\[64, 1\].*"
                                                              r"needs \[64, 2\] \(one per row and group of 8\)"),
    (lambda t: t.__setitem__(W + "_scale", torch.ones(64)), "transformer.h.1.mlp.c_fc: the scales"),
    (_unpacked_float, "transformer.h.1.mlp.c_fc: .* stored as float32, not uint8"),
    (lambda t: t.__setitem__(W, t[W].to(torch.int8)), "transformer.h.1.mlp.c_fc: .* stored as int8, not uint8"),
    (lambda t: t.__setitem__(W, torch.zeros(64, 16, dtype=torch.uint8)),
     r"transformer.h.1.mlp.c_fc: the packed weight .* \[64, 16\]"),
])
def test_checkpoint_with_a_bad_packed_weight_or_scales_is_refused(tmp_path, tiny_gpt2, edit, message):
    from kron.io import load_compressed

    out = tampered_checkpoint(tmp_path, tiny_gpt2, edit)
    with pytest.raises(CheckpointError, match=message):
        load_compressed(out, device="cpu", verify=False)


def test_an_untampered_checkpoint_loads(tmp_path, tiny_gpt2):
    from kron.io import load_compressed

    out = tampered_checkpoint(tmp_path, tiny_gpt2, lambda t: None)
    assert load_compressed(out, device="cpu", verify=False).transformer.h[1].mlp.c_fc.bits == 4
