"""Saved things are promises: what kronsearch 0.1.0 wrote to disk must keep loading, and mean the same.

The fixtures under tests/fixtures/v0_1/ are frozen outputs of kronsearch 0.1.0 (commit
166fcf1df223d8ed338b285afd5edeb7bf2b3e47), written by tests/fixtures/make_legacy_fixtures.py run with that release;
tests/fixtures/v0_1/EXPECTED.json holds what 0.1.0 returned for them. Never regenerate them with newer code: when a
test here fails, the new code no longer reads what users of 0.1.0 have on disk (fix the code, or add an explicit
migration and announce it).

Checked here:
* compressed-model folders (kron.save_compressed, format_version 1) load with kron.load_compressed and give 0.1.0's
  logits; kron.merge of them gives 0.1.0's merged logits;
* plan files (as 0.1.0 saved them, and a hand-written one using every rule key) load, round-trip through to_dict,
  and resolve on the tiny models exactly as 0.1.0 resolved them; so do the presets;
* trial summaries (trials.run_trial output folders) read with analysis.results; a trial's checkpoint loads;
* a finished search folder (kronsearch search: Ray Tune + Optuna, ASHA, a teacher reference) analyses
  (analysis.report.analyze, `kronsearch analyze`) to 0.1.0's tables;
* `kronsearch search CONFIG --resume` on a copy of that folder recognises the search as finished: nothing rerun,
  nothing lost (marked `ray`).
Only stable values are compared (no timings, no absolute paths). Fixtures are copied to tmp_path before use.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import shutil
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "v0_1"
EXPECTED = json.loads((FIXTURES / "EXPECTED.json").read_text(encoding="utf-8"))
RELEASE_COMMIT = "166fcf1df223d8ed338b285afd5edeb7bf2b3e47"
KINDS = ("gpt2", "bert", "llama")
FACTORED = ("KroneckerLinear", "FusedKroneckerLinear", "KroneckerEmbedding", "LowRankLinear", "FusedLowRankLinear")
STABLE_COLUMNS = ("search", "trial_id", "method", "label", "status", "error", "quality_name", "quality_mode", "quality",
                  "quality_at_init", "params", "params_excl_output_embedding", "compression_ratio", "macs_per_token",
                  "steps", "tokens_seen", "plan_summary")
SEARCH = EXPECTED["search"]["name"]


# ------------------------------------------------------------------------------------------------ helpers


def _copy(rel: str, tmp_path: Path) -> Path:
    src = FIXTURES / rel
    dest = tmp_path / rel
    shutil.copytree(src, dest)
    return dest


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _plain(value):
    """A table cell as JSON would hold it: None for NA/NaN, Python scalars."""
    import pandas as pd

    if value is None or value is pd.NA:
        return None
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _rows(df, columns) -> list[dict]:
    return [{c: _plain(row[c]) for c in columns if c in df.columns} for _, row in df.iterrows()]


def _same(got, want, where: str = "") -> None:
    """Equal, with floats compared to 1e-9 (they went through JSON or CSV)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want), f"{where}: keys {list(got)} != {list(want)}"
        for k in want:
            _same(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{where}: {got!r} != {want!r}"
        for i, (g, w) in enumerate(zip(got, want)):
            _same(g, w, f"{where}[{i}]")
    elif isinstance(want, float) and not isinstance(want, bool):
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12), f"{where}: {got!r} != {want!r}"
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def _by_trial(rows: list[dict]) -> dict[str, dict]:
    return {r["trial_id"]: r for r in rows}


def _factored_types(model) -> dict[str, str]:
    """Top-level factored modules (not the blocks inside a fused one) -> class name."""
    out: dict[str, str] = {}
    for name, mod in model.named_modules():
        if type(mod).__name__ in FACTORED and not any(name.startswith(d + ".") for d in out):
            out[name] = type(mod).__name__
    return out


