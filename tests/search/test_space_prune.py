"""Structured pruning in the search space (`space.methods: [..., prune]`): per layer, one choice per attention / FFN
block ("L0.prune_heads": none | a fraction removed) drawn before the matrices' own choices, which a pruned block
overrides. Exact sizes, analytic costs equal to the built model's counts (GPT-2, BERT, Llama with grouped-query
attention), plan rules the plan machinery accepts, Optuna and random drawing, budgets, seeds and a mixed trial."""
from __future__ import annotations

import functools
import random

import pytest

from kron.errors import ConfigError
from kron.plan import CompressionPlan
from kron.surgery import compress, count_bytes, count_params, macs_per_token
from search.config import SpaceConfig
from search.prepare import prepared_space
from search.space import KEEP, NO_PRUNE, SearchSpace

BLOCK_GROUPS = ["attention", "attention_output", "ffn_in", "ffn_out"]
METHODS = ["kronecker", "lowrank", "prune"]


def _config(kind: str):
    import transformers

    if kind == "gpt2":  # 4 heads: fractions 0.25 / 0.5 / 0.75 are distinct
        return transformers.GPT2Config(vocab_size=96, n_positions=32, n_embd=16, n_layer=2, n_head=4,
                                       architectures=["GPT2LMHeadModel"])
    if kind == "bert":
        return transformers.BertConfig(vocab_size=90, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=32, max_position_embeddings=32, num_labels=3,
                                       architectures=["BertForSequenceClassification"])
    if kind == "llama":  # grouped-query attention: 4 query heads, 2 key/value groups (the pruned unit)
        return transformers.LlamaConfig(vocab_size=96, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                        tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    raise ValueError(kind)


@functools.cache
def meta_model(kind: str):
    from kron.models import build_from_config

    return build_from_config(_config(kind), device="meta")


def real_model(kind: str):
    from kron.models import build_from_config

    return build_from_config(_config(kind), device="cpu", seed=0)


def _space(kind: str = "gpt2", **over) -> SearchSpace:
    return SearchSpace.from_model(meta_model(kind), {"groups": BLOCK_GROUPS, "methods": METHODS, "max_shapes": 2,
                                                     **over})


def _drawn(space: SearchSpace):
    """Every parameter dict the space's drawing code can produce (depth-first over its categorical decisions;
    `count` priorities drawn as 0 or 1, enough to reach every set of k layers)."""
    stack: list[list[int]] = [[]]
    while stack:
        prefix = stack.pop()
        sizes: list[int] = []

        def pick(opts):
            k = len(sizes)
            sizes.append(len(opts))
            return opts[prefix[k] if k < len(prefix) else 0]

        yield space._draw(lambda name, opts: pick(opts), lambda name, lo, hi: pick((0.0, 1.0)))
        full = prefix + [0] * (len(sizes) - len(prefix))
        for k in range(len(prefix), len(sizes)):
            stack.extend(full[:k] + [i] for i in range(1, sizes[k]))


def _plan_key(resolved: dict) -> tuple:
    return tuple(sorted((n, repr(sorted(s.items()))) for n, s in resolved.items()))


# ----------------------------------------------------------------------------------------------- the choices


def test_block_choices_cover_the_whole_block_and_name_their_fraction():
    space = _space("gpt2")
    keys = [b.key for b in space.blocks]
    assert keys == ["L0.prune_heads", "L0.prune_ffn", "L1.prune_heads", "L1.prune_ffn"]
    heads = space._blocks_by_key["L0.prune_heads"]
    assert heads.options == (NO_PRUNE, "0.25", "0.5", "0.75") and heads.members == ("L0.attention",
                                                                                   "L0.attention_output")
    assert heads.names[0] == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj"]
    # no matrix offers a prune option of its own: pruning is per block
    assert not any(o.startswith("pr:") for c in space.choices for o in c.options)
    # Llama with GQA: the unit is a key/value group (2 here), so only 0.5 is possible; 0.25 and 0.75 round to 1
    # group removed or to all of them
    llama = _space("llama")
    b = llama._blocks_by_key["L0.prune_heads"]
    assert b.options == (NO_PRUNE, "0.5")
    assert set(b.members) == {"L0.attention.8x16", "L0.attention.16x16", "L0.attention_output"}
    assert llama._blocks_by_key["L0.prune_ffn"].options == (NO_PRUNE, "0.25", "0.5", "0.75")
    assert "prune_heads" in llama.summary() and "0.25 | 0.5 | 0.75" in llama.summary()


def test_only_whole_blocks_are_offered():
    # FFN searched whole, attention without its output projection: FFN pruning only
    space = _space("gpt2", groups=["attention", "ffn_in", "ffn_out"])
    assert {b.part for b in space.blocks} == {"ffn"}
    with pytest.raises(ConfigError, match="searches no such block whole"):
        _space("gpt2", groups=["attention", "ffn_in"])
    with pytest.raises(ConfigError, match="with prune alone, every searched matrix must belong to a prunable block"):
        _space("gpt2", groups=["attention", "ffn_in", "ffn_out"], methods=["prune"])
    with pytest.raises(ConfigError, match="is a prune option; pruning is chosen per attention / FFN block"):
        _space("gpt2", shapes={"ffn_in": ["pr:ffn:out:32/64"]})
    with pytest.raises(Exception, match="prune_fractions must list fractions"):
        SpaceConfig(methods=METHODS, prune_fractions=[0.5, 1.0])


# ----------------------------------------------------------------------------------------------- size


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("layers", ["all", "free", {"count": 1}, [1]])
@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("keep", [False, True])
def test_size_counts_distinct_nonempty_plans_with_prune(kind, layers, tie, keep):
    space = _space(kind, layers=layers, tie_layers=tie, allow_keep=keep, max_shapes=1, methods=["kronecker", "prune"])
    plans = {_plan_key(r) for r in (space.resolved(p) for p in _drawn(space)) if r}
    assert space.size() == len(plans)


@pytest.mark.parametrize("layers", ["all", "free", {"count": 1}])
@pytest.mark.parametrize("tie", [False, True])
def test_size_with_prune_alone(layers, tie):
    space = _space("gpt2", layers=layers, tie_layers=tie, methods=["prune"])
    assert not space.choices  # the blocks' matrices take no other structure
    plans = {_plan_key(r) for r in (space.resolved(p) for p in _drawn(space)) if r}
    assert space.size() == len(plans) > 0


# ----------------------------------------------------------------------------------------------- costs


def _sampled_with_prune(space: SearchSpace, n: int, seed: int = 0):
    rng = random.Random(seed)
    out = []
    for _ in range(400):
        p = space.sample(rng)
        pruned = [b for b in space.blocks if p.get(b.key, NO_PRUNE) != NO_PRUNE]
        if pruned and len(pruned) < len([b for b in space.blocks if b.key in p]):  # some blocks pruned, not all
            out.append(p)
            if len(out) == n:
                return out
    raise AssertionError("too few plans mixing pruned and unpruned blocks")


@pytest.mark.parametrize("kind", ["gpt2", "bert", "llama"])
@pytest.mark.parametrize("tie", [False, True])
def test_plan_costs_equal_the_built_model(kind, tie):
    """params, params excluding the output embedding, MACs and bytes of plans mixing pruned blocks with Kronecker /
    low-rank matrices equal the counts of the model kron.surgery builds from the plan's rules (pruned biases, kept-unit
    id buffers and fused c_attn included)."""
    space = _space(kind, groups=["embedding", *BLOCK_GROUPS] if kind != "bert" else BLOCK_GROUPS, tie_layers=tie,
                   allow_keep=True)
    plans = _sampled_with_prune(space, 3) if not tie else [space.sample(i) for i in range(12)]
    if tie:
        plans = [p for p in plans if any(p.get(b.key, NO_PRUNE) != NO_PRUNE for b in space.blocks)][:3]
        assert plans
    for i, params in enumerate(plans):
        model = real_model(kind)
        plan = CompressionPlan.from_dict(space.to_plan_dict(params))
        resolved = {n: s.to_dict() for n, s in plan.resolve(model).items() if s != KEEP}
        assert resolved == space.resolved(params)  # the rules resolve to exactly the space's specs
        assert any("prune" in s for s in resolved.values())
        compress(model, plan, init="svd" if i == 0 else "none")
        costs = space.plan_costs(params)
        assert (costs["params"], costs["params_excl_output_embedding"], costs["macs_per_token"], costs["bytes"]) == (
            count_params(model), count_params(model, exclude_output_embedding=True), macs_per_token(model),
            count_bytes(model)), space.describe(params)


def test_prune_rules_are_one_per_fraction_and_part():
    space = _space("gpt2", methods=["prune"], layers="all")
    params = {"L0.prune_heads": "0.5", "L0.prune_ffn": "0.25", "L1.prune_heads": "0.5", "L1.prune_ffn": NO_PRUNE}
    rules = space.to_plan_rules(params)
    assert rules == [
        {"select": ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn", "transformer.h.0.attn.c_proj",
                    "transformer.h.1.attn.c_proj"], "prune": {"heads": 0.5}},
        {"select": ["transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"], "prune": {"ffn": 0.25}}]
    assert space.describe(params) == "L0.prune_heads 0.5 | L0.prune_ffn 0.25 | L1.prune_heads 0.5 | L1.prune_ffn none"


