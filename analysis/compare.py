"""`compare(sources, out_dir, labels=...)`: several searches and baselines in one plot and one table (`compare.csv`,
`compare.png`, `compare.md`): each search's hypervolume against a common reference point and, for every baseline,
the best search plan at no larger size and by how much it beats (or loses to) it. Reads saved files only.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.report import (Summary, best_index, eligible_rows, plotly_available, hypervolume_lines, axis_name, results_dir,
                             quality_name_of, trial_display_name, load_labelled, summarize)
from analysis.results import as_floats, atomic_write_text, column_direction, is_reference, left_out_line, usable_rows
from analysis.textfmt import fmt_delta, fmt_int, fmt_quality, md_table
from kron.errors import DataError

__all__ = ["baseline_dominance", "compare", "compare_markdown"]


def baseline_dominance(df: pd.DataFrame, y: str = "quality", *, x: str = "params") -> pd.DataFrame:
    """For every complete baseline row (teacher/preset/lowrank/layerdrop), the best search plan at <= its size x.

    Columns: baseline, method, params, quality, then for the best plan over all searches: best_search,
    best_trial, best_params, best_quality, quality_delta (best - baseline, signed; the quality units),
    quality_delta_pct, dominates (bool: no worse in both objectives and better in one); and per search
    `delta:<search>` / `dominates:<search>`. "Best" = best quality, ties to fewer params, then trial id.
    """
    baselines = df[usable_rows(df, (x, y)) & is_reference(df)]  # finite, non-negative sizes and quality
    trials = df[eligible_rows(df, x, y)]
    searches = sorted(trials["search"].dropna().unique(), key=str)
    direction = column_direction(pd.concat([trials, baselines]), y) if len(trials) + len(baselines) else "min"
    rows = []
    for _, base in baselines.sort_values(x).iterrows():
        bx, by = float(base[x]), float(base[y])
        row = {"baseline": trial_display_name(base), "method": str(base["method"]), "params": base[x], "quality": by}
        for scope, pool in [(None, trials)] + [(s, trials[trials["search"] == s]) for s in searches]:
            under = pool[as_floats(pool[x]) <= bx]
            best = under.iloc[best_index(under, y, direction, x)] if len(under) else None
            if best is None:
                delta, dominates = math.nan, False
            else:
                qx, qy = float(best[x]), float(best[y])
                delta = qy - by
                better_q = qy < by if direction == "min" else qy > by
                dominates = (qy == by and qx < bx) or better_q
            if scope is None:
                row.update(best_search=None if best is None else str(best["search"]),
                           best_trial=None if best is None else str(best["trial_id"]),
                           best_params=pd.NA if best is None else best[x],
                           best_quality=math.nan if best is None else float(best[y]),
                           quality_delta=delta, quality_delta_pct=100 * delta / abs(by) if by else math.nan,
                           dominates=bool(dominates))
            else:
                row[f"delta:{scope}"] = delta
                row[f"dominates:{scope}"] = bool(dominates)
        rows.append(row)
    columns = ["baseline", "method", "params", "quality", "best_search", "best_trial", "best_params",
               "best_quality", "quality_delta", "quality_delta_pct", "dominates"]
    columns += [f"{kind}:{s}" for s in searches for kind in ("delta", "dominates")]
    return pd.DataFrame(rows, columns=columns)


def compare(sources, out_dir, *, labels: Sequence[str] | None = None, title: str | None = None,
            x: str = "params") -> dict[str, Path]:
    """Overlay several searches and their baselines: compare.csv, compare.png (+ compare.html with plotly) and
    compare.md in `out_dir`. `labels` renames each source's search (one label per source).

    compare.csv has one row per search (kind "search": trials, front size, best quality, hypervolume against the
    common reference point) and one per baseline (kind "baseline": its params and quality, the best search plan
    at <= its params, the quality delta, and whether that plan dominates it). Returns {file name: path}.
    """
    return compare_with_summary(sources, out_dir, labels=labels, title=title, x=x)[0]


def compare_with_summary(sources, out_dir, *, labels=None, title=None, x="params"):
    from analysis.plots import plot_pareto

    out = results_dir(out_dir)
    df = load_labelled(sources, labels)
    if df.empty:
        raise DataError("no trials found in the given sources")
    summary = summarize(df, x, "quality")
    dominance = baseline_dominance(summary.marked, x=x)
    table = _compare_table(summary.stats, dominance)
    written: dict[str, Path] = {}
    written["compare.csv"] = atomic_write_text(out / "compare.csv", table.to_csv(index=False))
    html = out / "compare.html" if plotly_available() else None
    written["compare.png"] = plot_pareto(summary.marked, x=x, y="quality", out_png=out / "compare.png",
                                         title=title or "Pareto fronts compared", html_out=html)
    if html is not None:
        written["compare.html"] = html
    written["compare.md"] = atomic_write_text(out / "compare.md", compare_markdown(summary, dominance, title=title))
    return written, summary, dominance


def _compare_table(stats: pd.DataFrame, dominance: pd.DataFrame) -> pd.DataFrame:
    searches = pd.DataFrame({
        "kind": "search", "name": stats["search"], "trials": stats["trials"].astype("Int64"),
        "complete": stats["complete"].astype("Int64"), "on_front": stats["on_front"].astype("Int64"),
        "hypervolume": stats["hypervolume"],
        "hypervolume_share": stats["hypervolume_share"], "params": stats["best_params"],
        "quality": stats["best_quality"], "best_trial": stats["best_trial"],
    })
    baselines = pd.DataFrame({
        "kind": "baseline", "name": dominance["baseline"], "method": dominance["method"],
        "params": dominance["params"], "quality": dominance["quality"], "best_search": dominance["best_search"],
        "best_trial": dominance["best_trial"], "best_params": dominance["best_params"],
        "best_quality": dominance["best_quality"], "quality_delta": dominance["quality_delta"],
        "quality_delta_pct": dominance["quality_delta_pct"], "dominates": dominance["dominates"],
    })
    columns = ["kind", "name", "method", "trials", "complete", "on_front", "hypervolume", "hypervolume_share",
               "params", "quality", "best_search", "best_trial", "best_params", "best_quality", "quality_delta",
               "quality_delta_pct", "dominates"]
    frames = [frame for frame in (searches, baselines) if len(frame)]
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    table = table.reindex(columns=columns)
    for column in ("trials", "complete", "on_front", "params", "best_params"):
        table[column] = pd.to_numeric(table[column]).astype("Int64")
    table["dominates"] = table["dominates"].astype("boolean")
    return table


def compare_markdown(summary: Summary, dominance: pd.DataFrame, *, title: str | None = None) -> str:
    marked, stats = summary.marked, summary.stats
    qname = quality_name_of(marked)
    lines = [f"# {title or 'Pareto fronts compared'}", "", "![compare.png](compare.png)", ""]
    left_out = left_out_line(marked, (summary.x, summary.y))
    if left_out:
        lines += [f"**{left_out}** (on no front and in no comparison).", ""]
    lines += ["## Searches", ""]
    lines += hypervolume_lines(stats, summary.reference, qname)
    xname = axis_name(summary.x)  # the size axis the fronts and the dominance are computed on
    rows = [[row["search"], row["best_trial"] or "—", fmt_quality(row["best_quality"]),
             fmt_int(row["best_x"]), row["knee_trial"] or "—", fmt_int(row["knee_x"]),
             fmt_quality(row["knee_quality"])]
            for _, row in stats.iterrows()]
    lines += md_table(["search", "best trial", f"best {qname}", f"its {xname}", "knee trial", f"knee {xname}",
                        f"knee {qname}"], rows, numeric=(2, 3, 5, 6)) + [""]

    lines += ["## Baselines", ""]
    if dominance.empty:
        lines += ["No baseline trials (teacher, preset, low-rank, layer-drop) among the sources.", ""]
        return "\n".join(lines)
    lines += [f"For each baseline, the best search plan (by {qname}) with at most the baseline's {xname}. "
              f"Δ = plan − baseline in {qname}; the plan dominates the baseline when it is no worse in both "
              "objectives and better in one.", ""]
    searches = list(stats["search"])
    rows = []
    for _, row in dominance.iterrows():
        if not isinstance(row["best_trial"], str):  # None, or NaN once the rows went through a DataFrame
            verdict = "none dominates (no plan this small)"
        elif row["dominates"]:
            verdict = (f"{row['best_search']}/{row['best_trial']} ({fmt_int(row['best_params'])} {xname}, "
                       f"{fmt_quality(row['best_quality'])})")
        else:
            verdict = (f"none dominates (best at ≤ its {xname}: {row['best_search']}/{row['best_trial']}, "
                       f"{fmt_quality(row['best_quality'])})")
        cells = [row["baseline"], row["method"], fmt_int(row["params"]), fmt_quality(row["quality"]), verdict,
                 fmt_delta(row["quality_delta"], row["quality_delta_pct"])]
        for search in searches:
            delta = row.get(f"delta:{search}", math.nan)
            cells.append(fmt_delta(delta) + ("" if not row.get(f"dominates:{search}") else " ✓")
                         if np.isfinite(delta) else f"no plan ≤ {xname}")
        rows.append(cells)
    lines += md_table(["baseline", "method", xname, qname, "best dominating plan", "Δ (best plan)",
                        *[f"Δ {s}" for s in searches]], rows, numeric=[2, 3, 5, *range(6, 6 + len(searches))])
    lines += ["", "✓: that search has a plan dominating the baseline.", ""]
    return "\n".join(lines)


# --- console ------------------------------------------------------------------------------------------------
