"""Module surgery: exact Kronecker weights must survive compression bit-for-bit (up to float32 round-off), the LM head
is untied when the input embedding is compressed, and the report's counts are right."""
import json
import threading

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from kron.errors import PlanError
from kron.layers import FusedKroneckerLinear, KroneckerEmbedding, KroneckerLinear
from kron.plan import KEEP, CompressionPlan, ModuleSpec
from kron.surgery import apply_specs, compress, count_params, macs_per_token, specs_from_model

# Plans touching every kind of module of each tiny model, at rank 1 and 2 (see tests/conftest.py for the sizes).
PLANS = {
    "gpt2": {"rules": [
        {"select": "wte", "embedding_factor": 2},
        {"select": "attn.c_attn", "shape": [4, 8, 4, 2], "blocks": 3, "rank": 2},  # Q, K, V: 16 x 16 each
        {"select": "attn.c_proj", "layers": "even", "shape": [2, 4, 8, 4]},
        {"select": "mlp.c_fc", "layers": "odd", "shape": [8, 4, 8, 4]},
        {"select": "mlp.c_proj", "shape": [4, 8, 4, 8], "rank": 2},
    ]},
    "bert": {"rules": [
        {"select": "word_embeddings", "embedding_factor": 4},
        {"select": ["query", "key", "value", "attention.output.dense"], "shape": [4, 4, 4, 4], "rank": 2},
        {"select": "intermediate.dense", "shape": [8, 2, 4, 8]},
        {"select": "re:.*layer\\.\\d+\\.output\\.dense", "shape": [2, 8, 8, 4]},
    ]},
    "llama": {"rules": [
        {"select": "embed_tokens", "embedding_factor": 2},
        {"select": ["q_proj", "o_proj"], "shape": [4, 4, 4, 4]},
        {"select": ["k_proj", "v_proj"], "shape": [2, 4, 4, 4], "rank": 2},  # GQA: 8 x 16
        {"select": ["gate_proj", "up_proj"], "shape": [6, 4, 4, 4]},
        {"select": "down_proj", "shape": [4, 6, 4, 4], "rank": 2},
    ]},
}
N_FACTORED = {"gpt2": 13, "bert": 13, "llama": 15}


def _outputs(model, inputs):
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    return out.logits, out.hidden_states[-1]


