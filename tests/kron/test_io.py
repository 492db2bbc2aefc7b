"""Saving, loading and merging compressed models; loading source models (kron.models)."""
import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
from transformers.pytorch_utils import Conv1D

from kron.errors import CheckpointError, ConfigError, DataError
from kron.io import load_compressed, merge, read_info, save_compressed
from kron.layers import FusedKroneckerLinear, KroneckerEmbedding, KroneckerLinear
from kron.models import load_config, load_model, load_tokenizer, parse_dtype, pick_device, task_of
from kron.plan import CompressionPlan
from kron.surgery import compress, count_params

PLANS = {
    "gpt2": {"rules": [{"select": "wte", "embedding_factor": 2},
                       {"select": "attn.c_attn", "layers": "odd", "factor": 2, "blocks": 3},
                       {"select": ["attn.c_proj", "mlp.c_fc", "mlp.c_proj"], "factor": 4, "rank": 2}]},
    "bert": {"rules": [{"select": "word_embeddings", "embedding_factor": 4},
                       {"select": ["query", "key", "value", "intermediate.dense"], "factor": 2}]},
    "llama": {"rules": [{"select": "embed_tokens", "embedding_factor": 2},
                        {"select": ["q_proj", "k_proj", "v_proj", "down_proj"], "factor": 2, "rank": 2}]},
}
KRON = (KroneckerLinear, FusedKroneckerLinear, KroneckerEmbedding)


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _compressed(kind, make_tiny_model):
    model = make_tiny_model(kind)
    plan = CompressionPlan.from_dict(PLANS[kind])
    report = compress(model, plan)
    with torch.no_grad():  # move the factors off their SVD values so a load that re-initialises would show
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model, plan, report


@pytest.mark.parametrize("kind", ["gpt2", "bert", "llama"])
def test_save_load_gives_identical_logits(kind, make_tiny_model, tiny_inputs, tmp_path):
    model, plan, report = _compressed(kind, make_tiny_model)
    inputs = tiny_inputs(kind)
    ref = _logits(model, inputs)
    out = save_compressed(model, plan, tmp_path / "ckpt", report=report)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "kronsearch.json", "model.safetensors",
                                                     "plan.yaml"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary directory left behind
    loaded = load_compressed(out, device="cpu")
    assert type(loaded) is type(model)
    assert not loaded.training
    assert torch.equal(_logits(loaded, inputs), ref)
    assert [type(m) for m in loaded.modules()] == [type(m) for m in model.modules()]
    assert count_params(loaded) == count_params(model)
    assert loaded.kron_plan == plan
    info = read_info(out)
    assert info["format_version"] == 1 and info["model_class"] == type(model).__name__
    assert info["report"]["params_after"] == report.params_after
    assert info["task"] == {"gpt2": "causal-lm", "bert": "sequence-classification", "llama": "causal-lm"}[kind]


def test_tied_gpt2_without_embedding_compression_round_trips(tiny_gpt2, tiny_inputs, tmp_path, make_tiny_model):
    compress(tiny_gpt2, {"rules": [{"select": "mlp.c_fc", "factor": 2}]})
    save_compressed(tiny_gpt2, None, tmp_path / "ckpt")
    loaded = load_compressed(tmp_path / "ckpt", device="cpu")
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # still tied, stored once
    assert torch.equal(_logits(loaded, tiny_inputs("gpt2")), _logits(tiny_gpt2, tiny_inputs("gpt2")))
    # plan=None stores the exact modules as a plan
    stored = CompressionPlan.load(tmp_path / "ckpt" / "plan.yaml").resolve(make_tiny_model("gpt2"))
    assert {n for n, s in stored.items() if s != "keep"} == {f"transformer.h.{i}.mlp.c_fc" for i in range(4)}


def test_load_keeps_the_saved_dtype(make_tiny_model, tiny_inputs, tmp_path):
    model = make_tiny_model("llama", dtype=torch.float64)
    compress(model, PLANS["llama"])
    save_compressed(model, None, tmp_path / "c")
    loaded = load_compressed(tmp_path / "c", device="cpu")
    assert loaded.model.layers[0].self_attn.q_proj.A.dtype == torch.float64
    assert torch.equal(_logits(loaded, tiny_inputs("llama")), _logits(model, tiny_inputs("llama")))
    assert load_compressed(tmp_path / "c", device="cpu", dtype="float32").lm_head.weight.dtype == torch.float32


