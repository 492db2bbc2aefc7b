"""kron.profile: per-matrix, per-candidate damage with data-aware init; cache reuse and refusal; auto plans on it."""
import copy
import json
import math

import pytest
import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

from kron.autoplan import Constraints, auto_plan, parse_budget, resolved_specs
from kron.calibration import collect_input_stats
from kron.errors import DataError
from kron.plan import CompressionPlan
from kron.profile import check_header, compressible_matrices, load_profile, profile_model
from kron.surgery import apply_specs

C = Constraints(max_shapes=2, max_compression=8)


pytestmark = pytest.mark.usefixtures("one_thread")  # every test of this file (tests/kron/conftest.py)


@pytest.fixture(scope="module")
def gpt2(make_calibrated_gpt2):
    return make_calibrated_gpt2(2, 1)


def test_gpt2_profile(gpt2, tmp_path):
    model, stats, held = gpt2
    mats = compressible_matrices(model)
    assert [m.name for m in mats][:4] == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                                          "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
    assert mats[0].blocks == 3 and mats[0].m == 96 and len(mats) == 8  # lm_head is not profiled
    calls = []
    prof = profile_model(model, stats, constraints=C, source="tiny", heldout=held, kl_subset=2,
                         path=tmp_path / "p.json", progress=lambda d, t, n: calls.append((d, t)))
    assert calls[-1] == (8, 8)
    entry = prof["matrices"]["transformer.h.0.attn.c_attn"]
    methods = {c["method"] for c in entry["candidates"]}
    assert methods == {"keep", "kronecker", "lowrank"}
    for mx in prof["matrices"].values():
        keep = mx["candidates"][0]
        assert keep["method"] == "keep" and keep["damage"] == 0 and keep["params"] == mx["m"] * mx["n"]
        for c in mx["candidates"][1:]:
            assert 0 <= c["damage"] < 1.5 and math.isfinite(c["damage"]) and c["params"] < mx["m"] * mx["n"]
        assert sum(c["model_damage"] is not None for c in mx["candidates"][1:]) == 2
    kron_c = [c for c in entry["candidates"] if c["method"] == "kronecker"][0]
    assert kron_c["spec"]["blocks"] == 3 and kron_c["label"].endswith("b3")
    assert prof["model_measure"]["kind"] == "kl" and prof["correlation"]["pairs"] == 16
    assert prof["correlation"]["spearman"] is not None
    # lower rank never damages less (whitened low-rank is exact on the ridged S)
    lr = sorted((c for c in entry["candidates"] if c["method"] == "lowrank"), key=lambda c: c["params"])
    assert lr[0]["damage"] >= lr[-1]["damage"]
    on_disk = load_profile(tmp_path / "p.json")
    assert on_disk["matrices"].keys() == prof["matrices"].keys() and not on_disk.get("pending")


def test_profile_matches_compress(gpt2):
    """The proxy is the output error `compress(init='data')` gets for the same candidate."""
    from kron.datainit import calibration_objective

    model, stats, _ = gpt2
    mx = compressible_matrices(model)[1]
    prof = profile_model(model, stats, constraints=C, matrices=[mx], kl_subset=0)
    c = prof["matrices"][mx.name]["candidates"][1]
    m = copy.deepcopy(model)
    apply_specs(m, {mx.name: {**c["spec"], "method": c["method"]}}, init="data", calib=stats)
    W = model.get_submodule(mx.name).weight.T
    W_hat = m.get_submodule(mx.name).to_dense()
    S = stats.S(mx.name)
    assert c["damage"] == pytest.approx(calibration_objective(W, S, W_hat) / calibration_objective(W, S), rel=1e-3)


