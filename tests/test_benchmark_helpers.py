"""Helpers of the benchmark scripts whose correctness a printed figure depends on (the scripts themselves are run by
hand: they time things, which unit tests must not)."""
import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_model_speed_ceiling_model_has_no_linear_arithmetic_but_trains_through(arch):
    """The ceiling's stand-in model: no nn.Linear / Conv1D left (LM head included), same output shapes as dense,
    dense untouched, and a backward that still reaches the embeddings (so a training step times the whole rest)."""
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    ms = _load("model_speed")
    if arch == "gpt2":
        dense = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=16, vocab_size=50))
    else:
        dense = BertModel(BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=16, vocab_size=50))
    n_dense = sum(isinstance(m, (nn.Linear, Conv1D)) for m in dense.modules())
    stub = ms.without_linear(dense)
    assert not any(isinstance(m, (nn.Linear, Conv1D)) for m in stub.modules())
    assert sum(isinstance(m, ms._OutputOnly) for m in stub.modules()) == n_dense
    assert sum(isinstance(m, (nn.Linear, Conv1D)) for m in dense.modules()) == n_dense  # a copy was changed

    ids = torch.randint(0, 50, (2, 8))
    if arch == "gpt2":
        out_d, out_s = dense(input_ids=ids).logits, stub(input_ids=ids).logits
        loss = stub(input_ids=ids, labels=ids).loss
    else:
        out_d, out_s = dense(input_ids=ids).last_hidden_state, stub(input_ids=ids).last_hidden_state
        loss = stub(input_ids=ids).last_hidden_state.mean()
    assert out_s.shape == out_d.shape
    loss.backward()
    emb = stub.transformer.wte if arch == "gpt2" else stub.embeddings.word_embeddings
    assert emb.weight.grad is not None and emb.weight.grad.abs().sum() > 0
