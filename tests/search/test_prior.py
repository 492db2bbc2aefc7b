"""The teacher's sensitivity in a search: damages of the space's own options, the prior that drops hopeless ones,
automatic seed plans, and the defaults of this release (both methods, data-aware init) with old searches resumed
as they ran."""
from __future__ import annotations

import json

import pytest

from kron.errors import ConfigError
from search.config import load_search_config
from search.prior import auto_count, auto_seeds, choice_damage, pruned_options
from search.prepare import prepared_space
from search.space import SearchSpace

from .test_search_space import meta_model


def _cfg(tmp_path, **over):
    data = {
        "name": "prior",
        "trial": {"teacher": "demo", "device": "cpu",
                  "data": {"source": "teacher-samples", "seq_len": 32, "num_samples": 16, "val_blocks": 2, "top_k": 0},
                  "stage1": {"max_steps": 4, "eval_every": 2, "batch_size": 2, "eval_batches": 1}},
        "space": {"groups": ["attention", "attention_output", "ffn_in", "ffn_out"], "layers": "free",
                  "min_compression": 2, "max_compression": 64, "max_aspect": 16, "max_shapes": 4},
        "search": {"num_samples": 4, "storage": str(tmp_path / "runs"), "asha": None},
    }
    for key, value in over.items():
        node = data
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return load_search_config(data)


@pytest.fixture(scope="module")
def demo_space(tmp_path_factory):
    """The demo teacher's space with its damages (calibration on 512 sampled tokens, cached under tmp)."""
    tmp = tmp_path_factory.mktemp("prior")
    mp = pytest.MonkeyPatch()
    mp.setenv("KRONSEARCH_CACHE", str(tmp / "cache"))
    try:
        text = tmp / "calib.txt"  # a small local corpus: faster than sampling the teacher
        words = ("the model of a river is not the river but a map that the search reads in one pass and then "
                 "compresses into factors whose error it measures on held out tokens").split()
        text.write_text("\n".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(40)) for i in range(60)))
        cfg = _cfg(tmp, **{"trial.init": {"method": "data", "calib": str(text), "calib_tokens": 512},
                           "space.groups": ["attention_output", "ffn_in"], "space.max_shapes": 3})
        space = prepared_space(cfg)
        from search.prior import search_damages

        damages = search_damages(cfg, space)
        yield cfg, space, damages, tmp
    finally:
        mp.undo()


def test_defaults_are_both_methods_and_the_data_aware_init(tmp_path):
    cfg = _cfg(tmp_path)
    assert cfg.space.method_names() == ["kronecker", "lowrank"]
    assert cfg.trial.init_config.method == "data"
    assert "init" not in cfg.trial_section  # the section stays as written; the default is applied to trials
    assert _cfg(tmp_path, **{"trial.init": "svd"}).trial.init_config.method == "svd"


def test_damages_cover_every_linear_option_and_keep_is_free(demo_space):
    cfg, space, damages, _ = demo_space
    for c in space.choices:
        for mx in c.matrices:
            assert set(damages[mx.name]) == {o for o in c.options if o != "keep"}
            assert all(0 <= d < 10 for d in damages[mx.name].values())
        assert choice_damage(c, "keep", damages) == 0.0
    # on a given matrix, a low-rank option of higher rank never does worse (nested whitened truncations)
    c = space.choices[0]
    ranks = sorted((int(o[2:]), damages[c.matrices[0].name][o]) for o in c.options if o.startswith("lr"))
    assert len(ranks) >= 2 and all(a[1] >= b[1] - 1e-9 for a, b in zip(ranks, ranks[1:]))


