"""Automatic seeds evolved on the model before a search (`search.seed_evolve`, `search.seed_evolution`): the
config switch and its checks, the evolved seeds' KL against the knapsack's (measured on the model the way trials
build it), the cache that gives a resumed search the same seeds."""
from __future__ import annotations

import json

import pytest
import torch

from kron.errors import ConfigError
from search.prepare import prepared_space

from .test_prior import _cfg

SEED_EVOLVE = {"generations": 3, "offspring": 4, "tokens": [64, 256]}


@pytest.fixture(scope="module")
def evo_setup(tmp_path_factory):
    """The demo teacher's space with automatic seeds, calibrated on a small local corpus (cached under tmp)."""
    tmp = tmp_path_factory.mktemp("seedevo")
    mp = pytest.MonkeyPatch()
    mp.setenv("KRONSEARCH_CACHE", str(tmp / "cache"))
    try:
        text = tmp / "calib.txt"
        words = ("a river is not its map but the map is what the search reads once and then compresses into "
                 "factors whose error it measures on tokens held out of the fit").split()
        text.write_text("\n".join(" ".join(words[(i * 5 + j) % len(words)] for j in range(40)) for i in range(80)))
        base = {"trial.init": {"method": "data", "calib": str(text), "calib_tokens": 1024},
                "space.groups": ["attention_output", "ffn_in"], "space.max_shapes": 3, "search.seed_damage": "proxy",
                "search.seed_plans": ["auto:1"]}
        yield base, tmp, mp
    finally:
        mp.undo()


def _kl_of_seed(cfg, space, params) -> float:
    """KL(teacher ‖ the seed's model) on the held-out calibration batches, the model compressed as a trial builds
    it (the space's plan rules, data-aware init): independent of the evolution's own measure."""
    import torch.nn.functional as F

    from kron.measure import _model_inputs
    from kron.plan import CompressionPlan
    from kron.surgery import compress
    from trials.calibration import calibration_for, heldout_for
    from trials.inputs import load_teacher

    teacher, tok = load_teacher(cfg.trial, "cpu")
    teacher.eval()
    stats = calibration_for(cfg.trial, teacher, tok)
    plan = CompressionPlan.from_dict({"rules": space.to_plan_rules(params)})
    student = compress(teacher, plan, init="data", calib=stats, inplace=False).model.eval()
    num = den = 0.0
    with torch.no_grad():
        for b in heldout_for(cfg.trial, teacher, tok):
            kw, _ = _model_inputs(b, "cpu")
            ref = torch.log_softmax(teacher(**kw).logits.float(), -1)
            kl = F.kl_div(torch.log_softmax(student(**kw).logits.float(), -1), ref, reduction="none",
                          log_target=True).sum(-1)
            num, den = num + float(kl.sum()), den + kl.numel()
    return num / den


def test_seed_evolve_needs_automatic_seeds_and_takes_true_for_the_defaults(tmp_path):
    cfg = _cfg(tmp_path, **{"search.seed_plans": ["auto"], "search.seed_evolve": True})
    assert cfg.search.seed_evolve.generations == 20 and cfg.search.seed_evolve.tokens == [512, 4096]
    assert _cfg(tmp_path, **{"search.seed_plans": ["auto"], "search.seed_evolve": False}).search.seed_evolve is None
    for bad, word in (({"search.seed_plans": ["lowrank:2"], "search.seed_evolve": True}, "automatic seed plans"),
                      ({"search.seed_plans": ["auto"], "search.seed_evolve": {"generations": 0}}, "generations"),
                      ({"search.seed_plans": ["auto"], "search.seed_evolve": {"tokens": [512, 256]}}, "increasing"),
                      ({"search.seed_plans": ["auto"], "search.seed_evolve": {"rounds": 3}}, "rounds")):
        with pytest.raises(ConfigError, match=word):
            _cfg(tmp_path, **bad)


