"""Calibration statistics (kron.calibration) and data-aware compression (kron.surgery with init="data"): the hooks
collect the right S for GPT-2 Conv1D (fused c_attn included), BERT (padding left out) and Llama; per-matrix files;
held-out S; the report's output error; the split tie-break."""
from __future__ import annotations

import pytest
import torch

from kron.calibration import CalibStats, collect_input_stats, linear_modules
from kron.errors import DataError, PlanError
from kron.surgery import ModuleRecord, compress


def _manual(x: torch.Tensor, mask: torch.Tensor | None = None):
    if mask is not None:
        x = x[mask.bool()]
    x = x.reshape(-1, x.shape[-1]).double()
    return x.T @ x / x.shape[0], x.mean(0)


def _batches(kind, tiny_inputs, n=3):
    return [tiny_inputs(kind, seed=s) for s in range(n)]


def _hidden(model, batches, index):
    with torch.no_grad():
        return torch.cat([model(**b, output_hidden_states=True).hidden_states[index].reshape(-1, 16)
                          for b in batches])


def test_gpt2_conv1d_and_fused_c_attn(tiny_gpt2, tiny_inputs):
    batches = [{"input_ids": b["input_ids"]} for b in _batches("gpt2", tiny_inputs)]
    stats = collect_input_stats(tiny_gpt2, batches)
    assert set(stats.names) == set(linear_modules(tiny_gpt2))
    # c_attn of layer 1 reads ln_1 of the hidden state entering layer 1 (Conv1D: x is the input of the (out x in)
    # weight, so S is in x in = 16 x 16 although the stored weight is (in, out))
    x = tiny_gpt2.transformer.h[1].ln_1(_hidden(tiny_gpt2, batches, 1))
    S, mean = _manual(x)
    assert torch.allclose(stats.S("transformer.h.1.attn.c_attn"), S, rtol=1e-5, atol=1e-6)
    assert torch.allclose(stats.stats("transformer.h.1.attn.c_attn").mean, mean, rtol=1e-5, atol=1e-6)
    assert stats.S("transformer.h.0.mlp.c_proj").shape == (64, 64)  # its input is the FFN's 64 units
    assert stats.S("transformer.h.0.mlp.c_fc").shape == (16, 16)
    assert stats.tokens == sum(b["input_ids"].numel() for b in batches)
    assert stats.S("transformer.h.0.attn.c_attn").dtype == torch.float64


def test_bert_leaves_padding_out(tiny_bert, tiny_inputs):
    batches = _batches("bert", tiny_inputs)
    stats = collect_input_stats(tiny_bert, batches, names=["bert.encoder.layer.0.attention.self.query",
                                                          "bert.encoder.layer.0.attention.self.key"])
    x = _hidden(tiny_bert, batches, 0).reshape(len(batches), 2, 7, 16)
    mask = torch.stack([b["attention_mask"] for b in batches])
    S, _ = _manual(x, mask)
    assert stats.tokens == int(mask.sum())
    for name in stats.names:
        assert torch.allclose(stats.S(name), S, rtol=1e-5, atol=1e-6)


def test_llama_gqa_projections(tiny_llama, tiny_inputs):
    batches = [{"input_ids": b["input_ids"]} for b in _batches("llama", tiny_inputs)]
    stats = collect_input_stats(tiny_llama, batches)
    layer = tiny_llama.model.layers[0]
    with torch.no_grad():
        S, _ = _manual(layer.input_layernorm(_hidden(tiny_llama, batches, 0)))
    for proj in ("q_proj", "k_proj", "v_proj"):  # k/v are 8 x 16 (grouped-query): same 16-wide input
        assert torch.allclose(stats.S(f"model.layers.0.self_attn.{proj}"), S, rtol=1e-5, atol=1e-6)
    assert stats.S("model.layers.0.mlp.down_proj").shape == (24, 24)