@pytest.mark.parametrize("kind", ["gpt2", "bert", "llama"])
def test_exact_kronecker_weights_reproduce_the_model(kind, make_tiny_model, tiny_inputs, set_exact_kronecker):
    model = make_tiny_model(kind)
    plan = CompressionPlan.from_dict(PLANS[kind])
    set_exact_kronecker(model, plan.resolve(model))
    inputs = tiny_inputs(kind)
    ref_logits, ref_hidden = _outputs(model, inputs)

    report = compress(model, plan)

    assert len(report.modules) == N_FACTORED[kind]
    kron = [m for m in model.modules() if isinstance(m, (KroneckerLinear, FusedKroneckerLinear, KroneckerEmbedding))]
    assert len(kron) - sum(len(m.blocks) for m in kron if isinstance(m, FusedKroneckerLinear)) == N_FACTORED[kind]
    assert max(r.init_error for r in report.modules) < 1e-5  # exact products: the SVD finds them
    logits, hidden = _outputs(model, inputs)
    # float32 throughout; the scale check keeps the comparison meaningful for BERT's near-zero random head
    assert ref_hidden.abs().max() > 0.1
    torch.testing.assert_close(hidden, ref_hidden, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_generic_weights_are_not_reproduced(kind, make_tiny_model, tiny_inputs):
    """The control for the exactness test: random (non-Kronecker) weights lose information."""
    model = make_tiny_model(kind)
    inputs = tiny_inputs(kind)
    ref_logits, _ = _outputs(model, inputs)
    report = compress(model, PLANS[kind])
    assert min(r.init_error for r in report.modules) > 0.1
    logits, _ = _outputs(model, inputs)
    assert (logits - ref_logits).abs().max() > 1e-3


def test_gpt2_embedding_compression_unties_a_dense_lm_head(tiny_gpt2, tiny_inputs):
    model = tiny_gpt2
    assert model.lm_head.weight is model.transformer.wte.weight and model.config.tie_word_embeddings
    shared = model.transformer.wte.weight
    original = shared.detach().clone()
    before = count_params(model)
    report = compress(model, {"rules": [{"select": "wte", "embedding_factor": 2}]})
    assert isinstance(model.transformer.wte, KroneckerEmbedding)
    assert isinstance(model.lm_head, nn.Linear)
    assert torch.equal(model.lm_head.weight, original)  # the head keeps the dense table ...
    assert model.lm_head.weight is not shared and model.lm_head.weight.data_ptr() != shared.data_ptr()  # its own
    assert model.config.tie_word_embeddings is False
    assert model.all_tied_weights_keys == {}
    model.tie_weights()  # transformers must not re-tie it
    assert isinstance(model.transformer.wte, KroneckerEmbedding) and torch.equal(model.lm_head.weight, original)
    assert report.untied_output_embedding
    # tied before: the table counts once, as the input embedding; after: the dense head is excluded
    assert report.params_before == before == report.params_before_excluding_output_embedding
    assert report.params_after == before - 96 * 16 + (96 * 8 + 2) + 96 * 16
    assert report.params_after_excluding_output_embedding == before - 96 * 16 + (96 * 8 + 2)
    model(**tiny_inputs("gpt2")).logits.sum().backward()  # the untied model trains
    assert model.lm_head.weight.grad is not None and model.transformer.wte.A.grad is not None


def test_gpt2_without_embedding_compression_stays_tied(tiny_gpt2):
    report = compress(tiny_gpt2, {"rules": [{"select": "mlp.c_fc", "factor": 2}]})
    assert tiny_gpt2.lm_head.weight is tiny_gpt2.transformer.wte.weight
    assert tiny_gpt2.config.tie_word_embeddings and not report.untied_output_embedding


def test_fused_c_attn_blocks_are_q_k_v(tiny_gpt2, set_exact_kronecker):
    plan = CompressionPlan([{"select": "h.0.attn.c_attn", "shape": [4, 8, 4, 2], "blocks": 3}])
    set_exact_kronecker(tiny_gpt2, plan.resolve(tiny_gpt2))
    dense = tiny_gpt2.transformer.h[0].attn.c_attn.weight.detach().T.clone()  # Conv1D stores (in, out)
    compress(tiny_gpt2, plan)
    fused = tiny_gpt2.transformer.h[0].attn.c_attn
    assert isinstance(fused, FusedKroneckerLinear) and len(fused.blocks) == 3
    for block, rows in zip(fused.blocks, dense.split(16, dim=0)):  # Q, K, V in that order
        torch.testing.assert_close(block.to_dense(), rows, rtol=0, atol=1e-6)


def test_bert_heads_untouched_unless_named(tiny_bert):
    compress(tiny_bert, "uniform:2")
    assert type(tiny_bert.classifier) is nn.Linear and type(tiny_bert.bert.pooler.dense) is nn.Linear
    assert type(tiny_bert.bert.embeddings.word_embeddings) is nn.Embedding
    compress(tiny_bert, {"rules": [{"select": "classifier", "shape": [1, 8, 3, 2]}]})
    assert isinstance(tiny_bert.classifier, KroneckerLinear)


def test_llama_gqa_uniform(tiny_llama, tiny_inputs):
    report = compress(tiny_llama, "uniform:2")
    assert {r.name.rsplit(".", 1)[-1] for r in report.modules} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    shapes = {r.name: (tuple(r.dense_shape), tuple(r.spec["shape"])) for r in report.modules}
    assert shapes["model.layers.0.self_attn.k_proj"][0] == (8, 16)
    assert shapes["model.layers.0.self_attn.q_proj"][0] == (16, 16)
    assert tiny_llama(**tiny_inputs("llama")).logits.shape == (2, 7, 96)


def test_report_fields_and_counts(tiny_llama):
    tiny_llama.lock = threading.Lock()  # to_dict must not deep-copy the model (a lock cannot be copied)
    n_before = count_params(tiny_llama)
    macs_before = macs_per_token(tiny_llama)
    # hand count: per layer q, o 16x16, k, v 8x16, gate, up 24x16, down 16x24; the head 96x16
    assert macs_before == 2 * (2 * 256 + 2 * 128 + 3 * 384) + 96 * 16 == 5376
    assert count_params(tiny_llama, exclude_output_embedding=True) == n_before - 96 * 16  # untied head
    report = compress(tiny_llama, {"rules": [{"select": "q_proj", "shape": [4, 4, 4, 4]},
                                             {"select": "layers.1.mlp.down_proj", "shape": [4, 6, 4, 4], "rank": 2}]})
    assert report.params_before == n_before
    assert report.params_after == count_params(tiny_llama) == n_before - 2 * (256 - 32) - (384 - 2 * (24 + 16))
    assert report.params_before_excluding_output_embedding == n_before - 1536
    assert report.params_after_excluding_output_embedding == report.params_after - 1536
    assert report.compression_ratio == pytest.approx((n_before - 1536) / (report.params_after - 1536))
    # q 16x16 as A 4x4 ⊗ B 4x4: min(4·4·(4+4), 4·4·(4+4)) = 128 MACs; down 16x24 rank 2: 2·min(64+..)
    q = next(r for r in report.modules if r.name == "model.layers.0.self_attn.q_proj")
    assert (q.kind, q.module_type, q.dense_shape, q.spec) == ("linear", "Linear", (16, 16), {"shape": [4, 4, 4, 4],
                                                                                         "rank": 1})
    assert (q.params_before, q.params_after, q.macs_before, q.macs_after) == (256, 32, 256, 128)
    down = report.modules[-1]
    assert down.macs_after == 2 * min(4 * 4 * (6 + 4), 6 * 4 * (4 + 4)) == 320
    assert report.macs_per_token_before == macs_before
    assert report.macs_per_token_after == macs_before - 2 * (256 - 128) - (384 - 320) == macs_per_token(tiny_llama)
    assert report.mac_reduction == pytest.approx(macs_before / report.macs_per_token_after)
    d = json.loads(json.dumps(report.to_dict()))
    for key in ("params_before", "params_after", "params_before_excluding_output_embedding",
                "params_after_excluding_output_embedding", "compression_ratio", "macs_per_token_before",
                "macs_per_token_after", "mac_reduction", "modules", "untied_output_embedding", "init"):
        assert key in d
    assert "model" not in d
    assert d["modules"][0]["dense_shape"] == [16, 16] and 0 < d["modules"][0]["init_error"] < 1
    assert "parameters excluding the output embedding" in report.summary()


def test_count_params_counts_shared_tensors_once(tiny_gpt2):
    unique = {id(p): p.numel() for _, p in tiny_gpt2.named_parameters(remove_duplicate=False)}
    assert count_params(tiny_gpt2) == sum(unique.values())
    assert sum(p.numel() for _, p in tiny_gpt2.named_parameters(remove_duplicate=False)) == count_params(
        tiny_gpt2) + 96 * 16
    assert count_params(tiny_gpt2, exclude_output_embedding=True) == count_params(tiny_gpt2)  # tied: kept once
    assert count_params(tiny_gpt2) == 96 * 16 + 32 * 16 + 4 * (4 * 16 + 48 * 16 + 48 + 16 * 16 + 16 + 64 * 16 + 64
                                                              + 16 * 64 + 16) + 2 * 16


def test_not_inplace_leaves_model_untouched(tiny_gpt2, tiny_inputs):
    ref = tiny_gpt2(**tiny_inputs("gpt2")).logits
    report = compress(tiny_gpt2, "uniform:2", inplace=False)
    assert report.model is not tiny_gpt2
    assert not any(isinstance(m, KroneckerLinear) for m in tiny_gpt2.modules())
    assert any(isinstance(m, KroneckerLinear) for m in report.model.modules())
    assert torch.equal(tiny_gpt2(**tiny_inputs("gpt2")).logits, ref)


def test_init_none_builds_structure_without_svd(tiny_gpt2):
    report = compress(tiny_gpt2, PLANS["gpt2"], init="none")
    assert all(r.init_error is None for r in report.modules)
    assert {n: s.to_dict() for n, s in specs_from_model(tiny_gpt2).items()} == {r.name: r.spec for r in report.modules}
    with pytest.raises(ValueError, match="init must be 'svd', 'data' or 'none'"):
        compress(tiny_gpt2, PLANS["gpt2"], init="random")


def test_dtype_device_mode_and_requires_grad_are_kept(make_tiny_model):
    model = make_tiny_model("llama", dtype=torch.float64)
    model.train()
    model.model.layers[0].self_attn.q_proj.requires_grad_(False)
    compress(model, {"rules": [{"select": ["q_proj", "k_proj"], "factor": 2}, {"select": "embed_tokens",
                                                                               "embedding_factor": 2}]})
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, KroneckerLinear) and q.A.dtype == torch.float64 and q.A.device.type == "cpu"
    assert q.training and not q.A.requires_grad
    k = model.model.layers[0].self_attn.k_proj
    assert k.A.requires_grad and model.model.embed_tokens.A.dtype == torch.float64