def test_damages_are_cached_on_disk(demo_space, monkeypatch):
    cfg, space, damages, tmp = demo_space
    files = list((tmp / "cache" / "damages").glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["damages"] == damages
    import kron.damage

    monkeypatch.setenv("KRONSEARCH_CACHE", str(tmp / "cache"))
    monkeypatch.setattr(kron.damage, "option_damages", lambda *a, **k: pytest.fail("recomputed"))
    from search.prior import search_damages

    assert search_damages(cfg, space) == damages


def test_the_prior_drops_options_above_the_threshold_but_never_a_whole_choice(demo_space):
    _, space, damages, _ = demo_space
    everything = pruned_options(space, damages, 1e9)
    assert everything == {}
    nothing = pruned_options(space, damages, 1e-12)  # every option too damaging: the best of each choice stays
    for c in space.choices:
        kept = [o for o in c.options if o not in nothing.get(c.key, [])]
        assert len(kept) == 1 and kept[0] == min(c.options, key=lambda o: choice_damage(c, o, damages))
    mid = sorted(d for v in damages.values() for d in v.values())[len(damages) * 3]
    pruned = space.with_damages(damages)  # no prior configured: nothing dropped
    assert [c.options for c in pruned.choices] == [c.options for c in space.choices]
    from search.config import SpaceConfig

    cfg2 = SpaceConfig.model_validate({**space.config.model_dump(), "prior": {"max_damage": mid}})
    with_prior = SearchSpace(cfg2, space.info).with_damages(damages)
    for c in with_prior.choices:
        scores = [choice_damage(c, o, damages) for o in c.options]
        assert len(c.options) >= 1
        if len(c.options) > 1:
            assert max(scores) <= mid
    assert sum(len(c.options) for c in with_prior.choices) < sum(len(c.options) for c in space.choices)


def test_auto_seeds_spread_over_the_size_range_and_minimise_damage(demo_space):
    _, space, damages, _ = demo_space
    seeds = auto_seeds(space, damages, 3, "params")
    assert len(seeds) == 3
    sizes = []
    spaced = space.with_damages(damages).with_seeds(["auto"], None, metric="params")
    assert [label for label, _ in spaced.seeds] == [label for label, _, _ in seeds]
    for label, params in spaced.seeds:
        assert label.startswith("seed:auto@")
        sizes.append(spaced.plan_costs(params)["params"])
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1] < space.info.params
    # each seed is at least as good (summed damage) as any uniform choice of a single option level at its size
    for (label, options, _), size in zip(seeds, sizes):
        total = sum(damages[m][o] for m, o in options.items())
        for c in space.choices:
            assert all(choice_damage(c, o, damages) is not None for o in c.options)
        worst_case = sum(max(damages[mx.name].values()) for c in space.choices for mx in c.matrices)
        assert total < worst_case
    assert auto_count("auto") == 3 and auto_count("auto:5") == 5 and auto_count("kngpt2") is None
    with pytest.raises(ConfigError, match="between 1 and 20"):
        auto_count("auto:0")


def test_auto_seeds_by_bytes_use_int8_where_it_is_nearly_free(demo_space, monkeypatch):
    """With quantize: [none, int8] and bytes as the size objective, the automatic plans are spread over the space's
    byte range and the knapsack takes int8 (4x fewer bytes for a damage orders of magnitude below any structure's)."""
    cfg, _, _, tmp = demo_space
    monkeypatch.setenv("KRONSEARCH_CACHE", str(tmp / "cache"))
    from search.prior import search_damages

    cfg = _cfg(tmp, **{"trial.init": cfg.trial.init_config.model_dump(), "space.groups": ["attention_output", "ffn_in"],
                       "space.max_shapes": 3, "space.quantize": ["none", "int8"],
                       "search.objectives": ["quality", "bytes"]})
    assert cfg.size_metric == "bytes"
    space = prepared_space(cfg)
    damages = search_damages(cfg, space)
    int8_options = [o for opts in damages.values() for o in opts if o.endswith("int8")]
    assert int8_options and all(damages[m][o] >= 0 for m in damages for o in damages[m])
    spaced = space.with_damages(damages).with_seeds(["auto"], None, metric="bytes")
    sizes = [spaced.plan_costs(params)["bytes"] for _, params in spaced.seeds]
    assert len(sizes) == 3 and sizes == sorted(sizes) and sizes[-1] < space.info.bytes
    assert any(str(o).endswith("int8") for _, params in spaced.seeds for o in params.values())


