"""Reports over saved search results: CSV tables, Pareto / plan figures and a markdown summary.

* `analyze(sources, out_dir)`: one report over every trial of `sources` — `results.csv`, `pareto.csv`,
  `pareto.png` (+ `pareto.html` with plotly), `plans_heatmap.png` and `report.md` (status counts, the front
  table, knee points, best plans, hypervolumes against a stated common reference point, failed trials).
* `compare(...)` (in `analysis.compare`): several searches and baselines in one plot and one table.
* `format_front_table(df)`: the Pareto front as a plain-text table for the console.

Hypervolume reference point: the worst value of each objective observed over the complete, non-baseline trials
of all the searches compared, made 10% worse (×1.1 for a positive minimised objective such as params or
perplexity, ×0.9 for a positive maximised one such as accuracy). Every search is measured against the same point,
so their hypervolumes are comparable; the point is written into the report.

Like the rest of `analysis`, this reads saved files only: no Ray, torch or transformers.
"""
from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from analysis.pareto import hypervolume, knee_point
from analysis.results import (
    STATUSES,
    atomic_write_text,
    as_floats,
    column_direction,
    is_reference,
    left_out_line,
    trial_counts,
    load_results,
    mark_pareto,
    plan_table,
    usable_rows,
)
from analysis.textfmt import (fmt_int, fmt_percent, fmt_quality, fmt_ratio, fmt_sci, human, md_table, text_table,
                              one_line, text_or_none)
from kron.errors import DataError, UserError
from kron.vocab import AXES, SIZE_AXES

__all__ = ["analyze", "format_front_table", "common_reference", "search_stats", "front_rows", "load_labelled",
           "X_COLUMNS", "HV_MARGIN"]

X_COLUMNS = SIZE_AXES  # the size axes a report may use (known before training)
HV_MARGIN = 0.1  # the reference point is the worst observed value made this much worse
_FAILED = ("error", "diverged")
_QUALITY_SHORT = {"val_ppl": "ppl"}


# --- data ---------------------------------------------------------------------------------------------------


class Summary(NamedTuple):
    """Everything a report shows, computed once (the CLI prints from it)."""

    marked: pd.DataFrame  # load_results table + front_rank, on_front, is_knee
    stats: pd.DataFrame  # one row per search (see `search_stats`)
    front: pd.DataFrame  # the front rows of every search (see `front_rows`)
    reference: dict | None  # {"values": [x_ref, y_ref], "columns": [x, y], "directions": [...]} or None
    x: str
    y: str
    agreement: dict | None = None  # search -> `analysis.fidelity.rung_agreement` table (only searches with one)


def load_labelled(sources, labels: Sequence[str] | None = None) -> pd.DataFrame:
    """`load_results` of each source, concatenated; with `labels` (one per source) the source's search is renamed.

    A source holding one search is renamed to its label; one holding several gets "label/search" names. Baseline
    rows (teacher, preset, low-rank, layer-drop) are renamed too but never count as a search. A summary reached
    through two sources is kept once (first source wins).
    """
    sources = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    if not sources:
        raise DataError("no results sources given")
    if labels is not None:
        labels = list(labels)
        if len(labels) != len(sources):
            raise UserError(f"got {len(labels)} label(s) {labels} for {len(sources)} source(s); give one per source")
        if any(not str(label).strip() for label in labels):
            raise UserError("labels must be non-empty")
    frames = []
    for i, source in enumerate(sources):
        frame = load_results(source)
        if labels is not None:
            names = frame["search"].dropna().unique()
            label = str(labels[i])
            frame["search"] = (frame["search"].map(lambda s: label) if len(names) <= 1
                               else frame["search"].map(lambda s: f"{label}/{s}")).astype("string")
        frames.append(frame)
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    return df.drop_duplicates("summary_path", keep="first").reset_index(drop=True)


