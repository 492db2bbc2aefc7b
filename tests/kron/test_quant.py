"""int8 quantisation (`kron.methods.quant`): a modifier over dense, low-rank and Kronecker layers; bytes counts."""
from __future__ import annotations

import json

import pytest
import torch

from kron.errors import CheckpointError, PlanError
from kron.methods import ModuleSpec, parse_label, parse_option, spec_from_dict
from kron.methods.kronecker import KroneckerSpec
from kron.methods.lowrank import LowRankSpec
from kron.methods.quant import QuantizedSpec
from kron.methods.quant.layer import QuantizedLinear, dequantize_rows, quantize_rows
from kron.plan import KEEP, CompressionPlan


@pytest.mark.parametrize("shape", [(7, 13), (3, 5, 9), (4, 1)])
def test_round_trip_error_is_at_most_half_a_step_per_channel(shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 2, shape[-1])
    q, s = quantize_rows(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == shape[:-1]
    err = (dequantize_rows(q, s) - w).abs()
    assert torch.all(err <= s.unsqueeze(-1) / 2 * (1 + 1e-6))
    # symmetric, the full range used: each row's largest magnitude maps to ±127
    assert torch.equal(q.abs().amax(-1).to(torch.int64), torch.full(shape[:-1], 127))


def test_zero_rows_and_exact_grid_values():
    w = torch.tensor([[0.0, 0.0, 0.0], [-1.0, 0.5, 127 / 127]])
    q, s = quantize_rows(w)
    assert s[0] == 1.0 and torch.equal(q[0], torch.zeros(3, dtype=torch.int8))
    assert torch.equal(dequantize_rows(q, s)[0], w[0])
    assert torch.equal(q[1], torch.tensor([-127, 64, 127], dtype=torch.int8))  # 63.5 rounds half to even


@pytest.mark.parametrize("spec, m, n, expected", [
    # dense 8 x 4: 32 int8 + 8 float32 scales
    (QuantizedSpec(None), 8, 4, 32 + 8 * 4),
    # A 2x2 ⊗ B 4x2: A 4 bytes + 2 scales, B 8 bytes + 4 scales
    (QuantizedSpec(KroneckerSpec(shape=(2, 2, 4, 2))), 8, 4, 4 + 2 * 4 + 8 + 4 * 4),
    # rank 2, 3 blocks: per block A (2, 2, 2) 8 + 4 scales, B (2, 2, 2) 8 + 4 scales
    (QuantizedSpec(KroneckerSpec(shape=(2, 2, 2, 2), rank=2, blocks=3)), 12, 4, 3 * (8 + 16 + 8 + 16)),
    # U 8x2 (16 + 8 scales), V 2x4 (8 + 2 scales)
    (QuantizedSpec(LowRankSpec(rank=2)), 8, 4, 16 + 32 + 8 + 8),
    # float specs: parameters x 4 bytes
    (KroneckerSpec(shape=(2, 2, 4, 2)), 8, 4, (4 + 8) * 4),
    (LowRankSpec(rank=2), 8, 4, 24 * 4),
])
def test_bytes_hand_computed(spec, m, n, expected):
    assert spec.bytes(m, n) == expected
    if isinstance(spec, QuantizedSpec):
        assert sum(a * b for *lead, b in spec.weight_shapes(m, n) for a in [__import__("math").prod(lead) if lead
                                                                              else 1]) == spec.params(m, n)


@pytest.mark.parametrize("d", [
    {"quantize": "int8"}, {"shape": [2, 3, 4, 5], "rank": 2, "blocks": 3, "quantize": "int8"},
    {"lowrank_rank": 7, "quantize": "int8"},
])
def test_spec_dicts_labels_and_options_round_trip(d):
    spec = spec_from_dict(d)
    assert isinstance(spec, QuantizedSpec) and spec.to_dict() == d
    assert ModuleSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert parse_label(spec.label()) == spec
    if getattr(spec.inner, "blocks", 1) == 1:
        assert parse_option(spec.option()) == spec


def test_plan_rules_combine_quantize_with_any_structure(tiny_gpt2):
    plan = CompressionPlan([
        {"select": "mlp.c_fc", "shape": [16, 4, 4, 4], "quantize": "int8"},
        {"select": "attn.c_proj", "quantize": "int8"},
        {"select": "mlp.c_proj", "lowrank_rank": 4, "quantize": "int8"},
        {"select": "attn.c_attn", "layers": [0], "factor": 2, "blocks": 3, "quantize": "int8"},
    ])
    assert CompressionPlan.from_yaml(plan.to_yaml()) == plan
    resolved = plan.resolve(tiny_gpt2)
    assert resolved["transformer.h.1.mlp.c_fc"] == QuantizedSpec(KroneckerSpec(shape=(16, 4, 4, 4)))
    assert resolved["transformer.h.1.attn.c_proj"] == QuantizedSpec(None)
    assert resolved["transformer.h.1.mlp.c_proj"] == QuantizedSpec(LowRankSpec(rank=4))
    assert resolved["transformer.h.0.attn.c_attn"].inner.blocks == 3
    assert resolved["transformer.h.1.attn.c_attn"] == KEEP
    exact = CompressionPlan.from_resolved(resolved)
    assert exact.resolve(tiny_gpt2) == resolved


def test_kronecker_int8_builds_saves_reloads_bit_exactly_and_merges(tiny_gpt2, tmp_path):
    from kron.io import load_compressed, merge, read_info, save_compressed
    from kron.surgery import count_bytes, count_params, compress

    plan = CompressionPlan([{"select": "mlp.c_fc", "shape": [16, 4, 4, 4], "quantize": "int8"},
                            {"select": "attn.c_proj", "quantize": "int8"}])
    ids = torch.randint(0, tiny_gpt2.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        teacher = tiny_gpt2(ids).logits
    report = compress(tiny_gpt2, plan)
    layer = tiny_gpt2.get_submodule("transformer.h.2.mlp.c_fc")
    assert isinstance(layer, QuantizedLinear) and type(layer.inner).__name__ == "KroneckerLinear"
    assert layer.inner.A.dtype == torch.int8 and layer.inner.A_scale.dtype == torch.float32
    # the report's sizes: parameters count the int8 elements; bytes are what the state dict holds
    rec = next(r for r in report.modules if r.name == "transformer.h.2.mlp.c_fc")
    assert rec.params_after == 16 * 4 + 4 * 4 + 64 and rec.bytes_after == 16 * 4 + 16 * 4 + 16 + 4 * 4 + 64 * 4
    assert report.params_after == count_params(tiny_gpt2)
    assert report.bytes_after == count_bytes(tiny_gpt2) < report.bytes_before == 4 * report.params_before
    assert "weight storage (bytes)" in report.summary() and report.to_dict()["bytes_after"] == report.bytes_after
    with torch.no_grad():
        out = tiny_gpt2(ids).logits
    assert not torch.equal(out, teacher)  # the quantised weights are what runs
    saved = save_compressed(tiny_gpt2, plan, tmp_path / "m")
    assert read_info(saved)["modules"]["transformer.h.0.attn.c_proj"] == {"quantize": "int8"}
    loaded = load_compressed(saved, device="cpu")
    before, after = tiny_gpt2.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]), k
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, out)
        dense = merge(loaded)
        assert type(dense.get_submodule("transformer.h.0.attn.c_proj")).__name__ == "Conv1D"
        torch.testing.assert_close(dense(ids).logits, out, rtol=1e-5, atol=1e-5)