def test_resume_and_refusal(gpt2, tmp_path):
    model, stats, _ = gpt2
    path = tmp_path / "p.json"
    first = profile_model(model, stats, constraints=C, source="tiny", path=path, kl_subset=0,
                          matrices=compressible_matrices(model)[:2])
    assert len(first["matrices"]) == 2
    seen = []
    full = profile_model(model, stats, constraints=C, source="tiny", path=path, kl_subset=0,
                         progress=lambda d, t, n: seen.append(n))
    assert len(full["matrices"]) == 8 and len(seen) == 8
    for name in first["matrices"]:  # reused, not recomputed
        assert full["matrices"][name] == first["matrices"][name]
    with pytest.raises(DataError, match=r"constraints.max_shapes: the profile has 2, this run 3"):
        profile_model(model, stats, constraints=Constraints(max_shapes=3, max_compression=8), source="tiny",
                      path=path, kl_subset=0)
    with pytest.raises(DataError, match=r"methods"):
        profile_model(model, stats, constraints=C, methods=["lowrank"], source="tiny", path=path, kl_subset=0)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01)
    with pytest.raises(DataError, match=r"model.fingerprint"):
        profile_model(other, stats, constraints=C, source="tiny", path=path, kl_subset=0)
    with pytest.raises(DataError, match=r"model.source"):
        profile_model(model, stats, constraints=C, source="another", path=path, kl_subset=0)
    again = profile_model(model, stats, constraints=Constraints(max_shapes=1), source="tiny", path=path,
                          kl_subset=0, fresh=True, matrices=compressible_matrices(model)[:1])
    assert json.loads(path.read_text())["constraints"]["max_shapes"] == 1 and len(again["matrices"]) == 1
    prof = load_profile(path)
    check_header(prof, {"constraints": Constraints(max_shapes=1).to_dict()})
    with pytest.raises(DataError, match="not a kronsearch profile"):
        (tmp_path / "x.json").write_text("{}")
        load_profile(tmp_path / "x.json")


def test_singular_S_no_nan(gpt2):
    """A matrix whose inputs span a subspace (singular S) or are all zero: finite damages (the ridge)."""
    model, stats, _ = gpt2
    mx = compressible_matrices(model)[1]
    st = copy.copy(stats.in_memory())
    st._memory = dict(st._memory)
    n = mx.n
    X = torch.randn(100, 3, dtype=torch.float64) @ torch.randn(3, n, dtype=torch.float64)
    st._memory[mx.name] = type(st._memory[mx.name])(S=X.T @ X / 100, tokens=100)
    prof = profile_model(model, st, constraints=C, matrices=[mx], kl_subset=0)
    dmg = [c["damage"] for c in prof["matrices"][mx.name]["candidates"]]
    assert all(math.isfinite(d) for d in dmg)
    st._memory[mx.name] = type(st._memory[mx.name])(S=torch.zeros(n, n, dtype=torch.float64), tokens=100)
    prof = profile_model(model, st, constraints=C, matrices=[mx], kl_subset=0)
    assert all(c["damage"] == 0 for c in prof["matrices"][mx.name]["candidates"])
    st._memory[mx.name] = type(st._memory[mx.name])(S=torch.full((n, n), float("nan"), dtype=torch.float64),
                                                    tokens=100)
    with pytest.raises(DataError, match="NaN"):
        profile_model(model, st, constraints=C, matrices=[mx], kl_subset=0)


def test_auto_plan_respects_budget_and_resolves(gpt2):
    model, stats, _ = gpt2
    prof = profile_model(model, stats, constraints=C, kl_subset=0)
    for text in ("ratio=1.2", "params=60000", "macs=30000", "bytes=240000", "params_excl=60000"):
        budget = parse_budget(text)
        sol = auto_plan(prof, budget)
        plan = CompressionPlan.from_resolved(resolved_specs(sol))
        m = copy.deepcopy(model)
        rep = apply_specs(m, plan.resolve(m), init="data", calib=stats)
        got = rep.sizes()
        assert not budget.breaches(got, rep.sizes(before=True)), text
        if budget.single.ratio:
            assert rep.compression_ratio >= budget.value
        else:
            assert got[budget.axis] <= budget.value
        assert sol.cost == got[budget.axis], text  # the profile's counts are the model's
        # the prediction is the sum of the chosen matrices' damages
        assert sol.damage == pytest.approx(sum(o.damage for o in sol.choice.values()))
    from kron.errors import PlanError

    with pytest.raises(PlanError, match="smallest reachable size is ratio="):
        auto_plan(prof, parse_budget("ratio=50"))


def test_bert_profile_classifier_and_base():
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                     vocab_size=50, max_position_embeddings=32, num_labels=3)
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 50, (4, 12), generator=g),
                "attention_mask": torch.tensor([[1] * 12] * 2 + [[1] * 6 + [0] * 6] * 2)} for _ in range(2)]
    for cls, kind in ((BertForSequenceClassification, "kl"), (BertModel, "hidden_rel_mse")):
        model = cls(cfg).eval()
        stats = collect_input_stats(model, batches)
        mats = compressible_matrices(model)
        assert {m.group for m in mats} == {"attention", "attention_output", "ffn_in", "ffn_out"} and len(mats) == 6
        prof = profile_model(model, stats, constraints=C, heldout=batches[:1], kl_subset=1)
        assert prof["model_measure"]["kind"] == kind
        assert all(math.isfinite(c["damage"]) for mx in prof["matrices"].values() for c in mx["candidates"])
        sol = auto_plan(prof, parse_budget("ratio=1.1"))
        plan = CompressionPlan.from_resolved(resolved_specs(sol))
        rep = apply_specs(copy.deepcopy(model), plan.resolve(model), init="none")
        assert rep.compression_ratio >= 1.1


