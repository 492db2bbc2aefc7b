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


@pytest.mark.parametrize("kind", ["gpt2", "bert", "llama"])
def test_layer_by_layer_compression_equals_the_whole_models(kind, tiny_model_dir, tiny_inputs, make_tiny_model):
    """feed teacher: every layer's statistics are the teacher's, so the compressed model is whole-model data-aware
    compression's (the same outputs); feed compressed fits each layer to its compressed inputs: another model, as
    good on the calibration text here."""
    from kron.sequential import sequential_compress
    from kron.surgery import compress

    path = tiny_model_dir(kind)
    whole = make_tiny_model(kind)
    fit, held = _batches(tiny_inputs, kind)
    ref = compress(whole, "lowrank:2", init="data", calib=collect_input_stats(whole, fit), inplace=False).model
    seq, report = sequential_compress(LazyModel.open(path), "lowrank:2", fit, heldout=held)
    whole_report = compress(whole, "lowrank:2", init="data", calib=collect_input_stats(whole, fit), inplace=False)
    for k in ("params_before", "params_after", "compression_ratio", "macs_per_token_after", "bytes_after"):
        assert getattr(report, k) == getattr(whole_report, k), k
    assert [m.name for m in report.modules] == [m.name for m in whole_report.modules]
    assert not any(p.is_meta for p in seq.parameters())
    x = tiny_inputs(kind, batch=2, length=6, seed=42)
    with torch.no_grad():
        a, b = seq(**x).logits, ref(**x).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    fed, _ = sequential_compress(LazyModel.open(path), "lowrank:2", fit, feed="compressed")
    with torch.no_grad():
        c = fed(**x).logits
    assert torch.isfinite(c).all() and not torch.allclose(c, b)  # its later layers saw other inputs


def test_compress_sequential_on_the_command_line(tiny_model_dir, tmp_path, capsys):
    """`kronsearch compress --sequential` writes the model whole-model compression writes (same logits), and its
    bad combinations exit 2 with one line."""
    from kron.io import load_compressed
    from search.cli import main

    path = tiny_model_dir("gpt2")
    text = tmp_path / "calib.txt"
    text.write_text("\n".join(" ".join(str((i * 7 + j) % 90) for j in range(30)) for i in range(40)))
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    raw = Tokenizer(models.WordLevel({str(i): i for i in range(90)} | {"[UNK]": 90}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", eos_token="[UNK]").save_pretrained(str(path))
    common = ["compress", "--model", str(path), "--plan", "lowrank:2", "--init", "data", "--calib", str(text),
              "--calib-tokens", "400", "--calib-seq-len", "16"]
    assert main([*common, "--out", str(tmp_path / "seq"), "--sequential"]) == 0
    assert main([*common, "--out", str(tmp_path / "whole")]) == 0
    a, b = load_compressed(tmp_path / "seq"), load_compressed(tmp_path / "whole")
    x = torch.randint(0, 90, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(a(input_ids=x).logits, b(input_ids=x).logits, rtol=1e-4, atol=1e-5)
    capsys.readouterr()
    for extra, word in ((["--feed", "compressed"], "--feed goes with --sequential"),):
        assert main([*common, "--out", str(tmp_path / "x"), *extra]) == 2
        assert word in capsys.readouterr().err
    svd = ["compress", "--model", str(path), "--plan", "lowrank:2", "--out", str(tmp_path / "y"), "--sequential"]
    assert main(svd) == 2
    err = capsys.readouterr().err.strip()
    assert "--sequential compresses with the data-aware init" in err and len(err.splitlines()) == 1