def test_heldout_cache_dir_and_memory_groups(tiny_gpt2, tiny_inputs, tmp_path):
    batches = [{"input_ids": b["input_ids"]} for b in _batches("gpt2", tiny_inputs, 4)]
    fit, held = batches[:3], batches[3:]
    mem = collect_input_stats(tiny_gpt2, fit, heldout=held)
    # 64 x 64 and 16 x 16 float64 S, two per matrix: a 20 kB budget forces several passes over the data
    disk = collect_input_stats(tiny_gpt2, fit, heldout=held, cache_dir=tmp_path / "c", max_memory=20_000,
                               key={"model": "tiny"})
    files = sorted(p.name for p in (tmp_path / "c").glob("*.safetensors"))
    assert len(files) == len(mem.names) and "transformer.h.0.mlp.c_proj.safetensors" in files
    assert not disk._memory  # loaded lazily from the folder
    again = CalibStats.load(tmp_path / "c")
    assert again.key == {"model": "tiny"} and again.tokens == mem.tokens and again.heldout_tokens == 14
    for name in mem.names:
        assert torch.allclose(again.S(name), mem.S(name))
        assert torch.allclose(again.heldout(name), mem.heldout(name))
    x = tiny_gpt2.transformer.h[0].ln_1(_hidden(tiny_gpt2, held, 0))
    assert torch.allclose(mem.heldout("transformer.h.0.attn.c_attn"), _manual(x)[0], rtol=1e-5, atol=1e-6)
    (tmp_path / "c" / files[0]).unlink()
    with pytest.raises(DataError, match="incomplete"):
        CalibStats.load(tmp_path / "c")


def test_bad_inputs(tiny_gpt2):
    with pytest.raises(DataError, match="no tokens"):
        collect_input_stats(tiny_gpt2, [])
    with pytest.raises(DataError, match="not an nn.Linear or Conv1D"):
        collect_input_stats(tiny_gpt2, [torch.zeros(1, 4, dtype=torch.long)], names=["transformer.wte"])
    with pytest.raises(DataError, match="no readable calibration statistics"):
        CalibStats.load("/nonexistent/calib")


@pytest.mark.parametrize("kind", ["gpt2", "bert", "llama"])
def test_compress_init_data_reports_output_error(kind, make_tiny_model, tiny_inputs):
    model = make_tiny_model(kind)
    batches = [tiny_inputs(kind, batch=8, length=24, seed=s) for s in range(6)]
    stats = collect_input_stats(model, batches[:4], heldout=batches[4:])
    svd = compress(model, "uniform:2", init="svd", calib=stats, inplace=False)
    data = compress(model, "uniform:2", init="data", calib=stats, inplace=False)
    low_svd = compress(model, "lowrank:2", init="svd", calib=stats, inplace=False)
    low = compress(model, "lowrank:2", init="data", calib=stats, inplace=False)
    for rep in (svd, data, low_svd, low):
        assert all(r.output_error is not None and r.output_error >= 0 for r in rep.modules)
        d = rep.to_dict()
        assert all("output_error" in m for m in d["modules"]) and d["calib"]["heldout_tokens"] > 0
        assert "out_err" in rep.summary()
    assert {r.init for r in data.modules} <= {"data", "svd"} and "data" in {r.init for r in data.modules}
    # input splits under init="data" (B 1 x n2), the papers' output splits under svd
    assert all(r.spec["shape"][2] == 1 for r in data.modules)
    mean = lambda rep: sum(r.output_error for r in rep.modules) / len(rep.modules)  # noqa: E731
    assert mean(data) < mean(svd)
    assert mean(low) < mean(low_svd)
    with torch.no_grad():
        out = data.model(**batches[0])
    assert all(torch.isfinite(t).all() for t in out.values() if isinstance(t, torch.Tensor))