def test_heatmap(gpt2, tmp_path):
    pytest.importorskip("matplotlib")
    from analysis.profile_plot import profile_heatmap, profile_heatmap_data

    model, stats, _ = gpt2
    prof = profile_model(model, stats, constraints=C, kl_subset=0)
    data = profile_heatmap_data(prof)
    assert data.methods == ["kronecker", "lowrank"] and len(data.matrices) == 8
    assert all(((v > 0) | ~torch.isfinite(torch.tensor(v)).numpy()).all() for v in data.values.values())
    out = profile_heatmap(prof, tmp_path / "h.png")
    assert out.stat().st_size > 1000 and out.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("blocks", [1, 3])
def test_fast_path_matches_building_each_layer(gpt2, blocks):
    """The cached fast path gives the damages (and winning init) of `method.build(..., "data")` for every
    Kronecker split kind (n1 = 1, n2 = 1, general, rank 2) and low-rank rank, also on a near-singular S."""
    model, stats, _ = gpt2
    mx = compressible_matrices(model)[0 if blocks == 3 else 3]  # c_attn (96 x 32, 3 blocks) / mlp.c_proj (32 x 128)
    c = Constraints(ranks=(1, 2), max_shapes=4, shapes_per_level=3, max_compression=12)
    fast = profile_model(model, stats, constraints=c, matrices=[mx], kl_subset=0)
    slow = profile_model(model, stats, constraints=c, matrices=[mx], kl_subset=0, fast=False)
    fc, sc = fast["matrices"][mx.name]["candidates"], slow["matrices"][mx.name]["candidates"]
    assert [x["label"] for x in fc] == [x["label"] for x in sc] and len(fc) > 8
    shapes = [tuple(x["spec"]["shape"]) for x in fc if x["method"] == "kronecker"]
    assert any(s[1] == 1 for s in shapes) or any(s[3] == 1 for s in shapes)
    assert any(s[1] > 1 and s[3] > 1 for s in shapes)
    for a, b in zip(fc, sc):
        assert a["damage"] == pytest.approx(b["damage"], rel=2e-3, abs=1e-7), a["label"]


def test_option_damages_int8_without_building(gpt2, monkeypatch):
    """The search prior's damage of `+int8` options: exact for the dense matrix in int8 (= building the layer and
    measuring it), and for a structure + int8 the structure's own damage plus the dense int8 term — close to the
    built layer's (its factors are quantised, not W) and never below the structure alone; no layer is built."""
    from kron.calibration import ModuleStats
    from kron.methods import get_method, parse_option
    from kron.damage import Proxy, option_damages, weight_of

    model, stats, _ = gpt2
    name = "transformer.h.1.mlp.c_proj"  # 32 x 128
    module = dict(model.named_modules())[name]
    K = "16x32,2x4,r1"  # a general split (n1, n2 > 1): the iterative data-aware solve
    opts = ["int8", "lr4", "lr4+int8", K, K + "+int8"]
    specs = [parse_option(o) for o in opts]
    built = []
    one = ModuleStats(S=stats.stats(name).S, tokens=stats.stats(name).tokens)
    proxy = Proxy(weight_of(module), one.S)
    for spec in specs:
        built.append(proxy(get_method(spec.method).build(module, spec, "data", stats=one).to_dense()))
    import kron.methods.quant as quant

    monkeypatch.setattr(quant.QuantMethod, "build", lambda *a, **k: pytest.fail("built an int8 layer"))
    got = dict(zip(opts, option_damages(model, stats, {name: specs})[name]))
    assert got["int8"] == pytest.approx(built[0], rel=1e-6) and 0 < got["int8"] < 1e-3
    for structure in ("lr4", K):
        assert got[structure + "+int8"] >= got[structure]
        assert got[structure + "+int8"] == pytest.approx(built[opts.index(structure + "+int8")], rel=0.05)


