"""Bad numbers in trial summaries (issue 32, "trust"): never a wrong answer, never an internal error.

* A trial whose size is negative or not finite, or a complete trial whose quality is missing or not finite, is left
  out of every front, best, knee, hypervolume, selection and baseline comparison, and each command names it on one
  line ("1 trial left out: s/bad params -5, bytes -10").
* A file that cannot be read as a summary — not JSON, an integer too long, nesting too deep, text where a number
  belongs, a count that is not whole, a number out of range — is exit 2 and one short line naming the file.
"""
from __future__ import annotations

import json
import math
import time

import pandas as pd
import pytest

from analysis.pareto import nondominated_ranks
from analysis.report import summarize
from analysis.results import (left_out_line, left_out_reasons, load_results, mark_pareto, read_summary,
                              usable_rows)
from kron.errors import CheckpointError
from search.cli import main

SUFFIX = " (not on any front, nor best, knee or selected)"
MAX_MESSAGE = 2000
COMMANDS = ("analyze", "export", "compare")


def run(capsys, *argv):
    start = time.monotonic()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err, time.monotonic() - start


def run_command(capsys, command, search, out):
    """`command` over the search folder (and, for compare, the references beside it)."""
    if command == "analyze":
        return run(capsys, "analyze", search, "--out", out)
    if command == "export":
        return run(capsys, "export", search, "--select", "knee", "--out", out)
    return run(capsys, "compare", search, search.parent / "refs", "--out", out)


@pytest.fixture
def bad_json(make_summary):
    """`bad_json(**overrides)`: the JSON text of a summary (trial "bad") with `overrides`; a string "<<raw:TEXT>>" is
    written as the raw JSON TEXT, and `raw="..."` is the whole text."""

    def text(**overrides) -> str:
        if "raw" in overrides:
            return overrides["raw"]
        raw = {}
        for key, value in list(overrides.items()):
            if isinstance(value, str) and value.startswith("<<raw:"):
                raw[key] = value[6:-2]
                overrides[key] = f"@@{key}@@"
        text = json.dumps(make_summary(**{"trial_id": "bad", **overrides}))
        for key, literal in raw.items():
            text = text.replace(f'"@@{key}@@"', literal)
        return text

    return text


@pytest.fixture
def make_search(make_summary):
    """`make_search(tmp_path, mode)`: tmp_path/s, three good trials on one front (1M/2M/3M params), and
    tmp_path/refs, a teacher and a preset; returns tmp_path/s."""

    def make(tmp_path, mode: str = "min"):
        search = tmp_path / "s"
        qualities = (300.0, 200.0, 100.0) if mode == "min" else (0.5, 0.6, 0.7)
        for i, quality in enumerate(qualities, 1):
            write_json(search / f"good{i}" / "trial_summary.json",
                       make_summary(trial_id=f"good{i}", params=i * 1_000_000, bytes=4 * i * 1_000_000,
                                    quality=quality, quality_mode=mode,
                                    quality_name="val_ppl" if mode == "min" else "accuracy"))
        refs = tmp_path / "refs"
        write_json(refs / "teacher" / "trial_summary.json",
                   make_summary(trial_id="teacher", method="teacher", label="teacher", params=9_000_000, quality=62.0))
        write_json(refs / "kngpt2" / "trial_summary.json",
                   make_summary(trial_id="kngpt2", method="preset", label="kngpt2", params=2_500_000, quality=250.0))
        return search

    return make


def write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def write_bad(search, text: str, name: str = "bad"):
    path = search / name / "trial_summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --- values no front may use: left out and named ------------------------------------------------------------

# (summary overrides, the reason printed); every bad trial is tiny and excellent, so it would win if it counted
LEFT_OUT = [
    ({"params": -5, "bytes": -10, "quality": 1.0}, "params -5, bytes -10"),
    ({"params": 10, "quality": float("nan")}, "quality NaN"),  # json writes the NaN literal Python reads back
    ({"params": 10, "quality": "<<raw:NaN>>"}, "quality NaN"),
    ({"params": 10, "quality": float("inf")}, "quality inf"),
    ({"params": 10, "quality": float("-inf")}, "quality -inf"),
    ({"params": 10, "quality": "<<raw:1e400>>"}, "quality inf"),  # past float range: read as inf
    ({"params": 10, "quality": "<<raw:-1e400>>"}, "quality -inf"),
    ({"params": 10, "quality": None}, "quality missing"),
    ({"params": float("nan"), "quality": 1.0}, "params NaN"),
    ({"params": "<<raw:Infinity>>", "quality": 1.0}, "params inf"),
    ({"params": "<<raw:1e400>>", "quality": 1.0}, "params inf"),
    ({"params": 10, "macs_per_token": -1, "quality": 1.0}, "macs_per_token -1"),
    ({"params": 10, "params_excl_output_embedding": -3, "quality": 1.0}, "params_excl_output_embedding -3"),
    ({"params": 10, "bytes": float("-inf"), "quality": 1.0}, "bytes -inf"),
]