def test_auto_seeds_need_the_calibration_data_before_ray_starts(tmp_path, monkeypatch):
    monkeypatch.setenv("KRONSEARCH_CACHE", str(tmp_path / "cache"))
    missing = tmp_path / "nowhere.txt"
    cfg = _cfg(tmp_path, **{"search.seed_plans": ["auto"], "trial.init": {"method": "data", "calib": str(missing)}})
    with pytest.raises(ConfigError, match="needs calibration data from .*nowhere.txt"):
        prepared_space(cfg)
    space = SearchSpace.from_model(meta_model("gpt2"), {"groups": ["ffn_in"], "layers": "all"})
    with pytest.raises(ConfigError, match="needs the teacher's calibration statistics"):
        space.with_seeds(["auto"], meta_model("gpt2"))
    counted = SearchSpace.from_model(meta_model("gpt2"), {"groups": ["ffn_in"], "layers": {"count": 2}})
    with pytest.raises(ConfigError, match="layers are all, free or a fixed list"):
        auto_seeds(counted, {}, 2, "params")


def test_a_glue_only_trial_calibrates_on_its_task_sentences(tmp_path):
    from trials.calibration import default_calib_source
    from trials.config import TrialConfig

    cfg = TrialConfig.model_validate({"teacher": "config:bert", "plan": {"preset": "uniform:2"}, "stage1": None,
                                      "glue": {"task": "sst2", "source": str(tmp_path), "max_len": 48},
                                      "stage2": {"max_steps": 2}})
    assert default_calib_source(cfg) == (f"glue:sst2:{tmp_path}", 48)
    lm = TrialConfig.model_validate({"teacher": "demo", "plan": {"preset": "uniform:2"}})
    assert default_calib_source(lm) == ("teacher-samples", lm.data.seq_len)


def test_a_search_started_by_the_first_release_resumes_with_its_defaults(tmp_path, capsys, monkeypatch):
    from search.config import config_fingerprint
    from search.resume import _check_fingerprint, adopt_saved_defaults

    # as while the demo teacher it distilled (release 1) was bundled: a search of release 1 is refused under
    # release 2 (test_seed_evolution); the defaults it ran with are what this test is about
    monkeypatch.setattr("search.config.DEMO_TEACHER_RELEASE", 1)

    cfg = _cfg(tmp_path)
    folder = tmp_path / "runs" / "prior"
    folder.mkdir(parents=True)
    old_space = {k: v for k, v in cfg.space.model_dump(mode="json").items()
                 if k not in ("methods", "prior", "quantize")}  # 0.1.0 wrote neither key
    old_fp = {"trial": cfg.trial_section, "space": old_space}
    (folder / "search_meta.json").write_text(json.dumps({"fingerprint": old_fp}))

    adopted = adopt_saved_defaults(cfg)
    assert adopted.space.method_names() == ["kronecker"] and adopted.trial.init_config.method == "svd"
    assert "earlier release" in capsys.readouterr().err
    _check_fingerprint(adopted, lambda: json.dumps({"fingerprint": old_fp}).encode(), "meta")  # matches
    # under the new defaults the same config would run differently: refused, naming the old defaults
    with pytest.raises(ConfigError, match=r"defaults were space.methods \['kronecker'\] and trial.init 'svd'"):
        _check_fingerprint(cfg, lambda: json.dumps({"fingerprint": old_fp}).encode(), "meta")
    # what the user set explicitly is kept (and then checked against what the search ran with)
    mine = _cfg(tmp_path, **{"space.methods": ["lowrank"]})
    assert adopt_saved_defaults(mine).space.method_names() == ["lowrank"]
    # a search this release started is left alone
    (folder / "search_meta.json").write_text(json.dumps({"fingerprint": config_fingerprint(cfg)}))
    assert adopt_saved_defaults(cfg) is cfg


