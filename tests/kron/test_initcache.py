"""kron.initcache: layers initialised once per (scope, module, spec, init, ridge) and restored with the same values."""
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from kron.calibration import collect_input_stats
from kron.initcache import InitCache
from kron.methods import parse_option
from kron.surgery import apply_specs


def _model():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32,
                                       bos_token_id=0, eos_token_id=0)).eval()
    g = torch.Generator().manual_seed(1)
    stats = collect_input_stats(model, [torch.randint(0, 64, (4, 16), generator=g) for _ in range(2)])
    return model, stats


def _specs():
    from kron.methods.base import spec_from_dict

    return {"transformer.h.0.attn.c_attn": spec_from_dict({"method": "kronecker", "shape": [4, 2, 8, 16], "rank": 2,
                                                           "blocks": 3}),  # fused q/k/v
            "transformer.h.0.mlp.c_fc": parse_option("lr8"),
            "transformer.h.1.mlp.c_proj": parse_option("lr4+int8"),
            "transformer.h.1.attn.c_proj": spec_from_dict({"method": "kronecker", "shape": [4, 4, 8, 8], "rank": 1})}


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_a_hit_restores_exactly_what_the_init_built():
    model, stats = _model()
    specs = _specs()
    assert all(s is not None for s in specs.values())
    plain = apply_specs(model, specs, inplace=False, init="data", calib=stats)
    cache = InitCache()
    first = apply_specs(model, specs, inplace=False, init="data", calib=stats, init_cache=cache, cache_scope="t")
    assert (cache.hits, cache.misses, len(cache)) == (0, 4, 4)
    second = apply_specs(model, specs, inplace=False, init="data", calib=stats, init_cache=cache, cache_scope="t")
    assert (cache.hits, cache.misses) == (4, 4)
    want = _state(plain.model)
    for rep in (first, second):
        got = _state(rep.model)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        assert [(m.output_error, m.init_error, m.init) for m in rep.modules] == \
               [(m.output_error, m.init_error, m.init) for m in plain.modules]
    x = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        assert torch.equal(second.model(x).logits, plain.model(x).logits)
    # the restored layers are the model's own: training one changes neither the cache nor the next restore
    p = next(second.model.transformer.h[0].mlp.c_fc.parameters())
    with torch.no_grad():
        p.add_(1.0)
    third = apply_specs(model, specs, inplace=False, init="data", calib=stats, init_cache=cache, cache_scope="t")
    assert all(torch.equal(v, want[k]) for k, v in _state(third.model).items())


def test_scope_init_and_ridge_are_part_of_the_key_and_the_bound_holds():
    model, stats = _model()
    specs = _specs()
    cache = InitCache()
    apply_specs(model, specs, inplace=False, init="data", calib=stats, init_cache=cache, cache_scope="a")
    apply_specs(model, specs, inplace=False, init="data", calib=stats, init_cache=cache, cache_scope="b")
    apply_specs(model, specs, inplace=False, init="svd", init_cache=cache, cache_scope="a")
    apply_specs(model, specs, inplace=False, init="data", calib=stats, ridge=0.1, init_cache=cache, cache_scope="a")
    assert cache.hits == 0 and len(cache) == 16
    apply_specs(model, specs, inplace=False, init="data", calib=stats)  # no scope: the cache is not used
    apply_specs(model, specs, inplace=False, init="data", calib=stats, init_cache=cache, cache_scope=None)
    assert cache.hits == 0 and len(cache) == 16
    small = InitCache(max_mb=cache.nbytes / 4 / (1 << 20))
    apply_specs(model, specs, inplace=False, init="data", calib=stats, init_cache=small, cache_scope="a")
    apply_specs(model, specs, inplace=False, init="data", calib=stats, init_cache=small, cache_scope="b")
    assert 0 < small.nbytes <= small.max_bytes and len(small) < 8
    assert small.stats()["entries"] == len(small)
