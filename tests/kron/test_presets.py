"""Presets: the papers' configurations reproduced to the parameter, uniform compression, and clear mismatches.

Full-size models are built on the meta device (structure only), so these tests stay fast.
"""
import pytest

from kron.errors import PlanError
from kron.factor import kron_macs
from kron.models import build_from_config, load_config
from kron.plan import KEEP, ModuleSpec
from kron.presets import PRESETS, get_plan, preset_plan
from kron.surgery import compress, count_params, macs_per_token

GPT2_PARAMS = 124_439_808
BERT_BASE_PARAMS = 109_482_240  # BertModel, pooler included


@pytest.fixture(scope="module")
def gpt2_config():
    return load_config("config:gpt2")


@pytest.fixture(scope="module")
def bert_config():
    return load_config("config:bert-base-uncased")


def _meta(config, task="auto"):
    return build_from_config(config, task=task, device="meta")


def test_gpt2_small_parameter_count(gpt2_config):
    model = _meta(gpt2_config)
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert count_params(model) == GPT2_PARAMS
    assert count_params(model, exclude_output_embedding=True) == GPT2_PARAMS  # the head is tied to wte
    # 12 layers of 768·2304 + 768·768 + 2·768·3072 multiply-adds, plus the 768 x 50257 head
    assert macs_per_token(model) == 12 * (768 * 2304 + 768 * 768 + 2 * 768 * 3072) + 768 * 50257 == 123_532_032


def test_kngpt2_on_gpt2_small_exact_counts(gpt2_config):
    plan = preset_plan("kngpt2", gpt2_config)
    model = _meta(gpt2_config)
    report = compress(model, plan, init="none")
    odd = [f"transformer.h.{i}" for i in range(1, 12, 2)]
    assert [r.name for r in report.modules] == ["transformer.wte"] + [
        f"{layer}.{m}" for layer in odd for m in ("attn.c_attn", "mlp.c_fc", "mlp.c_proj")]
    specs = {r.name: r.spec for r in report.modules}
    assert specs["transformer.wte"] == {"embedding_factor": 2}
    assert specs["transformer.h.1.attn.c_attn"] == {"shape": [384, 768, 2, 1], "rank": 1, "blocks": 3}
    assert specs["transformer.h.1.mlp.c_fc"] == {"shape": [1536, 768, 2, 1], "rank": 1}
    assert specs["transformer.h.1.mlp.c_proj"] == {"shape": [768, 1536, 1, 2], "rank": 1}
    # savings: wte 50257·768 -> 50257·384 + 2; per odd layer Q, K, V 768² -> 384·768 + 2 each, c_fc and c_proj
    # 3072·768 -> 1536·768 + 2 each
    saved = (50257 * 384 - 2) + 6 * (3 * (384 * 768 - 2) + 2 * (1536 * 768 - 2))
    assert report.params_before_excluding_output_embedding == GPT2_PARAMS
    assert report.params_after_excluding_output_embedding == GPT2_PARAMS - saved == 85_676_990
    assert report.params_after == 85_676_990 + 50257 * 768 == 124_274_366  # + the dense, untied LM head
    assert report.untied_output_embedding
    assert report.compression_ratio == pytest.approx(GPT2_PARAMS / 85_676_990)
    qkv = kron_macs(384, 768, 2, 1)[0]  # 384·1·(768 + 2) = 295,680 per block
    ffn = kron_macs(1536, 768, 2, 1)[0]  # 1536·1·(768 + 2) = 1,182,720
    assert (qkv, ffn, kron_macs(768, 1536, 1, 2)[0]) == (295_680, 1_182_720, 1_182_720)
    assert report.macs_per_token_after == 123_532_032 - 6 * (768 * 2304 - 3 * qkv + 2 * (768 * 3072 - ffn))
    assert report.macs_per_token_after == 104_118_528


def test_kngpt2_with_attention_output_projection(gpt2_config):
    """The docstring's second figure: also compressing attn.c_proj in the odd layers."""
    plan = preset_plan("kngpt2", gpt2_config).add("attn.c_proj", layers="odd", shape=[384, 768, 2, 1])
    report = compress(_meta(gpt2_config), plan, init="none")
    assert report.params_after_excluding_output_embedding == 85_676_990 - 6 * (768 * 768 - (384 * 768 + 2))
    assert report.params_after_excluding_output_embedding == 83_907_530


def test_kngpt2_on_a_small_gpt2_scales_with_width(tiny_gpt2):
    plan = preset_plan("kngpt2", tiny_gpt2.config)  # d = 16, FFN 64, 4 layers
    resolved = plan.resolve(tiny_gpt2)
    assert resolved["transformer.h.1.attn.c_attn"] == ModuleSpec((8, 16, 2, 1), blocks=3)
    assert resolved["transformer.h.3.mlp.c_proj"] == ModuleSpec((16, 32, 1, 2))
    assert resolved["transformer.h.2.mlp.c_fc"] == KEEP and resolved["transformer.h.1.attn.c_proj"] == KEEP