def test_automatic_seeds_minimise_the_measured_kl_by_default(demo_space, monkeypatch):
    """search.seed_damage: kl (the default): the seeds' damages are the teacher's KL with each matrix compressed
    alone — measured for 4 options per matrix, interpolated for the others — cached beside the proxy damages;
    seed_damage: proxy keeps the relative output errors."""
    import torch

    from kron.calibration import ModuleStats
    from kron.methods import get_method
    from kron.measure import ModelMeasure, swap_module
    from search.prior import KL_POINTS, _specs
    from trials.calibration import calibration_for, heldout_for
    from trials.inputs import load_teacher

    cfg, _, damages, tmp = demo_space
    monkeypatch.setenv("KRONSEARCH_CACHE", str(tmp / "cache"))
    base = {"trial.init": cfg.trial.init_config.model_dump(), "space.groups": ["attention_output", "ffn_in"],
            "space.max_shapes": 3, "search.seed_plans": ["auto"]}
    kl_cfg = _cfg(tmp, **base)
    assert kl_cfg.search.seed_damage == "kl"
    space = prepared_space(kl_cfg)
    kl = space.seed_damages
    assert kl is not None and set(kl) == set(damages)
    assert all(set(kl[m]) == set(damages[m]) and all(v >= 0 for v in kl[m].values()) for m in kl)
    # a measured option's value is the KL of the model with that matrix alone compressed, taken again here
    teacher, tok = load_teacher(kl_cfg.trial, "cpu")
    teacher.eval()
    name = next(iter(kl))
    opts = dict(_specs(space)[name])
    worst = max(damages[name], key=damages[name].get)  # the ends of the proxy range are always measured
    st = calibration_for(kl_cfg.trial, teacher, tok).stats(name)
    layer = get_method(opts[worst].method).build(teacher.get_submodule(name), opts[worst], "data",
                                                 stats=ModuleStats(S=st.S, tokens=st.tokens)).eval()
    measure = ModelMeasure(teacher, heldout_for(kl_cfg.trial, teacher, tok), 1024)
    old = swap_module(teacher, name, layer)
    try:  # the teacher is the process's cached one (trials.inputs.load_teacher): later tests must find it whole
        with torch.no_grad():
            assert kl[name][worst] == pytest.approx(measure(), rel=1e-4)
    finally:
        swap_module(teacher, name, old)
    assert KL_POINTS == 4 and len(list((tmp / "cache" / "damages").glob("kl-*.json"))) == 1
    # the seeds are planned on these values; cached: a second space measures nothing
    import kron.measure

    monkeypatch.setattr(kron.measure, "ModelMeasure", lambda *a, **k: pytest.fail("measured again"))
    again = prepared_space(kl_cfg)
    assert again.seed_damages == kl and again.seeds == space.seeds and len(space.seeds) >= 2
    proxy = prepared_space(_cfg(tmp, **base, **{"search.seed_damage": "proxy"}))
    assert proxy.seed_damages is None and proxy.seeds
    with pytest.raises(Exception, match="seed_damage"):
        _cfg(tmp, **{"search.seed_damage": "mse"})


def test_a_search_with_automatic_seeds_from_the_last_release_resumes_with_proxy_seeds(tmp_path, capsys):
    from search.config import config_fingerprint
    from search.resume import _check_fingerprint, adopt_saved_defaults

    cfg = _cfg(tmp_path, **{"search.seed_plans": ["auto", "lowrank:2"]})
    folder = tmp_path / "runs" / "prior"
    folder.mkdir(parents=True)
    fp = config_fingerprint(cfg)
    assert fp["seed_damage"] == "kl"
    old_fp = {k: v for k, v in fp.items() if k not in ("seed_damage", "seed_embedding")}  # written before both
    (folder / "search_meta.json").write_text(json.dumps({"fingerprint": old_fp}))
    adopted = adopt_saved_defaults(cfg)
    assert adopted.search.seed_damage == "proxy" and "search.seed_damage 'proxy'" in capsys.readouterr().err
    _check_fingerprint(adopted, lambda: json.dumps({"fingerprint": old_fp}).encode(), "meta")  # matches
    with pytest.raises(ConfigError, match="defaults were search.seed_damage 'proxy'"):
        _check_fingerprint(cfg, lambda: json.dumps({"fingerprint": old_fp}).encode(), "meta")
    # set explicitly: kept, and then refused as a change
    mine = _cfg(tmp_path, **{"search.seed_plans": ["auto", "lowrank:2"], "search.seed_damage": "kl"})
    assert adopt_saved_defaults(mine).search.seed_damage == "kl"
    # without automatic seeds nothing is recorded or adopted
    plain = _cfg(tmp_path, **{"search.seed_plans": ["lowrank:2"]})
    assert "seed_damage" not in config_fingerprint(plain)
    (folder / "search_meta.json").write_text(json.dumps({"fingerprint": config_fingerprint(plain)}))
    assert adopt_saved_defaults(plain) is plain


