"""Report files (analyze), search comparisons (compare), the console front table and their numbers."""
from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import pandas as pd
import pytest

from analysis.pareto import hypervolume
from analysis.compare import baseline_dominance, compare
from analysis.report import (
    analyze,
    common_reference,
    format_front_table,
    load_labelled,
    search_stats,
    summarize,
)
from analysis.results import load_results, mark_pareto
from kron.errors import DataError, UserError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def all_sources(fake_results):
    return [fake_results["kron-gpt2-asha"], fake_results["kron-gpt2-tpe"], fake_results["references"]]


@pytest.fixture
def hand_results(tmp_path, make_summary):
    """Two small searches with known numbers plus three baselines."""
    root = tmp_path / "hand"
    points = {"A": [("a1", 1_000, 300.0), ("a2", 2_000, 150.0), ("a3", 4_000, 100.0), ("a4", 3_000, 200.0)],
              "B": [("b1", 1_500, 200.0), ("b2", 3_000, 90.0)]}
    for search, rows in points.items():
        for trial_id, params, quality in rows:
            write_json(root / search / trial_id / "trial_summary.json",
                       make_summary(trial_id=trial_id, search=search, params=params, quality=quality,
                                    macs_per_token=params // 2, compression_ratio=8_000 / params,
                                    plan_summary=f"plan of {trial_id}"))
    write_json(root / "A" / "broken" / "trial_summary.json",
               make_summary(trial_id="broken", search="A", status="error", quality=None,
                            error="RuntimeError: CUDA out of memory\nat step 3"))
    for trial_id, method, params, quality in (("teacher", "teacher", 8_000, 50.0), ("kn", "preset", 3_000, 120.0),
                                              ("lr", "lowrank", 1_000, 250.0)):
        write_json(root / "refs" / trial_id / "trial_summary.json",
                   make_summary(trial_id=trial_id, search="refs", method=method, label=trial_id, params=params,
                                quality=quality))
    return root


# --- analyze ------------------------------------------------------------------------------------------------


