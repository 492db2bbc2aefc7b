"""How well a short distillation budget predicts a long one: per budget (rung), the rank correlation between the
trials' quality there and at the top budget, over the trials that reached both.

A search with early stopping (ASHA) judges its trials at rungs of training steps and promotes few of them to the
next; whether its low rungs screen well is a question of these correlations, which only trials that reached the
top answer (a stopped trial has no top-rung quality). `rung_agreement(history)` takes `analysis.results.
load_history`'s frame: each trial's quality at a rung is the one it reported at its last evaluation at or before
that step; the top rung is the largest step any complete trial reached (or `top`), and a rung is every evaluation
step below it that at least three such trials reported at or past (or `rungs`). Spearman's rho by `scipy.stats`;
its two-sided p alongside, since with a handful of trials a high rho can be chance. Never imports Ray or builds
models.
"""
from __future__ import annotations

import math

import pandas as pd

__all__ = ["agreement_by_search", "rung_agreement", "rung_agreement_text"]

MIN_TRIALS = 3  # fewer pairs than this give no correlation


def _quality_at(frame: pd.DataFrame, step: int) -> pd.Series:
    """Per trial, the quality of its last evaluation at or before `step` (missing when it has none)."""
    upto = frame[frame["step"] <= step].sort_values("step")
    return upto.groupby("key", sort=False)["quality"].last()


def rung_agreement(history: pd.DataFrame, *, rungs=None, top: int | None = None) -> pd.DataFrame:
    """Rows (rung, top, trials, spearman, p) per rung below the top, in step order, over the complete trials of
    `history` that reported at the top (see the module docstring). Empty when fewer than three did."""
    from scipy.stats import spearmanr

    cols = ["rung", "top", "trials", "spearman", "p"]
    h = history[(history["status"] == "complete") & history["quality"].notna() & history["step"].notna()].copy()
    h = h[h["method"].astype("string").fillna("") != "teacher"]
    if h.empty:
        return pd.DataFrame(columns=cols)
    h["key"] = h["search"].astype("string").fillna("") + "/" + h["trial_id"].astype("string").fillna("")
    h["step"] = h["step"].astype("int64")
    last = h.groupby("key")["step"].max()
    top = int(last.max()) if top is None else int(top)
    reached = last[last >= top].index
    h = h[h["key"].isin(reached)]
    at_top = _quality_at(h, top)
    if rungs is None:
        steps = sorted(s for s in h["step"].unique() if 0 < s < top)
        rungs = [s for s in steps if (last.loc[reached] >= s).sum() >= MIN_TRIALS]
    rows = []
    for r in sorted(int(x) for x in rungs if 0 <= int(x) < top):
        at_r = _quality_at(h, r)
        both = pd.concat([at_r.rename("r"), at_top.rename("t")], axis=1).dropna()
        if len(both) < MIN_TRIALS:
            continue
        rho, p = spearmanr(both["r"], both["t"])
        rows.append({"rung": r, "top": top, "trials": len(both),
                     "spearman": None if rho != rho else float(rho), "p": None if p != p else float(p)})
    return pd.DataFrame(rows, columns=cols)


def rung_agreement_text(table: pd.DataFrame) -> str | None:
    """One line: "rank agreement with step 600: step 60 0.77 (12 trials), ..." (None for an empty table)."""
    if table is None or table.empty:
        return None
    parts = []
    for _, r in table.iterrows():
        rho = "n/a" if r["spearman"] is None or (isinstance(r["spearman"], float) and math.isnan(r["spearman"])) \
            else f"{r['spearman']:+.2f}"
        parts.append(f"step {int(r['rung'])} {rho} ({int(r['trials'])} trials)")
    return (f"rank agreement (Spearman) of each budget's quality with step {int(table['top'].iloc[0])}'s, over the "
            f"trials that reached it: " + ", ".join(parts))


def agreement_by_search(history: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """`rung_agreement` of each search of `history` (its own top budget), only those with a correlation."""
    out = {}
    for name, group in history.groupby(history["search"].astype("string").fillna(""), sort=True):
        table = rung_agreement(group)
        if not table.empty:
            out[str(name)] = table
    return out