@pytest.mark.parametrize("shape, rank", [((12, 16, 2, 1), 1), ((6, 1, 4, 16), 2), ((24, 8, 1, 2), 1),
                                         ((6, 4, 4, 4), 2)])
@pytest.mark.parametrize("wide", [False, True])
def test_cached_block_objectives_match_datainit_closely(shape, rank, wide):
    """The methods' closed-form damages on a cached `MatrixBlock` (from the whitening's SVD tail, triangular solves
    instead of L⁻¹, the transposed SVD of a wide W·L) reproduce `data_aware_kronecker` / `whitened_lowrank` on the
    calibration objective to rounding, not just to the 2e-3 of the layer-building comparison."""
    from kron.damage import MatrixBlock
    from kron.datainit import DEFAULT_RIDGE, calibration_objective
    from kron.methods import get_method
    from kron.methods.kronecker.datainit import data_aware_kronecker
    from kron.methods.lowrank.datainit import whitened_lowrank

    m1, n1, m2, n2 = shape
    m, n = m1 * m2, n1 * n2
    if wide:  # the low-rank check on a wide matrix (transposed SVD); the Kronecker shape on its transpose
        m1, n1, m2, n2, m, n = n1, m1, n2, m2, n, m
    g = torch.Generator().manual_seed(5)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    X = torch.randn(400, n, generator=g, dtype=torch.float64) @ torch.randn(n, n, generator=g, dtype=torch.float64)
    S = X.T @ X / 400
    from kron.methods import parse_option

    fb = MatrixBlock(W, S, DEFAULT_RIDGE)
    kspec = parse_option(f"{m1}x{n1},{m2}x{n2},r{rank}")
    got, _ = get_method("kronecker").block_damage(fb, kspec)
    ref = data_aware_kronecker(W, S, (m1, n1, m2, n2), rank)
    want = calibration_objective(W, S, torch.einsum("kac,kbd->abcd", ref.A, ref.B).reshape(m, n))
    assert got == pytest.approx(want, rel=1e-9)
    lin = torch.nn.Linear(n, m, dtype=torch.float64)
    layer = get_method("kronecker").layer_from_factors(lin, kspec, [fb])  # the layer the KL measurement swaps in
    dense = layer.to_dense()  # the factors behind that damage (the bias aside)
    assert torch.allclose(dense, torch.einsum("kac,kbd->abcd", ref.A, ref.B).reshape(m, n), rtol=1e-6, atol=1e-9)
    for r in (1, 3):
        lspec = parse_option(f"lr{r}")
        got, _ = get_method("lowrank").block_damage(fb, lspec)
        lr = whitened_lowrank(W, S, r)
        assert got == pytest.approx(calibration_objective(W, S, lr.U @ lr.V), rel=1e-9)
        layer = get_method("lowrank").layer_from_factors(lin, lspec, [fb])
        assert torch.allclose(layer.to_dense(), lr.U @ lr.V, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("blocks", [1, 3])
def test_kl_candidates_reuse_the_profiled_factors(gpt2, blocks, monkeypatch):
    """The model-level measurement swaps in the layer made from the factors the fast path just found (no second
    data-aware solve): the same KL as building each layer with `method.build(..., "data")`."""
    import kron.methods.kronecker.datainit as kron_datainit
    import kron.methods.lowrank.datainit as lowrank_datainit

    model, stats, held = gpt2
    mx = compressible_matrices(model)[0 if blocks == 3 else 3]
    c = Constraints(ranks=(1, 2), max_shapes=3, shapes_per_level=2, max_compression=12)
    slow = profile_model(model, stats, constraints=c, matrices=[mx], heldout=held, kl_subset=6, fast=False)
    calls = []
    for mod, fn in ((kron_datainit, "data_aware_kronecker"), (lowrank_datainit, "whitened_lowrank")):
        monkeypatch.setattr(mod, fn, lambda *a, _f=fn, **k: calls.append(_f) or pytest.fail(_f))
    fast = profile_model(model, stats, constraints=c, matrices=[mx], heldout=held, kl_subset=6)
    assert not calls
    got = [(x["label"], x["model_damage"]) for x in fast["matrices"][mx.name]["candidates"]]
    want = [(x["label"], x["model_damage"]) for x in slow["matrices"][mx.name]["candidates"]]
    assert sum(d is not None for _, d in got) >= 6 and {x for x, _ in got} >= {"keep"}
    assert {x["method"] for x in fast["matrices"][mx.name]["candidates"] if x["model_damage"]} == {"kronecker",
                                                                                                    "lowrank"}
    for (la, a), (lb, b) in zip(got, want):
        assert la == lb and (a is None) == (b is None)
        if a is not None:
            assert a == pytest.approx(b, rel=1e-3, abs=1e-8), la


def test_refine_improves_a_bad_start_on_the_model_and_keeps_the_budget(gpt2):
    """kron.refine: exchange moves judged by the joint KL of the whole model. Started from a deliberately bad plan
    (every matrix on its cheapest candidate but one kept dense) it must find a plan the joint measure rates better,
    within the budget, and never one it rates worse."""
    from kron.autoplan import Budget, Solution, items_from_profile
    from kron.measure import ModelMeasure  # the measure refine uses
    from kron.refine import refine_plan, staircase

    model, stats, held = gpt2
    prof = profile_model(model, stats, constraints=C, kl_subset=0)
    items, fixed = items_from_profile(prof, "params")
    cheapest = {it.name: min(it.options, key=lambda o: o.cost) for it in items}
    keep_one = items[0].name
    choice = dict(cheapest, **{keep_one: next(o for o in items[0].options if o.spec == "keep")})
    cost = sum(o.cost for o in choice.values())
    budget = Budget.on("params", cost + fixed)
    start = Solution(choice=choice, damage=sum(o.damage for o in choice.values()), cost=cost + fixed,
                     room=cost, bound=0.0, solver="dp")
    params_before = sum(p.numel() for p in model.parameters())
    r = refine_plan(model, stats, prof, budget, start, held, max_evals=25)
    assert sum(p.numel() for p in model.parameters()) == params_before  # the model is given back as it was
    assert 1 <= r.evals <= 25 and r.kl <= r.start_kl and r.solution.cost <= budget.value
    assert r.kl < r.start_kl * 0.999 and r.moves, r.to_dict()
    # what it reports is what the plan measures: build the refined plan and take the KL again
    plan = CompressionPlan.from_resolved(resolved_specs(r.solution))
    m = copy.deepcopy(model)
    rep = apply_specs(m, plan.resolve(m), init="data", calib=stats)
    assert rep.params_after <= budget.value
    measure = ModelMeasure(model, held, 4096)
    measure.model = m.eval()
    assert measure() == pytest.approx(r.kl, rel=1e-4)
    # the staircase: cheapest first, damage strictly falling
    st = staircase(items[1])
    assert all(a.cost < b.cost and a.damage > b.damage for a, b in zip(st, st[1:]))
    from kron.errors import PlanError

    with pytest.raises(PlanError, match="at least one measurement"):
        refine_plan(model, stats, prof, budget, start, held, max_evals=0)


def _three_families():
    from transformers import BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=3, n_head=2, vocab_size=64, n_positions=32,
                                      bos_token_id=0, eos_token_id=0)).eval()
    bert = BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3,
                                                    num_attention_heads=2, intermediate_size=64,
                                                    max_position_embeddings=32, num_labels=3,
                                                    initializer_range=0.3)).eval()
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=32)).eval()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 64, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    return [(gpt2, "transformer.h.2.mlp.c_fc", 2, "transformer.h.0.attn.c_proj", [ids]),
            (bert, "bert.encoder.layer.2.intermediate.dense", 2, "bert.encoder.layer.0.attention.self.query",
             [{"input_ids": ids, "attention_mask": mask}]),
            (llama, "model.layers.1.mlp.up_proj", 1, "model.layers.0.self_attn.o_proj", [ids])]