def test_pruned_blocks_offer_int8_like_the_matrices():
    """With int8 in space.quantize each fraction also comes in int8 ("0.5+int8": pruning + int8, one kron rule per
    fraction); costs equal the built model's; quantize: [int8] alone offers only int8 pruning; size stays exact."""
    from kron.methods.prune.layer import PrunedLinear
    from kron.methods.quant.layer import QuantizedLinear

    space = _space("gpt2", quantize=["none", "int8"], allow_keep=True)
    heads = space.blocks[0]
    assert heads.options == (NO_PRUNE, "0.25", "0.5", "0.75", "0.25+int8", "0.5+int8", "0.75+int8")
    assert all(o == NO_PRUNE or o.endswith("+int8") for b in _space("gpt2", quantize=["int8"]).blocks
               for o in b.options)
    assert all("int8" not in o for b in _space("gpt2").blocks for o in b.options)  # the default: float only
    params = {**space.cheapest("params"), "L0.prune_heads": "0.5+int8", "L0.prune_ffn": "0.25",
              "L1.prune_heads": "0.5", "L1.prune_ffn": "0.75+int8"}
    params = space._normalise(params)
    rules = space.to_plan_rules(params)
    assert {"select": ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj"], "prune": {"heads": 0.5},
            "quantize": "int8"} in rules
    assert {"select": ["transformer.h.1.attn.c_attn", "transformer.h.1.attn.c_proj"], "prune": {"heads": 0.5}} \
        in rules
    assert space.resolved(params)["transformer.h.0.attn.c_attn"] == {
        "prune": {"part": "heads", "side": "out", "units": 4, "kept": 2, "blocks": 3}, "quantize": "int8"}
    checked = [params] + [p for p in _sampled_with_prune(space, 40, seed=3)
                          if any(p.get(b.key, "").endswith("+int8") for b in space.blocks)][:2]
    assert len(checked) == 3
    for k, p in enumerate(checked):
        model = real_model("gpt2")
        compress(model, CompressionPlan.from_dict(space.to_plan_dict(p)))
        costs = space.plan_costs(p)
        assert (costs["params"], costs["macs_per_token"], costs["bytes"]) == (
            count_params(model), macs_per_token(model), count_bytes(model)), space.describe(p)
        if k == 0:
            int8, fp = model.transformer.h[0].attn.c_attn, model.transformer.h[1].attn.c_attn
            assert isinstance(int8, QuantizedLinear) and isinstance(int8.inner, PrunedLinear)
            assert isinstance(fp, PrunedLinear)
    # a float prune seed is its float fraction, never the int8 twin (added where the space has int8 only)
    for quantize in (["none", "int8"], ["int8"]):
        seeded = _space("gpt2", quantize=quantize, allow_keep=True).with_seeds(["prune:2"], meta_model("gpt2"))
        (_, seed), = seeded.seeds
        assert {seed[b.key] for b in seeded.blocks} == {"0.5"}
        assert "0.5" in seeded.blocks[0].options and "0.5+int8" in seeded.blocks[0].options
    small = _space("gpt2", quantize=["none", "int8"], max_shapes=1, methods=["kronecker", "prune"], layers=[1])
    plans = {_plan_key(r) for r in (small.resolved(p) for p in _drawn(small)) if r}
    assert small.size() == len(plans)