def test_kl_seeds_measure_every_embedding_factor_and_may_factor_the_embedding(demo_space, monkeypatch):
    """search.seed_embedding (default true with KL seeds): the KL of the teacher with its embedding alone factored
    is measured for every embedding option (data-free init, as trials build it; the tied LM head keeps the dense
    table), and the knapsack plans the embedding like any matrix: on the axis that counts the factored table
    (parameters excluding the output embedding) the cheapest seed factors it. seed_embedding: false keeps the last
    release's seeds (embedding on its mildest option)."""
    import torch

    from kron.methods import get_method, parse_option
    from kron.measure import ModelMeasure, swap_module
    from trials.calibration import heldout_for
    from trials.inputs import load_teacher

    cfg, _, _, tmp = demo_space
    monkeypatch.setenv("KRONSEARCH_CACHE", str(tmp / "cache"))
    base = {"trial.init": cfg.trial.init_config.model_dump(), "space.groups": ["embedding", "ffn_in"],
            "space.max_shapes": 3, "search.seed_plans": ["auto"],
            "search.objectives": ["quality", "params_excl_output_embedding"]}
    kl_cfg = _cfg(tmp, **base)
    assert kl_cfg.search.seed_embedding is True
    space = prepared_space(kl_cfg)
    emb = next(c for c in space.choices if any(mx.kind == "embedding" for mx in c.matrices))
    name = emb.matrices[0].name
    measured = space.seed_damages[name]
    assert set(measured) == {o for o in emb.options if o != "keep"} and len(measured) >= 2
    # each is the KL of the model with that factor, taken again here
    teacher, tok = load_teacher(kl_cfg.trial, "cpu")
    teacher.eval()
    strongest = max(measured, key=lambda o: int(o[1:]))
    layer = get_method("kron_embedding").build(teacher.get_submodule(name), parse_option(strongest), "svd").eval()
    measure = ModelMeasure(teacher, heldout_for(kl_cfg.trial, teacher, tok), 1024, replay=False)
    old = swap_module(teacher, name, layer)
    try:  # the process's cached teacher: put its embedding back for the tests after this one
        with torch.no_grad():
            assert measured[strongest] == pytest.approx(measure(), rel=1e-4) and measured[strongest] > 0
    finally:
        swap_module(teacher, name, old)
    cheapest = min(space.seeds, key=lambda s: space.plan_costs(s[1])["params_excl_output_embedding"])
    assert cheapest[1][emb.key] != "keep" and cheapest[1][emb.key] != min(measured, key=lambda o: int(o[1:]))
    # seed_embedding false: nothing measured for the embedding, every seed on its mildest option or keep
    legacy = prepared_space(_cfg(tmp, **base, **{"search.seed_embedding": False}))
    assert name not in legacy.seed_damages
    assert {p[emb.key] for _, p in legacy.seeds} <= {"keep", emb.options[0]}