def _tiny_model(name: str):
    """The tiny model `name` of the fixtures (models/<name>/config.json), freshly initialised with seed 0."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(FIXTURES / "models" / name))
    cls = getattr(transformers, config.architectures[0])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return cls(config).eval()


def _teacher_skeleton():
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(FIXTURES / "teacher"))
    with torch.device("meta"):
        return getattr(transformers, config.architectures[0])(config)


def _resolved(plan, model) -> dict:
    return {n: s if s == "keep" else s.to_dict() for n, s in plan.resolve(model).items()}


def _report_counts(report: dict) -> dict:
    keys = ("params_before", "params_after", "params_before_excluding_output_embedding",
            "params_after_excluding_output_embedding", "compression_ratio", "macs_per_token_before",
            "macs_per_token_after", "mac_reduction", "untied_output_embedding", "init")
    out = {k: report[k] for k in keys}
    out["modules"] = [{k: m[k] for k in ("name", "kind", "module_type", "dense_shape", "spec", "params_before",
                                         "params_after", "macs_before", "macs_after")} for m in report["modules"]]
    return out


def _run_cli(argv: list[str]) -> tuple[int, str]:
    from search.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(argv)
    return rc, buf.getvalue()


# ------------------------------------------------------------------------------------------------ the fixtures


def test_the_fixtures_are_the_frozen_0_1_0_outputs():
    assert EXPECTED["release"] == "0.1.0" and EXPECTED["commit"] == RELEASE_COMMIT
    for kind in KINDS:
        info = json.loads((FIXTURES / "compressed" / kind / "checkpoint" / "kronsearch.json").read_text())
        assert info["kronsearch_version"] == "0.1.0" and info["format_version"] == 1
    total = sum(p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file())
    assert total < 2 * 2**20, f"the fixtures grew to {total:,} bytes"


# ------------------------------------------------------------------------------------------------ compressed models


@pytest.mark.parametrize("kind", KINDS)
def test_a_compressed_folder_loads_and_gives_the_same_logits(kind, tmp_path):
    import torch
    from safetensors.torch import load_file

    from kron import CompressionPlan, count_params, load_compressed, macs_per_token
    from kron.io import read_info

    want = EXPECTED["compressed"][kind]
    ckpt = _copy(f"compressed/{kind}", tmp_path) / "checkpoint"
    before = _digests(ckpt)
    saved = load_file(str(ckpt.parent / "expected.safetensors"))

    info = read_info(ckpt)
    assert info["format_version"] == want["format_version"] == 1
    assert (info["model_class"], info["task"], info["dtype"]) == (want["model_class"], want["task"], want["dtype"])
    assert info["modules"] == want["modules"] and info["source_types"] == want["source_types"]
    _same(_report_counts(info["report"]), want["report"], f"{kind} kronsearch.json report")

    model = load_compressed(ckpt, device="cpu")
    assert type(model).__name__ == want["model_class"] and not model.training
    assert _factored_types(model) == want["factored_types"]
    counts = want["counts_after_load"]
    assert count_params(model) == counts["params"]
    assert count_params(model, exclude_output_embedding=True) == counts["params_excl_output_embedding"]
    assert macs_per_token(model) == counts["macs_per_token"]
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    if out_emb is not None:  # compressing the embedding untied GPT-2's head, and it must stay untied
        tied = out_emb._parameters.get("weight") is not None and \
            out_emb._parameters.get("weight") is in_emb._parameters.get("weight")
        assert tied == want["output_embedding_tied_after_load"]
    with torch.no_grad():
        logits = model(input_ids=saved["input_ids"], attention_mask=saved["attention_mask"]).logits
    torch.testing.assert_close(logits, saved["logits"], rtol=1e-5, atol=1e-5)

    plan = CompressionPlan.load(ckpt / "plan.yaml")
    assert model.kron_plan == plan
    assert plan.to_dict() == EXPECTED["plans"][kind]["to_dict"]
    assert _digests(ckpt) == before, "loading changed the saved folder"


@pytest.mark.parametrize("kind", KINDS)
def test_merging_a_loaded_folder_gives_the_old_merged_logits(kind, tmp_path):
    import torch
    from safetensors.torch import load_file

    from kron import load_compressed, merge

    want = EXPECTED["compressed"][kind]
    ckpt = _copy(f"compressed/{kind}", tmp_path) / "checkpoint"
    saved = load_file(str(ckpt.parent / "expected.safetensors"))
    merged = merge(load_compressed(ckpt, device="cpu"))
    assert not _factored_types(merged)
    for name, source in want["source_types"].items():  # each factored module is the dense type it replaced again
        assert type(merged.get_submodule(name)).__name__ == source, name
    with torch.no_grad():
        logits = merged(input_ids=saved["input_ids"], attention_mask=saved["attention_mask"]).logits
    torch.testing.assert_close(logits, saved["merged_logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, saved["logits"], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------ plans


PLAN_FILES = [(name, f) for name, entry in EXPECTED["plans"].items() for f in entry["files"]]


@pytest.mark.parametrize("name, file", PLAN_FILES, ids=[f for _, f in PLAN_FILES])
def test_a_plan_file_loads_round_trips_and_resolves_as_before(name, file, tmp_path):
    from kron import CompressionPlan, compress

    want = EXPECTED["plans"][name]
    path = tmp_path / file
    shutil.copy2(FIXTURES / "plans" / file, path)
    plan = CompressionPlan.load(path)
    assert plan.to_dict() == want["to_dict"]
    again = CompressionPlan.from_dict(plan.to_dict())
    assert again == plan and again.to_dict() == want["to_dict"]
    assert CompressionPlan.from_yaml(plan.to_yaml()).to_dict() == want["to_dict"]
    assert CompressionPlan.from_json(plan.to_json()).to_dict() == want["to_dict"]
    for model_name, resolved in want["resolved"].items():
        model = _tiny_model(model_name)
        got = _resolved(plan, model)
        assert list(got) == list(resolved), f"{model_name}: module order"
        assert got == resolved, model_name
        assert _resolved(again, model) == resolved
        if file.endswith(".yaml") and not file.endswith(".saved.yaml"):  # once per plan: the sizes it gives
            _same(_report_counts(compress(model, plan).to_dict()), want["reports"][model_name], model_name)


PRESETS = [(preset, m) for preset, by_model in EXPECTED["presets"].items() for m in by_model]


@pytest.mark.parametrize("preset, model_name", PRESETS, ids=[f"{p}-{m}" for p, m in PRESETS])
def test_a_preset_gives_the_same_plan(preset, model_name):
    from kron import preset_plan

    want = EXPECTED["presets"][preset][model_name]
    model = _tiny_model(model_name)
    plan = preset_plan(preset, model.config)
    assert plan.to_dict() == want["to_dict"]
    assert _resolved(plan, model) == want["resolved"]


# ------------------------------------------------------------------------------------------------ trial summaries


@pytest.mark.parametrize("name", sorted(EXPECTED["trials"]))
def test_a_trial_folder_reads_as_before(name, tmp_path):
    from analysis.results import load_history, load_results, read_summary
    from kron import CompressionPlan, count_params, load_compressed

    want = EXPECTED["trials"][name]
    folder = _copy(f"trials/{name}", tmp_path)
    summary = read_summary(folder / "trial_summary.json")
    assert summary["schema"] == "kronsearch.trial/1"
    assert set(want["summary_keys"]) <= set(summary)
    df = load_results(folder)
    assert len(df) == 1
    _same(_rows(df, STABLE_COLUMNS), want["rows"], name)
    history = load_history(folder)
    assert len(history) == want["history_rows"]
    assert [int(s) for s in history["step"]] == want["history_steps"]

    # the plan a trial records resolves, on its teacher, to the modules it factored
    plan = CompressionPlan.from_dict(summary["plan"])
    factored = {n: s for n, s in _resolved(plan, _teacher_skeleton()).items() if s != "keep"}
    assert factored == summary["plan_resolved"]

    checkpoint = df["checkpoint"].iloc[0]
    if "checkpoint_params" in want:
        assert checkpoint is not None and Path(checkpoint) == (folder / "checkpoint").resolve()
        assert count_params(load_compressed(checkpoint, device="cpu")) == want["checkpoint_params"]
    else:
        assert checkpoint is None


# ------------------------------------------------------------------------------------------------ the search folder


def test_the_search_folder_analyzes_as_before(tmp_path):
    import pandas as pd

    from analysis.report import analyze
    from analysis.results import load_results

    want = EXPECTED["search"]
    exp = _copy(f"search/{SEARCH}", tmp_path)
    assert sorted(p.name for p in exp.glob("trial_*") if p.is_dir()) == want["trial_dirs"]

    rows = _by_trial(_rows(load_results(exp).sort_values("trial_id"), STABLE_COLUMNS))
    _same(rows, _by_trial(want["load_results"]), "load_results")

    written = analyze(exp, tmp_path / "report")
    assert {"results.csv", "pareto.csv", "pareto.png", "report.md"} <= set(written)
    results = pd.read_csv(written["results.csv"])
    cols = STABLE_COLUMNS + ("front_rank", "on_front", "is_knee")
    _same(_by_trial(_rows(results.sort_values("trial_id"), cols)), _by_trial(want["analyze_results_csv"]),
          "results.csv")
    pareto = pd.read_csv(written["pareto.csv"])
    _same(_rows(pareto, [c for c in want["analyze_pareto_csv"][0]] if want["analyze_pareto_csv"] else []),
          want["analyze_pareto_csv"], "pareto.csv")

    # the console command prints the same counts
    rc, out = _run_cli(["analyze", str(exp), "--out", str(tmp_path / "cli")])
    assert rc == 0
    # 0.1.0 printed "5 trials: 3 complete, 2 pruned", counting the teacher reference as a trial (issue #14): the
    # same four trials and the reference, counted as references are counted since
    assert want["analyze_stdout"].splitlines()[0] == "5 trials: 3 complete, 2 pruned"
    assert out.splitlines()[0] == "4 trials: 2 complete, 2 pruned; references: teacher"
    for stats in want["analyze_stats"]:
        assert f"{stats['search']}: {stats['complete']}/{stats['trials']} complete, {stats['on_front']} on front" in out


def test_the_front_plans_the_search_wrote_still_load(tmp_path):
    import yaml

    from kron import CompressionPlan

    exp = _copy(f"search/{SEARCH}", tmp_path)
    files = sorted((exp / "analysis" / "front").glob("*.yaml"))
    assert [p.name for p in files] == EXPECTED["search"]["front_plans"]
    teacher = _teacher_skeleton()
    for path in files:
        trial = path.stem.split("_", 1)[1]
        summary = json.loads((exp / f"trial_{trial}" / "trial_summary.json").read_text())
        plan = CompressionPlan.load(path)
        assert plan.to_dict() == CompressionPlan.from_dict(summary["plan"]).to_dict()
        assert yaml.safe_load(path.read_text())["rules"]  # a plain YAML plan, header lines are comments
        factored = {n: s for n, s in _resolved(plan, teacher).items() if s != "keep"}
        assert factored == summary["plan_resolved"]


# ------------------------------------------------------------------------------------------------ resuming


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """One local Ray (2 CPUs) for this module, started the way `kronsearch search` starts it (as
    tests/search/conftest.py's ray_session does); reused, and left running, if the session has one already.
    Where no `init_local_ray` is found, no Ray is started here and the search command starts its own."""
    import importlib
    import os

    import ray

    init_local_ray = None
    for module in ("search.raystart", "search.tuner"):  # 0.1.0 had it in search.tuner
        try:
            init_local_ray = importlib.import_module(module).init_local_ray
            break
        except (ImportError, AttributeError):
            continue
    old = os.environ.get("KRONSEARCH_CACHE")
    os.environ["KRONSEARCH_CACHE"] = str(tmp_path_factory.mktemp("kron-cache"))
    started = init_local_ray is not None and not ray.is_initialized()
    if started:
        init_local_ray(num_cpus=2)
    yield ray
    if started:
        ray.shutdown()
    if old is None:
        os.environ.pop("KRONSEARCH_CACHE", None)
    else:
        os.environ["KRONSEARCH_CACHE"] = old


def _relocated_search(tmp_path: Path) -> tuple[Path, Path]:
    """The finished search and its teacher copied under tmp_path; returns (experiment folder, config file).

    0.1.0 records the teacher as an absolute path in search_meta.json (config and the resume fingerprint, which
    --resume compares with the config): the copy points it at the copied teacher, the one edit made (as a user
    whose teacher is where the search recorded it would have it). Ray's own files are left as written."""
    import yaml

    storage = tmp_path / "storage"
    exp = storage / SEARCH
    shutil.copytree(FIXTURES / "search" / SEARCH, exp)
    teacher = tmp_path / "teacher"
    shutil.copytree(FIXTURES / "teacher", teacher)
    meta_path = exp / "search_meta.json"
    meta = json.loads(meta_path.read_text())
    old = EXPECTED["search"]["teacher_path"]
    assert meta["config"]["trial"]["teacher"] == meta["fingerprint"]["trial"]["teacher"] == old
    meta["config"]["trial"]["teacher"] = meta["fingerprint"]["trial"]["teacher"] = str(teacher)
    meta_path.write_text(json.dumps(meta, indent=2))
    cfg = yaml.safe_load((FIXTURES / "search" / "search.yaml").read_text())
    assert cfg["trial"]["teacher"] == old
    cfg["trial"]["teacher"], cfg["search"]["storage"] = str(teacher), str(storage)
    cfg_path = tmp_path / "search.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return exp, cfg_path


def _latest_trial_states(exp: Path) -> dict[str, str]:
    state = json.loads(sorted(exp.glob("experiment_state-*.json"))[-1].read_text())
    out = {}
    for trial_json, _ in state["trial_data"]:
        t = json.loads(trial_json) if isinstance(trial_json, str) else trial_json
        out[t["trial_id"]] = t["status"]
    return out


@pytest.mark.ray
def test_resuming_the_finished_search_loses_and_reruns_nothing(local_ray, tmp_path, monkeypatch, capsys):
    from analysis.results import load_results

    monkeypatch.setenv("KRONSEARCH_TRACEBACK", "1")  # an internal error shows its traceback, not one line
    want = EXPECTED["search"]
    exp, cfg_path = _relocated_search(tmp_path)
    kept = {k: v for k, v in _digests(exp).items() if k.startswith("trial_") or k.startswith("reference_teacher")}
    summaries = {p.parent.name: json.loads(p.read_text()) for p in exp.glob("*/trial_summary.json")}

    # without --resume the existing search is refused, untouched
    from search.cli import main

    assert main(["search", str(cfg_path)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert {k: v for k, v in _digests(exp).items() if k in kept} == kept

    # its state was written before kronsearch signed search state: a plain --resume refuses to hand it to Ray
    assert main(["search", str(cfg_path), "--resume"]) == 2
    assert "no valid kronsearch state signatures" in capsys.readouterr().err
    assert {k: v for k, v in _digests(exp).items() if k in kept} == kept
    rc, out = _run_cli(["search", str(cfg_path), "--resume", "--trust-state"])
    assert rc == 0, out  # 130 would mean "interrupted with unfinished trials"
    assert sorted(p.name for p in exp.glob("trial_*") if p.is_dir()) == want["trial_dirs"]  # no trial added
    after = _digests(exp)
    for rel in ("params.json", "progress.csv", "result.json"):  # nothing rerun, nothing reported again
        for d in want["trial_dirs"]:
            assert after[f"{d}/{rel}"] == kept[f"{d}/{rel}"], f"{d}/{rel} changed"
    for d, before in summaries.items():  # rewritten at most, with the same content
        now = json.loads((exp / d / "trial_summary.json").read_text())
        assert now == before, d
    assert set(_latest_trial_states(exp).values()) == {"TERMINATED"}
    assert set(_latest_trial_states(exp)) == {d.removeprefix("trial_") for d in want["trial_dirs"]}

    rows = _by_trial(_rows(load_results(exp).sort_values("trial_id"), STABLE_COLUMNS))
    _same(rows, _by_trial(want["load_results"]), "load_results after --resume")
    study = {t["user_attrs"].get("ray_trial_id"): t["state"] for t in
             json.loads((exp / "optuna_trials.json").read_text()) if t["user_attrs"].get("ray_trial_id")}
    old_study = {t["user_attrs"].get("ray_trial_id"): t["state"] for t in want["optuna_trials"]
                 if t["user_attrs"].get("ray_trial_id")}
    assert study == old_study
    assert sorted(p.name for p in (exp / "analysis" / "front").glob("*.yaml")) == want["front_plans"]