def test_conv1d_orientation_in_records(tiny_gpt2):
    report = compress(tiny_gpt2, {"rules": [{"select": "h.0.mlp.c_proj", "shape": [4, 8, 4, 8]}]})
    rec = report.modules[0]
    assert isinstance(Conv1D(64, 16), nn.Module) and rec.module_type == "Conv1D"
    assert rec.dense_shape == (16, 64)  # (out x in), although Conv1D stores (64, 16)


def test_errors_leave_the_model_unchanged(tiny_gpt2):
    plan = {"rules": [{"select": "mlp.c_fc", "factor": 2}, {"select": "ln_f", "factor": 2}]}
    with pytest.raises(PlanError, match="LayerNorm"):
        compress(tiny_gpt2, plan)
    specs = {"transformer.h.0.mlp.c_fc": ModuleSpec((8, 4, 8, 4)), "transformer.h.1.mlp.c_fc": ModuleSpec((8, 4, 4, 4))}
    with pytest.raises(PlanError, match="module transformer.h.1.mlp.c_fc: shape A 8x4 ⊗ B 4x4 gives a 32x16 matrix"):
        apply_specs(tiny_gpt2, specs)  # resolved specs (as load_compressed passes them) are checked up front too
    assert not any(isinstance(m, KroneckerLinear) for m in tiny_gpt2.modules())