def test_a_search_with_kl_seeds_from_the_last_release_resumes_with_its_embedding_kept(tmp_path, capsys):
    """The last release's KL seeds never factored the embedding: its searches resume with seed_embedding false
    (adopted, said), and a config that insists on the new default is refused naming it."""
    from search.config import config_fingerprint
    from search.resume import _check_fingerprint, adopt_saved_defaults

    cfg = _cfg(tmp_path, **{"search.seed_plans": ["auto"]})
    fp = config_fingerprint(cfg)
    assert fp["seed_damage"] == "kl" and fp["seed_embedding"] is True
    old_fp = {k: v for k, v in fp.items() if k != "seed_embedding"}
    folder = tmp_path / "runs" / "prior"
    folder.mkdir(parents=True)
    (folder / "search_meta.json").write_text(json.dumps({"fingerprint": old_fp}))
    adopted = adopt_saved_defaults(cfg)
    assert adopted.search.seed_embedding is False and "search.seed_embedding false" in capsys.readouterr().err
    _check_fingerprint(adopted, lambda: json.dumps({"fingerprint": old_fp}).encode(), "meta")  # matches
    with pytest.raises(ConfigError, match="defaults were search.seed_embedding false"):
        _check_fingerprint(cfg, lambda: json.dumps({"fingerprint": old_fp}).encode(), "meta")
    # proxy seeds never measured the embedding: nothing recorded, nothing adopted
    proxy = _cfg(tmp_path, **{"search.seed_plans": ["auto"], "search.seed_damage": "proxy"})
    assert "seed_embedding" not in config_fingerprint(proxy)


def test_auto_at_a_size_or_at_a_presets_size(demo_space, tmp_path):
    """`auto@3.5M` is one automatic plan at that size; `auto@lowrank:2` one at the preset's size on the search's
    size axis, never above it. Bad targets are errors naming the seed."""
    from kron.autoplan import parse_number
    from search.prior import auto_target

    from search.config import base_trial_config
    from search.model_info import teacher_skeleton

    cfg, space, damages, _ = demo_space
    spaced = space.with_damages(damages)
    teacher = teacher_skeleton(base_trial_config(cfg))
    plan = tmp_path / "lr.yaml"  # a hand-made low-rank plan of the searched groups
    plan.write_text("rules:\n  - {select: attn.c_proj, lowrank_rank: 64}\n  - {select: mlp.c_fc, lowrank_rank: 64}\n")
    assert parse_number("3.5M") == 3.5e6 and parse_number("250k") == 250e3 and parse_number("lowrank:2") is None
    assert auto_target("auto@lowrank:2") == "lowrank:2" and auto_target("auto") is None
    ref = spaced.with_seeds([str(plan)], teacher, metric="params")
    (_, ref_params), = ref.seeds
    ref_size = ref.plan_costs(ref_params)["params"]
    both = spaced.with_seeds([str(plan), f"auto@{plan}", f"auto@{ref_size / 1e6:.4f}M"], teacher, metric="params")
    labels = [label for label, _ in both.seeds]
    assert labels == [f"seed:{plan}", f"seed:auto@{plan}", f"seed:auto@{ref_size / 1e6:.4f}M"]
    sizes = [both.plan_costs(p)["params"] for _, p in both.seeds]
    assert sizes[1] <= ref_size and sizes[1] > 0.95 * ref_size  # fills the preset's size, not far below it
    assert both.seeds[1][1] == both.seeds[2][1] or abs(sizes[2] - sizes[1]) < 0.001 * ref_size

    # on another size axis the target is the preset's size on that axis
    macs = spaced.with_seeds([str(plan), f"auto@{plan}"], teacher, metric="macs_per_token")
    (_, p_ref), (_, p_auto) = macs.seeds
    assert macs.plan_costs(p_auto)["macs_per_token"] <= macs.plan_costs(p_ref)["macs_per_token"]
    for name, message in [("auto@10k", "smallest plan has"), ("auto@nonsense:3", "neither a size"),
                          ("auto@", "give a size"), ("auto@lowrank:2", "neither a size")]:
        with pytest.raises(ConfigError, match=message):
            spaced.with_seeds([name], teacher, metric="params")
