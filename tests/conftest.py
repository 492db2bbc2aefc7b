"""Shared fixtures: tiny GPT-2 / BERT / Llama models built from configs (no downloads; each builds in milliseconds).

- `tiny_config(kind, **overrides)`: the config of "gpt2" (4 layers, d=16, FFN 64, tied LM head), "bert" (2 layers,
  d=16, FFN 32, sequence classification with 3 labels) or "llama" (2 layers, d=16, 4 query heads and 2 key/value
  heads: grouped-query attention, k/v projections 8 x 16, FFN 24, untied head).
- `make_tiny_model(kind, seed=0, dtype=None, **overrides)`: a fresh model in eval mode, seeded.
- `tiny_gpt2`, `tiny_bert`, `tiny_llama`: one fresh model each.
- `tiny_model_dir(kind, **overrides)`: a save_pretrained directory (safetensors) of a fresh model under tmp_path.
- `tiny_inputs(kind)`: a fixed batch of input ids (and attention mask) for the model's vocabulary.
"""
from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the search-state signing key (search.statesign) of the test session, not the user's
os.environ.setdefault("KRONSEARCH_STATE_KEY", os.path.join(tempfile.mkdtemp(prefix="kronsearch-key-"), "state.key"))

import pytest  # noqa: E402
import torch  # noqa: E402

VOCAB = 96


def _config(kind: str, **overrides):
    import transformers

    if kind == "gpt2":
        kw = dict(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=4, n_head=2, resid_pdrop=0.0,
                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                  architectures=["GPT2LMHeadModel"])
        cls = transformers.GPT2Config
    elif kind == "bert":
        kw = dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                  max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                  num_labels=3, architectures=["BertForSequenceClassification"])
        cls = transformers.BertConfig
    elif kind == "llama":
        kw = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False,
                  architectures=["LlamaForCausalLM"])
        cls = transformers.LlamaConfig
    else:
        raise ValueError(f"unknown tiny model kind {kind!r}")
    kw.update(overrides)
    return cls(**kw)


def _model(kind: str, seed: int = 0, dtype=None, **overrides):
    from kron.models import build_from_config

    model = build_from_config(_config(kind, **overrides), seed=seed, device="cpu", attn_implementation="eager")
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def _inputs(kind: str, batch: int = 2, length: int = 7, seed: int = 123) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # a padded row, so masking paths are exercised too
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture
def tiny_config():
    return _config


@pytest.fixture
def make_tiny_model():
    return _model


@pytest.fixture
def tiny_inputs():
    return _inputs


@pytest.fixture
def tiny_gpt2():
    return _model("gpt2")


@pytest.fixture
def tiny_bert():
    return _model("bert")


@pytest.fixture
def tiny_llama():
    return _model("llama")


@pytest.fixture
def tiny_model_dir(tmp_path):
    def make(kind: str, name: str | None = None, **overrides):
        path = tmp_path / (name or f"tiny-{kind}")
        _model(kind, **overrides).save_pretrained(str(path))
        return path

    return make


def _set_exact_kronecker(model, specs, seed: int = 0, scale: float = 0.3) -> None:
    """Overwrite the weight of every module in `specs` (name -> ModuleSpec | "keep", as from plan.resolve) with an
    exact Σ_k A_k ⊗ B_k of that spec (per block for fused projections; A (v x d/f) ⊗ B (1 x f) for embeddings), so
    that compressing with the same plan must reproduce the model exactly."""
    from kron.plan import KEEP

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, spec in specs.items():
            if spec == KEEP:
                continue
            module = model.get_submodule(name)
            w = module.weight
            if spec.kind == "embedding":
                v, d = w.shape
                f = spec.embedding_factor
                A = torch.randn(v, d // f, generator=g, dtype=torch.float64) * scale
                B = torch.randn(1, f, generator=g, dtype=torch.float64) + 1.0
                w.copy_(torch.kron(A, B).to(w.dtype))
                continue
            m1, n1, m2, n2 = spec.shape
            blocks = []
            for _ in range(spec.blocks):
                W = sum(torch.kron(torch.randn(m1, n1, generator=g, dtype=torch.float64) * scale,
                                   torch.randn(m2, n2, generator=g, dtype=torch.float64) * scale)
                        for _ in range(spec.rank))
                blocks.append(W)
            W = torch.cat(blocks, dim=0)  # (out, in)
            is_conv1d = type(module).__name__ == "Conv1D"
            w.copy_((W.T if is_conv1d else W).to(w.dtype))


@pytest.fixture
def set_exact_kronecker():
    return _set_exact_kronecker