# ----------------------------------------------------------------------------------------------- drawing


@pytest.mark.parametrize("layers", ["all", "free", {"count": 1}])
@pytest.mark.parametrize("tie", [False, True])
def test_define_by_run_and_sample_agree(layers, tie):
    import optuna

    space = _space("llama", layers=layers, tie_layers=tie)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(12):
        trial = study.ask()
        params = space.define_by_run(trial)
        assert params == trial.params and set(params) <= set(space.param_names())
        on = space.active_layers(params)
        skip = space.pruned_members(params)
        for b in space.blocks:
            assert (b.key in params) == (b.layer in on if b.layer is not None else bool(on))
        for c in space.choices:  # a pruned block's matrices take no choice of their own
            live = c.layer in on if c.layer is not None else any(m.layer in on for m in c.matrices)
            assert (c.key in params) == (live and c.key not in skip)
        study.tell(trial, 0.0)
    for i in range(12):
        params = space.sample(i)
        assert set(params) <= set(space.param_names()) and not space.is_empty(params)


def test_tied_layers_prune_every_layer_alike():
    space = _space("gpt2", tie_layers=True, layers="free")
    assert [b.key for b in space.blocks] == ["prune_heads", "prune_ffn"]
    params = {"L0.on": True, "L1.on": False, "prune_heads": "0.75", "prune_ffn": NO_PRUNE}
    params.update({c.key: c.options[0] for c in space.choices if c.group.startswith("ffn")})
    resolved = space.resolved(params)
    assert resolved["transformer.h.0.attn.c_attn"]["prune"]["kept"] == 1
    assert not any(".h.1." in n for n in resolved)  # layer 1 switched off: not pruned either
    params["L1.on"] = True
    resolved = space.resolved(params)
    assert resolved["transformer.h.1.attn.c_proj"]["prune"] == {"part": "heads", "side": "in", "units": 4, "kept": 1}


