"""Compression plans: selectors, layer filters, overrides, validation messages, YAML/JSON round trips."""
import json

import pytest
import yaml

from kron.errors import PlanError, UserError
from kron.plan import KEEP, CompressionPlan, ModuleSpec, Rule, layer_index, nearest_shape, selector_matches

NAME = "transformer.h.3.mlp.c_fc"


@pytest.mark.parametrize("selector, name, expected", [
    ("transformer.h.3.mlp.c_fc", NAME, True),  # exact
    ("mlp.c_fc", NAME, True),  # dotted suffix (peft)
    ("c_fc", NAME, True),
    ("fc", NAME, False),  # a suffix must start at a dot
    ("h.3.mlp", NAME, False),  # not a suffix
    ("mlp.c_fc", "transformer.h.3.mlp.c_fc2", False),
    ("*.c_fc", NAME, True),  # glob on the full name
    ("h.*.c_fc", NAME, True),  # glob on a dotted suffix; * crosses dots
    ("h.[02].mlp.c_fc", NAME, False),
    ("h.[13].mlp.c_fc", NAME, True),
    ("c_?c", NAME, True),
    ("re:.*\\.h\\.\\d+\\.mlp\\.c_fc", NAME, True),  # regex, full match
    ("re:mlp\\.c_fc", NAME, False),  # full match, not search
    ("re:.*c_(fc|proj)", NAME, True),
    ("re:.*c_(fc|proj)", "transformer.h.3.mlp.c_fc.extra", False),
])
def test_selector_matches(selector, name, expected):
    assert selector_matches(selector, name) is expected


@pytest.mark.parametrize("name, index", [
    ("transformer.h.3.mlp.c_fc", 3), ("model.layers.12.self_attn.q_proj", 12), ("bert.encoder.layer.0.output", 0),
    ("transformer.wte", None), ("lm_head", None), ("x.2.y.5", 2), ("h3.mlp", None),
])
def test_layer_index_is_first_all_digit_component(name, index):
    assert layer_index(name) == index


@pytest.mark.parametrize("layers, expected", [
    (None, None), ("odd", "odd"), ("EVEN", "even"), ("all", "all"), (3, (3,)), ("0-2", (0, 1, 2)),
    ("1,3", (1, 3)), ([5, "0-1", 1], (0, 1, 5)), ((2,), (2,)), (" 2 - 3 ", (2, 3)),
])
def test_layers_parse(layers, expected):
    assert Rule(select="c_fc", shape=[2, 2, 2, 2], layers=layers).layers == expected


@pytest.mark.parametrize("layers", ["3-1", -1, True, "first", [1.5], [], "1-"])
def test_layers_reject_bad_values_naming_them(layers):
    with pytest.raises(PlanError, match="layer"):
        Rule(select="c_fc", shape=[2, 2, 2, 2], layers=layers)


# ------------------------------------------------------------------------------------------- resolve


def _factored(resolved):
    return {n: s for n, s in resolved.items() if s != KEEP}


def test_resolve_odd_even_ranges_and_overrides(tiny_gpt2):
    plan = CompressionPlan([
        {"select": "mlp.c_fc", "layers": "odd", "shape": [8, 4, 8, 4]},
        {"select": "h.*.mlp.c_proj", "layers": "even", "shape": [4, 8, 4, 8], "rank": 2},
        {"select": "re:.*\\.attn\\.c_attn", "layers": "1-2", "shape": [4, 4, 4, 4], "blocks": 3},
        {"select": "transformer.h.3.mlp.c_fc", "keep": True},  # per-module override back to dense
        {"select": "transformer.h.1.mlp.c_fc", "shape": [4, 4, 16, 4]},  # and to another shape
    ])
    resolved = plan.resolve(tiny_gpt2)
    assert _factored(resolved) == {
        "transformer.h.0.mlp.c_proj": ModuleSpec((4, 8, 4, 8), rank=2),
        "transformer.h.1.attn.c_attn": ModuleSpec((4, 4, 4, 4), blocks=3),
        "transformer.h.1.mlp.c_fc": ModuleSpec((4, 4, 16, 4)),
        "transformer.h.2.attn.c_attn": ModuleSpec((4, 4, 4, 4), blocks=3),
        "transformer.h.2.mlp.c_proj": ModuleSpec((4, 8, 4, 8), rank=2),
    }
    # every supported module appears, in model order; the rest stays "keep"
    assert list(resolved)[:3] == ["transformer.wte", "transformer.wpe", "transformer.h.0.attn.c_attn"]
    assert resolved["transformer.h.3.mlp.c_fc"] == KEEP
    assert resolved["lm_head"] == KEEP
    assert "transformer.h.0.ln_1" not in resolved  # LayerNorm: not a candidate