def test_plan_argument_forms(tiny_gpt2, tmp_path):
    path = CompressionPlan([{"select": "mlp.c_fc", "factor": 2}]).save(tmp_path / "p.yaml")
    assert len(compress(tiny_gpt2, str(path), inplace=False).modules) == 4
    assert len(compress(tiny_gpt2, {"rules": [{"select": "mlp.c_fc", "factor": 2}]}, inplace=False).modules) == 4
    assert len(compress(tiny_gpt2, "kngpt2", inplace=False).modules) == 1 + 3 * 2
    with pytest.raises(PlanError, match="'nope' is neither a plan file nor a preset; presets: kngpt2"):
        compress(tiny_gpt2, "nope")
    with pytest.raises(PlanError, match="plan file .*missing.yaml does not exist"):
        compress(tiny_gpt2, str(tmp_path / "missing.yaml"))


def test_resolve_then_keep_everything_is_a_no_op(tiny_gpt2):
    resolved = CompressionPlan().resolve(tiny_gpt2)
    assert set(resolved.values()) == {KEEP}
    report = compress(tiny_gpt2, CompressionPlan())
    assert report.modules == [] and report.compression_ratio == 1.0


def test_tied_llama_embedding_compression_unties(make_tiny_model, tiny_inputs, set_exact_kronecker):
    model = make_tiny_model("llama", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    plan = CompressionPlan([{"select": "embed_tokens", "embedding_factor": 4}])
    set_exact_kronecker(model, plan.resolve(model))
    ref = model(**tiny_inputs("llama")).logits
    report = compress(model, plan)
    assert report.untied_output_embedding and model.config.tie_word_embeddings is False
    assert isinstance(model.model.embed_tokens, KroneckerEmbedding) and type(model.lm_head) is nn.Linear
    torch.testing.assert_close(model(**tiny_inputs("llama")).logits, ref, rtol=0, atol=1e-5)