@pytest.mark.parametrize("family", [0, 1, 2], ids=["gpt2", "bert", "llama"])
def test_model_measure_replays_the_unchanged_layer_prefix(family):
    """The model-level measure told which module changed runs the model from that module's layer on: the same value
    as running every layer, and the layers before it are really not run (a change made to one of them after the
    reference pass goes unseen, which only a replay can do)."""
    from kron.measure import ModelMeasure, swap_module

    model, late, index, early, held = _three_families()[family]
    measure = ModelMeasure(model, held)
    full = ModelMeasure(model, held, replay=False)
    assert measure.layers is not None and full.layers is None
    new = copy.deepcopy(model.get_submodule(late))
    with torch.no_grad():
        new.weight.mul_(0.7)
    old = swap_module(model, late, new)
    try:
        want = full()
        assert want > 1e-6
        assert measure(changed=[late]) == pytest.approx(want, rel=1e-5)
        assert measure.replays == 1
        assert measure.start_layer([late]) == index and measure.start_layer([late, early]) == 0
        assert measure(changed=None) == pytest.approx(want, rel=1e-5)  # unknown: everything runs
        assert measure.replays == 1
        # a change before the replayed layers: seen only when the measure is told about it
        with torch.no_grad():
            model.get_submodule(early).weight.mul_(0.5)
        try:
            assert measure(changed=[late]) == pytest.approx(want, rel=1e-5)
            both = measure(changed=[late, early])
            assert abs(both - want) > 0.01 * want and both == pytest.approx(full(), rel=1e-5)
        finally:
            with torch.no_grad():
                model.get_submodule(early).weight.mul_(2.0)
    finally:
        swap_module(model, late, old)
    # a module outside the layers (the embedding): every layer runs
    emb = "transformer.wte" if family == 0 else "bert.embeddings.word_embeddings" if family == 1 else "model.embed_tokens"
    assert measure.start_layer([emb]) == 0
    assert measure(changed=[late]) == pytest.approx(0.0, abs=1e-6)  # the reference model again
    assert not any("forward" in layer.__dict__ for layer in measure.layers)  # the stubs are gone


