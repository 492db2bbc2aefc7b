"""Short budgets against the longest (`analysis.fidelity`): Spearman per rung over the trials that reached the top,
the quality at a rung taken from the last evaluation at or before it; the report and `analyze` print it."""
from __future__ import annotations

import pandas as pd
import pytest
from scipy.stats import spearmanr

from analysis.fidelity import rung_agreement, rung_agreement_text


def _history(rows):
    cols = ["search", "trial_id", "method", "status", "step", "quality"]
    return pd.DataFrame([dict(zip(cols, r)) for r in rows], columns=cols).astype(
        {"step": "Int64", "quality": "float64"})


def test_spearman_per_rung_over_the_trials_that_reached_the_top():
    # five trials evaluated at 0, 10, 20, 40; the fifth stopped at 20 (ASHA): it takes no part
    finals = {"a": 100.0, "b": 110.0, "c": 120.0, "d": 130.0}
    at10 = {"a": 150.0, "b": 140.0, "c": 160.0, "d": 170.0}   # one swap (a, b) against the end
    rows = []
    for t in finals:
        rows += [("s", t, "mixed", "complete", 0, 500.0), ("s", t, "mixed", "complete", 10, at10[t]),
                 ("s", t, "mixed", "complete", 40, finals[t])]
    rows += [("s", "e", "mixed", "pruned", 0, 500.0), ("s", "e", "mixed", "pruned", 10, 90.0)]
    rows += [("s", "teacher", "teacher", "complete", 0, 50.0)]
    table = rung_agreement(_history(rows))
    assert list(table["rung"]) == [10] and int(table["top"].iloc[0]) == 40 and int(table["trials"].iloc[0]) == 4
    want = spearmanr([at10[t] for t in finals], list(finals.values())).statistic
    assert table["spearman"].iloc[0] == pytest.approx(want) and want == pytest.approx(0.8)
    # an explicit rung between evaluations takes each trial's last evaluation before it
    t2 = rung_agreement(_history(rows), rungs=[25])
    assert t2["spearman"].iloc[0] == pytest.approx(want)
    line = rung_agreement_text(table)
    assert "step 40" in line and "step 10 +0.80 (4 trials)" in line
    assert rung_agreement(_history(rows[:6])).empty  # fewer than three trials at the top: nothing to say


def test_analyze_reports_the_agreement(fake_results, tmp_path, capsys):
    from search.cli import main

    out = tmp_path / "analysis"
    assert main(["analyze", str(fake_results["kron-gpt2-tpe"]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "rank agreement (Spearman)" in printed
    report = (out / "report.md").read_text()
    assert "## Short budgets against the longest" in report
