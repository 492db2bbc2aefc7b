"""The end of a search: its Pareto front over the search's own objectives, as files and as a console table.

    report = analyze_search(experiment_dir, "quickstart", ["quality", "params"], ["min", "min"],
                            describe=space.describe)
    print(report.text)          # the Pareto table (after any warning), as `kronsearch search` prints it
    report.paths                # {"Pareto front (CSV)": .../analysis/pareto.csv, "all trials (CSV)": ...,
                                #  "Pareto plot": .../pareto.png, "report (Markdown)": .../report.md,
                                #  "front plans (YAML)": .../front}

The files are the report `kronsearch analyze` writes (`analysis.report.analyze`, the one report path: results.csv,
pareto.csv, pareto.png, plans_heatmap.png, report.md; its front over quality and the first size objective known
before training), plus what only the end of a search adds: trials.csv (the search's trials only), references.csv
(the teacher reference, when there is one: a reference point, never a trial) and front/<rank>_<trial>.yaml (the
plans of the front over every objective the search optimised — two or three: quality plus one or two of params,
params_excl_output_embedding, macs, bytes, latency — loadable as `plan: {file: ...}` or by
`kron.plan.CompressionPlan.load`), and the console table of that front. Reads saved files only: no Ray, torch or
transformers; a plan's one-line description comes from the caller (`describe`), which knows the space.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from analysis.export import plan_yaml
from analysis.pareto import pareto_mask
from analysis.results import atomic_write_text, is_reference, left_out_line, load_results, read_summary, usable_rows
from analysis.textfmt import text_table
from kron.errors import DataError
from kron.vocab import AXES, OBJECTIVES, SIZE_AXES, latency_us_per_token

__all__ = ["SearchReport", "analyze_search", "plan_text_table", "shorten"]

# the columns of pareto.csv and trials.csv, in this order (those the table has)
CSV_COLUMNS = ["trial_id", "status", "quality_name", "quality", "params", "params_excl_output_embedding",
               "compression_ratio", "macs_per_token", "bytes", "latency_us_per_token", "steps", "wall_time_s", "on_front",
               "plan_summary", "summary_path", "checkpoint"]

Describe = Callable[[dict], str]


class SearchReport(NamedTuple):
    paths: dict[str, Path]  # label -> written file or folder, in the order they are printed
    text: str  # what the console shows: warnings, then the Pareto table (or why there is none)


def analyze_search(local_dir, name: str, objectives: Sequence[str], modes: Sequence[str] | None = None, *,
                   describe: Describe | None = None) -> SearchReport:
    """The Pareto front of search `name` in `local_dir` over its `objectives` (names of kron.vocab.OBJECTIVES).

    modes: "min"/"max" per objective (default: each objective's own, the trials' quality_mode for quality).
    describe: search parameters (a summary's `search_params`) -> one line naming the plan, for the table's plan
    column and the front YAML headers (default: the trial's plan_summary).
    Returns the written paths and the console text; no file is written when there are no trials of the search.
    """
    local_dir = Path(local_dir)
    try:
        df = load_results(local_dir)
    except DataError as exc:
        return SearchReport({}, f"no results to analyse: {exc}")
    df = df[df["search"] == name].copy()
    if df.empty:
        return SearchReport({}, f"no trials of search {name!r} in {local_dir}")
    df["latency_us_per_token"] = [latency_us_per_token(t) for t in df["throughput_tokens_per_s"]]
    columns = [OBJECTIVES[o].column for o in objectives]
    modes = list(modes) if modes is not None else [_mode(df, o) for o in objectives]
    usable = usable_rows(df, columns)  # a negative or non-finite size or quality is on no front: named below
    complete = df[usable & ~is_reference(df)].copy()
    values = np.column_stack([pd.to_numeric(complete[c], errors="coerce").astype(float).to_numpy() for c in columns]) \
        if len(complete) else np.zeros((0, len(columns)))
    mask = pareto_mask(values, modes) if len(complete) else np.zeros(0, dtype=bool)
    complete["on_front"] = mask
    df["on_front"] = False
    df.loc[complete.index, "on_front"] = mask
    size_col = columns[1] if columns[0] == "quality" else columns[0]
    front = complete[complete["on_front"]].sort_values(size_col)

    adir = local_dir / "analysis"
    adir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    notes: list[str] = []
    left_out = left_out_line(df, columns)
    if left_out:
        notes.append(f"warning: {left_out} (not ranked)")
    # the report `kronsearch analyze` writes (results.csv, pareto.csv, pareto.png, plans_heatmap.png, report.md),
    # over the first size objective known before training (latency is measured: parameters then)
    from analysis.report import analyze_with_summary

    x = size_col if size_col in SIZE_AXES else "params"
    try:
        written, _ = analyze_with_summary(local_dir, adir, x=x,
                                          title=f"{name}: {df['quality_name'].iloc[0]} vs {AXES[x].label}")
    except Exception as exc:  # a report problem must not hide the table
        written = {}
        notes.append(f"warning: could not write the report: {type(exc).__name__}: {exc}")
    if "pareto.csv" in written:
        paths["Pareto front (CSV)"] = written["pareto.csv"]
    refs, trials = df[is_reference(df)], df[~is_reference(df)]
    atomic_write_text(adir / "trials.csv", trials[[c for c in CSV_COLUMNS if c in trials]].sort_values(
        ["status", size_col]).to_csv(index=False))
    paths["all trials (CSV)"] = adir / "trials.csv"
    old_refs = adir / "references.csv"
    if len(refs):  # the teacher evaluated without training: a reference, not a trial
        atomic_write_text(old_refs, refs[[c for c in CSV_COLUMNS if c in refs]].to_csv(index=False))
        paths["references (CSV)"] = old_refs
    elif old_refs.exists():
        old_refs.unlink()
    if len(complete) and "pareto.png" in written:
        paths["Pareto plot"] = written["pareto.png"]
    if "report.md" in written:
        paths["report (Markdown)"] = written["report.md"]
    fdir = adir / "front"
    for old in fdir.glob("*.yaml") if fdir.exists() else []:
        old.unlink()
    for rank, (_, row) in enumerate(front.iterrows(), 1):
        atomic_write_text(fdir / f"{rank:02d}_{row['trial_id']}.yaml", _front_plan_text(name, row, describe))
    if len(front):
        paths["front plans (YAML)"] = fdir
    table = _pareto_table(name, objectives, front, complete, df, describe, size_col)
    extra = [line for line in (_structures(front), _seeds_vs_search(complete, columns[0], size_col)) if line]
    return SearchReport(paths, "\n".join([*notes, table, *extra]))


def _mode(df: pd.DataFrame, objective: str) -> str:
    if OBJECTIVES[objective].mode is not None:
        return OBJECTIVES[objective].mode
    from analysis.results import column_direction

    return column_direction(df, "quality")


def _front_plan_text(name: str, row, describe: Describe | None) -> str:
    """A front trial's plan as YAML, under a comment naming the trial, its quality and its costs."""
    summary = read_summary(row["summary_path"])
    plan = summary.get("plan") or {"rules": []}
    header = (f"# {name} trial {row['trial_id']}: {row['quality_name']} {row['quality']:.6g}, "
              f"{int(row['params']):,} parameters ({float(row['compression_ratio']):.2f}x excl. output "
              f"embedding), {int(row['macs_per_token']):,} MACs/token\n")
    if describe is not None and summary.get("search_params"):
        try:
            header += f"# {describe(summary['search_params'])}\n"
        except Exception:
            pass
    return header + plan_yaml(plan)  # a summary's plan is CompressionPlan.to_dict(): the same text to_yaml gives


def _plan_text(row, describe: Describe | None) -> str:
    if describe is not None:
        try:
            params = read_summary(row["summary_path"]).get("search_params")
            if params:
                return describe(params)
        except Exception:
            pass
    return str(row["plan_summary"] or "")


def _pareto_table(name: str, objectives: Sequence[str], front, complete, df, describe: Describe | None,
                  size_col: str = "params") -> str:
    """The front as a text table; its parameter column is the count the front was computed on (the total, or
    without the output embedding when that is the objective)."""
    pcol = "params_excl_output_embedding" if size_col == "params_excl_output_embedding" else "params"
    by_bytes = size_col == "bytes"  # the front is over bytes: the table shows them beside the parameters
    qname = df["quality_name"].dropna().iloc[0] if df["quality_name"].notna().any() else "quality"
    ref = df[is_reference(df)]
    df = df[~is_reference(df)]
    n_pruned = int((df["status"] == "pruned").sum())
    n_fail = int(df["status"].isin(["error", "diverged"]).sum())
    lines = [f"Pareto front of {name} over {', '.join(objectives)}: {len(front)} of {len(complete)} "
             f"complete trials ({n_pruned} pruned, {n_fail} failed or diverged not ranked)"]
    if front.empty:
        return "\n".join(lines + ["  (no complete trial)"])
    rows = []
    for _, r in front.iterrows():
        lat = r.get("latency_us_per_token")
        rows.append([str(r["trial_id"]), f"{r['quality']:.4g}", f"{int(r[pcol]):,}",
                     *([_int_or_dash(r.get("bytes"))] if by_bytes else []),
                     f"{float(r['compression_ratio']):.2f}x", f"{int(r['macs_per_token']):,}",
                     f"{lat:.1f}" if lat is not None and not (isinstance(lat, float) and math.isnan(lat)) else "-",
                     str(r["steps"]) if r["steps"] is not None else "-", shorten(_plan_text(r, describe), 70)])
    for _, r in ref.iterrows():
        if r["quality"] is None or (isinstance(r["quality"], float) and math.isnan(r["quality"])):
            continue
        rows.append([f"({r['method']})", f"{r['quality']:.4g}", f"{int(r[pcol]):,}",
                     *([_int_or_dash(r.get("bytes"))] if by_bytes else []), "1.00x",
                     f"{int(r['macs_per_token']):,}" if r["macs_per_token"] is not None else "-", "-", "0",
                     "uncompressed reference, not trained"])
    pname = "params excl. out-emb" if pcol != "params" else "params"
    lines.append(plan_text_table(["trial", qname, pname, *(["bytes"] if by_bytes else []), "compr.", "MACs/token",
                             "us/token", "steps", "plan"], rows))
    pruned = _pruned_line(df[df["status"] == "pruned"], "bytes" if by_bytes else pcol)
    if pruned:
        lines.append(pruned)
    return "\n".join(lines)


def _int_or_dash(value) -> str:
    return "-" if value is None or pd.isna(value) else f"{int(value):,}"


def _pruned_line(pruned: pd.DataFrame, pcol: str, most: int = 8) -> str | None:
    """The trials ASHA stopped early, apart from the front: their quality at the step they reached and size."""
    if pruned.empty:
        return None
    parts = []
    for _, r in pruned.sort_values(pcol).head(most).iterrows():
        q = pd.to_numeric(pd.Series([r["quality"]]), errors="coerce").iloc[0]
        steps = r["steps"] if r["steps"] is not None and not pd.isna(r["steps"]) else "?"
        parts.append(f"{r['trial_id']} {'-' if pd.isna(q) else f'{q:.4g}'} at step {steps}, {int(r[pcol]):,}")
    more = f"; and {len(pruned) - most} more" if len(pruned) > most else ""
    return f"stopped early (not ranked, hollow in the plot): {'; '.join(parts)}{more}"


def _structures(front: pd.DataFrame) -> str | None:
    """How many matrices of the front's plans use each structure (kron.methods) or stay dense."""
    from kron.methods import spec_from_dict

    counts: dict[str, int] = {}
    for path in front["summary_path"]:
        for spec in (read_summary(path).get("plan_resolved") or {}).values():
            key = "keep" if spec == "keep" else spec_from_dict(spec).method
            counts[key] = counts.get(key, 0) + 1
    if not counts:
        return None
    order = sorted(counts, key=lambda k: (k == "keep", -counts[k], k))
    return "structures in the front's plans: " + ", ".join(f"{k} {counts[k]}" for k in order) + " matrices"


def _seeds_vs_search(complete: pd.DataFrame, quality: str, size_col: str) -> str | None:
    """For each seed plan (search.seed_plans), the best searched (non-seed) plan at no larger size."""
    if quality != "quality" or complete.empty:
        return None
    is_seed = complete["label"].astype("string").str.startswith("seed:").fillna(False)
    seeds, searched = complete[is_seed], complete[~is_seed]
    if seeds.empty:
        return None
    from analysis.results import column_direction

    lower = column_direction(complete, "quality") == "min"
    lines = ["seed plans against the searched plans at no larger size:"]
    for _, s in seeds.sort_values(size_col).iterrows():
        under = searched[pd.to_numeric(searched[size_col], errors="coerce") <= float(s[size_col])]
        under = under[np.isfinite(pd.to_numeric(under["quality"], errors="coerce").astype(float))]
        head = f"  {s['label']}: {float(s['quality']):.4g} at {int(s[size_col]):,}"
        if under.empty:
            lines.append(head + " — no searched plan at or below its size")
            continue
        best = under.sort_values("quality", ascending=lower).iloc[0]
        delta = float(best["quality"]) - float(s["quality"])
        better = delta < 0 if lower else delta > 0
        lines.append(head + f" — best searched {float(best['quality']):.4g} at {int(best[size_col]):,} "
                            f"(trial {best['trial_id']}, {delta / float(s['quality']):+.1%}: "
                            f"{'better' if better else 'not better'})")
    return "\n".join(lines)


def shorten(text: str, n: int) -> str:
    """`text` cut to `n` characters, ending in "..." when cut."""
    return text if len(text) <= n else text[: n - 3] + "..."


def plan_text_table(header: list[str], rows: list[list[str]]) -> str:
    """The tables of a search's console output (`analysis.textfmt.text_table`): numbers right-aligned (every
    column but plan, trial and status), a dashed rule under the header."""
    return text_table(header, rows, right=[i for i, h in enumerate(header) if h not in ("plan", "trial", "status")])