def test_model_measure_is_the_mean_next_token_kl(gpt2):
    """The model-level measure of a causal LM is the mean over positions of KL(teacher ‖ student) of the next-token
    distributions, checked against the definition in float64."""
    from kron.measure import ModelMeasure

    model, _, held = gpt2
    student = copy.deepcopy(model)
    measure = ModelMeasure(student, held)  # the reference pass: the teacher's weights
    assert measure() == pytest.approx(0.0, abs=1e-7)
    with torch.no_grad():
        student.transformer.h[1].mlp.c_fc.weight.mul_(-3.0)
        p = torch.log_softmax(model(input_ids=held[0]).logits.double(), -1)
        q = torch.log_softmax(student(input_ids=held[0]).logits.double(), -1)
    want = float((p.exp() * (p - q)).sum(-1).mean())
    assert want > 1e-3 and measure(changed=["transformer.h.1.mlp.c_fc"]) == pytest.approx(want, rel=1e-4)


def test_model_measure_token_budget_cuts_rows():
    """A token budget smaller than a batch keeps that batch's first rows (padding not counted; at least one row, never
    more than the budget); `whole_batches` keeps the older rule."""
    from kron.measure import first_rows

    ids = torch.arange(8 * 16).reshape(8, 16)
    assert first_rows(ids, 32).shape == (2, 16) and first_rows(ids, 40).shape == (2, 16)
    assert first_rows(ids, 5).shape == (1, 16) and first_rows(ids, 10_000) is ids
    mask = torch.zeros(8, 16, dtype=torch.long)
    mask[:, :4] = 1  # 4 real tokens per row
    cut = first_rows({"input_ids": ids, "attention_mask": mask, "labels": ids, "n": 3}, 12)
    assert cut["input_ids"].shape == (3, 16) and cut["attention_mask"].shape == (3, 16)
    assert cut["labels"].shape == (3, 16) and cut["n"] == 3


def test_model_measure_honours_a_budget_below_one_batch(gpt2):
    from kron.measure import ModelMeasure

    model, _, held = gpt2  # one batch of 2 x 16
    assert ModelMeasure(model, held, 16).tokens == 16
    assert ModelMeasure(model, held, 16, whole_batches=True).tokens == 32
    assert ModelMeasure(model, held).tokens == 32


# ----------------------------------------------------------------------------------------------- the word embedding


