"""Layer-by-layer calibration (`kron.sequential`): a model whose weights are read from disk one layer at a time
gives the statistics of the whole model (`kron.calibration.collect_input_stats`) on tiny GPT-2, BERT and Llama
models, padding left out; the layers are unloaded again."""
from __future__ import annotations

import pytest
import torch

from kron.calibration import collect_input_stats
from kron.errors import CheckpointError
from kron.sequential import LazyModel, sequential_stats


def _batches(inputs, kind):
    fit = [inputs(kind, batch=2, length=7, seed=s) for s in (1, 2, 3)]
    held = [inputs(kind, batch=2, length=5, seed=9)]
    return fit, held


@pytest.mark.parametrize("kind", ["gpt2", "bert", "llama"])
def test_layer_by_layer_statistics_equal_the_whole_models(kind, tiny_model_dir, tiny_inputs, make_tiny_model):
    path = tiny_model_dir(kind)
    whole = make_tiny_model(kind)
    fit, held = _batches(tiny_inputs, kind)
    lazy = LazyModel.open(path)
    assert lazy.loaded_bytes == 0  # nothing read yet
    seq = sequential_stats(lazy, fit, heldout=held)
    layer_prefix = lazy.layers_name + "."
    names = [n for n in collect_input_stats(whole, fit[:1]).names if n.startswith(layer_prefix)]
    ref = collect_input_stats(whole, fit, names, heldout=held)
    assert seq.names == ref.names and seq.tokens == ref.tokens and seq.heldout_tokens == ref.heldout_tokens
    for n in ref.names:
        a, b = seq.stats(n), ref.stats(n)
        assert a.tokens == b.tokens
        torch.testing.assert_close(a.S, b.S, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(a.S_heldout, b.S_heldout, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(a.mean, b.mean, rtol=1e-5, atol=1e-7)
    # every layer went back to the meta device: what stays loaded is what lies outside the layers
    outside = sum(p.numel() * p.element_size() for name, p in whole.named_parameters()
                  if not name.startswith(layer_prefix))
    assert 0 < lazy.loaded_bytes <= outside
    assert all(p.is_meta for p in lazy.layers.parameters())


def test_a_folder_without_safetensors_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="safetensors"):
        LazyModel.open(tmp_path)
