"""4-bit weights in a search space and a profile, through the quantisation modifier's own options (nothing in the
search or the profile names int4): every structure and the dense matrix also in 4 bits, pruned blocks too; costs on
every size axis equal the built model's; the profile's int4 candidates feed a bytes budget."""
from __future__ import annotations

import copy

import pytest
import torch

from kron.plan import CompressionPlan
from kron.surgery import compress, count_bytes, count_params, macs_per_token
from search.space import SearchSpace
from search.space_config import SpaceConfig


def _models():
    import transformers

    from kron.models import build_from_config

    def config():
        return transformers.GPT2Config(vocab_size=96, n_positions=32, n_embd=16, n_layer=2, n_head=2,
                                       architectures=["GPT2LMHeadModel"])

    return build_from_config(config(), device="meta"), lambda: build_from_config(config(), device="cpu", seed=0)


def test_int4_is_spelled_like_int8_and_merges_with_it():
    a = SpaceConfig(methods=["kronecker", "int8", "int4"])
    b = SpaceConfig(methods={"kronecker": {}, "quant": {"bits": [8, 4]}})
    c = SpaceConfig(methods=["kronecker"], quantize=["none", "int8", "int4"])
    assert a.methods["quant"] == b.methods["quant"] == c.methods["quant"]
    assert a.method_options("quant").bits == [8, 4] and a.method_options("quant").keep_float
    assert not SpaceConfig(methods=["kronecker"], quantize=["int4"]).method_options("quant").keep_float
    with pytest.raises(Exception, match="quant.bits"):
        SpaceConfig(methods={"kronecker": {}, "quant": {"bits": [3]}})
    with pytest.raises(Exception, match="both given"):
        SpaceConfig(methods={"kronecker": {}, "quant": {}}, quantize=["none", "int8"])


def test_int4_options_and_their_costs_are_the_built_models():
    meta, real = _models()
    space = SearchSpace.from_model(meta, {"groups": ["attention", "attention_output", "ffn_in", "ffn_out"],
                                          "methods": {"kronecker": {}, "lowrank": {}, "prune": {"fractions": [0.5]},
                                                      "quant": {"bits": [8, 4], "group_size": 8}},
                                          "max_shapes": 2, "allow_keep": True})
    opts = next(c for c in space.choices if c.key == "L0.ffn_in").options
    assert "int4:g8" in opts and any(o.endswith("+int4:g8") for o in opts) and "int8" in opts
    assert any(o.endswith("+int4:g8") for b in space.blocks for o in b.options)  # pruning + int4
    seen = 0
    for i in range(60):
        params = space.sample(i)
        resolved = space.resolved(params)
        if not any(s.get("quantize") == "int4" for s in resolved.values()):
            continue
        seen += 1
        model = real()
        compress(model, CompressionPlan.from_dict(space.to_plan_dict(params)))
        costs = space.plan_costs(params)
        got = {"params": count_params(model), "macs_per_token": macs_per_token(model), "bytes": count_bytes(model),
               "params_excl_output_embedding": count_params(model, exclude_output_embedding=True)}
        assert {k: costs[k] for k in got} == got, params
        if seen == 4:
            break
    assert seen == 4


def test_a_profile_with_int4_plans_under_a_bytes_budget(tiny_gpt2, gpt2_calibration):
    """The profile's candidates include each structure and the dense matrix in int4 (damage: the structure's plus
    the dense matrix's 4-bit error); the knapsack under a bytes budget meets it on the built model."""
    from kron.autoplan import Constraints, auto_plan, parse_budget, resolved_specs
    from kron.profile import profile_model
    from kron.surgery import apply_specs

    model, stats = tiny_gpt2, gpt2_calibration
    prof = profile_model(model, stats, methods=["kronecker", "lowrank", "int4"], kl_subset=0,
                         constraints=Constraints(max_shapes=2, max_compression=8,
                                                 options={"quant": {"group_size": 8}}))
    assert prof["methods"] == ["kronecker", "lowrank", "quant"]
    assert prof["constraints"]["options"]["quant"]["bits"] == [4]
    entry = next(iter(prof["matrices"].values()))
    int4 = [c for c in entry["candidates"] if c["method"] == "int4"]
    assert int4 and any(c["spec"].get("lowrank_rank") for c in int4) and any(c["label"] == "dense int4 g8"
                                                                              for c in int4)
    for c in int4:
        if c.get("methods"):  # a structure in 4 bits: at least the structure's own damage
            plain = next(x for x in entry["candidates"] if x["label"] == c["label"].rsplit(" int4", 1)[0])
            assert c["damage"] >= plain["damage"] and c["bytes"] < plain["bytes"]
    from kron.autoplan import items_from_profile

    def smallest(methods):
        items, fixed = items_from_profile(prof, "bytes", methods=methods)
        return fixed + sum(min(o.cost for o in it.options) for it in items)

    lo4, lo = smallest(["kronecker", "lowrank", "quant"]), smallest(["kronecker", "lowrank"])
    assert lo4 < lo  # 4-bit weights reach sizes the float structures cannot
    budget = parse_budget(f"bytes={(lo4 + lo) // 2}")
    sol = auto_plan(prof, budget, damage="proxy")
    m = copy.deepcopy(model)
    plan = CompressionPlan.from_resolved(resolved_specs(sol))
    rep = apply_specs(m, plan.resolve(m), init="none")
    assert rep.bytes_after <= budget.value and rep.bytes_after == sol.cost
    assert any(o.spec != "keep" and o.spec.get("quantize") == "int4" for o in sol.choice.values())
    with pytest.raises(Exception, match="unreachable"):
        auto_plan(prof, budget, methods=["kronecker", "lowrank"], damage="proxy")


@pytest.fixture
def tiny_gpt2(make_tiny_model):
    return make_tiny_model("gpt2", n_layer=2)


@pytest.fixture
def gpt2_calibration(tiny_gpt2):
    from kron.calibration import collect_input_stats

    g = torch.Generator().manual_seed(0)
    return collect_input_stats(tiny_gpt2, [torch.randint(0, 96, (4, 16), generator=g) for _ in range(4)])