def test_embedding_candidates_of_a_tied_lm(gpt2, tmp_path):
    """The word embedding as A (v x d/f) ⊗ B (1 x f): data-free init, its weight error as proxy, every factor
    measured at model level (the same number as swapping the built embedding in by hand), and sizes that count the
    dense copy a tied LM head keeps; the proxy/KL correlation stays over the linear matrices only."""
    from kron.methods import get_method
    from kron.methods.base import spec_from_dict
    from kron.measure import ModelMeasure

    model, stats, held = gpt2
    prof = profile_model(model, stats, constraints=C, heldout=held, kl_subset=1, embedding_factors=(2, 3, 4, 8),
                         path=tmp_path / "p.json")
    assert list(prof["matrices"])[0] == "transformer.wte"
    entry = prof["matrices"]["transformer.wte"]
    assert entry["group"] == "embedding" and entry["tied"] and entry["factors"] == [2, 4, 8]  # 3 does not divide 32
    assert [c["label"] for c in entry["candidates"]] == ["keep", "emb f2", "emb f4", "emb f8"]
    E = model.transformer.wte.weight.detach().double()
    measure = ModelMeasure(model, held, 1024)
    for c in entry["candidates"][1:]:
        f = c["spec"]["embedding_factor"]
        assert c["params_excl_output_embedding"] == 64 * 32 // f + f
        assert c["params"] == 64 * 32 // f + f + 64 * 32  # the head keeps the dense table
        layer = get_method("kron_embedding").build(model.transformer.wte, spec_from_dict(c["spec"]), "svd")
        assert c["damage"] == pytest.approx(float((layer.to_dense().detach().double() - E).pow(2).sum() / E.pow(2).sum()))
        assert c["model_damage"] == pytest.approx(measure.with_layers({"transformer.wte": layer.eval()}), rel=1e-5)
        assert c["model_damage"] > 0
    fs = [c["damage"] for c in entry["candidates"][1:]]
    assert fs == sorted(fs)  # a larger factor loses more of the table
    assert prof["correlation"]["pairs"] == 8  # one measured candidate per linear matrix; the embedding left out
    assert model.transformer.wte.weight is model.lm_head.weight  # the model is given back untouched


def test_auto_plan_reaches_further_with_the_embedding(gpt2):
    """A ratio budget no linear-only plan reaches is met by factoring the embedding; the plan builds to the size the
    knapsack counted. On the params axis a tied embedding's factors only add (the head keeps the table)."""
    from kron.errors import PlanError

    model, stats, held = gpt2
    prof = profile_model(model, stats, constraints=C, heldout=held, kl_subset=1, embedding_factors=(2, 4, 8))
    linear_only = profile_model(model, stats, constraints=C, heldout=held, kl_subset=1)
    with pytest.raises(PlanError, match="smallest reachable size is ratio=") as exc:
        auto_plan(linear_only, parse_budget("ratio=4.5"), damage="kl")
    assert "--embedding-factors" in str(exc.value)
    with pytest.raises(PlanError, match="--embedding-factors"):
        auto_plan(prof, parse_budget("ratio=4.5"), damage="kl", embeddings=False)
    sol = auto_plan(prof, parse_budget("ratio=4.5"), damage="kl")
    assert sol.choice["transformer.wte"].spec != "keep"
    plan = CompressionPlan.from_resolved(resolved_specs(sol))
    m = copy.deepcopy(model)
    rep = apply_specs(m, plan.resolve(m), init="data", calib=stats)
    assert rep.compression_ratio >= 4.5 and sol.cost == rep.params_after_excluding_output_embedding
    only_f8 = auto_plan(prof, parse_budget("ratio=4.5"), damage="kl", embeddings=[8])
    assert only_f8.choice["transformer.wte"].label in ("emb f8",)
    on_params = auto_plan(prof, parse_budget(f"params={rep.params_after}"), damage="kl")
    assert on_params.choice["transformer.wte"].spec == "keep"


def test_resume_adds_the_embedding_and_redoes_it_for_other_factors(gpt2, tmp_path):
    model, stats, held = gpt2
    path = tmp_path / "p.json"
    first = profile_model(model, stats, constraints=C, heldout=held, kl_subset=1, path=path)
    assert "transformer.wte" not in first["matrices"]
    calls = []
    second = profile_model(model, stats, constraints=C, heldout=held, kl_subset=1, path=path,
                           embedding_factors=(2, 4), progress=lambda d, t, n: calls.append(n))
    assert second["matrices"]["transformer.wte"]["factors"] == [2, 4]
    for name, entry in first["matrices"].items():  # resumed, not recomputed
        assert second["matrices"][name] == json.loads(json.dumps(entry))
    third = profile_model(model, stats, constraints=C, heldout=held, kl_subset=1, path=path, embedding_factors=(8,))
    assert third["matrices"]["transformer.wte"]["factors"] == [8]
    from kron.errors import PlanError

    with pytest.raises(PlanError, match="divides the width 32"):
        profile_model(model, stats, constraints=C, kl_subset=0, embedding_factors=(3, 5))