def eligible_rows(df: pd.DataFrame, x: str, y: str) -> pd.Series:
    """Complete, non-baseline rows with finite x and y that `analysis.results.left_out_reasons` passes."""
    ok = usable_rows(df, (x, y)) & ~is_reference(df)
    for column in (x, y):
        ok &= np.isfinite(as_floats(df[column]))
    return ok


def common_reference(df: pd.DataFrame, x: str = "params", y: str = "quality") -> dict | None:
    """The hypervolume reference point shared by every search of `df` (see the module docstring), or None when
    no complete non-baseline trial has finite objectives.

    Returns {"columns": [x, y], "directions": [...], "values": [...], "worst": [...]}.
    """
    rows = df[eligible_rows(df, x, y)]
    if rows.empty:
        return None
    directions = [column_direction(rows, x), column_direction(rows, y)]
    values, worst_values = [], []
    for column, direction in zip((x, y), directions):
        observed = as_floats(rows[column])
        worst = float(observed.max() if direction == "min" else observed.min())
        margin = HV_MARGIN * abs(worst)
        if margin == 0:  # a worst value of exactly 0: fall back to a tenth of the observed span, else 0.1
            span = float(observed.max() - observed.min())
            margin = HV_MARGIN * span if span > 0 else HV_MARGIN
        values.append(worst + margin if direction == "min" else worst - margin)
        worst_values.append(worst)
    return {"columns": [x, y], "directions": directions, "values": values, "worst": worst_values}


def search_stats(df: pd.DataFrame, x: str = "params", y: str = "quality", reference: dict | None = None
                 ) -> pd.DataFrame:
    """One row per search (groups with at least one non-baseline trial), in name order.

    Columns: search, trials, complete, failed, on_front, best_trial, best_quality, best_params, best_x (the best
    trial's size on `x`), best_plan, knee_trial, knee_x, knee_quality, hypervolume, hypervolume_share (of the largest hypervolume).
    `reference` defaults to `common_reference(df, x, y)`.
    """
    if reference is None:
        reference = common_reference(df, x, y)
    ok = eligible_rows(df, x, y)
    searches = sorted(df.loc[~is_reference(df), "search"].dropna().unique(), key=str)
    rows = []
    for search in searches:
        group = df[(df["search"] == search) & ~is_reference(df)]
        good = group[ok[group.index]]
        row = {"search": str(search), "trials": len(group), "complete": int((group["status"] == "complete").sum()),
               "failed": int(group["status"].isin(_FAILED).sum()), "on_front": 0,
               "best_trial": None, "best_quality": math.nan, "best_params": pd.NA, "best_x": math.nan,
               "best_plan": None,
               "knee_trial": None, "knee_x": math.nan, "knee_quality": math.nan,
               "hypervolume": math.nan, "hypervolume_share": math.nan}
        if not good.empty:
            directions = [column_direction(good, x), column_direction(good, y)]
            values = np.column_stack([as_floats(good[x]), as_floats(good[y])])
            best = good.iloc[best_index(good, y, directions[1], x)]
            knee = good.iloc[knee_point(values, directions)]
            row.update(best_trial=str(best["trial_id"]), best_quality=float(best["quality"]),
                       best_params=best["params"], best_x=float(best[x]), best_plan=text_or_none(best["plan_summary"]),
                       knee_trial=str(knee["trial_id"]), knee_x=float(knee[x]), knee_quality=float(knee[y]))
            if reference is not None:
                row["hypervolume"] = hypervolume(values, directions, reference["values"])
        if "on_front" in group:
            row["on_front"] = int(group["on_front"].sum())
        rows.append(row)
    stats = pd.DataFrame(rows, columns=[
        "search", "trials", "complete", "failed", "on_front", "best_trial", "best_quality", "best_params", "best_x",
        "best_plan", "knee_trial", "knee_x", "knee_quality", "hypervolume", "hypervolume_share"])
    top = stats["hypervolume"].max() if len(stats) else math.nan
    if np.isfinite(top) and top > 0:
        stats["hypervolume_share"] = stats["hypervolume"] / top
    return stats


