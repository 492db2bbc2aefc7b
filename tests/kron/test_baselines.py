"""Baselines at equal size: the low-rank U·V layer and plans, and layer dropping (kron.baselines)."""
import json
import math

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
from transformers.pytorch_utils import Conv1D

from kron.baselines import (LAYERDROP_INFO, describe_lowrank, drop_layers, parse_keep, read_layerdrop_info,
                            save_layerdrop, size_report)
from kron.errors import CheckpointError, PlanError, ShapeError
from kron.factor import lowrank_rank_for_ratio, nearest_lowrank
from kron.io import load_compressed, merge, read_info, save_compressed
from kron.layers import FusedLowRankLinear, LowRankLinear, lowrank_linear
from kron.models import load_model
from kron.plan import KEEP, CompressionPlan, ModuleSpec
from kron.presets import get_plan, preset_plan
from kron.surgery import CompressionReport, compress, count_params, is_factored, macs_per_token

AUTO = {"gpt2": AutoModelForCausalLM, "bert": AutoModelForSequenceClassification, "llama": AutoModelForCausalLM}
LOWRANK = (LowRankLinear, FusedLowRankLinear)


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _rank_r(m, n, r, g, dtype=torch.float64):
    return torch.randn(m, r, generator=g, dtype=dtype) @ torch.randn(r, n, generator=g, dtype=dtype) * 0.3