def test_resolve_explicit_layer_list_and_all(tiny_llama):
    plan = CompressionPlan().add(["q_proj", "k_proj"], layers=[1], factor=2).add("down_proj", layers="all", factor=2)
    names = set(_factored(plan.resolve(tiny_llama)))
    assert names == {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj",
                     "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}


def test_layer_filter_never_matches_modules_outside_layers(tiny_gpt2):
    plan = CompressionPlan([{"select": "re:.*", "layers": "all", "keep": True}])
    assert all(v == KEEP for v in plan.resolve(tiny_gpt2).values())
    with pytest.raises(PlanError, match=r"rule 1: select 'wte' matched 1 modules but none in layers all"):
        CompressionPlan([{"select": "wte", "layers": "all", "embedding_factor": 2}]).resolve(tiny_gpt2)


def test_factor_rule_picks_nearest_shape_per_module(tiny_llama):
    # GQA: q_proj is 16 x 16 but k_proj only 8 x 16, so one factor gives different shapes
    resolved = CompressionPlan([{"select": ["q_proj", "k_proj"], "factor": 4}]).resolve(tiny_llama)
    q = resolved["model.layers.0.self_attn.q_proj"]
    k = resolved["model.layers.0.self_attn.k_proj"]
    assert q.shape == nearest_shape(16, 16, 4).shape
    assert k.shape == nearest_shape(8, 16, 4).shape
    assert q.shape[0] * q.shape[2] == 16 and k.shape[0] * k.shape[2] == 8


def test_factor_rule_with_blocks_factors_each_block(tiny_gpt2):
    resolved = CompressionPlan([{"select": "attn.c_attn", "factor": 2, "blocks": 3}]).resolve(tiny_gpt2)
    spec = resolved["transformer.h.0.attn.c_attn"]
    assert spec.blocks == 3 and spec.shape == nearest_shape(16, 16, 2).shape


# ------------------------------------------------------------------------------------------- nearest shape


@pytest.mark.parametrize("m, n, factor, rank, shape", [
    # 4x4 at 2x: (1,4,4,1), (2,2,2,2) and (4,1,1,4) all give 8 params; (2,2,2,2) costs 16 MACs, the others 8;
    # A and B are equal in size, so the lexicographic order decides
    (4, 4, 2, 1, (1, 4, 4, 1)),
    # 4x8 at 2x: 18 params (1.78x, |log| 0.118) beats 12 params (2.67x, 0.288); of the four 18-param splits
    # (1,2,4,4) and (4,4,1,2) cost 24 MACs, (2,1,2,8) and (2,8,2,1) 20; A larger than B picks (2,8,2,1)
    (4, 8, 2, 1, (2, 8, 2, 1)),
    # 4x4 far beyond the largest possible compression (2x): the most compressing split
    (4, 4, 100, 1, (1, 4, 4, 1)),
    # GPT-2 768x768 at 4x: (384,384,2,2), (192,768,4,1), (768,192,1,4) and their A/B swaps all have 147,460
    # params; (384,384,2,2) costs 296,448 MACs, the others 148,224; A larger leaves (192,768,4,1), (768,192,1,4)
    (768, 768, 4, 1, (192, 768, 4, 1)),
    # rank counts: 8x8 at 2x and rank 2 needs |A| = |B| = 8 (2·(8+8) = 32 params); (1,8,8,1) and (8,1,1,8) cost
    # 2·16 = 32 MACs, (2,4,4,2) and (4,2,2,4) 64; at rank 1 the nearest is 34 params (|A| = 32, |B| = 2)
    (8, 8, 2, 2, (1, 8, 8, 1)),
    (8, 8, 2, 1, (4, 8, 2, 1)),
])
def test_nearest_shape_table(m, n, factor, rank, shape):
    assert nearest_shape(m, n, factor, rank).shape == shape


@pytest.mark.parametrize("factor", [0.5, 0, -2, float("nan"), float("inf"), "4"])
def test_nearest_shape_rejects_bad_factor(factor):
    with pytest.raises(PlanError, match="factor must be"):
        nearest_shape(8, 8, factor)


# ------------------------------------------------------------------------------------------- error messages


def test_selector_matching_nothing_lists_patterns_and_example_names(tiny_gpt2):
    plan = CompressionPlan([{"select": ["mlp.c_fc", "mlp.c_fcc"], "shape": [8, 4, 8, 4]}])
    with pytest.raises(PlanError) as err:
        plan.resolve(tiny_gpt2)
    msg = str(err.value)
    assert msg.startswith("rule 1: selector 'mlp.c_fcc' matches no module of this model")
    assert "patterns of the rule: 'mlp.c_fc', 'mlp.c_fcc'" in msg
    assert "Module names look like: transformer.wte, transformer.wpe, transformer.h.0.attn.c_attn" in msg
    assert "(layers 0-3)" in msg


def test_non_dividing_shape_names_module_size_and_lists_valid_shapes(tiny_gpt2):
    plan = CompressionPlan([{"select": "h.0.mlp.c_fc", "shape": [5, 4, 13, 4]}])
    with pytest.raises(PlanError) as err:
        plan.resolve(tiny_gpt2)
    msg = str(err.value)
    assert msg.startswith("rule 1: module transformer.h.0.mlp.c_fc (Conv1D, weight 64 x 16 (out x in)) cannot take "
                          "shape [5, 4, 13, 4] at rank 1: shape A 5x4 ⊗ B 13x4 gives a 65x16 matrix, not 64x16")
    # the 10 valid shapes nearest to the requested 72 parameters, largest first
    assert "the 10 valid shapes [m1, n1, m2, n2] nearest in parameter count: " in msg
    assert "[8, 4, 8, 4] (64 params, 16.0x)" in msg
    assert "[4, 4, 16, 4] (80 params, 12.8x)" in msg
    assert msg.count("params,") == 10


def test_fused_blocks_shape_is_checked_per_block(tiny_gpt2):
    fits_whole = CompressionPlan([{"select": "h.0.attn.c_attn", "shape": [12, 4, 4, 4]}])
    assert fits_whole.resolve(tiny_gpt2)["transformer.h.0.attn.c_attn"].shape == (12, 4, 4, 4)
    per_block = CompressionPlan([{"select": "h.0.attn.c_attn", "shape": [12, 4, 4, 4], "blocks": 3}])
    with pytest.raises(PlanError) as err:
        per_block.resolve(tiny_gpt2)
    assert ("module transformer.h.0.attn.c_attn (Conv1D, weight 48 x 16 (out x in), 3 blocks of 16 x 16) cannot "
            "take shape [12, 4, 4, 4]") in str(err.value)
    assert "gives a 48x16 matrix, not 16x16" in str(err.value)
    bad_blocks = CompressionPlan([{"select": "h.0.attn.c_attn", "shape": [2, 2, 2, 2], "blocks": 5}])
    with pytest.raises(PlanError, match="cannot be split into 5 equal output blocks .48 is not a multiple of 5."):
        bad_blocks.resolve(tiny_gpt2)


def test_unsupported_type_names_type_and_supported_ones(tiny_gpt2):
    plan = CompressionPlan([{"select": "transformer.ln_f", "shape": [4, 4, 4, 4]}])
    with pytest.raises(PlanError) as err:
        plan.resolve(tiny_gpt2)
    assert str(err.value) == (
        "rule 1: module transformer.ln_f is a torch.nn.modules.normalization.LayerNorm, which cannot be compressed; "
        "supported types: torch.nn.Linear, transformers.pytorch_utils.Conv1D, torch.nn.Embedding")
    container = CompressionPlan([{"select": "h.0.attn", "factor": 2}])
    with pytest.raises(PlanError, match=r"GPT2Attention \(a container: select its linear layers instead"):
        container.resolve(tiny_gpt2)


def test_embedding_and_linear_specs_do_not_mix(tiny_gpt2):
    with pytest.raises(PlanError, match="module transformer.wte is an nn.Embedding .96 x 16.: use embedding_factor"):
        CompressionPlan([{"select": "wte", "factor": 2}]).resolve(tiny_gpt2)
    with pytest.raises(PlanError, match="embedding_factor applies to nn.Embedding only, but transformer.h.0.mlp.c_fc "
                                        "is a Conv1D"):
        CompressionPlan([{"select": "h.0.mlp.c_fc", "embedding_factor": 2}]).resolve(tiny_gpt2)
    with pytest.raises(PlanError, match=r"cannot take embedding_factor 3: .*valid: \[2, 4, 8, 16\]"):
        CompressionPlan([{"select": "wte", "embedding_factor": 3}]).resolve(tiny_gpt2)


def test_trivial_shape_is_refused(tiny_gpt2):
    with pytest.raises(PlanError, match="has a 1x1 factor, which only rescales the weight"):
        CompressionPlan([{"select": "h.0.attn.c_proj", "shape": [16, 16, 1, 1]}]).resolve(tiny_gpt2)


def test_layers_that_do_not_exist(tiny_gpt2):
    with pytest.raises(PlanError, match=r"rule 1: layers \[7, 9\] do not exist; the model has layers 0-3"):
        CompressionPlan([{"select": "c_fc", "layers": [1, 7, 9], "factor": 2}]).resolve(tiny_gpt2)


@pytest.mark.parametrize("rule, message", [
    ({"select": "c_fc", "shapes": [2, 2, 2, 2]},
     "rule 1: unknown key 'shapes' (did you mean 'shape'?); valid keys: select, layers, shape, factor, rank, blocks, "
     "embedding_factor, keep"),
    ({"shape": [2, 2, 2, 2]}, "rule 1: missing key 'select'"),
    ({"select": "c_fc"}, "rule 1: give exactly one of shape, factor, embedding_factor or keep: true (got none)"),
    ({"select": "c_fc", "shape": [2, 2, 2, 2], "factor": 2}, "give exactly one of shape, factor, embedding_factor or "
                                                             "keep: true (got shape, factor)"),
    ({"select": "c_fc", "shape": [2, 2, 2]}, "rule 1: shape must be four positive integers [m1, n1, m2, n2]"),
    ({"select": "c_fc", "shape": [2, 0, 2, 2]}, "shape must be four positive integers"),
    ({"select": "c_fc", "factor": 0.5}, "rule 1: factor must be a compression factor >= 1 (e.g. 4), got 0.5"),
    ({"select": "c_fc", "shape": [2, 2, 2, 2], "rank": 0}, "rule 1: rank must be a positive integer, got 0"),
    ({"select": "c_fc", "keep": True, "rank": 2}, "keep: true cannot be combined with rank"),
    ({"select": "c_fc", "keep": "yes"}, "keep must be true or false, got 'yes'"),
    ({"select": "", "factor": 2}, "select must be a non-empty module selector"),
    ({"select": "re:(", "factor": 2}, "select 're:(' is not a valid regular expression"),
    ({"select": "wte", "embedding_factor": 2, "rank": 2}, "embedding_factor cannot be combined with rank or blocks"),
])
def test_rule_validation_messages(rule, message):
    with pytest.raises(PlanError) as err:
        CompressionPlan([rule])
    assert message in str(err.value)


@pytest.mark.parametrize("plan, message", [
    ({"rules": [], "defaults": "keep"}, "plan: unknown key 'defaults' (did you mean 'default'?); valid keys: version, "
                                        "name, description, default, rules"),
    ({"default": "compress"}, "plan: default must be 'keep'"),
    ({"version": 2}, "plan: version 2 is not supported"),
    ({"rules": {"select": "x"}}, "plan: rules must be a list of rules, got dict"),
    ({"rules": ["c_fc"]}, "rule 1 must be a mapping with keys select"),
])
def test_plan_validation_messages(plan, message):
    with pytest.raises(PlanError) as err:
        CompressionPlan.from_dict(plan)
    assert message in str(err.value)


def test_plan_errors_are_user_errors():
    assert issubclass(PlanError, UserError)


# ------------------------------------------------------------------------------------------- round trips

FULL = {
    "version": 1,
    "name": "mixed",
    "description": "every feature once",
    "default": "keep",
    "rules": [
        {"select": "transformer.wte", "embedding_factor": 2},
        {"select": "re:.*\\.attn\\.c_attn", "layers": "odd", "shape": [8, 16, 2, 1], "rank": 2, "blocks": 3},
        {"select": ["mlp.c_fc", "h.*.mlp.c_proj"], "layers": [0, 2, 3], "factor": 2.5},
        {"select": "transformer.h.0.mlp.c_fc", "keep": True},
    ],
}


def test_dict_round_trip_is_exact():
    plan = CompressionPlan.from_dict(FULL)
    assert plan.to_dict() == FULL
    assert CompressionPlan.from_dict(plan.to_dict()) == plan


def test_yaml_and_json_round_trip(tmp_path, tiny_gpt2):
    plan = CompressionPlan.from_dict(FULL)
    text = plan.to_yaml()
    assert "shape: [8, 16, 2, 1]" in text  # flow-style lists read like the paper's shapes
    assert CompressionPlan.from_yaml(text) == plan
    assert CompressionPlan.from_json(plan.to_json()) == plan
    for name in ("plan.yaml", "plan.yml", "plan.json"):
        path = plan.save(tmp_path / name)
        assert CompressionPlan.load(path) == plan
    assert json.loads((tmp_path / "plan.json").read_text()) == FULL
    assert yaml.safe_load((tmp_path / "plan.yaml").read_text()) == FULL
    assert CompressionPlan.load(tmp_path / "plan.yaml").resolve(tiny_gpt2) == plan.resolve(tiny_gpt2)


def test_layer_ranges_normalise_once():
    plan = CompressionPlan([{"select": "c_fc", "layers": ["0-2", 5], "factor": 2}])
    assert plan.to_dict()["rules"][0]["layers"] == [0, 1, 2, 5]
    assert CompressionPlan.from_dict(plan.to_dict()) == plan


def test_yaml_is_parsed_safely(tmp_path):
    evil = "rules: !!python/object/apply:os.system ['echo pwned']\n"
    with pytest.raises(PlanError, match="not valid YAML/JSON"):
        CompressionPlan.from_yaml(evil)
    (tmp_path / "list.yaml").write_text("- select: c_fc\n")
    with pytest.raises(PlanError, match=r"list.yaml: a plan is a mapping with keys version, name, description"):
        CompressionPlan.load(tmp_path / "list.yaml")
    with pytest.raises(PlanError, match="plan file .*missing.yaml does not exist"):
        CompressionPlan.load(tmp_path / "missing.yaml")


def test_from_resolved_reproduces_exact_modules(tiny_gpt2):
    plan = CompressionPlan([{"select": "c_fc", "layers": "odd", "factor": 2}, {"select": "wte", "embedding_factor": 4}])
    resolved = plan.resolve(tiny_gpt2)
    again = CompressionPlan.from_resolved(resolved)
    assert again.resolve(tiny_gpt2) == resolved
    assert CompressionPlan.from_yaml(again.to_yaml()).resolve(tiny_gpt2) == resolved


def test_module_spec_validation_and_dict():
    assert ModuleSpec.from_dict({"shape": [2, 3, 4, 5], "rank": 2}).to_dict() == {"shape": [2, 3, 4, 5], "rank": 2}
    assert ModuleSpec(embedding_factor=4).kind == "embedding"
    assert ModuleSpec((2, 2, 2, 2), blocks=3).kind == "fused"
    assert ModuleSpec((2, 2, 2, 2), blocks=3).params(12, 4) == 3 * 8
    with pytest.raises(PlanError, match="exactly one of shape"):
        ModuleSpec()
    with pytest.raises(PlanError, match="an embedding spec takes neither rank nor blocks"):
        ModuleSpec(embedding_factor=2, rank=2)
    with pytest.raises(PlanError, match="module spec: unknown key 'order'"):
        ModuleSpec.from_dict({"shape": [2, 2, 2, 2], "order": "a_first"})


from hypothesis import given as _given, settings as _settings, strategies as _st  # noqa: E402

_SELECTS = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj", "h.*.mlp.c_fc", "transformer.wte"]


@_st.composite
def _rules(draw):
    rules = []
    for _ in range(draw(_st.integers(0, 4))):
        rule = {"select": draw(_st.sampled_from(_SELECTS))}
        if draw(_st.booleans()):
            rule["layers"] = draw(_st.sampled_from(["odd", "even", [0], [0, 1]]))
        kind = draw(_st.sampled_from(["shape", "factor", "keep", "lowrank_rank"]))
        if kind == "shape":
            rule["shape"] = [draw(_st.integers(1, 64)) for _ in range(4)]
            rule["rank"] = draw(_st.integers(1, 3))
        elif kind == "factor":
            rule["factor"] = draw(_st.sampled_from([2, 4, 8.5]))
        elif kind == "keep":
            rule["keep"] = True
        else:
            rule["lowrank_rank"] = draw(_st.integers(1, 16))
        rules.append(rule)
    return {"default": draw(_st.sampled_from(["keep"])), "rules": rules}


@_settings(max_examples=50, deadline=None)
@_given(raw=_rules())
def test_property_plan_yaml_round_trip(raw, tmp_path_factory):
    """to_yaml → from_yaml, and save → load, give back the same plan (same dict), for any well-formed plan."""
    from kron.plan import CompressionPlan

    plan = CompressionPlan.from_dict(raw)
    again = CompressionPlan.from_yaml(plan.to_yaml())
    assert again.to_dict() == plan.to_dict()
    path = plan.save(tmp_path_factory.mktemp("plan") / "p.yaml")
    assert CompressionPlan.load(path).to_dict() == plan.to_dict()