def test_seed_evolve_is_in_the_fingerprint_only_when_set(tmp_path):
    """A search written before seed_evolve existed (no key) resumes unchanged; changing it is named."""
    from search.config import config_fingerprint
    from search.resume import _check_fingerprint

    plain = _cfg(tmp_path, **{"search.seed_plans": ["auto"]})
    assert "seed_evolve" not in config_fingerprint(plain)
    evolved = _cfg(tmp_path, **{"search.seed_plans": ["auto"], "search.seed_evolve": {"generations": 5}})
    assert config_fingerprint(evolved)["seed_evolve"]["generations"] == 5
    meta = json.dumps({"fingerprint": config_fingerprint(plain)}).encode()
    _check_fingerprint(plain, lambda: meta, "meta")  # unchanged: no error
    with pytest.raises(ConfigError, match="search.seed_evolve"):
        _check_fingerprint(evolved, lambda: meta, "meta")


def test_evolved_seeds_have_a_lower_kl_than_the_knapsacks_and_are_cached(evo_setup, monkeypatch):
    base, tmp, _ = evo_setup
    monkeypatch.setenv("KRONSEARCH_CACHE", str(tmp / "cache"))
    plain_cfg = _cfg(tmp, **base)
    evo_cfg = _cfg(tmp, **base, **{"search.seed_evolve": SEED_EVOLVE})
    plain = prepared_space(plain_cfg)
    evolved = prepared_space(evo_cfg)
    assert [label for label, _ in plain.seeds] and len(evolved.seeds) == len(plain.seeds)
    assert all(label.endswith("+evo") for label, _ in evolved.seeds)
    saved = sorted((tmp / "cache" / "damages").glob("evo-seed-*.json"))
    saved = [json.loads(p.read_text()) for p in saved if not p.name.endswith(".state.json")]
    assert len(saved) == len(plain.seeds) and not list((tmp / "cache" / "damages").glob("*.state.json"))
    for (label, p_plain), (_, p_evo) in zip(plain.seeds, evolved.seeds):
        assert not evolved.over_budget(p_evo)
        kl_plain, kl_evo = _kl_of_seed(plain_cfg, plain, p_plain), _kl_of_seed(evo_cfg, evolved, p_evo)
        assert kl_evo <= kl_plain * (1 + 1e-4), label
        # the evolution's measure is the model's KL as a trial builds the plan (the start's and the end's)
        rec = next(s for s in saved if s["kl"] == pytest.approx(kl_evo, rel=1e-3))
        assert rec["start_kl"] == pytest.approx(kl_plain, rel=1e-3)
        assert rec["evolution"]["generations"] == SEED_EVOLVE["generations"]
    # cached: preparing again evolves nothing and gives the same seeds (a resumed search starts from them)
    import kron.evo

    monkeypatch.setattr(kron.evo, "evolve_choice", lambda *a, **k: pytest.fail("evolved again"))
    assert prepared_space(evo_cfg).seeds == evolved.seeds


def test_a_search_of_another_demo_teacher_release_is_not_resumed(tmp_path, monkeypatch):
    """Release 1 of the bundled teacher was never recorded: a search of it (no key) resumes only while release 1 is
    bundled, and is refused, naming both releases, under release 2; a search of release 2 resumes; a search of a
    user's teacher records no release."""
    import search.config as sc
    from kron.vocab import DEMO_TEACHER_RELEASE
    from search.config import config_fingerprint
    from search.resume import _check_fingerprint

    assert DEMO_TEACHER_RELEASE == 2  # the bundled one (kron/demo_teacher/MODEL_CARD.md)
    cfg = _cfg(tmp_path, **{"search.seed_plans": ["auto"]})
    now = config_fingerprint(cfg)
    assert now["demo_teacher_release"] == 2
    _check_fingerprint(cfg, lambda: json.dumps({"fingerprint": now}).encode(), "meta")  # release 2: resumes
    release1 = json.dumps({"fingerprint": {k: v for k, v in now.items() if k != "demo_teacher_release"}}).encode()
    with pytest.raises(ConfigError, match="release 1 of the bundled demo teacher; this kronsearch bundles release 2"):
        _check_fingerprint(cfg, lambda: release1, "meta")
    monkeypatch.setattr(sc, "DEMO_TEACHER_RELEASE", 1)  # as the last release bundled it: the same search resumes
    assert "demo_teacher_release" not in config_fingerprint(cfg)
    _check_fingerprint(cfg, lambda: release1, "meta")
    mine = _cfg(tmp_path, **{"trial.teacher": "config:gpt2"})
    assert "demo_teacher_release" not in config_fingerprint(mine)