def test_int8_file_is_smaller_on_disk(tiny_gpt2, tmp_path):
    from kron.io import save_compressed
    from kron.surgery import compress

    import copy

    plain = copy.deepcopy(tiny_gpt2)
    compress(tiny_gpt2, CompressionPlan([{"select": "re:.*\\.(c_attn|c_proj|c_fc)", "quantize": "int8"}]))
    a = save_compressed(plain, None, tmp_path / "f32") / "model.safetensors"
    b = save_compressed(tiny_gpt2, None, tmp_path / "i8") / "model.safetensors"
    linear = sum(m.weight.numel() for n, m in plain.named_modules() if type(m).__name__ == "Conv1D")
    # each quantised weight: 4 bytes -> 1 byte plus its scales
    assert a.stat().st_size - b.stat().st_size > 0.7 * 3 * linear


def test_embeddings_are_refused_naming_the_module(tiny_gpt2):
    with pytest.raises(PlanError, match="transformer.wte is an nn.Embedding.*quantize: int8 supports linear"):
        CompressionPlan([{"select": "wte", "quantize": "int8"}]).resolve(tiny_gpt2)
    with pytest.raises(PlanError, match="transformer.wte"):
        CompressionPlan([{"select": "wte", "embedding_factor": 2, "quantize": "int8"}]).resolve(tiny_gpt2)