@pytest.mark.parametrize("name, params, attention, ffn_in, ffn_out, f, ffn_rank", [
    ("kroneckerbert8", 14_654_216, [384, 384, 2, 2], [8, 2, 384, 384], [2, 8, 384, 384], 8, 1),
    ("kroneckerbert21", 5_228_272, [384, 48, 2, 16], [16, 2, 192, 384], [2, 16, 384, 192], 16, 1),
    ("kroneckerbert5", 24_295_500, [384, 384, 2, 2], [384, 384, 8, 2], [384, 384, 2, 8], 12, 4),
])
def test_kroneckerbert_presets_on_bert_base(bert_config, name, params, attention, ffn_in, ffn_out, f, ffn_rank):
    model = _meta(bert_config)
    assert count_params(model) == BERT_BASE_PARAMS
    report = compress(model, preset_plan(name, bert_config), init="none")
    specs = {r.name: r.spec for r in report.modules}
    assert len(specs) == 1 + 12 * 6
    assert specs["embeddings.word_embeddings"] == {"embedding_factor": f}
    for layer in (0, 11):
        p = f"encoder.layer.{layer}."
        for m in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            assert specs[p + m] == {"shape": attention, "rank": 1}
        assert specs[p + "intermediate.dense"] == {"shape": ffn_in, "rank": ffn_rank}
        assert specs[p + "output.dense"] == {"shape": ffn_out, "rank": ffn_rank}
    assert "pooler.dense" not in specs
    # hand count: per layer 4 attention matrices + 2 FFN matrices (factors) + biases and LayerNorms, embeddings
    m1, n1, m2, n2 = attention
    a1, b1, a2, b2 = ffn_in
    per_layer = 4 * (m1 * n1 + m2 * n2 + 768) + 2 * ffn_rank * (a1 * b1 + a2 * b2) + 3072 + 768 + 2 * 2 * 768
    embeddings = 30522 * 768 // f + f + 512 * 768 + 2 * 768 + 2 * 768
    assert report.params_after == params == embeddings + 12 * per_layer + 768 * 768 + 768


def test_kroneckerbert5_puts_rank_4_on_the_ffn_only(bert_config):
    """Rank 4 goes to the FFN: on the attention it would give no compression at all."""
    plan = preset_plan("kroneckerbert5", bert_config)
    attn = next(r for r in plan.rules if r.select[0] == "attention.self.query")
    assert attn.rank == 1 and 768 * 768 / (384 * 384 + 4) == pytest.approx(4.0, rel=1e-3)


@pytest.mark.parametrize("kind", ["gpt2", "bert", "llama"])
@pytest.mark.parametrize("factor", [2, 4])
def test_uniform_factor_on_every_attention_and_ffn_matrix(kind, factor, make_tiny_model):
    model = make_tiny_model(kind)
    report = compress(model, f"uniform:{factor}", init="none")
    per_layer = {"gpt2": 4, "bert": 6, "llama": 7}[kind]
    n_layers = {"gpt2": 4, "bert": 2, "llama": 2}[kind]
    assert len(report.modules) == per_layer * n_layers
    for r in report.modules:
        m, n = r.dense_shape
        blocks = r.spec.get("blocks", 1)
        assert blocks == (3 if r.name.endswith("c_attn") else 1)
        dense = m * n
        kron = r.params_after - (r.params_before - dense)  # minus the bias
        # each matrix lands within a factor 2 of the target on these small sizes
        assert factor / 2 <= dense / kron <= factor * 2, r
    assert all(r.kind != "embedding" for r in report.modules)


def test_uniform_on_llama_gqa_shapes(tiny_llama):
    plan = preset_plan("uniform:2", tiny_llama.config)
    resolved = plan.resolve(tiny_llama)
    k = resolved["model.layers.0.self_attn.k_proj"].shape
    q = resolved["model.layers.0.self_attn.q_proj"].shape
    assert k[0] * k[2] == 8 and q[0] * q[2] == 16


def test_uniform_on_gpt2_small_pins_shapes(gpt2_config):
    resolved = preset_plan("uniform:4", gpt2_config).resolve(_meta(gpt2_config))
    assert resolved["transformer.h.0.attn.c_attn"] == ModuleSpec((192, 768, 4, 1), blocks=3)
    assert resolved["transformer.h.0.attn.c_proj"] == ModuleSpec((192, 768, 4, 1))
    assert resolved["transformer.h.0.mlp.c_fc"] == ModuleSpec((3072, 192, 1, 4))  # 590,592 MACs < 592,896
    assert resolved["transformer.wte"] == KEEP and resolved["lm_head"] == KEEP


# ------------------------------------------------------------------------------------------- mismatches