def front_rows(marked: pd.DataFrame, x: str = "params") -> pd.DataFrame:
    """The Pareto-front rows of a `mark_pareto` table, per search in `x` order, with `rank` = 1, 2, ... along
    the front (1 = smallest `x`)."""
    front = marked[marked["on_front"]].copy()
    front["_x"] = as_floats(front[x])
    front = front.sort_values(["search", "_x", "trial_id"], kind="stable").drop(columns="_x")
    front.insert(1, "rank", front.groupby("search", sort=False).cumcount() + 1)
    return front.reset_index(drop=True)


def summarize(df: pd.DataFrame, x: str = "params", y: str = "quality") -> Summary:
    """Fronts, knee points, per-search statistics and the common hypervolume reference of a results table."""
    if x not in X_COLUMNS:
        raise UserError(f"x must be one of {list(X_COLUMNS)}, got {x!r}")
    if y != "quality":
        raise UserError(f"y must be 'quality' (the trials' quality metric), got {y!r}")
    marked = mark_pareto(df.reset_index(drop=True), x, y)
    reference = common_reference(marked, x, y)
    stats = search_stats(marked, x, y, reference)
    marked["is_knee"] = False
    for knee, search in zip(stats["knee_trial"], stats["search"]):
        if knee is not None:
            marked.loc[(marked["search"] == search) & (marked["trial_id"] == knee) & marked["on_front"],
                       "is_knee"] = True
    return Summary(marked, stats, front_rows(marked, x), reference, x, y)


# --- analyze ------------------------------------------------------------------------------------------------


def analyze(sources, out_dir, *, x: str = "params", y: str = "quality", title: str | None = None
            ) -> dict[str, Path]:
    """Write the report files of `sources` (result directories or summary files) into `out_dir`.

    x: "params" or "macs_per_token" (the size objective); y: "quality" (the trials' metric, its direction from
    `quality_mode`). Baseline trials (teacher/preset/lowrank/layerdrop) are drawn and counted but form no front.

    Returns {file name: path} of what was written: results.csv, pareto.csv, pareto.png, pareto.html (when plotly
    is installed), plans_heatmap.png (when the front trials have resolved plans) and report.md.
    """
    return analyze_with_summary(sources, out_dir, x=x, y=y, title=title)[0]


def analyze_with_summary(sources, out_dir, *, x: str = "params", y: str = "quality", title: str | None = None):
    """`analyze`, also returning its `Summary` (for the CLI's console output)."""
    from analysis.plots import plot_pareto, plot_plan_heatmap

    out = results_dir(out_dir)
    df = load_labelled(sources)
    if df.empty:
        raise DataError("no trials found in the given sources")
    summary = summarize(df, x, y)
    written: dict[str, Path] = {}

    results = summary.marked.drop(columns=[c for c in ("history",) if c in summary.marked])
    # the teacher and other references are rows of the results, never trials: `role` says which is which
    results["role"] = np.where(is_reference(results), "reference", "trial")
    written["results.csv"] = atomic_write_text(out / "results.csv", results.to_csv(index=False))
    written["pareto.csv"] = atomic_write_text(out / "pareto.csv", _pareto_csv(summary.front, y).to_csv(index=False))

    html = out / "pareto.html" if plotly_available() else None
    written["pareto.png"] = plot_pareto(summary.marked, x=x, y=y, out_png=out / "pareto.png",
                                        title=title or _default_title(summary), html_out=html)
    if html is not None:
        written["pareto.html"] = html

    heatmap_note = None
    front_trials = summary.marked[summary.marked["on_front"]]
    if front_trials.empty:
        heatmap_note = "no plan heat map: no search has a complete trial on its front"
    else:
        try:
            table = plan_table(front_trials)
            written["plans_heatmap.png"] = plot_plan_heatmap(
                table, out / "plans_heatmap.png", title="Plans on the Pareto front (colour: compression per matrix)")
        except DataError as exc:
            heatmap_note = f"no plan heat map: {exc}"

    from analysis.fidelity import agreement_by_search
    from analysis.results import load_history

    summary = summary._replace(agreement=agreement_by_search(load_history(sources)))
    text = report_markdown(summary, title=title, images=[name for name in ("pareto.png", "plans_heatmap.png")
                                                         if name in written], note=heatmap_note)
    written["report.md"] = atomic_write_text(out / "report.md", text)
    return written, summary