# ----------------------------------------------------------------------------------------------- budget


def test_budget_sampling_repair_and_cheapest_use_pruning():
    loose = _space("gpt2", layers="free")
    costs = sorted(loose.plan_costs(loose.sample(i))["params"] for i in range(200))
    limit = costs[15]
    space = _space("gpt2", layers="free", budget={"max_params": limit})
    rng = random.Random(0)
    for _ in range(15):
        p = space.sample_within_budget(rng, tries=3)
        assert space.plan_costs(p)["params"] <= limit and not space.is_empty(p)
        space._check(p)
        assert not (space.pruned_members(p) & set(p))  # repaired plans are what drawing would produce
    over = next(p for p in (loose.sample(i) for i in range(200)) if loose.plan_costs(p)["params"] > limit)
    assert space.within_budget(space.repair(over))
    # the cheapest plan prunes where pruning is cheaper than the cheapest factorisation, and no sample is cheaper:
    # removing 0.75 of the FFN neurons is 4-fold, the factorisations here at most 2.5-fold
    for mild in (loose, _space("gpt2", layers="free", methods=["kronecker", "prune"],
                                   min_compression=1.5, max_compression=2.5)):
        cheapest = mild.cheapest("params")
        floor = mild.plan_costs(cheapest)["params"]
        assert all(mild.plan_costs(mild.sample(i))["params"] >= floor for i in range(200))
    assert cheapest["L0.prune_ffn"] == cheapest["L1.prune_ffn"] == "0.75"
    assert cheapest["L0.on"] and cheapest["L1.on"]