@pytest.mark.parametrize("overrides, reason", LEFT_OUT, ids=[r for _, r in LEFT_OUT])
def test_analyze_names_the_left_out_trial_and_keeps_it_off_the_front(bad_json, make_search, capsys, tmp_path,
                                                                     overrides, reason):
    search = make_search(tmp_path)
    write_bad(search, bad_json(**overrides))
    rc, out, err, _ = run(capsys, "analyze", search, "--out", tmp_path / "out")
    assert rc == 0, err
    line = f"1 trial left out: s/bad {reason}"
    assert line + SUFFIX in out.splitlines()
    assert "best good3 " in out and "knee good" in out and "*bad" not in out
    results = pd.read_csv(tmp_path / "out" / "results.csv").set_index("trial_id")
    assert results.loc["bad", "left_out"] == reason and not results.loc["bad", "on_front"]
    assert pd.isna(results.loc["bad", "front_rank"])
    assert results["on_front"].sum() == 3 and results["left_out"].notna().sum() == 1
    assert "bad" not in pd.read_csv(tmp_path / "out" / "pareto.csv")["trial_id"].tolist()
    assert f"**{line}** (not on any front" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.parametrize("overrides, reason", [LEFT_OUT[0], LEFT_OUT[1], LEFT_OUT[4]], ids=["neg", "nan", "-inf"])
@pytest.mark.parametrize("how", ["knee", "front", "best-under-params:1.5M", "best-under-bytes:1GB"])
def test_export_never_selects_a_left_out_trial_and_records_it(bad_json, make_search, capsys, tmp_path, overrides,
                                                              reason, how):
    search = make_search(tmp_path)
    write_bad(search, bad_json(**overrides))
    rc, out, err, _ = run(capsys, "export", search, "--select", how, "--out", tmp_path / "out")
    assert rc == 0, err
    assert out.splitlines()[0] == f"1 trial left out: s/bad {reason}" + SUFFIX
    record = json.loads((tmp_path / "out" / "selection.json").read_text())
    assert "bad" not in [entry["trial_id"] for entry in record["selected"]] and record["selected"]
    assert record["left_out"] == [{"search": "s", "trial_id": "bad", "role": "trial", "reason": reason}]
    assert not (tmp_path / "out" / "bad.plan.yaml").exists()


def test_export_with_only_left_out_trials_says_so(bad_json, capsys, tmp_path):
    write_bad(tmp_path / "s", bad_json(params=-5, quality=1.0))
    write_bad(tmp_path / "s", bad_json(trial_id="bad2", quality=float("nan")), "bad2")
    rc, _, err, _ = run(capsys, "export", tmp_path / "s", "--select", "knee", "--out", tmp_path / "out")
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "no complete trials to select from: 2 trials (2 complete)" in err
    assert "2 trials left out: s/bad params -5; s/bad2 quality NaN" in err
    assert not (tmp_path / "out" / "selection.json").exists()


@pytest.mark.parametrize("overrides, reason", [LEFT_OUT[0], LEFT_OUT[4]], ids=["neg", "-inf"])
def test_compare_never_lets_a_left_out_trial_dominate_a_baseline(bad_json, make_search, capsys, tmp_path, overrides,
                                                                 reason):
    search = make_search(tmp_path)
    write_bad(search, bad_json(**overrides))
    rc, out, err, _ = run_command(capsys, "compare", search, tmp_path / "out")
    assert rc == 0, err
    assert f"1 trial left out: s/bad {reason}" + SUFFIX in out.splitlines()
    assert "s/bad" not in out.replace(f"s/bad {reason}", "")
    # the preset (2.5M, ppl 250) is dominated by good2 (2M, ppl 200), not by the tiny "bad" trial
    assert "baseline kngpt2 [preset] 2.5M (2,500,000) params, quality 250: dominated by s/good2" in out
    assert f"**1 trial left out: s/bad {reason}**" in (tmp_path / "out" / "compare.md").read_text()


def test_a_reference_with_bad_values_is_left_out_and_named(make_search, make_summary, capsys, tmp_path):
    search = make_search(tmp_path)
    write_json(tmp_path / "refs" / "kngpt2" / "trial_summary.json",
               make_summary(trial_id="kngpt2", method="preset", label="kngpt2", params=-2, quality=250.0))
    rc, out, err, _ = run_command(capsys, "compare", search, tmp_path / "out")
    assert rc == 0, err
    assert "1 reference left out: refs/kngpt2 params -2" + SUFFIX in out.splitlines()
    assert "baseline kngpt2" not in out and "baseline teacher [teacher]" in out


