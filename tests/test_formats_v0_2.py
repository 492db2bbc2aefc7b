"""Saved things are promises: what kronsearch wrote after 0.1.0 — int8 and pruned model folders, plans stacking int8
on a structure, sensitivity profiles, a mixed trial, a search with seed plans and an Optuna journal — must keep
loading and mean the same.

The fixtures under tests/fixtures/v0_2/ are frozen outputs of the code at commit 5d69f4f (the last landing before
the redesign of issue 28), written by tests/fixtures/make_v0_2_fixtures.py; EXPECTED.json holds what that code
returned for them. Never regenerate them with newer code. The helpers (comparisons, CLI capture, Ray) are those of
the 0.1.0 fixtures' tests (tests/test_legacy_formats.py).
"""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("_legacy_formats", Path(__file__).with_name("test_legacy_formats.py"))
_legacy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_legacy)
_same, _rows, _digests, _run_cli, _by_trial = _legacy._same, _legacy._rows, _legacy._digests, _legacy._run_cli, \
    _legacy._by_trial
local_ray = _legacy.local_ray  # the module-scoped local Ray fixture

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "v0_2"
EXPECTED = json.loads((FIXTURES / "EXPECTED.json").read_text(encoding="utf-8"))
COMPRESSED = sorted(EXPECTED["compressed"])
SEARCH = EXPECTED["search"]["name"]
STABLE_COLUMNS = _legacy.STABLE_COLUMNS


def _copy(rel: str, tmp_path: Path) -> Path:
    dest = tmp_path / rel
    shutil.copytree(FIXTURES / rel, dest)
    return dest


def _tiny_model(name: str):
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(FIXTURES / "models" / name))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return getattr(transformers, config.architectures[0])(config).eval()


def _teacher_skeleton():
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(FIXTURES / "teacher"))
    with torch.device("meta"):
        return getattr(transformers, config.architectures[0])(config)


def _factored_types(model) -> dict[str, str]:
    from kron.surgery import is_factored

    out: dict[str, str] = {}
    for name, mod in model.named_modules():
        if is_factored(mod) and not any(name.startswith(d + ".") for d in out):
            out[name] = type(mod).__name__
    return out


def test_the_fixtures_are_the_frozen_outputs_of_5d69f4f():
    assert EXPECTED["commit"].startswith("5d69f4f")
    total = sum(p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file())
    assert total < 2 * 2**20, f"the fixtures grew to {total:,} bytes"


# ------------------------------------------------------------------------------------------------ model folders


@pytest.mark.parametrize("kind", COMPRESSED)
def test_an_int8_or_pruned_folder_loads_and_gives_the_same_logits(kind, tmp_path):
    import torch
    from safetensors.torch import load_file

    from kron import CompressionPlan, count_params, load_compressed, macs_per_token
    from kron.io import read_info
    from kron.surgery import count_bytes

    want = EXPECTED["compressed"][kind]
    ckpt = _copy(f"compressed/{kind}", tmp_path) / "checkpoint"
    before = _digests(ckpt)
    saved = load_file(str(ckpt.parent / "expected.safetensors"))
    info = read_info(ckpt)
    assert info["format_version"] == want["format_version"] and info["modules"] == want["modules"]
    model = load_compressed(ckpt, device="cpu")
    assert type(model).__name__ == want["model_class"]
    assert _factored_types(model) == want["factored_types"]
    counts = want["counts_after_load"]
    assert (count_params(model), count_params(model, exclude_output_embedding=True), macs_per_token(model),
            count_bytes(model)) == (counts["params"], counts["params_excl_output_embedding"],
                                    counts["macs_per_token"], counts["bytes"])
    with torch.no_grad():
        logits = model(input_ids=saved["input_ids"], attention_mask=saved["attention_mask"]).logits
    # int8 weights and kept-unit indices reload exactly; the logits agree to float rounding only: another CPU's
    # kernels sum in another order (4.5e-8 at most on an AMD EPYC host, logits ~0.3), while a wrong scale or unit
    # index moves them by 1e-2 and more
    torch.testing.assert_close(logits, saved["logits"], rtol=0, atol=1e-6)
    assert CompressionPlan.load(ckpt / "plan.yaml").to_dict() == EXPECTED["plans_of_compressed"][kind]
    assert _digests(ckpt) == before, "loading changed the saved folder"