# pareto.csv, of `kronsearch analyze` and of the end of a search alike: the front's trials, every size axis
PARETO_COLUMNS = ["search", "rank", "trial_id", "label", "method", "status", "params", "compression_ratio", "quality",
                  "quality_name", "macs_per_token", "params_excl_output_embedding", "bytes", "latency_us_per_token",
                  "throughput_tokens_per_s", "steps", "plan_summary", "is_knee", "front_rank", "summary_path",
                  "checkpoint"]


def _pareto_csv(front: pd.DataFrame, y: str) -> pd.DataFrame:
    return front[[c for c in PARETO_COLUMNS if c in front]]


def report_markdown(summary: Summary, *, title: str | None = None, images: Sequence[str] = (),
                    note: str | None = None) -> str:
    """The markdown text of `report.md`."""
    marked, stats, x = summary.marked, summary.stats, summary.x
    qname = quality_name_of(marked)
    qdir = column_direction(marked[(marked["status"] == "complete").fillna(False)], "quality")
    lines = [f"# {title or _default_title(summary)}", ""]
    n_trials, _, references = trial_counts(marked)
    trials = marked[~is_reference(marked)]
    lines += [f"{n_trials} trials in {trials['search'].nunique()} search(es); objectives: {axis_name(x)} (lower is "
              f"better) and {qname} ({'lower' if qdir == 'min' else 'higher'} is better)."
              + (f" References (not trials): {', '.join(references)}." if references else ""), ""]
    left_out = left_out_line(marked, (x, summary.y))
    if left_out:
        lines += [f"**{left_out}** (not on any front, nor best, knee or hypervolume).", ""]
    for image in images:
        lines += [f"![{image}]({image})", ""]

    lines += ["## Trials by status", ""]
    counts = pd.crosstab(trials["search"].astype(str), trials["status"].astype(str))
    statuses = [s for s in STATUSES if s in counts.columns] + [s for s in counts.columns if s not in STATUSES]
    rows = [[search, *(int(counts.loc[search, s]) for s in statuses), int(counts.loc[search].sum())]
            for search in counts.index]
    lines += md_table(["search", *statuses, "total"], rows, numeric=range(1, len(statuses) + 2)) + [""]
    if references:
        lines += [f"References, not counted as trials: {', '.join(references)}.", ""]

    lines += ["## Pareto front", ""]
    if summary.front.empty:
        lines += ["No search has a complete trial: there is no front.", ""]
    else:
        lines += [f"Front of each search ({axis_name(x)} vs {qname}); ★ marks the knee point.", ""]
        rows = []
        for _, row in summary.front.iterrows():
            rows.append([row["search"], int(row["rank"]), ("★ " if row["is_knee"] else "") + trial_display_name(row),
                         fmt_int(row["params"]), fmt_ratio(row["compression_ratio"]), fmt_quality(row["quality"]),
                         human(row["macs_per_token"]), human(row["throughput_tokens_per_s"]),
                         text_or_none(row["plan_summary"]) or ""])
        lines += md_table(["search", "#", "trial", "params", "compression", qname, "MACs/token", "tokens/s",
                            "plan"], rows, numeric=(1, 3, 4, 5, 6, 7)) + [""]

    lines += ["## Knee point", ""]
    lines += ["The knee is the front point farthest from the line joining the front's two extremes (both objectives "
              "normalised to [0, 1] over the front): the best trade-off where shrinking further starts to cost "
              "much more quality.", ""]
    for _, row in stats.iterrows():
        if row["knee_trial"] is None:
            lines.append(f"- **{row['search']}**: no complete trial")
            continue
        knee = _row_of(marked, row["search"], row["knee_trial"])
        lines.append(f"- **{row['search']}**: {trial_display_name(knee)} — {axis_name(x)} {fmt_int(knee[x])}, "
                     f"{qname} {fmt_quality(knee['quality'])}, compression {fmt_ratio(knee['compression_ratio'])}; "
                     f"plan: {text_or_none(knee['plan_summary']) or '—'}")
    lines += ["", "## Best plan per search", ""]
    rows = []
    for _, row in stats.iterrows():
        if row["best_trial"] is None:
            rows.append([row["search"], "—", "", "", "", "no complete trial"])
            continue
        best = _row_of(marked, row["search"], row["best_trial"])
        rows.append([row["search"], trial_display_name(best), fmt_quality(best["quality"]), fmt_int(best["params"]),
                     fmt_ratio(best["compression_ratio"]), text_or_none(best["plan_summary"]) or ""])
    lines += md_table(["search", f"best trial (by {qname})", qname, "params", "compression", "plan"], rows,
                       numeric=(2, 3, 4)) + [""]

    lines += ["## Hypervolume", ""]
    lines += hypervolume_lines(stats, summary.reference, qname)

    agreement = summary.agreement or {}
    if agreement:
        lines += ["## Short budgets against the longest", "",
                  "How well each budget (training steps) ranked the trials that went on to the longest one: Spearman's "
                  "rank correlation of their quality there with their quality at the end (p: two-sided).", ""]
        for name, table in agreement.items():
            rows = [[name, int(r["rung"]), int(r["top"]), int(r["trials"]),
                     "n/a" if r["spearman"] is None else f"{r['spearman']:+.3f}",
                     "n/a" if r["p"] is None else f"{r['p']:.2g}"] for _, r in table.iterrows()]
            lines += md_table(["search", "step", "top step", "trials", "Spearman", "p"], rows,
                               numeric=(1, 2, 3, 4, 5)) + [""]

    lines += ["## Failed trials", ""]
    failed = marked[marked["status"].isin(_FAILED).fillna(False)]
    if failed.empty:
        lines += ["None.", ""]
    else:
        rows = [[row["search"], trial_display_name(row), row["status"], one_line(row["error"]) or "(no error recorded)"]
                for _, row in failed.sort_values(["search", "trial_id"]).iterrows()]
        lines += md_table(["search", "trial", "status", "error"], rows) + [""]
    if note:
        lines += [f"_Note: {note}._", ""]
    return "\n".join(lines)