def test_init_data_needs_stats_and_the_right_model(tiny_gpt2, tiny_llama, tiny_inputs):
    with pytest.raises(PlanError, match="init 'data' needs calibration statistics"):
        compress(tiny_gpt2, "uniform:2", init="data")
    stats = collect_input_stats(tiny_llama, [{"input_ids": tiny_inputs("llama")["input_ids"]}])
    with pytest.raises(PlanError, match="no entry for transformer.h.0"):
        compress(tiny_gpt2, "uniform:2", init="data", calib=stats)


def test_embeddings_stay_data_free_and_old_records_load(tiny_gpt2, tiny_inputs):
    stats = collect_input_stats(tiny_gpt2, [{"input_ids": tiny_inputs("gpt2")["input_ids"]}])
    rep = compress(tiny_gpt2, {"rules": [{"select": "wte", "embedding_factor": 2},
                                         {"select": "c_fc", "factor": 2}]}, init="data", calib=stats)
    wte = next(r for r in rep.modules if r.name == "transformer.wte")
    assert wte.init == "svd" and wte.output_error is None and not rep.notes
    old = {k: v for k, v in rep.to_dict()["modules"][0].items() if k not in ("output_error", "init")}
    record = ModuleRecord(**old)  # a report written before output_error existed
    assert record.output_error is None and record.init is None


def test_split_tie_break(gpt2_config=None):
    from transformers import GPT2Config

    from kron.methods.kronecker import nearest_shape
    from kron.presets import preset_plan

    assert nearest_shape(768, 768, 2).shape == (384, 768, 2, 1)  # the papers' (and today's default) shape
    assert nearest_shape(768, 768, 2, prefer="input").shape == (768, 384, 1, 2)
    assert nearest_shape(768, 3072, 4, prefer="input").shape[2] == 1
    with torch.device("meta"):
        from transformers import GPT2LMHeadModel

        model = GPT2LMHeadModel(GPT2Config(n_layer=1))
    plan = preset_plan("uniform:4", model.config)
    assert plan.resolve(model)["transformer.h.0.attn.c_attn"].shape == (192, 768, 4, 1)
    assert plan.resolve(model, split="input")["transformer.h.0.attn.c_attn"].shape == (768, 192, 1, 4)
    with pytest.raises(PlanError, match="split must be"):
        plan.resolve(model, split="sideways")


def test_the_ridge_reaches_every_data_aware_init(tiny_gpt2, tiny_inputs):
    """compress(..., ridge=) goes to each Kronecker and low-rank layer: ridge 0 trusts S fully (lowest calibration
    error), a huge ridge gives back the plain SVD factors, the default sits between; a bad ridge is refused first."""
    import copy

    from kron.datainit import calibration_objective

    batches = [{"input_ids": b["input_ids"]} for b in _batches("gpt2", tiny_inputs)]
    stats = collect_input_stats(tiny_gpt2, batches)
    name = "transformer.h.0.mlp.c_fc"
    plan = {"rules": [{"select": name, "lowrank_rank": 3}, {"select": "transformer.h.1.mlp.c_proj", "factor": 2}]}
    W = tiny_gpt2.get_submodule(name).weight.detach().T  # Conv1D stores (in, out)
    S = stats.stats(name).S

    def err(**kw):
        model = copy.deepcopy(tiny_gpt2)
        compress(model, plan, init="data", calib=stats, **kw)
        return calibration_objective(W.double(), S, model.get_submodule(name).to_dense().double())

    exact, default, huge = err(ridge=0.0), err(), err(ridge=1e6)
    svd = copy.deepcopy(tiny_gpt2)
    compress(svd, plan, init="svd")
    plain = calibration_objective(W.double(), S, svd.get_submodule(name).to_dense().double())
    assert exact <= default + 1e-12 <= huge + 2e-12
    assert huge == pytest.approx(plain, rel=1e-3)
    with pytest.raises(PlanError, match="ridge must be a finite number >= 0"):
        compress(copy.deepcopy(tiny_gpt2), plan, init="data", calib=stats, ridge=-1)
