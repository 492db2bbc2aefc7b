"""The search space's int8 choice (`space.quantize: [none, int8]`) and the bytes objective/budget: analytic bytes
agree with the built model's, and a bytes budget is met."""
from __future__ import annotations

import random

import pytest

from kron.errors import ConfigError
from kron.plan import CompressionPlan
from kron.surgery import compress, count_bytes
from search.space import SearchSpace


def _models():
    import transformers

    from kron.models import build_from_config

    def config():  # a fresh one each time: compressing the tied embedding unties the config it was built from
        return transformers.GPT2Config(vocab_size=96, n_positions=32, n_embd=16, n_layer=2, n_head=2,
                                       architectures=["GPT2LMHeadModel"])

    return build_from_config(config(), device="meta"), lambda: build_from_config(config(), device="cpu", seed=0)


SPACE = {"groups": ["embedding", "attention", "ffn_in", "ffn_out"], "methods": ["kronecker", "lowrank"],
         "quantize": ["none", "int8"], "allow_keep": True}


def test_int8_options_and_analytic_bytes_match_the_built_model():
    meta, real = _models()
    space = SearchSpace.from_model(meta, SPACE)
    opts = next(c for c in space.choices if c.key == "L0.attention").options
    assert "int8" in opts and any(o.endswith("+int8") for o in opts) and any("+" not in o for o in opts if o != "keep")
    emb = next(c for c in space.choices if c.group == "embedding").options
    assert not any("int8" in o for o in emb)  # embeddings have no int8
    seen = 0
    for i in range(40):
        params = space.sample(i)
        resolved = space.resolved(params)
        if not any("quantize" in s for s in resolved.values()):
            continue
        seen += 1
        model = real()
        before = count_bytes(model)
        assert before == space.info.bytes == 4 * space.info.params
        compress(model, CompressionPlan.from_dict(space.to_plan_dict(params)))
        assert space.plan_costs(params)["bytes"] == count_bytes(model), params
        if seen == 3:
            break
    assert seen == 3


def test_dense_int8_of_a_fused_projection_is_the_plain_int8_spec():
    meta, _ = _models()
    space = SearchSpace.from_model(meta, {**SPACE, "groups": ["attention"], "methods": ["kronecker"]})
    params = {k: "int8" for k in space.param_names() if k.endswith("attention")}
    resolved = space.resolved(params)
    assert resolved["transformer.h.0.attn.c_attn"] == {"quantize": "int8"}
    # 48 x 16 in int8 plus 48 float32 scales, against 48 x 16 float32
    assert space.plan_costs(params)["bytes"] == space.info.bytes - 2 * (48 * 16 * 4 - (48 * 16 + 48 * 4))


def test_bytes_budget_is_met_and_an_impossible_one_named():
    meta, _ = _models()
    loose = SearchSpace.from_model(meta, SPACE)
    limit = sorted(loose.plan_costs(loose.sample(i))["bytes"] for i in range(100))[10]
    space = SearchSpace.from_model(meta, {**SPACE, "budget": {"max_bytes": limit}})
    rng = random.Random(0)
    for _ in range(10):
        assert space.plan_costs(space.sample_within_budget(rng, tries=5))["bytes"] <= limit
    with pytest.raises(ConfigError, match="max_bytes"):
        SearchSpace.from_model(meta, {**SPACE, "budget": {"max_bytes": 1000}})
    with pytest.raises(ConfigError, match="quantize"):
        SearchSpace.from_model(meta, {**SPACE, "quantize": ["int3"]})