def hypervolume_lines(stats: pd.DataFrame, reference: dict | None, qname: str) -> list[str]:
    if reference is None:
        return ["Not computed: no complete trial with finite objectives.", ""]
    (x, _), (rx, ry), (wx, wy) = reference["columns"], reference["values"], reference["worst"]
    dx, dy = reference["directions"]
    lines = [f"Common reference point (the same for every search): **{axis_name(x)} = {fmt_int(rx)}, {qname} = "
             f"{fmt_quality(ry)}** — the worst value of each objective observed over the complete trials of all "
             f"{len(stats)} search(es) ({fmt_int(wx)} and {fmt_quality(wy)}), made {HV_MARGIN:.0%} worse "
             f"({axis_name(x)} {_margin_word(dx, wx)}, {qname} {_margin_word(dy, wy)}). "
             f"Hypervolume is the area of the ({axis_name(x)}, {qname}) "
             f"plane dominated by a search's trials up to that point (units: {axis_name(x)} × {qname}); larger is "
             "better.", ""]
    rows = [[row["search"], fmt_sci(row["hypervolume"]), fmt_percent(row["hypervolume_share"]), int(row["on_front"]),
             int(row["complete"])] for _, row in stats.iterrows()]
    return lines + md_table(["search", "hypervolume", "share of best", "front points", "complete trials"], rows,
                             numeric=(1, 2, 3, 4)) + [""]


# --- compare ------------------------------------------------------------------------------------------------