# ----------------------------------------------------------------------------------------------- seeds and prior


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("layers", ["all", "free"])
def test_prune_preset_is_a_seed(tie, layers):
    from kron.presets import preset_plan

    model = meta_model("gpt2")
    space = _space("gpt2", tie_layers=tie, layers=layers, prune_fractions=[0.25]).with_seeds(["prune:2", "prune:4"],
                                                                                              model)
    for (label, params), preset in zip(space.seeds, ["prune:2", "prune:4"]):
        assert label == f"seed:{preset}" and not space.is_empty(params)
        space._check(params)
        want = {n: s.to_dict() for n, s in preset_plan(preset, model.config).resolve(real_model("gpt2")).items()
                if s != KEEP}
        assert space.resolved(params) == want
    # prune:2 removes 0.5, a fraction prune_fractions lacked: added to the block choices
    assert "0.5" in space.blocks[0].options


def test_prune_seeds_need_prune_in_the_space():
    model = meta_model("gpt2")
    space = SearchSpace.from_model(model, {"groups": BLOCK_GROUPS, "methods": ["kronecker"], "max_shapes": 1})
    with pytest.raises(ConfigError, match=r"'prune:2' makes .* prune, but space.methods is \['kronecker'\]"):
        space.with_seeds(["prune:2"], model)
    partial = _space("gpt2", groups=["attention", "ffn_in", "ffn_out"])  # attention not searched whole
    with pytest.raises(ConfigError, match="compresses transformer.h.0.attn.c_proj, which the space does not search"):
        partial.with_seeds(["prune:2"], model)


def test_prior_and_auto_seeds_leave_blocks_unpruned():
    """The sensitivity prior and the automatic seeds know per-matrix damages only: block choices are never dropped,
    and auto seeds leave every block to its matrices."""
    from search.prior import _specs, auto_seeds, pruned_options
    from search.seeds import Seed, seed_options

    space = _space("gpt2", allow_keep=True)
    specs = _specs(space)
    assert not any(sp.method == "prune" for v in specs.values() for _, sp in v)
    damages = {n: {o: 0.1 * (k + 1) for k, (o, _) in enumerate(v)} for n, v in specs.items()}
    assert not set(pruned_options(space, damages, 0.15)) & {b.key for b in space.blocks}
    [(label, options, layers)] = auto_seeds(space, damages, 1, "params")
    params, missing = seed_options(Seed(label, options, layers), space)
    assert all(params[b.key] == NO_PRUNE for b in space.blocks) and not missing


# ----------------------------------------------------------------------------------------------- a trial


def test_a_searched_plan_mixing_prune_and_kronecker_trains_as_mixed(tiny_teacher, tmp_path):
    from search.config import load_search_config
    from search.trainable import trial_setup
    from trials.trial import run_trial

    from .conftest import tiny_search_dict

    raw = tiny_search_dict(tiny_teacher, tmp_path / "runs", "prune")
    raw["space"] = {"groups": BLOCK_GROUPS, "methods": METHODS, "max_shapes": 2}
    raw["trial"]["init"] = "svd"
    cfg = load_search_config(raw)
    space = prepared_space(cfg)
    params = {"L0.prune_heads": "0.5", "L0.prune_ffn": "0.5", "L1.prune_heads": NO_PRUNE, "L1.prune_ffn": NO_PRUNE}
    for c in space.choices:
        if c.layer == 1:
            params[c.key] = next(o for o in c.options if "x" in o)  # a Kronecker shape
    space._check(params)
    methods = {("prune" if "prune" in s else "lowrank" if "lowrank_rank" in s else "kronecker")
               for s in space.resolved(params).values()}
    assert methods == {"prune", "kronecker"}
    setup = trial_setup(cfg, space)
    assert setup.base_trial["method"] == "mixed"
    trial_cfg = {**setup.base_trial, "name": "t0", "threads": 1, "plan": {"rules": space.to_plan_rules(params)}}
    summary = run_trial(trial_cfg, output_dir=tmp_path / "t0", progress=False)
    assert summary["status"] == "complete" and summary["method"] == "mixed"
    costs = space.plan_costs(params)
    assert (summary["params"], summary["macs_per_token"]) == (costs["params"], costs["macs_per_token"])
    assert summary["plan_resolved"]["transformer.h.0.attn.c_attn"]["prune"]["kept"] == 1