def test_a_left_out_trial_is_not_drawn(bad_json, make_search, tmp_path):
    from analysis.plots import pareto_plot_data

    search = make_search(tmp_path)
    write_bad(search, bad_json(params=-5, quality=1.0))
    data = pareto_plot_data(load_results(search))
    (series,) = data.series
    assert sorted(series.x.tolist()) == [1e6, 2e6, 3e6] and series.on_front.all()


def test_the_end_of_search_front_warns_and_ranks_only_usable_trials(bad_json, make_search, tmp_path):
    from analysis.front import analyze_search

    search = make_search(tmp_path)
    write_bad(search, bad_json(params=-5, quality=1.0))
    report = analyze_search(search, "s", ["quality", "params"])
    assert report.text.splitlines()[0] == "warning: 1 trial left out: s/bad params -5 (not ranked)"
    assert "Pareto front of s over quality, params: 3 of 3 complete trials" in report.text
    assert not any("bad" in path.name for path in (search / "analysis" / "front").iterdir())


def test_max_mode_inf_accuracy_is_left_out(bad_json, make_search, capsys, tmp_path):
    search = make_search(tmp_path, mode="max")
    write_bad(search, bad_json(params=10, quality=float("inf"), quality_mode="max", quality_name="accuracy"))
    rc, out, err, _ = run(capsys, "analyze", search, "--out", tmp_path / "out")
    assert rc == 0, err
    assert "1 trial left out: s/bad quality inf" + SUFFIX in out.splitlines() and "best good3 " in out


def test_failed_trials_keep_their_own_treatment(bad_json, make_search, capsys, tmp_path):
    """A diverged trial's NaN quality and an errored trial's missing one are failures, reported as such: not
    "left out"."""
    search = make_search(tmp_path)
    write_bad(search, bad_json(status="diverged", quality=float("nan"), error="loss became NaN at step 3"))
    write_bad(search, bad_json(trial_id="err", status="error", quality=None, error="RuntimeError: boom"), "err")
    rc, out, err, _ = run(capsys, "analyze", search, "--out", tmp_path / "out")
    assert rc == 0, err
    assert "left out" not in out and "5 trials: 3 complete, 1 diverged, 1 error" in out
    report = (tmp_path / "out" / "report.md").read_text()
    assert "left out" not in report and "loss became NaN at step 3" in report and "RuntimeError: boom" in report


def test_a_missing_size_on_the_axis_in_use_is_named(bad_json, make_search, capsys, tmp_path):
    search = make_search(tmp_path)
    write_bad(search, bad_json(params=10, macs_per_token=None, quality=1.0))
    rc, out, err, _ = run(capsys, "analyze", search, "--out", tmp_path / "a", "--x", "macs_per_token")
    assert rc == 0, err
    assert "1 trial left out: s/bad macs_per_token missing" + SUFFIX in out.splitlines()
    rc, out, err, _ = run(capsys, "analyze", search, "--out", tmp_path / "b")  # on params it is a fine trial
    assert rc == 0 and "left out" not in out and "best bad " in out


def test_left_out_line_lists_ten_then_counts(bad_json, make_search, tmp_path):
    search = make_search(tmp_path)
    for i in range(12):
        write_bad(search, bad_json(trial_id=f"b{i:02d}", params=-i - 1, quality=1.0), f"b{i:02d}")
    line = left_out_line(load_results(search))
    assert line.startswith("12 trials left out: s/b00 params -1; s/b01 params -2; ")
    assert line.endswith("; s/b09 params -10; and 2 more") and "b10" not in line


# --- the rule itself, on tables ----------------------------------------------------------------------------


def test_left_out_reasons_of_a_hand_made_table():
    """A table without a `left_out` column (not from load_results) gets its reasons from its values."""
    df = pd.DataFrame({
        "search": "s", "trial_id": ["ok", "neg", "nan", "inf", "div", "nomacs"],
        "method": "kronecker", "quality_mode": "min",
        "status": ["complete", "complete", "complete", "complete", "diverged", "complete"],
        "params": pd.array([10, -5, 10, 10, 10, 10], dtype="Int64"),
        "macs_per_token": pd.array([5, 5, 5, 5, 5, None], dtype="Int64"),
        "quality": [1.0, 1.0, math.nan, -math.inf, math.nan, 2.0],
    })
    reasons = left_out_reasons(df, ("macs_per_token", "quality"))
    assert reasons.tolist() == [pd.NA, "params -5", "quality NaN", "quality -inf", pd.NA, "macs_per_token missing"]
    assert usable_rows(df, ("params", "quality")).tolist() == [True, False, False, False, False, True]
    marked = mark_pareto(df)
    assert marked["on_front"].tolist() == [True, False, False, False, False, False]
    assert marked["front_rank"].isna().tolist() == [False, True, True, True, True, False]


