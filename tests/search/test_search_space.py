"""The search space: sizes, sampling constraints (property tests), analytic costs against kron's compress report,
the budget, and the module grouping per architecture."""
from __future__ import annotations

import functools
import itertools
import math
import random
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kron.errors import ConfigError
from kron.factor import validate_shape
from kron.plan import CompressionPlan, ModuleSpec
from kron.surgery import compress
from search.config import SpaceConfig
from kron.vocab import FAMILIES
from search.space import KEEP, SearchSpace, parse_option

ALL_GROUPS = ["embedding", "attention", "attention_output", "ffn_in", "ffn_out"]


def _config(kind: str):
    import transformers

    if kind == "gpt2":
        return transformers.GPT2Config(vocab_size=96, n_positions=32, n_embd=16, n_layer=3, n_head=2,
                                       architectures=["GPT2LMHeadModel"])
    if kind == "bert":
        return transformers.BertConfig(vocab_size=90, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=32, max_position_embeddings=32, num_labels=3,
                                       architectures=["BertForSequenceClassification"])
    if kind == "llama":  # grouped-query attention: k/v projections are 8 x 16, q is 16 x 16
        return transformers.LlamaConfig(vocab_size=96, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                        tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    if kind == "llama-tied":
        return transformers.LlamaConfig(vocab_size=96, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                        tie_word_embeddings=True, architectures=["LlamaForCausalLM"])
    raise ValueError(kind)


@functools.cache
def meta_model(kind: str):
    from kron.models import build_from_config

    return build_from_config(_config(kind), device="meta")


def real_model(kind: str):
    from kron.models import build_from_config

    return build_from_config(_config(kind), device="cpu", seed=0)


# ----------------------------------------------------------------------------------------------- size


def _all_params(space: SearchSpace):
    """Every parameter dict of a (small) space: layer switches x every option of every choice."""
    layer_keys: list[list[dict]] = [[{}]]
    if space.layer_mode == "free":
        layer_keys = [[{f"L{i}.on": v} for v in (True, False)] for i in space.fixed_layers]
    elif space.layer_mode == "count":
        subsets = itertools.combinations(space.fixed_layers, space.count)
        layer_keys = [[{f"L{i}.priority": 1.0 if i in s else 0.0 for i in space.fixed_layers} for s in subsets]]
    option_lists = [[(c.key, o) for o in c.options] for c in space.choices]
    for layer_parts in itertools.product(*layer_keys):
        base = {k: v for part in layer_parts for k, v in part.items()}
        for combo in itertools.product(*option_lists):
            yield {**base, **dict(combo)}


@pytest.mark.parametrize("layers", ["all", "free", {"count": 2}, "odd", [0, 2]])
@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("keep", [False, True])
def test_size_counts_distinct_nonempty_plans(layers, tie, keep):
    space = SearchSpace.from_model(meta_model("gpt2"), {
        "groups": ["embedding", "attention", "ffn_in"], "layers": layers, "tie_layers": tie, "allow_keep": keep,
        "max_shapes": 2, "embedding_factors": [2, 4]})
    plans = set()
    for params in _all_params(space):
        resolved = space.resolved(params)
        if resolved:
            plans.add(tuple(sorted((k, tuple(sorted((kk, str(vv)) for kk, vv in v.items())))
                                   for k, v in resolved.items())))
    assert space.size() == len(plans)
    assert space.size_log10() == pytest.approx(math.log10(len(plans)))


def test_size_of_a_large_space_is_exact_and_fast():
    from kron.models import build_from_config, load_config

    gpt2 = build_from_config(load_config("config:gpt2"), device="meta")
    space = SearchSpace.from_model(gpt2, {"groups": ALL_GROUPS, "layers": "free", "ranks": [1, 2]})
    n = space.size()
    assert isinstance(n, int) and n > 10 ** 100
    assert space.size_log10() == pytest.approx(math.log10(n))
    assert "size: 10^" in space.summary()


# ----------------------------------------------------------------------------------------------- sampling


def _check_plan(space: SearchSpace, cfg: SpaceConfig, params: dict, kind: str) -> None:
    model = meta_model(kind)
    modules = dict(model.named_modules())
    resolved = space.resolved(params)
    assert resolved, "sample() never returns the empty plan"
    on = space.active_layers(params)
    family = space.info.family
    for name, spec in resolved.items():
        group = FAMILIES[family].group_of(name, cfg.groups)
        layer = next((int(p) for p in name.split(".") if p.isdigit()), None)
        module = modules[name]
        if group == "embedding":
            f = spec["embedding_factor"]
            assert f in cfg.embedding_factors and module.embedding_dim % f == 0
            continue
        assert layer in on
        if isinstance(cfg.layers, list):
            assert layer in cfg.layers
        elif cfg.layers == "odd":
            assert layer % 2 == 1
        elif cfg.layers == "even":
            assert layer % 2 == 0
        if "lowrank_rank" in spec:  # the default space also offers low-rank U·V per matrix
            assert "lowrank" in cfg.methods
            out, inp = (module.nf, module.weight.shape[0]) if type(module).__name__ == "Conv1D" else \
                (module.out_features, module.in_features)
            blocks, r = spec.get("blocks", 1), spec["lowrank_rank"]
            assert blocks == (3 if name.endswith("attn.c_attn") else 1)
            compression = (out // blocks) * inp / (r * (out // blocks + inp))
            if cfg.shapes is None:
                assert cfg.min_compression - 1e-9 <= compression <= (cfg.max_compression or math.inf) + 1e-9
            continue
        m1, n1, m2, n2 = spec["shape"]
        rank, blocks = spec["rank"], spec.get("blocks", 1)
        assert rank in cfg.ranks
        out, inp = (module.nf, module.weight.shape[0]) if type(module).__name__ == "Conv1D" else \
            (module.out_features, module.in_features)
        assert blocks == (3 if name.endswith("attn.c_attn") else 1)
        validate_shape(out // blocks, inp, (m1, n1, m2, n2), rank)
        assert min(m1 * n1, m2 * n2) > 1, "no 1x1 factor"
        if cfg.shapes is None:
            compression = (out // blocks) * inp / (rank * (m1 * n1 + m2 * n2))
            assert compression >= cfg.min_compression - 1e-9
            if cfg.max_compression is not None:
                assert compression <= cfg.max_compression + 1e-9
            if cfg.max_aspect is not None:
                assert max(m1, n1) / min(m1, n1) <= cfg.max_aspect and max(m2, n2) / min(m2, n2) <= cfg.max_aspect
    if space.layer_mode == "count":
        decomposed = {int(next(p for p in n.split(".") if p.isdigit())) for n in resolved
                      if any(p.isdigit() for p in n.split("."))}
        assert len(on) == cfg.layers.count and decomposed <= on
        if not cfg.allow_keep:
            assert decomposed == on
    if cfg.tie_layers:  # one option per group (and shape) across layers
        seen: dict[tuple, str] = {}
        for name, spec in resolved.items():
            key = (re.sub(r"\.\d+\.", ".*.", name), )
            assert seen.setdefault(key, repr(spec)) == repr(spec)
    # the rules are a valid kron plan that resolves to exactly these specs
    plan = CompressionPlan.from_dict({"rules": space.to_plan_rules(params)})
    got = {n: s for n, s in plan.resolve(model).items() if s != KEEP}
    assert {n: s.to_dict() for n, s in got.items()} == {n: ModuleSpec.from_dict(s).to_dict()
                                                        for n, s in resolved.items()}


space_settings = st.fixed_dictionaries({
    "kind": st.sampled_from(["gpt2", "bert", "llama"]),
    "groups": st.lists(st.sampled_from(ALL_GROUPS), min_size=1, max_size=5, unique=True),
    "tie_layers": st.booleans(),
    "layers": st.one_of(st.sampled_from(["all", "free", "odd", "even"]), st.just([1]),
                        st.integers(0, 2).map(lambda k: {"count": k})),
    "ranks": st.lists(st.integers(1, 3), min_size=1, max_size=3, unique=True),
    "min_compression": st.sampled_from([1.0, 1.5, 2.0, 4.0]),
    "max_compression": st.sampled_from([None, 4.0, 16.0]),
    "max_aspect": st.sampled_from([None, 2.0, 8.0]),
    "max_shapes": st.sampled_from([None, 1, 3]),
    "allow_keep": st.booleans(),
    "embedding_factors": st.sampled_from([[2], [2, 4, 8], [3, 4]]),
    "seed": st.integers(0, 10 ** 6),
})


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(space_settings)
def test_samples_respect_every_constraint(s):
    kind, seed = s.pop("kind"), s.pop("seed")
    if s["max_compression"] is not None and s["max_compression"] < s["min_compression"]:
        s["max_compression"] = None
    cfg = SpaceConfig.model_validate(s)
    try:
        space = SearchSpace(cfg, __import__("search.space", fromlist=["x"]).inspect_model(meta_model(kind), cfg))
    except ConfigError as exc:  # a space with no valid choice must say why, naming the setting
        assert re.search(r"space[.:]", str(exc)), str(exc)
        return
    rng = random.Random(seed)
    for _ in range(5):
        params = space.sample(rng)
        assert set(params) <= set(space.param_names())
        _check_plan(space, cfg, params, kind)
        assert space.plan_cost(params) == (space.plan_costs(params)["params"],
                                           space.plan_costs(params)["macs_per_token"])


@settings(max_examples=25, deadline=None)
@given(space_settings)
def test_define_by_run_and_sample_agree(s):
    """Optuna's define-by-run suggests exactly the parameters `sample` draws, from the same choice lists."""
    import optuna

    kind, seed = s.pop("kind"), s.pop("seed")
    s["max_compression"] = None
    try:
        space = SearchSpace.from_model(meta_model(kind), s)
    except ConfigError:
        return
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    for _ in range(3):
        trial = study.ask()
        params = space.define_by_run(trial)
        assert params == trial.params
        assert set(params) <= set(space.param_names())
        on = space.active_layers(params)
        for c in space.choices:  # a choice is suggested exactly when its layer is decomposed
            expected = c.layer is None and not any(m.layer is not None for m in c.matrices) or (
                c.layer in on if c.layer is not None else any(m.layer in on for m in c.matrices))
            assert (c.key in params) == expected
        study.tell(trial, 0.0)


# ----------------------------------------------------------------------------------------------- costs


@pytest.mark.parametrize("kind", ["gpt2", "bert", "llama", "llama-tied"])
@pytest.mark.parametrize("tie", [False, True])
def test_plan_cost_equals_compress_report(kind, tie):
    """Analytic costs == kron.surgery's report on a real model (SVD init), for every architecture, with tied and
    untied embeddings (a compressed tied input embedding leaves the LM head a dense copy)."""
    model = real_model(kind)
    space = SearchSpace.from_model(model, {"groups": ALL_GROUPS, "layers": "free", "tie_layers": tie,
                                           "ranks": [1, 2], "allow_keep": True})
    rng = random.Random(7)
    for i in range(6):
        params = space.sample(rng)
        report = compress(model, {"rules": space.to_plan_rules(params)}, inplace=False,
                          init="svd" if i == 0 else "none")
        costs = space.plan_costs(params)
        assert (costs["params"], costs["params_excl_output_embedding"], costs["macs_per_token"]) == (
            report.params_after, report.params_after_excluding_output_embedding, report.macs_per_token_after)
        assert costs["compression_ratio"] == pytest.approx(report.compression_ratio)
        assert space.plan_cost(params) == (report.params_after, report.macs_per_token_after)


def test_teacher_counts_match_the_real_model():
    from kron.surgery import count_params, macs_per_token

    for kind in ("gpt2", "bert", "llama"):
        info = SearchSpace.from_model(meta_model(kind), {}).info
        model = real_model(kind)
        assert (info.params, info.macs) == (count_params(model), macs_per_token(model))


# ----------------------------------------------------------------------------------------------- budget


def test_budget_sampling_and_repair_stay_within_budget():
    base = {"groups": ["embedding", "attention", "ffn_in", "ffn_out"], "layers": "free", "ranks": [1, 2]}
    loose = SearchSpace.from_model(meta_model("gpt2"), base)
    costs = sorted(loose.plan_costs(loose.sample(i))["params"] for i in range(200))
    limit = costs[20]  # only ~10% of random plans fit
    space = SearchSpace.from_model(meta_model("gpt2"), {**base, "budget": {"max_params": limit}})
    rng = random.Random(0)
    for _ in range(30):
        p = space.sample_within_budget(rng, tries=5)  # few tries: the greedy repair does most of the work
        assert space.within_budget(p) and space.plan_costs(p)["params"] <= limit
        assert not space.is_empty(p)
    over = next(p for p in (loose.sample(i) for i in range(200)) if loose.plan_costs(p)["params"] > limit)
    assert space.over_budget(over) and "params" in space.over_budget(over)[0]
    fixed = space.repair(over)
    assert space.within_budget(fixed)
    assert set(fixed) <= set(space.param_names())


@pytest.mark.parametrize("budget", [{"max_params": 1000}, {"max_macs": 100},
                                    {"max_params_excl_output_embedding": 50}])
def test_impossible_budget_is_a_config_error(budget):
    with pytest.raises(ConfigError) as info:
        SearchSpace.from_model(meta_model("gpt2"), {"groups": ["attention", "ffn_in"], "budget": budget})
    msg = str(info.value)
    field = next(iter(budget))
    assert f"space.budget.{field}" in msg and "cannot be met" in msg and "cheapest plan" in msg
    assert f"{budget[field]:,}" in msg


def test_budget_minimum_uses_the_cheapest_choices():
    space = SearchSpace.from_model(meta_model("gpt2"), {"groups": ["attention", "ffn_in"], "layers": "free"})
    cheapest = space.plan_costs(space.cheapest("params"))["params"]
    assert all(space.plan_costs(space.sample(i))["params"] >= cheapest for i in range(100))
    ok = SearchSpace.from_model(meta_model("gpt2"), {"groups": ["attention", "ffn_in"], "layers": "free",
                                                     "budget": {"max_params": cheapest}})
    assert ok.plan_costs(ok.feasible_plan)["params"] == cheapest
    with pytest.raises(ConfigError, match=f"cheapest plan of this space has {cheapest:,}"):
        SearchSpace.from_model(meta_model("gpt2"), {"groups": ["attention", "ffn_in"], "layers": "free",
                                                    "budget": {"max_params": cheapest - 1}})


# ----------------------------------------------------------------------------------------------- grouping


def test_groups_map_to_modules_per_architecture():
    gpt2 = SearchSpace.from_model(meta_model("gpt2"), {"groups": ALL_GROUPS})
    names = {m.group: m.name for m in gpt2.info.matrices}
    assert names["embedding"] == "transformer.wte" and names["attention"].endswith("attn.c_attn")
    assert {m.blocks for m in gpt2.info.matrices if m.group == "attention"} == {3}
    bert = SearchSpace.from_model(meta_model("bert"), {"groups": ALL_GROUPS})
    by_group = {}
    for m in bert.info.matrices:
        by_group.setdefault(m.group, []).append(m.name)
    assert sorted(n.rsplit(".", 1)[1] for n in by_group["attention"] if ".0." in n) == ["key", "query", "value"]
    assert all("attention.output" not in n for n in by_group["ffn_out"])
    llama = SearchSpace.from_model(meta_model("llama"), {"groups": ALL_GROUPS})
    keys = [c.key for c in llama.choices]
    assert "L0.attention.8x16" in keys and "L0.attention.16x16" in keys  # GQA: k/v get their own choice
    assert "L0.ffn_in" in keys  # gate and up share one


def test_custom_module_groups_and_shape_lists():
    space = SearchSpace.from_model(meta_model("gpt2"), {
        "groups": [], "modules": {"mlp": ["re:.*\\.mlp\\.c_fc"]}, "shapes": {"mlp": ["8x8,8x2,r1", "keep"]},
        "tie_layers": True})
    assert [c.key for c in space.choices] == ["mlp"] and space.choices[0].options == ("8x8,8x2,r1", "keep")
    assert space.size() == 1


@pytest.mark.parametrize(("space_cfg", "fragment"), [
    ({"groups": [], "modules": {"mine": ["no_such_module"]}}, "space.modules.mine: no compressible module"),
    ({"groups": [], "modules": {"head": ["lm_head"]}}, "output embedding (LM head)"),
    ({"groups": ["attention"], "modules": {"again": ["attn.c_attn"]}}, "in two groups"),
    ({"groups": ["attention"], "layers": [5]}, "space.layers: layers [5] do not exist"),
    ({"groups": ["attention"], "layers": {"count": 9}}, "space.layers.count: 9 layers requested"),
    ({"groups": ["embedding"], "embedding_factors": [5, 7]}, "none of [5, 7] divides the embedding size 16"),
    ({"groups": ["ffn_in"], "shapes": {"ffn_in": ["3x3,3x3,r1"]}}, "space.shapes.ffn_in: none of"),
    ({"groups": ["ffn_in"], "shapes": {"ffn_in": ["3 by 3"]}}, "cannot parse choice '3 by 3'"),
    ({"groups": ["ffn_in"], "min_compression": 1000}, "group ffn_in has no valid factor shape"),
    ({"groups": ["ffn_in"], "layers": {"count": 0}}, "every plan of this space is empty"),
])
def test_space_errors_name_the_setting(space_cfg, fragment):
    with pytest.raises(ConfigError) as info:
        SearchSpace.from_model(meta_model("gpt2"), space_cfg)
    assert fragment in str(info.value)


def test_unknown_architecture_needs_explicit_modules():
    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(2))

    with pytest.raises(ConfigError, match="space.modules"):
        SearchSpace.from_model(Toy(), {"groups": ["attention"]})
    space = SearchSpace.from_model(Toy(), {"groups": [], "modules": {"lin": ["blocks.*"]}, "layers": "free"})
    assert space.layer_mode == "free" and space.fixed_layers == [0, 1]


def test_option_encoding_round_trip():
    assert parse_option("384x768,2x1,r1") == {"shape": [384, 768, 2, 1], "rank": 1}
    assert parse_option("4x4,4x4") == {"shape": [4, 4, 4, 4], "rank": 1}
    assert parse_option("f8") == {"embedding_factor": 8}
    assert parse_option("keep") == KEEP
    with pytest.raises(ValueError):
        parse_option("4x4")


def test_plan_rules_use_exact_names_and_group_identical_specs():
    space = SearchSpace.from_model(meta_model("gpt2"), {"groups": ["attention", "ffn_in"], "tie_layers": True,
                                                        "max_shapes": 1})
    params = space.sample(0)
    rules = space.to_plan_rules(params)
    assert len(rules) == 2
    att = next(r for r in rules if "attn" in str(r["select"]))
    assert att["select"] == [f"transformer.h.{i}.attn.c_attn" for i in range(3)] and att["blocks"] == 3
    plan = space.to_plan_dict(params, name="x")
    assert CompressionPlan.from_dict(plan).name == "x"


# ----------------------------------------------------------------------------------------------- mixed methods


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_mixed_methods_offer_both_structures_and_cost_what_compress_reports(kind):
    """space.methods [kronecker, lowrank]: each linear matrix chooses its structure as well as its size; the
    analytic costs still equal kron's compress report for every sampled plan, fused c_attn included."""
    cfg = SpaceConfig(groups=["attention", "attention_output", "ffn_in", "ffn_out"], methods=["kronecker", "lowrank"],
                      min_compression=1.5, max_shapes=3)
    space = SearchSpace.from_model(meta_model(kind), cfg)
    for c in space.choices:
        kinds = {ModuleSpec.from_dict(parse_option(o)).method for o in c.options if o != KEEP}
        assert kinds == {"kronecker", "lowrank"}, (c.key, c.options)
    rng = random.Random(0)
    seen = set()
    for _ in range(6):
        params = space.sample(rng)
        model = real_model(kind)
        plan = CompressionPlan.from_dict(space.to_plan_dict(params))
        specs = plan.resolve(model)
        seen |= {s.method for s in specs.values() if s != KEEP}
        report = compress(model, plan)
        costs = space.plan_costs(params)
        assert costs["params"] == report.params_after
        assert costs["macs_per_token"] == report.macs_per_token_after
    assert seen == {"kronecker", "lowrank"}


def test_space_methods_are_validated_before_anything_runs():
    with pytest.raises(Exception, match=r"unknown method\(s\) \['tucker'\]; valid: kronecker, lowrank"):
        SpaceConfig(methods=["kronecker", "tucker"])
    with pytest.raises(ConfigError, match="is a lowrank option but space.methods is \\['kronecker'\\]"):
        SearchSpace.from_model(meta_model("gpt2"), SpaceConfig(groups=["ffn_in"], methods=["kronecker"], shapes={"ffn_in": ["lr4"]}))
    space = SearchSpace.from_model(meta_model("gpt2"), SpaceConfig(groups=["ffn_in"], methods=["lowrank"],
                                                                   shapes={"ffn_in": ["lr4", "lr2", "keep"]}))
    assert space.choices[0].options == ("lr4", "lr2", "keep")


def test_a_mixed_plan_trains_as_method_mixed(tmp_path):
    """A searched plan that mixes methods is a 'mixed' trial: kronecker and lowrank trials stay single-method."""
    from trials.config import load_trial_config
    from trials.inputs import build_student

    teacher = real_model("gpt2")
    rules = [{"select": "mlp.c_fc", "shape": [8, 4, 8, 4]}, {"select": "mlp.c_proj", "lowrank_rank": 2}]
    cfg = load_trial_config({"teacher": "config:gpt2", "method": "mixed", "plan": {"rules": rules}})
    student, comp, _ = build_student(cfg, teacher)
    assert {m["kind"] for m in comp["modules"]} == {"linear", "lowrank"}
    from kron.errors import UserError

    assert build_student(load_trial_config({"teacher": "config:gpt2", "plan": {"rules": rules}}),
                         teacher)[1]["plan_method"] == "mixed"  # no method given: the plan says it is mixed
    with pytest.raises(UserError, match=r"method 'kronecker': the plan makes module .* U·V .*\(mixed\)"):
        build_student(load_trial_config({"teacher": "config:gpt2", "method": "kronecker", "plan": {"rules": rules}}),
                      teacher)


# ----------------------------------------------------------------------------------------------- seed plans


def _resolved(plan, model):
    return {n: s for n, s in CompressionPlan.from_dict(plan).resolve(model).items() if s != KEEP} if isinstance(
        plan, dict) else {n: s for n, s in plan.resolve(model).items() if s != KEEP}


@pytest.mark.parametrize("layers", ["free", "all"])
@pytest.mark.parametrize("preset, methods", [("kngpt2", ["kronecker"]), ("uniform:2", ["kronecker"]),
                                             ("lowrank:2", ["kronecker", "lowrank"])])
def test_seed_plans_are_exactly_the_hand_made_plans(preset, methods, layers):
    """A seed is written in the space's own parameters (its shapes added to the options where the space would not
    sample them), and the plan those parameters describe is the preset itself."""
    from kron.presets import preset_plan

    model = meta_model("gpt2")
    if preset == "kngpt2" and layers == "all":
        layers = {"count": 1}  # kngpt2 decomposes the odd layers only: here h.1 of 3
    cfg = SpaceConfig(groups=ALL_GROUPS, layers=layers, methods=methods, max_shapes=2, allow_keep=preset == "kngpt2")
    space = SearchSpace.from_model(model, cfg).with_seeds([preset], model)
    [(label, params)] = space.seeds
    assert label == f"seed:{preset}" and space.within_budget(params) and not space.is_empty(params)
    assert _resolved(space.to_plan_dict(params), real_model("gpt2")) == _resolved(
        preset_plan(preset, model.config), real_model("gpt2"))
    space._check(params)  # every value is one of its choice's options


def test_seed_plans_that_the_space_cannot_express_are_named():
    model = meta_model("gpt2")
    space = SearchSpace.from_model(model, SpaceConfig(groups=["attention", "ffn_in", "ffn_out"], layers="free",
                                                      methods=["kronecker"]))
    with pytest.raises(ConfigError, match=r"'kngpt2' compresses transformer.wte, which the space does not search"):
        space.with_seeds(["kngpt2"], model)
    with pytest.raises(ConfigError, match=r"'lowrank:2' makes .* lowrank, but space.methods is \['kronecker'\]"):
        space.with_seeds(["lowrank:2"], model)
    with pytest.raises(ConfigError, match="'auto' .* needs the teacher's calibration statistics"):
        space.with_seeds(["auto"], model)
    with pytest.raises(ConfigError, match="'kroneckerbert8' does not fit the teacher"):
        space.with_seeds(["kroneckerbert8"], model)
    groups = ["attention", "attention_output", "ffn_in", "ffn_out"]
    loose = SearchSpace.from_model(model, SpaceConfig(groups=groups, layers="free")).with_seeds(["uniform:2"], model)
    size = loose.plan_costs(loose.seeds[0][1])["params"]
    tight = SearchSpace.from_model(model, SpaceConfig(groups=groups, layers="free", budget={"max_params": size - 1}))
    with pytest.raises(ConfigError, match=r"'uniform:2' breaks the space's budget \(params [\d,]+ > max_params"):
        tight.with_seeds(["uniform:2"], model)


def test_ranks_auto_offers_every_rank_the_compression_range_allows():
    from kron.methods import parse_option as parse_spec

    cfg = {"groups": ["ffn_in"], "layers": "all", "methods": ["kronecker"], "min_compression": 2,
           "max_compression": 64, "max_shapes": None}
    one = SearchSpace.from_model(meta_model("gpt2"), {**cfg, "ranks": [1]})
    auto = SearchSpace.from_model(meta_model("gpt2"), {**cfg, "ranks": "auto"})
    rows, cols = auto.choices[0].dims
    specs = [parse_spec(o) for o in auto.choices[0].options]
    ranks = {s.rank for s in specs}
    assert 1 in ranks and max(ranks) > 1  # high-rank sums are reachable
    assert set(one.choices[0].options) <= set(auto.choices[0].options)
    for s in specs:
        assert 2 - 1e-9 <= rows * cols / s.params(rows, cols) <= 64 + 1e-9
    with pytest.raises(Exception, match="ranks"):
        SpaceConfig(ranks="all")