def test_overwrite_rules(tiny_gpt2, tmp_path):
    compress(tiny_gpt2, PLANS["gpt2"])
    save_compressed(tiny_gpt2, None, tmp_path / "c")
    save_compressed(tiny_gpt2, None, tmp_path / "c")  # an earlier checkpoint is replaced
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="other exists, is not empty and is not a kronsearch checkpoint"):
        save_compressed(tiny_gpt2, None, tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "other"]


@pytest.fixture
def saved(make_tiny_model, tmp_path):
    model, plan, report = _compressed("gpt2", make_tiny_model)
    return save_compressed(model, plan, tmp_path / "ckpt", report=report)


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "kronsearch.json"])
def test_missing_file_is_named(saved, name):
    (saved / name).unlink()
    with pytest.raises(CheckpointError, match=f"ckpt/{name} is missing"):
        load_compressed(saved, device="cpu")


def test_truncated_weights(saved):
    data = (saved / "model.safetensors").read_bytes()
    (saved / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"safetensors is truncated or was replaced: [\d,]+ bytes, expected"):
        load_compressed(saved, device="cpu")
    # without the size/hash check the safetensors reader still refuses it, naming the file
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt or truncated"):
        load_compressed(saved, device="cpu", verify=False)


def test_corrupt_weights_same_size(saved):
    data = bytearray((saved / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (saved / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt: its sha256 does not match"):
        load_compressed(saved, device="cpu")


def test_corrupt_json_and_config(saved):
    (saved / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is corrupt"):
        load_compressed(saved, device="cpu")
    (saved / "kronsearch.json").write_text('{"format": "kronsearch.compressed", "format_ver')
    with pytest.raises(CheckpointError, match="kronsearch.json is corrupt or truncated"):
        load_compressed(saved, device="cpu")
    with pytest.raises(CheckpointError, match="nowhere does not exist"):
        load_compressed(saved.parent / "nowhere")


def test_mismatched_specs_are_reported(saved):
    info = json.loads((saved / "kronsearch.json").read_text())
    info["modules"]["transformer.h.0.mlp.c_fc"] = {"shape": [8, 4, 8, 4], "rank": 1}  # was factor 4, rank 2
    (saved / "kronsearch.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="model.safetensors does not match the architecture"):
        load_compressed(saved, device="cpu")


# ------------------------------------------------------------------------------------------- merge


@pytest.mark.parametrize("kind, auto", [("gpt2", AutoModelForCausalLM), ("bert", AutoModelForSequenceClassification),
                                        ("llama", AutoModelForCausalLM)])
def test_merge_round_trip_through_transformers(kind, auto, make_tiny_model, tiny_inputs, tmp_path):
    model, plan, _ = _compressed(kind, make_tiny_model)
    inputs = tiny_inputs(kind)
    ref = _logits(model, inputs)
    save_compressed(model, plan, tmp_path / "ckpt")
    merged = merge(load_compressed(tmp_path / "ckpt", device="cpu"))
    assert not any(isinstance(m, KRON) for m in merged.modules())
    if kind == "gpt2":
        assert type(merged.transformer.h[1].attn.c_attn) is Conv1D  # GPT-2 keeps Conv1D's (in, out) layout
        assert merged.transformer.h[1].attn.c_attn.weight.shape == (16, 48)
        assert type(merged.transformer.wte) is nn.Embedding
    merged.save_pretrained(str(tmp_path / "dense"))
    plain = auto.from_pretrained(str(tmp_path / "dense"), attn_implementation="eager")  # no kronsearch involved
    assert type(plain) is type(model)
    torch.testing.assert_close(_logits(plain, inputs), ref, rtol=0, atol=1e-5)


def test_merge_not_inplace(make_tiny_model):
    model, _, _ = _compressed("llama", make_tiny_model)
    dense = merge(model, inplace=False)
    assert any(isinstance(m, KRON) for m in model.modules())
    assert not any(isinstance(m, KRON) for m in dense.modules())


# ------------------------------------------------------------------------------------------- models


def test_load_model_from_directory(tiny_model_dir, tiny_inputs, make_tiny_model):
    path = tiny_model_dir("gpt2")
    model = load_model(path, device="cpu", attn_implementation="eager")
    assert type(model).__name__ == "GPT2LMHeadModel" and not model.training
    assert torch.equal(_logits(model, tiny_inputs("gpt2")), _logits(make_tiny_model("gpt2"), tiny_inputs("gpt2")))
    assert type(load_model(path, task="base", device="cpu")).__name__ == "GPT2Model"
    bf16 = load_model(path, device="cpu", dtype="bfloat16")
    assert bf16.transformer.wte.weight.dtype == torch.bfloat16
    bert = load_model(tiny_model_dir("bert"), device="cpu")
    assert type(bert).__name__ == "BertForSequenceClassification" and bert.config.num_labels == 3
    five = load_model(tiny_model_dir("bert", name="b5"), device="cpu", num_labels=5)
    assert five.classifier.out_features == 5


def test_load_model_opens_compressed_directories(saved):
    model = load_model(saved, device="cpu")
    assert isinstance(model.transformer.wte, KroneckerEmbedding)


def test_load_model_refuses_pickles(tiny_model_dir):
    path = tiny_model_dir("gpt2")
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"has only pytorch_model.bin; kronsearch reads safetensors only .* "
                                              "save_pretrained"):
        load_model(path, device="cpu")
    (path / "pytorch_model.bin").unlink()
    with pytest.raises(CheckpointError, match="has no weights .expected model.safetensors or "
                                              "model.safetensors.index.json."):
        load_model(path, device="cpu")


def test_load_model_missing_sources(tmp_path):
    with pytest.raises(DataError, match=f"model source {tmp_path}/nope does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(DataError, match="model source ./nope does not exist"):
        load_model("./nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty has no config.json"):
        load_model(tmp_path / "empty")
    with pytest.raises(DataError, match=f"config file {tmp_path}/missing.json does not exist"):
        load_model(f"config:{tmp_path}/missing.json")
    with pytest.raises(DataError, match="unknown architecture 'config:gpt5'; known: config:gpt2, "
                                        "config:bert-base-uncased"):
        load_config("config:gpt5")


def test_hub_names_fail_cleanly_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="cannot load 'no-such-org/no-such-model-kronsearch'"):
        load_model("no-such-org/no-such-model-kronsearch", device="cpu")


def test_config_path_gives_reproducible_random_weights(tiny_config, tmp_path):
    tiny_config("llama").save_pretrained(str(tmp_path))
    a = load_model(f"config:{tmp_path}/config.json", device="cpu")
    b = load_model(f"config:{tmp_path}", device="cpu", seed=0)
    c = load_model(f"config:{tmp_path}", device="cpu", seed=1)
    assert type(a).__name__ == "LlamaForCausalLM"
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    state = torch.random.get_rng_state()
    load_model(f"config:{tmp_path}", device="cpu")
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is left alone


def test_known_configs_offline():
    gpt2 = load_config("config:gpt2")
    assert (gpt2.n_layer, gpt2.n_embd, gpt2.n_head, gpt2.vocab_size, gpt2.n_positions) == (12, 768, 12, 50257, 1024)
    assert task_of(gpt2) == "causal-lm"
    bert = load_config("config:bert-base-uncased")
    assert (bert.num_hidden_layers, bert.hidden_size, bert.intermediate_size, bert.vocab_size) == (12, 768, 3072, 30522)
    assert task_of(bert) == "base"
    meta = load_model("config:bert-base-uncased", device="meta", task="sequence-classification", num_labels=2)
    assert type(meta).__name__ == "BertForSequenceClassification" and meta.classifier.out_features == 2


def test_task_and_device_and_dtype_validation(tiny_model_dir):
    with pytest.raises(ConfigError, match="task 'lm' is not supported; use one of auto, causal-lm, "
                                          "sequence-classification, base"):
        load_model("config:gpt2", task="lm", device="meta")
    with pytest.raises(ConfigError, match="dtype 'int8' is not supported"):
        parse_dtype("int8")
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype(torch.float16) is torch.float16
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device(None) == pick_device("auto") and pick_device("cpu").type == "cpu"
    with pytest.raises(ConfigError, match="is not a torch device"):
        pick_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            pick_device("cuda")
    with pytest.raises(ConfigError, match="num_labels must be a positive integer"):
        load_model("config:bert-base-uncased", device="meta", num_labels=0)


def test_load_tokenizer_errors(tiny_model_dir):
    with pytest.raises(DataError, match="config:gpt2 is an architecture without a tokenizer"):
        load_tokenizer("config:gpt2")
    with pytest.raises(DataError, match="has no tokenizer files"):
        load_tokenizer(tiny_model_dir("gpt2"))


def test_tied_llama_untied_by_compression_round_trips(make_tiny_model, tiny_inputs, tmp_path):
    model = make_tiny_model("llama", tie_word_embeddings=True)
    compress(model, PLANS["llama"])
    save_compressed(model, None, tmp_path / "c")
    assert json.loads((tmp_path / "c" / "config.json").read_text())["tie_word_embeddings"] is False
    loaded = load_compressed(tmp_path / "c", device="cpu")
    assert loaded.lm_head.weight is not getattr(loaded.model.embed_tokens, "weight", None)
    assert torch.equal(_logits(loaded, tiny_inputs("llama")), _logits(model, tiny_inputs("llama")))