def format_front_table(df: pd.DataFrame, *, x: str = "params", y: str = "quality", max_plan: int = 48) -> str:
    """The Pareto front of each search as a plain-text table (knee marked with *), for the console.

    `df` is a `load_results` table (fronts are computed) or one already marked by `mark_pareto`/`summarize`.
    """
    if df.empty:
        return "no trials"
    if "on_front" not in df:
        marked = summarize(df, x, y).marked
    elif "is_knee" not in df:
        marked = _with_knees(df, x, y)
    else:
        marked = df
    front = front_rows(marked, x)
    if front.empty:
        return "no complete trials: no Pareto front"
    qname = quality_name_of(marked)
    header = ["search", "#", "trial", "params", "compr.", qname, "MACs/tok", "tok/s", "plan"]
    rows = []
    for _, row in front.iterrows():
        plan = text_or_none(row["plan_summary"]) or ""
        plan = plan if len(plan) <= max_plan else plan[: max_plan - 1] + "…"
        rows.append([str(row["search"]), str(row["rank"]), ("*" if row["is_knee"] else " ") + trial_display_name(row),
                     human(row["params"]), fmt_ratio(row["compression_ratio"]), fmt_quality(row["quality"]),
                     human(row["macs_per_token"]), human(row["throughput_tokens_per_s"]), plan])
    return text_table(header, rows, right={1, 3, 4, 5, 6, 7}, strip=True) + "\n(* = knee point)"


def _with_knees(marked: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    marked = marked.copy()
    marked["is_knee"] = False
    stats = search_stats(marked, x, y)
    for knee, search in zip(stats["knee_trial"], stats["search"]):
        if knee is not None:
            marked.loc[(marked["search"] == search) & (marked["trial_id"] == knee) & marked["on_front"],
                       "is_knee"] = True
    return marked


# --- helpers ------------------------------------------------------------------------------------------------


def results_dir(out_dir) -> Path:
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {str(out)!r} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    return out


def plotly_available() -> bool:
    try:
        return importlib.util.find_spec("plotly") is not None
    except (ImportError, ValueError):  # a broken or stubbed plotly
        return False


def best_index(group: pd.DataFrame, y: str, direction: str, x: str) -> int:
    """Position of the best-`y` row of `group`; ties go to the smaller `x`, then to the smaller trial id."""
    quality = as_floats(group[y]) * (1.0 if direction == "min" else -1.0)
    size = as_floats(group[x])
    ids = group["trial_id"].astype(str).to_numpy()
    order = np.lexsort((ids, size, quality))
    return int(order[0])


def _row_of(df: pd.DataFrame, search: str, trial_id: str) -> pd.Series:
    return df[(df["search"] == search) & (df["trial_id"] == trial_id)].iloc[0]


def _default_title(summary: Summary) -> str:
    searches = [str(s) for s in summary.stats["search"]]
    names = ", ".join(searches) if len(searches) <= 3 else f"{len(searches)} searches"
    return f"Pareto front{'s' if len(searches) > 1 else ''} of {names or 'no search'}: " \
           f"{axis_name(summary.x)} vs {quality_name_of(summary.marked)}"


def quality_name_of(df: pd.DataFrame) -> str:
    names = df.loc[(df["status"] == "complete").fillna(False), "quality_name"].dropna().unique()
    if not len(names):
        names = df["quality_name"].dropna().unique()
    return str(names[0]) if len(names) else "quality"


def axis_name(column: str) -> str:
    """A size axis's short name in the markdown reports' text and table headers (`kron.vocab.AXES`)."""
    return AXES[column].short if column in AXES else column


def _margin_word(direction: str, worst: float) -> str:
    """How the reference value was made from the worst observed one."""
    if worst > 0:
        return f"× {1 + HV_MARGIN:g}" if direction == "min" else f"× {1 - HV_MARGIN:g}"
    return f"{'+' if direction == 'min' else '−'} {HV_MARGIN:.0%} of |worst| (or of the observed range when 0)"


def trial_display_name(row) -> str:
    label = row.get("label")
    trial_id = str(row.get("trial_id"))
    if isinstance(label, str) and label and label != trial_id:
        return f"{trial_id} ({label})"
    return trial_id