def test_embedding_of_an_untied_classifier_and_refine_with_it():
    """BERT's word embedding: no tied head, so its factors count alone on every axis; plan --auto --refine builds
    an embedding option data-free, and what it reports is what the built plan measures."""
    from transformers import BertForSequenceClassification

    from kron.autoplan import Budget, Solution, items_from_profile
    from kron.measure import ModelMeasure
    from kron.refine import refine_plan

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                     vocab_size=200, max_position_embeddings=32, num_labels=3)
    model = BertForSequenceClassification(cfg).eval()
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 200, (4, 12), generator=g),
                "attention_mask": torch.ones(4, 12, dtype=torch.long)} for _ in range(2)]
    stats = collect_input_stats(model, batches)
    prof = profile_model(model, stats, constraints=C, heldout=batches[:1], kl_subset=1, embedding_factors=(2, 4))
    entry = prof["matrices"]["bert.embeddings.word_embeddings"]
    assert not entry["tied"]
    assert all(c["params"] == c["params_excl_output_embedding"] for c in entry["candidates"])
    items, fixed = items_from_profile(prof, "params")
    cheapest = {it.name: min(it.options, key=lambda o: o.cost) for it in items}
    assert cheapest["bert.embeddings.word_embeddings"].label == "emb f4"
    cost = sum(o.cost for o in cheapest.values())
    start = Solution(choice=cheapest, damage=0.0, cost=cost + fixed, room=cost, bound=0.0, solver="dp")
    budget = Budget.on("params", cost + fixed + 2000)
    r = refine_plan(model, stats, prof, budget, start, batches[:1], max_evals=6)
    plan = CompressionPlan.from_resolved(resolved_specs(r.solution))
    m = copy.deepcopy(model)
    rep = apply_specs(m, plan.resolve(m), init="data", calib=stats)
    assert rep.params_after <= budget.value and rep.params_after == r.solution.cost
    measure = ModelMeasure(model, batches[:1], 4096)
    measure.model = m.eval()
    assert measure() == pytest.approx(r.kl, rel=1e-4)


def test_a_profile_of_other_weights_is_refused_for_a_model_built_without_them(tmp_path):
    """`plan --auto --profile` builds the model on the meta device, so the weights fingerprint was never compared and a
    profile of the same config but other weights was accepted; the fingerprint is now read from the folder's
    model.safetensors (4 tensors) and equals the loaded model's."""
    from kron.models import build_from_config
    from kron.profile import model_identity

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=16)
    model = GPT2LMHeadModel(cfg)
    model.save_pretrained(tmp_path / "m")
    loaded = model_identity(model, "m")
    skeleton = build_from_config(cfg, device="meta")
    assert model_identity(skeleton, "m")["fingerprint"] is None  # no weights, nowhere to read them
    assert model_identity(skeleton, "m", weights_dir=tmp_path / "m") == loaded
    profile = {"format": "kronsearch.profile/2", "model": loaded}
    check_header(profile, {"model": model_identity(skeleton, "m", weights_dir=tmp_path / "m")})
    with torch.no_grad():
        model.transformer.wte.weight.add_(1.0)  # retrained: same config, other weights
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(DataError, match="model.fingerprint"):
        check_header(profile, {"model": model_identity(skeleton, "m", weights_dir=tmp_path / "m")})


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(damage=-85.0), "damage must be a finite number >= 0, got -85.0"),
    (lambda c: c.update(model_damage=float("nan")), "model_damage must be a finite number >= 0"),
    (lambda c: c.update(params="12"), "params must be a whole number >= 0, got '12'"),
    (lambda c: c.update(params=-5), "params must be a whole number >= 0, got -5"),
    (lambda c: c.update(method="spiral"), "unknown compression method 'spiral'"),
])
def test_a_damaged_profile_is_refused_naming_the_candidate(tmp_path, edit, message):
    """Negative damages (a plan with 'predicted damage -85'), string or negative counts, unknown methods: each a
    DataError naming the matrix and the candidate, not a plan built from them."""
    from pathlib import Path

    from kron.profile import load_profile

    src = Path(__file__).resolve().parents[1] / "fixtures" / "v0_2" / "profile" / "profile.json"
    data = json.loads(src.read_text())
    name = next(n for n, m in data["matrices"].items() if m.get("group") != "embedding")
    edit(data["matrices"][name]["candidates"][1])
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(DataError, match=rf"matrix {name}, candidate .*{message.replace('(', '[(]')}"):
        load_profile(bad)
    data["matrices"][name]["candidates"] = []
    bad.write_text(json.dumps(data))
    with pytest.raises(DataError, match=f"matrix {name}: no candidates"):
        load_profile(bad)