def test_kroneckerbert_on_a_384_wide_bert(tiny_config):
    config = tiny_config("bert", hidden_size=384, intermediate_size=1536, num_attention_heads=6)
    with pytest.raises(PlanError) as err:
        preset_plan("kroneckerbert8", config)
    assert str(err.value) == (
        "preset 'kroneckerbert8' does not fit this model: attention Q, K, V, O weights are 384 x 384 (out x in), so "
        "the preset's A 384x384 leaves B 1x1: a 1x1 factor, no compression; the KroneckerBERT shapes are for "
        "BERT-base (hidden 768, intermediate 3072); use uniform:<factor> for other sizes")
    with pytest.raises(PlanError, match=r"FFN intermediate.dense weights are 1000 x 384 .* does not divide them"):
        preset_plan("kroneckerbert21", tiny_config("bert", hidden_size=384, intermediate_size=1000,
                                                     num_attention_heads=6))


def test_kngpt2_on_bert(bert_config):
    with pytest.raises(PlanError) as err:
        preset_plan("kngpt2", bert_config)
    assert str(err.value) == ("preset 'kngpt2' is for GPT-2 (model_type 'gpt2') models, but this model's model_type is "
                              "'bert'; presets for this model: kroneckerbert8, kroneckerbert21, kroneckerbert5, "
                              "uniform:<factor>")


def test_kroneckerbert_on_gpt2_and_llama(gpt2_config, tiny_config):
    with pytest.raises(PlanError, match="preset 'kroneckerbert8' is for BERT .* model_type is 'gpt2'; presets for "
                                        "this model: kngpt2, uniform:<factor>"):
        preset_plan("kroneckerbert8", gpt2_config)
    with pytest.raises(PlanError, match="model_type is 'llama'; presets for this model: uniform:<factor>"):
        preset_plan("kroneckerbert21", tiny_config("llama"))


def test_kngpt2_misfits(tiny_config):
    with pytest.raises(PlanError, match=r"has 1 layer\(s\), so no odd-indexed layer"):
        preset_plan("kngpt2", tiny_config("gpt2", n_layer=1))
    with pytest.raises(PlanError, match=r"mlp.c_fc \(63 x 16\) needs an even FFN size"):
        preset_plan("kngpt2", tiny_config("gpt2", n_inner=63))


@pytest.mark.parametrize("name, message", [
    ("uniform:abc", "preset 'uniform:abc': give a compression factor >= 1 after 'uniform:', e.g. uniform:4"),
    ("uniform:0.5", "give a compression factor >= 1"),
    ("uniform", "give a compression factor >= 1"),
    ("kngpt3", "unknown preset 'kngpt3'; presets: kngpt2, kroneckerbert8, kroneckerbert21, kroneckerbert5, "
               "uniform:<factor>"),
])
def test_bad_preset_names(name, message, gpt2_config):
    with pytest.raises(PlanError) as err:
        preset_plan(name, gpt2_config)
    assert message in str(err.value)


def test_uniform_on_an_unknown_architecture():
    from transformers import T5Config

    with pytest.raises(PlanError, match="presets know model types gpt2, bert, roberta, xlm-roberta, electra, camembert, "
                                        "llama, mistral, qwen2, qwen3, gemma, gemma2, olmo, olmo2; "
                                        "this model's model_type is 't5'"):
        preset_plan("uniform:4", T5Config())


@pytest.mark.parametrize("family", ["electra", "gemma"])
def test_presets_cover_every_searchable_family(family):
    """The families the search space knows (kron.vocab) have presets too: ELECTRA as BERT, Gemma as Llama."""
    import transformers

    if family == "electra":
        config = transformers.ElectraConfig(vocab_size=64, embedding_size=32, hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=2, intermediate_size=64)
        model = transformers.ElectraForSequenceClassification(config)
        expected = {"query", "key", "value", "dense"}
    else:
        config = transformers.GemmaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=1, head_dim=16)
        model = transformers.GemmaForCausalLM(config)
        expected = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    for preset in ("uniform:2", "lowrank:2"):
        resolved = preset_plan(preset, config).resolve(model)
        compressed = {n.rsplit(".", 1)[-1] for n, s in resolved.items() if s != KEEP}
        assert expected <= compressed, (preset, compressed)


def test_presets_listing_and_round_trip(gpt2_config, bert_config, tiny_config):
    assert set(PRESETS) == {"kngpt2", "kroneckerbert8", "kroneckerbert21", "kroneckerbert5", "uniform:<factor>",
                            "lowrank:<factor>", "prune:<factor>"}
    assert all(isinstance(v, str) and "\n" not in v for v in PRESETS.values())
    for name, config in [("kngpt2", gpt2_config), ("kroneckerbert21", bert_config), ("uniform:3.5", gpt2_config),
                         ("uniform:2", tiny_config("llama"))]:
        plan = preset_plan(name, config)
        assert plan.name == name
        from kron.plan import CompressionPlan

        assert CompressionPlan.from_yaml(plan.to_yaml()) == plan


def test_get_plan_accepts_a_model_for_presets(tiny_gpt2):
    assert get_plan("kngpt2", tiny_gpt2.config) == preset_plan("kngpt2", tiny_gpt2)
    with pytest.raises(PlanError, match="preset 'kngpt2' needs the model's config"):
        get_plan("kngpt2")