@pytest.mark.parametrize("kind", COMPRESSED)
def test_merging_an_int8_or_pruned_folder_gives_the_same_model_or_the_same_refusal(kind, tmp_path):
    import torch
    from safetensors.torch import load_file

    from kron import load_compressed, merge
    from kron.errors import PlanError

    want = EXPECTED["compressed"][kind]
    ckpt = _copy(f"compressed/{kind}", tmp_path) / "checkpoint"
    saved = load_file(str(ckpt.parent / "expected.safetensors"))
    model = load_compressed(ckpt, device="cpu")
    if want["merge_error"] is not None:
        with pytest.raises(PlanError) as exc:
            merge(model)
        assert str(exc.value) == want["merge_error"]
        return
    merged = merge(model)
    assert not _factored_types(merged)
    assert {k: v for k, v in merged.config.to_dict().items() if k in want["merged_config"]} == want["merged_config"]
    with torch.no_grad():
        logits = merged(input_ids=saved["input_ids"], attention_mask=saved["attention_mask"]).logits
    torch.testing.assert_close(logits, saved["merged_logits"], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ plans


@pytest.mark.parametrize("file", ["stacked.yaml", "stacked.saved.yaml", "stacked.json"])
def test_the_stacked_plan_loads_round_trips_and_resolves_as_before(file, tmp_path):
    from kron import CompressionPlan, compress

    want = EXPECTED["plans"]["stacked"]
    path = tmp_path / file
    shutil.copy2(FIXTURES / "plans" / file, path)
    plan = CompressionPlan.load(path)
    assert plan.to_dict() == want["to_dict"]
    assert CompressionPlan.from_yaml(plan.to_yaml()).to_dict() == want["to_dict"]
    for model_name, resolved in want["resolved"].items():
        model = _tiny_model(model_name)
        got = {n: s if s == "keep" else s.to_dict() for n, s in plan.resolve(model).items()}
        assert got == resolved and list(got) == list(resolved), model_name
        if file == "stacked.yaml":
            report = compress(model, plan).to_dict()
            for key in ("params_after", "params_after_excluding_output_embedding", "macs_per_token_after",
                        "bytes_after"):
                assert report[key] == want["reports"][model_name][key], (model_name, key)
            assert [m["spec"] for m in report["modules"]] == [m["spec"] for m in want["reports"][model_name]["modules"]]


# ------------------------------------------------------------------------------------------------ profiles


def test_the_profile_loads_and_plans_the_same_automatic_plan(tmp_path):
    from kron import CompressionPlan

    want = EXPECTED["profile"]
    folder = _copy("profile", tmp_path)
    teacher = _copy("teacher", tmp_path)
    # a profile names its model's source, which this code checks against --model: point it at the copied teacher,
    # the one edit (as for the search folders' teacher path; the config hash still decides it is the same model)
    path = folder / "profile.json"
    profile = json.loads(path.read_text())
    assert profile["model"]["source"] == str(Path(EXPECTED["generation_root"]) / "teacher")
    profile["model"]["source"] = str(teacher)
    path.write_text(json.dumps(profile))
    out = tmp_path / "auto.yaml"
    rc, text = _run_cli(["plan", "--model", str(teacher), "--auto", "--profile", str(folder / "profile.json"),
                         "--budget", "ratio=1.5", "--out", str(out)])
    assert rc == 0, text
    assert CompressionPlan.load(out).to_dict() == CompressionPlan.from_yaml(want["auto_plan"]).to_dict()
    # the tables the command prints are the same (the model's and the plan's paths are this run's)
    old_root = EXPECTED["generation_root"]
    assert text.replace(str(teacher), f"{old_root}/teacher").splitlines()[:-1] == want["auto_stdout"].splitlines()[:-1]
    rc, text = _run_cli(["plan", "--model", str(teacher), "--auto", "--profile", str(folder / "profile.json"),
                         "--budgets", "ratio=1.3,ratio=2", "--damage", "proxy", "--json"])
    assert rc == 0, text
    got = json.loads(text)
    assert (got["model"], got["profile"]) == (str(teacher), str(path))
    _same(got["plans"], want["front_json"]["plans"], "plan --auto --budgets --json")


# ------------------------------------------------------------------------------------------------ a mixed trial


def test_the_mixed_trial_folder_reads_as_before(tmp_path):
    from analysis.results import load_history, load_results, read_summary
    from kron import count_params, load_compressed
    from kron.surgery import count_bytes

    want = EXPECTED["trials"]["mixed"]
    folder = _copy("trials/mixed", tmp_path)
    summary = read_summary(folder / "trial_summary.json")
    assert set(want["summary_keys"]) <= set(summary) and summary["plan"] == want["plan"]
    _same(_rows(load_results(folder), STABLE_COLUMNS + ("bytes",)), want["rows"], "mixed trial")
    assert [int(s) for s in load_history(folder)["step"]] == want["history_steps"]
    model = load_compressed(folder / "checkpoint", device="cpu")
    assert (count_params(model), count_bytes(model)) == (want["checkpoint_params"], want["checkpoint_bytes"])


# ------------------------------------------------------------------------------------------------ the seeded search


def test_the_seeded_search_folder_analyzes_as_before(tmp_path):
    import pandas as pd

    from analysis.report import analyze
    from analysis.results import load_results

    want = EXPECTED["search"]
    exp = _copy(f"search/{SEARCH}", tmp_path)
    rows = _by_trial(_rows(load_results(exp).sort_values("trial_id"), STABLE_COLUMNS))
    _same(rows, _by_trial(want["load_results"]), "load_results")
    labels = {r["trial_id"]: r["label"] for r in want["load_results"]}
    assert sum(1 for v in labels.values() if str(v).startswith("seed:")) == 3  # two automatic plans and a preset
    written = analyze(exp, tmp_path / "report")
    results = pd.read_csv(written["results.csv"])
    cols = STABLE_COLUMNS + ("front_rank", "on_front", "is_knee")
    _same(_by_trial(_rows(results.sort_values("trial_id"), cols)), _by_trial(want["analyze_results_csv"]),
          "results.csv")
    pareto = pd.read_csv(written["pareto.csv"])
    _same(_rows(pareto, list(want["analyze_pareto_csv"][0])), want["analyze_pareto_csv"], "pareto.csv")
    rc, out = _run_cli(["analyze", str(exp), "--out", str(tmp_path / "cli")])
    assert rc == 0 and out.splitlines()[0] == want["analyze_stdout"].splitlines()[0]
    # the journal holds every trial the searcher told Optuna about
    from search.searcher import STUDY_JOURNAL, load_journal_study

    study = load_journal_study(exp / STUDY_JOURNAL, json.loads((exp / "search_meta.json").read_text())["name"])
    assert len(study.trials) == len(want["optuna_trials"])


def _relocated(tmp_path: Path) -> tuple[Path, Path]:
    return _legacy_relocate(FIXTURES / "search" / SEARCH, FIXTURES / "search" / "search.yaml", FIXTURES / "teacher",
                            tmp_path, EXPECTED["search"]["teacher_path"])


def _legacy_relocate(src_exp: Path, src_cfg: Path, teacher: Path, dest: Path, old_teacher: str):
    import sys

    sys.path.insert(0, str(FIXTURES.parent))
    try:
        from make_legacy_fixtures import relocate_search
    finally:
        sys.path.remove(str(FIXTURES.parent))
    return relocate_search(src_exp, src_cfg, teacher, dest, old_teacher)


@pytest.mark.ray
def test_resuming_the_seeded_search_loses_and_reruns_nothing(local_ray, tmp_path, monkeypatch):
    from analysis.results import load_results

    monkeypatch.setenv("KRONSEARCH_TRACEBACK", "1")
    want = EXPECTED["search"]
    exp, cfg_path = _relocated(tmp_path)
    kept = {k: v for k, v in _digests(exp).items() if k.startswith("trial_")}
    rc, out = _run_cli(["search", str(cfg_path), "--resume"])  # written before search state was signed
    assert rc == 2, out
    assert {k: v for k, v in _digests(exp).items() if k.startswith("trial_")} == kept
    rc, out = _run_cli(["search", str(cfg_path), "--resume", "--trust-state"])
    assert rc == want["old_resume"]["rc"] == 0, out
    assert sorted(p.name for p in exp.glob("trial_*") if p.is_dir()) == want["trial_dirs"]
    after = _digests(exp)
    for d in want["trial_dirs"]:
        for rel in ("params.json", "progress.csv", "result.json"):
            assert after[f"{d}/{rel}"] == kept[f"{d}/{rel}"], f"{d}/{rel} changed"
    _same(_by_trial(_rows(load_results(exp).sort_values("trial_id"), STABLE_COLUMNS)),
          _by_trial(want["load_results"]), "load_results after --resume")