def test_analyze_writes_every_file(all_sources, tmp_path):
    out = tmp_path / "report"
    written = analyze(all_sources, out, title="fake fronts")
    expected = {"results.csv", "pareto.csv", "pareto.png", "plans_heatmap.png", "report.md"}
    if "plotly" in sys.modules or _has("plotly"):
        expected.add("pareto.html")
    assert set(written) == expected
    assert sorted(os.listdir(out)) == sorted(expected)  # nothing else (no temporary files)
    for name in ("pareto.png", "plans_heatmap.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    results = pd.read_csv(out / "results.csv")
    assert len(results) == 34 and {"front_rank", "on_front", "is_knee"} <= set(results.columns)


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_pareto_csv_holds_each_search_front_with_rank(all_sources, tmp_path):
    analyze(all_sources, tmp_path)
    front = pd.read_csv(tmp_path / "pareto.csv")
    marked = mark_pareto(load_results(all_sources))
    assert len(front) == int(marked["on_front"].sum())
    assert set(front["trial_id"]) == set(marked.loc[marked["on_front"], "trial_id"])
    for _, group in front.groupby("search"):
        assert list(group["rank"]) == list(range(1, len(group) + 1))
        assert group["params"].is_monotonic_increasing and group["quality"].is_monotonic_decreasing
        assert group["is_knee"].sum() == 1
    assert "references" not in set(front["search"])  # baselines are not a search front


def test_report_md_has_front_table_hypervolume_and_failures(all_sources, tmp_path):
    analyze(all_sources, tmp_path)
    text = (tmp_path / "report.md").read_text()
    for heading in ("## Trials by status", "## Pareto front", "## Knee point", "## Best plan per search",
                    "## Hypervolume", "## Failed trials"):
        assert heading in text
    assert "| search | # | trial | params | compression | val_ppl | MACs/token | tokens/s | plan |" in text
    assert "| kron-gpt2-asha | 12 | 1 | 1 | 1 | 15 |" in text  # complete, pruned, diverged, error, total
    assert "★" in text and "![pareto.png](pareto.png)" in text

    df = load_results(all_sources)
    summary = summarize(df)
    ref = summary.reference
    complete = df[(df["status"] == "complete") & (df["method"] == "kronecker")]
    assert ref["values"] == pytest.approx([complete["params"].max() * 1.1, complete["quality"].max() * 1.1])
    assert "Common reference point" in text and f"{ref['values'][1]:.4g}" in text
    for search in ("kron-gpt2-asha", "kron-gpt2-tpe"):
        rows = complete[complete["search"] == search]
        hv = hypervolume(rows[["params", "quality"]].to_numpy(float), ["min", "min"], ref["values"])
        assert f"| {search} | {hv:.4g} |" in text
    assert "CUDA out of memory" in text and "loss became NaN at step 120" in text


def test_report_numbers_on_a_hand_made_set(hand_results, tmp_path):
    analyze(hand_results, tmp_path)
    summary = summarize(load_labelled(hand_results))
    stats = summary.stats.set_index("search")
    assert list(stats.index) == ["A", "B"]  # "refs" holds only baselines: not a search
    assert summary.reference["values"] == pytest.approx([4_400, 330.0])
    a_points = [[1_000, 300.0], [2_000, 150.0], [4_000, 100.0], [3_000, 200.0]]
    assert stats.loc["A", "hypervolume"] == pytest.approx(hypervolume(a_points, ["min", "min"], [4_400, 330.0]))
    assert stats.loc["A", "on_front"] == 3 and stats.loc["A", "failed"] == 1 and stats.loc["A", "trials"] == 5
    assert stats.loc["A", "best_trial"] == "a3" and stats.loc["B", "best_trial"] == "b2"
    assert stats.loc["A", "knee_trial"] == "a2"
    assert stats["hypervolume_share"].max() == pytest.approx(1.0)
    assert stats["hypervolume_share"].min() == pytest.approx(stats["hypervolume"].min() / stats["hypervolume"].max())
    text = (tmp_path / "report.md").read_text()
    assert "| A | 2 | ★ a2 | 2k (2,000) | 4.00× | 150 | 1k | 12k | plan of a2 |" in text
    assert "| A | broken | error | RuntimeError: CUDA out of memory at step 3 |" in text  # one line


def test_analyze_on_macs(all_sources, tmp_path):
    written = analyze(all_sources, tmp_path, x="macs_per_token")
    text = written["report.md"].read_text()
    assert "MACs/token" in text.splitlines()[0] and "Common reference point" in text
    with pytest.raises(UserError, match="x must be one of"):
        analyze(all_sources, tmp_path, x="wall_time_s")


def test_analyze_with_only_failed_trials(tmp_path, make_summary):
    write_json(tmp_path / "res" / "t1" / "trial_summary.json",
               make_summary(trial_id="t1", status="error", quality=None, error="boom"))
    written = analyze(tmp_path / "res", tmp_path / "out")
    assert "plans_heatmap.png" not in written and (tmp_path / "out" / "pareto.png").is_file()
    text = written["report.md"].read_text()
    assert "there is no front" in text and "Not computed" in text and "boom" in text


def test_analyze_without_plotly_writes_no_html(all_sources, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "plotly", None)
    written = analyze(all_sources, tmp_path)
    assert "pareto.html" not in written and not (tmp_path / "pareto.html").exists()


def test_analyze_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        analyze(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no trial_summary.json"):
        analyze(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="not a directory"):
        analyze(tmp_path / "empty", tmp_path / "file")


# --- reference point ----------------------------------------------------------------------------------------


def test_common_reference_for_a_maximised_metric(make_summary, tmp_path):
    for i, (params, acc) in enumerate([(1_000, 0.8), (2_000, 0.9), (500, 0.5)]):
        write_json(tmp_path / "s" / f"t{i}" / "trial_summary.json",
                   make_summary(trial_id=f"t{i}", params=params, quality=acc, quality_name="accuracy",
                                quality_mode="max"))
    ref = common_reference(load_results(tmp_path / "s"))
    assert ref["directions"] == ["min", "max"]
    assert ref["values"] == pytest.approx([2_200, 0.45])  # worst params x1.1, worst accuracy x0.9


def test_common_reference_ignores_baselines_and_failures(hand_results):
    df = load_results(hand_results)
    assert common_reference(df)["values"] == pytest.approx([4_400, 330.0])  # not the teacher's 8000 params
    assert common_reference(df[df["method"] == "teacher"]) is None


# --- compare ------------------------------------------------------------------------------------------------


def test_compare_writes_files_and_labels(fake_results, tmp_path):
    sources = [fake_results["kron-gpt2-asha"], fake_results["kron-gpt2-tpe"], fake_results["references"]]
    written = compare(sources, tmp_path, labels=["ASHA", "TPE", "baselines"])
    assert {"compare.csv", "compare.png", "compare.md"} <= set(written)
    assert (tmp_path / "compare.png").read_bytes().startswith(PNG_MAGIC)
    table = pd.read_csv(tmp_path / "compare.csv")
    assert list(table.loc[table["kind"] == "search", "name"]) == ["ASHA", "TPE"]
    assert set(table.loc[table["kind"] == "baseline", "method"]) == {"teacher", "preset", "lowrank", "layerdrop"}
    text = (tmp_path / "compare.md").read_text()
    assert "Common reference point" in text and "| ASHA |" in text and "Δ TPE" in text


def test_compare_dominance_on_a_hand_made_set(hand_results, tmp_path):
    compare([hand_results / "A", hand_results / "B", hand_results / "refs"], tmp_path)
    table = pd.read_csv(tmp_path / "compare.csv").set_index("name")
    # kn (preset): 3000 params, ppl 120 -> dominated by B's b2 (3000 params, ppl 90): delta -30
    assert table.loc["kn", "best_trial"] == "b2" and bool(table.loc["kn", "dominates"])
    assert table.loc["kn", "quality_delta"] == pytest.approx(-30.0)
    assert table.loc["kn", "quality_delta_pct"] == pytest.approx(-25.0)
    # lr (lowrank): 1000 params, ppl 250 -> only a1 (ppl 300) is that small: none dominates, delta +50
    assert table.loc["lr", "best_trial"] == "a1" and not bool(table.loc["lr", "dominates"])
    assert table.loc["lr", "quality_delta"] == pytest.approx(50.0)
    # teacher: 8000 params, ppl 50 -> nothing is as good
    assert not bool(table.loc["teacher", "dominates"])
    hv = table.loc[["A", "B"], "hypervolume"]
    assert hv["A"] == pytest.approx(hypervolume([[1_000, 300.0], [2_000, 150.0], [4_000, 100.0], [3_000, 200.0]],
                                                ["min", "min"], [4_400, 330.0]))
    text = (tmp_path / "compare.md").read_text()
    assert "B/b2" in text and "none dominates (best at ≤ its params: A/a1, 300)" in text
    assert "-30 (-25.0%)" in text


def test_compare_names_its_size_axis(hand_results, tmp_path):
    """On another size axis (here MACs/token = params / 2) the tables say so, and each search's best trial is given
    by its size on that axis, not by its parameters."""
    import json

    for path in (hand_results / "refs").glob("*/trial_summary.json"):
        summary = json.loads(path.read_text())
        write_json(path, {**summary, "macs_per_token": summary["params"] // 2})
    compare([hand_results / "A", hand_results / "B", hand_results / "refs"], tmp_path, x="macs_per_token")
    text = (tmp_path / "compare.md").read_text()
    assert "| its MACs/token |" in text and "knee MACs/token" in text and "its params" not in text
    assert "none dominates (best at ≤ its MACs/token: A/a1, 300)" in text
    table = pd.read_csv(tmp_path / "compare.csv").set_index("name")
    assert table.loc["kn", "best_trial"] == "b2"  # same verdicts: every size halves
    assert "| B | b2 | 90 | 1.5k (1,500) |" in text  # its best trial b2: 3,000 params, 1,500 MACs/token


def test_baseline_dominance_per_search_columns(hand_results):
    dominance = baseline_dominance(mark_pareto(load_results(hand_results))).set_index("baseline")
    assert dominance.loc["kn", "delta:A"] == pytest.approx(30.0)  # a2: 2000 params, ppl 150 (better than a4)
    assert not dominance.loc["kn", "dominates:A"] and dominance.loc["kn", "dominates:B"]
    assert math.isnan(dominance.loc["lr", "delta:B"])  # B has nothing with <= 1000 params


def test_equal_quality_with_fewer_params_dominates(tmp_path, make_summary):
    write_json(tmp_path / "s" / "t" / "trial_summary.json", make_summary(trial_id="t", params=900, quality=120.0))
    write_json(tmp_path / "s" / "same" / "trial_summary.json",
               make_summary(trial_id="same", method="preset", params=900, quality=120.0))
    write_json(tmp_path / "s" / "kn" / "trial_summary.json",
               make_summary(trial_id="kn", method="preset", params=1_000, quality=120.0))
    dominance = baseline_dominance(load_results(tmp_path / "s")).set_index("baseline")
    assert bool(dominance.loc["kn", "dominates"]) and not bool(dominance.loc["same", "dominates"])


def test_a_baseline_smaller_than_every_plan_says_so(tmp_path, make_summary):
    write_json(tmp_path / "s" / "t" / "trial_summary.json", make_summary(trial_id="t", params=900, quality=120.0))
    write_json(tmp_path / "s2" / "u" / "trial_summary.json", make_summary(trial_id="u", params=800, quality=130.0))
    write_json(tmp_path / "r" / "tiny" / "trial_summary.json",
               make_summary(trial_id="tiny", method="preset", params=100, quality=300.0))
    write_json(tmp_path / "r" / "big" / "trial_summary.json",
               make_summary(trial_id="big", method="preset", params=2_000, quality=200.0))
    compare([tmp_path / "s", tmp_path / "s2", tmp_path / "r"], tmp_path / "out")
    text = (tmp_path / "out" / "compare.md").read_text()
    assert "none dominates (no plan this small)" in text and "nan" not in text


def test_load_labelled(fake_results, tmp_path):
    root = fake_results["kron-gpt2-asha"].parents[1]  # holds asha, tpe and the references
    df = load_labelled([fake_results["kron-gpt2-tpe"], root], labels=["T", "all"])
    assert df["summary_path"].is_unique and len(df) == 34
    # the root holds two searches (asha named by its search_meta.json, the rest by the root folder): "label/search"
    assert set(df["search"]) == {"T", "all/kron-gpt2-asha", "all/results"}
    assert (df.loc[df["summary_path"].str.contains("kron-gpt2-tpe"), "search"] == "T").all()  # first source wins
    with pytest.raises(UserError, match="2 label"):
        load_labelled([fake_results["kron-gpt2-tpe"]], labels=["a", "b"])


# --- console table ------------------------------------------------------------------------------------------


def test_format_front_table(all_sources):
    df = load_results(all_sources)
    text = format_front_table(df)
    lines = text.splitlines()
    assert lines[0].split()[:6] == ["search", "#", "trial", "params", "compr.", "val_ppl"]
    marked = mark_pareto(df)
    front = marked[marked["on_front"]]
    assert len(lines) == 2 + len(front) + 1
    for trial_id in front["trial_id"]:
        assert trial_id in text
    assert sum(line.split()[2].startswith("*") for line in lines[2:-1]) == 2  # one knee per search
    assert lines[-1] == "(* = knee point)"
    assert format_front_table(summarize(df).marked) == text  # a marked table gives the same


def test_format_front_table_edge_cases(make_summary, tmp_path):
    assert format_front_table(pd.DataFrame()) == "no trials"
    write_json(tmp_path / "s" / "t" / "trial_summary.json", make_summary(status="error", quality=None))
    assert format_front_table(load_results(tmp_path / "s")) == "no complete trials: no Pareto front"
    long = "x" * 200
    write_json(tmp_path / "s2" / "t" / "trial_summary.json", make_summary(plan_summary=long))
    line = format_front_table(load_results(tmp_path / "s2")).splitlines()[2]
    assert line.endswith("…") and len(line) < 160


def test_search_stats_without_complete_trials(make_summary, tmp_path):
    write_json(tmp_path / "s" / "t" / "trial_summary.json", make_summary(status="pruned"))
    write_json(tmp_path / "s" / "u" / "trial_summary.json", make_summary(trial_id="u", status="error", quality=None))
    stats = search_stats(mark_pareto(load_results(tmp_path / "s")))
    row = stats.iloc[0]
    assert row["trials"] == 2 and row["complete"] == 0 and row["failed"] == 1 and row["knee_trial"] is None
    assert np.isnan(row["hypervolume"])


def test_the_end_of_search_table_lists_the_trials_stopped_early_apart_from_the_front(fake_results):
    import re

    from analysis.front import analyze_search

    exp = fake_results["kron-gpt2-asha"]
    report = analyze_search(exp, "kron-gpt2-asha", ["quality", "params"])
    pruned = [json.loads(p.read_text()) for p in exp.glob("*/trial_summary.json")]
    pruned = [s for s in pruned if s["status"] == "pruned"]
    assert len(pruned) == 1
    line = next(ln for ln in report.text.splitlines() if ln.startswith("stopped early"))
    p = pruned[0]
    assert re.search(rf"{p['trial_id']} {p['quality']:.4g} at step 120, {p['params']:,}", line), line
    front_rows = report.text.split("stopped early")[0]
    assert p["trial_id"] not in front_rows  # never on the front


def test_the_end_of_search_analysis_of_a_bytes_objective(make_summary, tmp_path):
    """objectives [quality, bytes] (a search with int8 in its space): the front is over bytes, trials.csv and
    pareto.csv carry the bytes column, sorted by it (the analysis stopped with KeyError: 'bytes' before)."""
    from analysis.front import analyze_search

    rows = [("a", 4_000_000, 120.0, "complete"), ("b", 2_000_000, 130.0, "complete"), ("c", 3_000_000, 140.0,
                                                                                      "complete"),
            ("d", 1_000_000, 200.0, "pruned")]
    for trial_id, n_bytes, quality, status in rows:
        write_json(tmp_path / "s" / trial_id / "trial_summary.json",
                   make_summary(trial_id=trial_id, search="s", bytes=n_bytes, quality=quality, status=status,
                                params=1_000_000))  # every plan the same parameters: only bytes tell them apart
    report = analyze_search(tmp_path / "s", "s", ["quality", "bytes"])
    trials = pd.read_csv(tmp_path / "s" / "analysis" / "trials.csv")
    assert "bytes" in trials and list(trials.loc[trials["status"] == "complete", "trial_id"]) == ["b", "c", "a"]
    front = pd.read_csv(tmp_path / "s" / "analysis" / "pareto.csv")
    assert list(front["trial_id"]) == ["b", "a"] and list(front["bytes"]) == [2_000_000, 4_000_000]
    assert "stopped early" in report.text and "d 200 at step" in report.text and "1,000,000" in report.text
    header = next(ln for ln in report.text.splitlines() if ln.startswith("trial"))
    assert "bytes" in header.split()