def _set_exact_lowrank(model, specs, seed=0):
    """Give every module with a low-rank spec a weight of exactly that rank (per block for fused projections)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, spec in specs.items():
            if spec == KEEP:
                continue
            module = model.get_submodule(name)
            is_conv1d = type(module).__name__ == "Conv1D"
            n, m = module.weight.shape if is_conv1d else module.weight.shape[::-1]
            rows = m // spec.blocks
            W = torch.cat([_rank_r(rows, n, spec.lowrank_rank, g) for _ in range(spec.blocks)])
            module.weight.copy_((W.T if is_conv1d else W).to(module.weight.dtype))


# ----------------------------------------------------------------------------------------------- LowRankLinear


@pytest.mark.parametrize("lead", [(5,), (2, 3), ()])
@pytest.mark.parametrize("m, n, r", [(8, 12, 3), (12, 8, 1), (5, 5, 5)])
def test_forward_matches_dense(lead, m, n, r):
    U, V, b = torch.randn(m, r), torch.randn(r, n), torch.randn(m)
    x = torch.randn(*lead, n)
    y = lowrank_linear(x, U, V, b)
    assert y.shape == (*lead, m)
    assert torch.allclose(y, x @ (U @ V).T + b, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_from_linear_exact_when_rank_fits_and_keeps_dtype(kind, dtype):
    g = torch.Generator().manual_seed(0)
    W = _rank_r(10, 14, 3, g).to(dtype)  # (out 10, in 14), rank 3 (up to bfloat16 rounding)
    if kind == "linear":
        module = nn.Linear(14, 10).to(dtype)
        module.weight.data.copy_(W)
    else:
        module = Conv1D(10, 14).to(dtype)  # weight stored (in, out)
        module.weight.data.copy_(W.T)
    layer = LowRankLinear.from_linear(module, rank=3)
    assert layer.U.shape == (10, 3) and layer.V.shape == (3, 14)
    assert layer.U.dtype == dtype and layer.U.device == module.weight.device and layer.bias.dtype == dtype
    tol = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 3e-2}[dtype]
    assert layer.init_error < (1e-5 if dtype != torch.bfloat16 else 1e-2)
    assert torch.allclose(layer.to_dense().float(), module.weight.float().T if kind == "conv1d"
                          else module.weight.float(), atol=tol * 10)
    x = torch.randn(4, 14).to(dtype)
    assert torch.allclose(layer(x).float(), module(x).float(), rtol=tol * 10, atol=tol * 10)


def test_init_error_is_the_relative_frobenius_tail():
    W = torch.randn(9, 7, dtype=torch.float64)
    s = torch.linalg.svdvals(W)
    for r in (1, 3, 7):
        layer = LowRankLinear.from_linear(_linear(W), r)
        expected = math.sqrt(float((s[r:] ** 2).sum() / (s ** 2).sum()))
        assert layer.init_error == pytest.approx(expected, abs=1e-12)
        rel = torch.linalg.norm(layer.to_dense().detach() - W) / torch.linalg.norm(W)
        assert rel.item() == pytest.approx(expected, abs=1e-10)
    # √σ split: both factors carry the same scale
    f = nearest_lowrank(W, 2)
    assert torch.allclose(f.U.norm(dim=0), f.V.norm(dim=1), atol=1e-10)


def _linear(W, bias=True):
    lin = nn.Linear(W.shape[1], W.shape[0], bias=bias, dtype=W.dtype)
    with torch.no_grad():
        lin.weight.copy_(W)
    return lin


def test_gradients_equal_autograd_through_dense_form():
    U = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    V = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, 6, dtype=torch.float64)
    (lowrank_linear(x, U, V) * w).sum().backward()
    grads = [t.grad.clone() for t in (U, V, x)]
    for t in (U, V, x):
        t.grad = None
    ((x @ (U @ V).T) * w).sum().backward()
    for got, t in zip(grads, (U, V, x)):
        assert torch.allclose(got, t.grad, atol=1e-12)
    layer = LowRankLinear(5, 6, 2)
    layer(torch.randn(2, 5)).sum().backward()
    assert all(p.grad is not None for p in layer.parameters())


def test_costs_and_random_init_scale():
    layer = LowRankLinear(768, 3072, 96)
    assert layer.macs_per_token == layer.factor_params == 96 * (768 + 3072)
    assert sum(p.numel() for p in layer.parameters()) == 96 * (768 + 3072) + 3072
    # the random init gives W about nn.Linear's variance 1/(3·in)
    assert layer.to_dense().var().item() == pytest.approx(1 / (3 * 768), rel=0.1)


def test_rank_and_type_errors():
    with pytest.raises(PlanError, match="rank 9 exceeds min\\(out, in\\) = 8"):
        LowRankLinear.from_linear(nn.Linear(8, 12), 9)
    with pytest.raises(PlanError, match="rank must be a positive integer, got 0"):
        LowRankLinear(8, 12, 0)
    with pytest.raises(TypeError, match="supported types are torch.nn.Linear"):
        LowRankLinear.from_linear(nn.Conv2d(3, 3, 1), 1)
    with pytest.raises(ShapeError, match="rank must be an integer in \\[1, 4\\]"):
        nearest_lowrank(torch.randn(4, 6), 5)


def test_fused_blocks_each_get_their_own_low_rank():
    # Q, K, V each of rank 2: the fused 24 x 8 matrix has rank 6, so only a per-block rank-2 U·V is exact.
    g = torch.Generator().manual_seed(1)
    blocks = [_rank_r(8, 8, 2, g).float() for _ in range(3)]
    module = Conv1D(24, 8)
    module.weight.data.copy_(torch.cat(blocks).T)
    fused = FusedLowRankLinear.from_linear(module, 2, blocks=3)
    x = torch.randn(5, 8)
    assert torch.allclose(fused(x), module(x), atol=1e-5)
    assert fused.init_error < 1e-5 and fused.rank == 2
    assert fused.macs_per_token == 3 * 2 * (8 + 8)
    assert torch.allclose(fused.to_dense(), torch.cat(blocks), atol=1e-5)
    assert LowRankLinear.from_linear(module, 2).init_error > 0.1
    with pytest.raises(PlanError, match="cannot split 24 output features into 5 equal blocks"):
        FusedLowRankLinear.from_linear(module, 2, blocks=5)


# ----------------------------------------------------------------------------------------------- rank selection


@pytest.mark.parametrize("m, n, ratio, rank", [
    (768, 768, 2, 192),     # 589,824 / (2 · 1536) = 192 exactly: not 191
    (3072, 768, 2, 307),    # 2,359,296 / 7680 = 307.2
    (768, 3072, 4, 153),    # 2,359,296 / 15,360 = 153.6
    (16, 16, 2, 4),
    (8, 16, 2, 2),          # 128 / 48 = 2.67
    (64, 16, 3, 4),         # 1024 / 240 = 4.27
    (10, 10, 100, 1),       # floor(0.5) = 0 -> at least rank 1
    (768, 768, 1.5, 256),   # 589,824 / 2304 = 256 exactly
])
def test_rank_for_ratio(m, n, ratio, rank):
    assert lowrank_rank_for_ratio(m, n, ratio) == rank


@pytest.mark.parametrize("kind", ["gpt2", "bert", "llama"])
@pytest.mark.parametrize("ratio", [2, 3])
def test_lowrank_preset_meets_the_parameter_target(kind, ratio, make_tiny_model):
    model = make_tiny_model(kind)
    plan = preset_plan(f"lowrank:{ratio}", model.config)
    assert plan.name == f"lowrank:{ratio}"
    resolved = plan.resolve(model)
    targets = {"gpt2": ("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"), "bert": ("query", "key", "value", "dense"),
               "llama": ("_proj",)}[kind]
    lowrank = {n: s for n, s in resolved.items() if s != KEEP}
    assert lowrank and all(any(t in n for t in targets) for n in lowrank)
    assert all(s == KEEP for n, s in resolved.items() if "embed" in n or n.endswith(("wte", "wpe", "lm_head")))
    report = compress(model, plan)
    for rec in report.modules:
        assert rec.kind == "lowrank"
        spec = ModuleSpec.from_dict(rec.spec)
        m, n = rec.dense_shape
        blocks = spec.blocks
        assert blocks == (3 if rec.name.endswith("c_attn") else 1)
        rows, r = m // blocks, spec.lowrank_rank
        # the largest rank whose U·V holds at most 1/ratio of the weight (rank 1 at least)
        assert r == max(1, math.floor(rows * n / (ratio * (rows + n))))
        assert r * (rows + n) <= rows * n / ratio or r == 1
        assert (r + 1) * (rows + n) > rows * n / ratio
        assert rec.params_after - (rec.params_before - m * n) == blocks * r * (rows + n)
        assert rec.macs_after == blocks * r * (rows + n) and rec.macs_before == m * n
    assert report.params_after < report.params_before
    assert macs_per_token(model) == report.macs_per_token_after


# ----------------------------------------------------------------------------------------------- plan errors


@pytest.mark.parametrize("rule, message", [
    ({"select": "c_fc", "lowrank_rank": 16},
     "rule 1: module transformer.h.0.mlp.c_fc (Conv1D, weight 64 x 16 (out x in)): lowrank_rank 16 is >= min(m, n) = "
     "16, so U·V can hold any 64 x 16 matrix with 1,280 parameters against 1,024 dense: no compression; ranks 1-12 "
     "compress it"),
    ({"select": "c_fc", "lowrank_rank": 13},
     "lowrank_rank 13 gives U·V 1,040 parameters for a 64 x 16 weight of 1,024: no compression; ranks 1-12 compress "
     "it"),
    ({"select": "c_attn", "lowrank_rank": 8, "blocks": 3},
     "lowrank_rank 8 gives U·V 256 parameters for each 16 x 16 block of 256: no compression; ranks 1-7 compress it"),
    ({"select": "wte", "lowrank_rank": 2},
     "module transformer.wte is an nn.Embedding (96 x 16): use embedding_factor (A v x d/f ⊗ B 1 x f), not "
     "lowrank_rank or lowrank_ratio"),
    ({"select": "c_attn", "lowrank_rank": 2, "blocks": 5}, "cannot be split into 5 equal output blocks"),
])
def test_lowrank_plan_errors_against_a_model(rule, message, tiny_gpt2):
    with pytest.raises(PlanError) as err:
        CompressionPlan([rule]).resolve(tiny_gpt2)
    assert message in str(err.value)


@pytest.mark.parametrize("rule, message", [
    ({"select": "c_fc", "lowrank_ratio": 1}, "rule 1: lowrank_ratio must be a parameter reduction > 1"),
    ({"select": "c_fc", "lowrank_ratio": "2"}, "lowrank_ratio must be a parameter reduction > 1"),
    ({"select": "c_fc", "lowrank_rank": 0}, "rule 1: lowrank_rank must be a positive integer, got 0"),
    ({"select": "c_fc", "lowrank_rank": 2, "rank": 2}, "rank is the number of summed Kronecker products"),
    ({"select": "c_fc", "lowrank_rank": 2, "lowrank_ratio": 2},
     "give exactly one of shape, factor, embedding_factor or keep: true (got lowrank_rank, lowrank_ratio)"),
    ({"select": "c_fc", "lowrank_rank": 2, "shape": [2, 2, 2, 2]}, "(got shape, lowrank_rank)"),
    ({"select": "c_fc"}, "or, for a low-rank U·V instead of Kronecker factors, one of lowrank_rank or lowrank_ratio"),
    ({"select": "c_fc", "keep": True, "lowrank_rank": 2}, "keep: true cannot be combined with lowrank_rank"),
    ({"select": "c_fc", "lowrank_rnak": 2}, "unknown key 'lowrank_rnak' (did you mean 'lowrank_rank'?)"),
])
def test_lowrank_rule_validation(rule, message):
    with pytest.raises(PlanError) as err:
        CompressionPlan([rule])
    assert message in str(err.value)


def test_module_spec_lowrank():
    spec = ModuleSpec(lowrank_rank=4, blocks=3)
    assert spec.kind == "lowrank"
    assert spec.to_dict() == {"lowrank_rank": 4, "blocks": 3}
    assert ModuleSpec.from_dict(spec.to_dict()) == spec
    assert ModuleSpec.from_dict({"lowrank_rank": 4}).to_dict() == {"lowrank_rank": 4}
    assert spec.params(48, 16) == 3 * 4 * (16 + 16)
    assert spec.describe(48, 16) == "3 blocks of U 16x4 · V 4x16"
    assert ModuleSpec(lowrank_rank=2).describe(8, 6) == "U 8x2 · V 2x6"
    with pytest.raises(PlanError, match="exactly one of shape .* got shape, lowrank_rank"):
        ModuleSpec(shape=(2, 2, 2, 2), lowrank_rank=2)
    with pytest.raises(PlanError, match="takes lowrank_rank .* not rank=2"):
        ModuleSpec(lowrank_rank=2, rank=2)
    with pytest.raises(PlanError, match="lowrank_rank must be a positive integer"):
        ModuleSpec(lowrank_rank=-1)


def test_lowrank_preset_errors_and_lookup(tiny_config):
    from transformers import T5Config

    with pytest.raises(PlanError, match="preset 'lowrank:1': give a compression factor > 1 after 'lowrank:'"):
        preset_plan("lowrank:1", tiny_config("gpt2"))
    with pytest.raises(PlanError, match="give a compression factor > 1"):
        preset_plan("lowrank:x", tiny_config("gpt2"))
    with pytest.raises(PlanError, match="this model's model_type is 't5'"):
        preset_plan("lowrank:2", T5Config())
    assert get_plan("lowrank:2.5", tiny_config("llama")).name == "lowrank:2.5"


def test_lowrank_plan_serialisation_round_trips(tiny_gpt2, tmp_path):
    plan = CompressionPlan([{"select": "c_attn", "lowrank_ratio": 2.5, "blocks": 3},
                            {"select": "mlp.c_fc", "layers": "odd", "lowrank_rank": 3}])
    assert plan.to_dict()["rules"] == [{"select": "c_attn", "lowrank_ratio": 2.5, "blocks": 3},
                                       {"select": "mlp.c_fc", "layers": "odd", "lowrank_rank": 3}]
    for path in (tmp_path / "p.yaml", tmp_path / "p.json"):
        plan.save(path)
        assert CompressionPlan.load(path) == plan
    resolved = plan.resolve(tiny_gpt2)
    assert resolved["transformer.h.1.mlp.c_fc"] == ModuleSpec(lowrank_rank=3)
    assert resolved["transformer.h.0.mlp.c_fc"] == KEEP
    assert CompressionPlan.from_resolved(resolved).resolve(tiny_gpt2) == resolved


# ----------------------------------------------------------------------------------------------- compress/save/load


@pytest.mark.parametrize("kind", ["gpt2", "bert", "llama"])
def test_exact_low_rank_weights_reproduce_the_model(kind, make_tiny_model, tiny_inputs):
    model = make_tiny_model(kind)
    plan = preset_plan("lowrank:2", model.config)
    specs = plan.resolve(model)
    _set_exact_lowrank(model, specs)
    inputs = tiny_inputs(kind)
    ref = _logits(model, inputs)
    report = compress(model, plan)
    assert all(isinstance(model.get_submodule(r.name), LOWRANK) for r in report.modules) and report.modules
    assert max(r.init_error for r in report.modules) < 1e-5
    assert torch.allclose(_logits(model, inputs), ref, atol=1e-4)
    assert report.params_after_excluding_output_embedding < report.params_before_excluding_output_embedding
    assert "U 16x4 · V 4x16" in report.summary()


@pytest.mark.parametrize("kind", ["gpt2", "bert", "llama"])
def test_lowrank_save_load_merge(kind, make_tiny_model, tiny_inputs, tmp_path):
    model = make_tiny_model(kind)
    plan = preset_plan("lowrank:2", model.config)
    report = compress(model, plan)
    with torch.no_grad():  # off the SVD values, so a load that re-initialised would show
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    inputs = tiny_inputs(kind)
    ref = _logits(model, inputs)
    out = save_compressed(model, plan, tmp_path / "ckpt", report=report)
    info = read_info(out)
    assert all("lowrank_rank" in spec for spec in info["modules"].values())
    loaded = load_compressed(out, device="cpu")
    assert torch.equal(_logits(loaded, inputs), ref)
    assert [type(m) for m in loaded.modules()] == [type(m) for m in model.modules()]
    assert count_params(loaded) == count_params(model) == report.params_after
    assert loaded.kron_plan == plan
    assert torch.equal(_logits(load_model(out, device="cpu"), inputs), ref)  # kron.models.load_model routes here
    # merge: a plain transformers model that reloads without kronsearch
    dense = merge(loaded)
    assert not any(is_factored(m) for m in dense.modules())
    assert count_params(dense) > count_params(model)
    dense.save_pretrained(str(tmp_path / "dense"))
    again = AUTO[kind].from_pretrained(str(tmp_path / "dense"), attn_implementation="eager")
    assert torch.allclose(_logits(again, inputs), ref, atol=1e-4)


def test_lowrank_init_none_dtype_and_requires_grad(make_tiny_model):
    model = make_tiny_model("gpt2", dtype=torch.bfloat16)
    model.transformer.h[0].mlp.c_fc.requires_grad_(False)
    report = compress(model, "lowrank:2", init="none")
    layer = model.transformer.h[0].mlp.c_fc
    assert isinstance(layer, LowRankLinear) and layer.U.dtype == torch.bfloat16
    assert not layer.U.requires_grad and model.transformer.h[1].mlp.c_fc.U.requires_grad
    assert report.init == "none" and all(r.init_error is None for r in report.modules)
    assert isinstance(model.transformer.h[0].attn.c_attn, FusedLowRankLinear)


def test_describe_lowrank(make_tiny_model):
    model = make_tiny_model("gpt2")
    plan = preset_plan("lowrank:2", model.config)
    assert describe_lowrank(plan, compress(model, plan, inplace=False).to_dict()) == "lowrank 2x on attention+FFN"
    plan = CompressionPlan([{"select": "c_fc", "lowrank_rank": 3}, {"select": "attn.c_proj", "lowrank_rank": 2}])
    assert describe_lowrank(plan, compress(model, plan).to_dict()) == "lowrank: 8 matrices, rank 2-3"
    assert describe_lowrank(CompressionPlan(), {"modules": []}) == "lowrank: no matrix factored"


# ----------------------------------------------------------------------------------------------- layer dropping

LAYERS = {"gpt2": lambda m: m.transformer.h, "bert": lambda m: m.bert.encoder.layer,
          "llama": lambda m: m.model.layers}


@pytest.mark.parametrize("kind, n_layer, keep, kept", [
    ("gpt2", 4, "odd", [1, 3]),
    ("gpt2", 4, "even", [0, 2]),
    ("gpt2", 4, [0, 3], [0, 3]),
    ("bert", 2, "odd", [1]),
    ("bert", 3, [0, 2], [0, 2]),
    ("llama", 2, "even", [0]),
    ("llama", 4, [1, 2, 3], [1, 2, 3]),
])
def test_drop_layers(kind, n_layer, keep, kept, make_tiny_model, tiny_inputs, tmp_path):
    key = "n_layer" if kind == "gpt2" else "num_hidden_layers"
    teacher = make_tiny_model(kind, **{key: n_layer})
    student, layer_map = drop_layers(teacher, keep, inplace=False)
    assert layer_map == kept
    assert len(LAYERS[kind](teacher)) == teacher.config.num_hidden_layers == n_layer  # teacher untouched
    assert len(LAYERS[kind](student)) == student.config.num_hidden_layers == len(kept)
    if kind == "gpt2":
        assert student.config.n_layer == len(kept)
    for i, j in enumerate(kept):  # the kept layers are the teacher's, in order
        s_params = dict(LAYERS[kind](student)[i].named_parameters())
        for name, p in LAYERS[kind](teacher)[j].named_parameters():
            assert torch.equal(s_params[name], p), name
    idx = [m.layer_idx for m in student.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    assert sorted(set(idx)) == list(range(len(kept)))
    inputs = tiny_inputs(kind)
    ref = _logits(student, inputs)
    assert torch.isfinite(ref).all()
    student.save_pretrained(str(tmp_path / "s"))
    again = AUTO[kind].from_pretrained(str(tmp_path / "s"), attn_implementation="eager")
    assert again.config.num_hidden_layers == len(kept)
    assert torch.equal(_logits(again, inputs), ref)
    assert count_params(again) == count_params(student)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_drop_layers_kv_cache_generation(kind, make_tiny_model, tiny_inputs):
    key = "n_layer" if kind == "gpt2" else "num_hidden_layers"
    student, _ = drop_layers(make_tiny_model(kind, **{key: 4}), [1, 3])
    ids = tiny_inputs(kind)["input_ids"][:1]
    cached = student.generate(ids, max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
    plain = student.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, plain)


def test_keeping_a_prefix_reproduces_the_teachers_hidden_states(make_tiny_model, tiny_inputs):
    teacher = make_tiny_model("gpt2")
    student, _ = drop_layers(teacher, [0, 1], inplace=False)
    inputs = tiny_inputs("gpt2")
    with torch.no_grad():
        t = teacher(**inputs, output_hidden_states=True).hidden_states
        s = student(**inputs, output_hidden_states=True).hidden_states
    assert len(s) == 3 and torch.equal(s[1], t[1])  # the output of layer 0 (the last entry has ln_f applied)
    keep_all, _ = drop_layers(teacher, [0, 1, 2, 3], inplace=False)
    assert torch.equal(_logits(keep_all, inputs), _logits(teacher, inputs))


def test_gpt2_inverse_layer_idx_scaling_follows_the_new_position(make_tiny_model, tiny_inputs, tmp_path):
    student, _ = drop_layers(make_tiny_model("gpt2", scale_attn_by_inverse_layer_idx=True), [2, 3])
    inputs = tiny_inputs("gpt2")
    ref = _logits(student, inputs)
    student.save_pretrained(str(tmp_path / "s"))
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "s"), attn_implementation="eager")
    assert torch.equal(_logits(again, inputs), ref)


def test_per_layer_config_lists_are_subset(tmp_path):
    import transformers

    from kron.models import build_from_config

    cfg = transformers.Qwen2Config(vocab_size=96, hidden_size=16, intermediate_size=24, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   use_sliding_window=True, sliding_window=4, max_window_layers=2,
                                   architectures=["Qwen2ForCausalLM"])
    teacher = build_from_config(cfg, seed=0, device="cpu")
    assert teacher.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    student, _ = drop_layers(teacher, [1, 2], inplace=False)
    assert student.config.layer_types == ["full_attention", "sliding_attention"]
    ids = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(0))
    ref = student(input_ids=ids).logits.detach()
    student.save_pretrained(str(tmp_path / "s"))
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "s"), attn_implementation="eager")
    assert again.config.layer_types == student.config.layer_types
    assert torch.equal(again(input_ids=ids).logits.detach(), ref)


@pytest.mark.parametrize("keep, message", [
    ([], "keep is empty: a model needs at least one layer (the teacher has layers 0-3)"),
    ([1, 4], "keep [1, 4]: layers [4] do not exist; the model has layers 0-3"),
    ([-1], "layers [-1] do not exist"),
    ([2, 1], "list layer indices in increasing order, each once"),
    ([1, 1], "each once"),
    ("first", "keep must be 'odd', 'even' or a list of layer indices, got 'first'"),
    ([True], "keep must be 'odd', 'even' or a list of layer indices"),
    (2, "keep must be 'odd', 'even' or a list of layer indices, got 2"),
])
def test_drop_layers_errors(keep, message, tiny_gpt2):
    with pytest.raises(PlanError) as err:
        drop_layers(tiny_gpt2, keep)
    assert message in str(err.value)
    assert len(tiny_gpt2.transformer.h) == 4 and tiny_gpt2.config.n_layer == 4  # unchanged


def test_drop_layers_unsupported_models(make_tiny_model):
    from transformers import T5Config

    with pytest.raises(PlanError, match="keep 'odd' selects no layer of a 1-layer model"):
        drop_layers(make_tiny_model("gpt2", n_layer=1), "odd")
    with pytest.raises(PlanError, match="layer dropping supports GPT-2, BERT/RoBERTa and Llama-family models"):
        drop_layers(_Wrapped(T5Config()), "odd")
    with pytest.raises(PlanError, match="without a transformers config"):
        drop_layers(nn.Linear(2, 2), "odd")


@pytest.mark.parametrize("keep, n, kept", [("odd", 5, [1, 3]), ("even", 5, [0, 2, 4]), ("even", 1, [0]),
                                           ((0, 4), 5, [0, 4])])
def test_parse_keep(keep, n, kept):
    assert parse_keep(keep, n) == kept


class _Wrapped(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config


def test_size_report_has_the_compression_report_keys(make_tiny_model):
    teacher = make_tiny_model("gpt2")
    student, _ = drop_layers(teacher, "odd", inplace=False)
    report = size_report(teacher, student)
    reference = compress(make_tiny_model("gpt2"), "uniform:2").to_dict()
    assert set(report) == set(reference)
    assert report["modules"] == [] and report["init"] == "teacher"
    assert report["params_before"] == count_params(teacher) and report["params_after"] == count_params(student)
    per_layer = sum(p.numel() for p in teacher.transformer.h[0].parameters())
    assert report["params_before"] - report["params_after"] == 2 * per_layer
    assert report["compression_ratio"] == pytest.approx(
        report["params_before_excluding_output_embedding"] / report["params_after_excluding_output_embedding"])
    assert report["macs_per_token_after"] < report["macs_per_token_before"]
    json.dumps(report)


def test_save_layerdrop_round_trip_and_overwrite_rules(make_tiny_model, tiny_inputs, tmp_path):
    teacher = make_tiny_model("llama", num_hidden_layers=3)
    student, layer_map = drop_layers(teacher, [0, 2], inplace=False)
    report = size_report(teacher, student)
    inputs = tiny_inputs("llama")
    ref = _logits(student, inputs)
    out = save_layerdrop(student, tmp_path / "ckpt", layer_map=layer_map, report=report)
    names = sorted(p.name for p in out.iterdir())
    assert "config.json" in names and "model.safetensors" in names and LAYERDROP_INFO in names
    assert "kronsearch.json" not in names
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary directory left behind
    info = read_layerdrop_info(out)
    assert info["layer_map"] == [0, 2] and info["report"]["params_after"] == report["params_after"]
    loaded = load_model(out, device="cpu", attn_implementation="eager")
    assert type(loaded) is type(student) and loaded.config.num_hidden_layers == 2
    assert count_params(loaded) == report["params_after"]
    assert torch.equal(_logits(loaded, inputs), ref)
    save_layerdrop(student, out, layer_map=layer_map)  # an earlier one is replaced
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    with pytest.raises(CheckpointError, match="is not empty and is not a layer-dropped checkpoint"):
        save_layerdrop(student, tmp_path / "other", layer_map=layer_map)
    with pytest.raises(CheckpointError, match="was not written by save_layerdrop"):
        read_layerdrop_info(tmp_path / "other")