def test_nan_never_reaches_a_pareto_computation(bad_json, make_search, tmp_path):
    """NaN compares False with everything, so a NaN point would look non-dominated: it is kept out before ranking
    (and `nondominated_ranks` itself never puts one on front 0)."""
    assert nondominated_ranks([[1.0, math.nan], [2.0, 5.0]], ["min", "min"]).tolist() == [1, 0]
    search = make_search(tmp_path)
    write_bad(search, bad_json(params=10, quality=float("nan")))
    stats = summarize(load_results(search)).stats.iloc[0]
    assert stats["best_trial"] == "good3" and stats["knee_trial"] != "bad" and stats["on_front"] == 3
    assert math.isfinite(stats["hypervolume"])


# --- files that cannot be read: exit 2, one short line naming the file ----------------------------------------

# (id, `bad_text` overrides, a fragment of the error line)
UNREADABLE = [
    ("not json", {"raw": "{not json"}, "truncated or corrupt JSON"),
    ("int 5001 digits", {"params": "<<raw:1" + "0" * 5000 + ">>"}, "an integer of 5,001 digits"),
    ("int 100001 digits", {"params": "<<raw:-1" + "0" * 100_000 + ">>"}, "an integer of 100,001 digits"),
    ("nested 10^5", {"config": "<<raw:" + "[" * 100_000 + "]" * 100_000 + ">>"}, "nested more than 64 levels"),
    ("nested 900 in plan", {"plan": "<<raw:{\"rules\": " + "[" * 900 + "]" * 900 + "}>>"},
     "nested more than 64 levels"),
    ("text quality", {"quality": "good"}, "'quality' must be a number, got str 'good'"),
    ("text params", {"params": "5M"}, "'params' must be a number, got str '5M'"),
    ("long text params", {"params": "9" * 1_000_000}, "'params' must be a number, got str '99999"),
    ("bool params", {"params": True}, "'params' must be a number, got bool True"),
    ("list quality", {"quality": [1.0]}, "'quality' must be a number, got list [1.0]"),
    ("fractional params", {"params": 2.5}, "'params' must be a whole number, got 2.5"),
    ("params past int64", {"params": 10**30}, "'params' is out of range"),
    ("quality past float", {"quality": 10**400}, "'quality' is out of range"),
    ("object trial id", {"trial_id": {"a": 1}}, "'trial_id' must be a string, got dict {'a': 1}"),
]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("overrides, fragment", [case[1:] for case in UNREADABLE],
                         ids=[case[0] for case in UNREADABLE])
def test_an_unreadable_summary_is_exit_2_one_short_line_naming_the_file(bad_json, make_search, capsys, tmp_path,
                                                                        command, overrides, fragment):
    search = make_search(tmp_path)
    bad = write_bad(search, bad_json(**overrides))
    rc, out, err, seconds = run_command(capsys, command, search, tmp_path / "out")
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"kronsearch {command}: error: {bad}: "), err
    assert fragment in lines[0] and len(lines[0]) < MAX_MESSAGE and "Traceback" not in err
    assert seconds < 20
    written = [p.name for p in (tmp_path / "out").iterdir()] if (tmp_path / "out").exists() else []
    assert written == []


def test_the_python_api_raises_checkpoint_errors_for_unreadable_files(bad_json, tmp_path):
    bad = write_bad(tmp_path / "s", bad_json(quality="good"))
    with pytest.raises(CheckpointError, match="'quality' must be a number") as info:
        load_results(tmp_path / "s")
    assert str(bad) in str(info.value)
    deep = write_bad(tmp_path / "d", bad_json(config="<<raw:" + "[" * 5000 + "]" * 5000 + ">>"))
    with pytest.raises(CheckpointError, match="nested more than 64 levels deep"):
        read_summary(deep)
    fine = write_bad(tmp_path / "f", bad_json(config={"a": {"b": [[{"c": [1, 2]}]]}}, quality=float("nan")))
    assert math.isnan(read_summary(fine)["quality"])  # NaN literals are values, named later, not file errors


def test_a_file_past_the_size_cap_is_refused_naming_it(bad_json, make_search, capsys, tmp_path, monkeypatch):
    import analysis.summary_checks as checks

    search = make_search(tmp_path)
    bad = write_bad(search, bad_json(config={"pad": "x" * 5000}))
    monkeypatch.setattr(checks, "MAX_JSON_BYTES", 4096)
    rc, _, err, _ = run(capsys, "analyze", search, "--out", tmp_path / "out")
    assert rc == 2 and err.strip() == (f"kronsearch analyze: error: {bad}: {bad.stat().st_size:,} bytes, more than "
                                       "the 4,096 a results file may have")