@pytest.mark.parametrize("rule, message", [
    ({"select": "c_fc", "quantize": "int3"}, "quantize must be 'int8'"),
    ({"select": "c_fc", "quantize": "int8", "keep": True}, "keep: true cannot be combined with quantize"),
    ({"select": "c_fc", "shape": [16, 4, 4, 4], "factor": 2, "quantize": "int8"}, "give exactly one of"),
])
def test_bad_rules(rule, message):
    with pytest.raises(PlanError, match=message):
        CompressionPlan([rule])


def tampered_checkpoint(tmp_path, model, edit, plan=None):
    """`model` compressed by `plan` (default: mlp.c_fc in int8), saved under tmp_path/m, its weights file then
    rewritten with `edit` applied to its tensors; returns the folder."""
    from safetensors.torch import load_file, save_file

    from kron.io import save_compressed
    from kron.surgery import compress

    compress(model, plan or CompressionPlan([{"select": "mlp.c_fc", "quantize": "int8"}]))
    out = save_compressed(model, None, tmp_path / "m")
    tensors = load_file(out / "model.safetensors")
    edit(tensors)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("transformer.h.1.mlp.c_fc.inner.weight_scale"), "transformer.h.1.mlp.c_fc.*scale"),
    (lambda t: t.__setitem__("transformer.h.1.mlp.c_fc.inner.weight_scale", torch.ones(3)),
     "transformer.h.1.mlp.c_fc.*scale"),
    (lambda t: t.__setitem__("transformer.h.1.mlp.c_fc.inner.weight",
                             t["transformer.h.1.mlp.c_fc.inner.weight"].float()), "transformer.h.1.mlp.c_fc.*int8"),
])
def test_checkpoint_with_missing_or_mismatched_scales_is_refused(tmp_path, tiny_gpt2, edit, message):
    from kron.io import load_compressed

    out = tampered_checkpoint(tmp_path, tiny_gpt2, edit)
    with pytest.raises(CheckpointError, match=message):
        load_compressed(out, device="cpu", verify=False)


def test_quantisation_aware_training_moves_masters_and_saves_int8(tiny_gpt2, tmp_path):
    from kron.io import load_compressed, save_compressed
    from kron.methods.quant.layer import disable_qat, enable_qat
    from kron.surgery import count_params, compress

    compress(tiny_gpt2, CompressionPlan([{"select": "mlp.c_fc", "lowrank_rank": 4, "quantize": "int8"}]))
    n = count_params(tiny_gpt2)
    assert enable_qat(tiny_gpt2) == 4 and count_params(tiny_gpt2) == n  # masters stand in for the int8 tensors
    layer = tiny_gpt2.get_submodule("transformer.h.0.mlp.c_fc")
    q0 = layer.inner.U.clone()
    ids = torch.randint(0, tiny_gpt2.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(2))
    tiny_gpt2.train()
    opt = torch.optim.SGD([p for p in tiny_gpt2.parameters() if p.requires_grad], lr=0.5)
    loss = tiny_gpt2(ids, labels=ids).loss
    loss.backward()
    assert layer.master["U"].grad is not None and layer.master["U"].grad.abs().sum() > 0  # straight through
    opt.step()
    state = tiny_gpt2.state_dict()
    assert not any(".master." in k for k in state)  # a checkpoint never holds the float masters
    assert state["transformer.h.0.mlp.c_fc.inner.U"].dtype == torch.int8
    assert not torch.equal(state["transformer.h.0.mlp.c_fc.inner.U"], q0)  # training moved the int8 weights
    tiny_gpt2.load_state_dict(state)  # loading into QAT layers: masters follow the int8 weights, none missing
    out = save_compressed(tiny_gpt2.eval(), None, tmp_path / "qat")
    loaded = load_compressed(out, device="cpu")
    assert torch.equal(loaded.state_dict()["transformer.h.0.mlp.c_fc.inner.U"], state["transformer.h.0.mlp.c_fc.inner.U"])
    disable_qat(tiny_gpt2)
    assert len(layer.master) == 0 and torch.equal(layer.inner.U, state["transformer.h.0.mlp.c_fc.inner.U"])
