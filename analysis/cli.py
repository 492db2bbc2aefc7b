"""`kronsearch analyze | compare | export`: reports, comparisons and plan export from saved results.

    kronsearch analyze RESULTS... --out DIR [--x params|macs_per_token|bytes] [--title T]
    kronsearch compare A B ... --out DIR [--labels LA LB ...] [--title T]
    kronsearch export RESULTS... --select knee|front|best-under-params:N|best-under-macs:N|best-under-bytes:N --out DIR [--build]

RESULTS are search directories (searched recursively for trial_summary.json) or single summary files. Heavy
modules (pandas, matplotlib; torch only for `export --build`) are imported inside the handlers, so
`kronsearch --help` stays fast. Errors in the input (missing paths, no results, no matching trial) raise
`kron.errors.UserError`, which the console script prints as one line with exit status 2; so does a results file
that cannot be read (not JSON, nested too deeply, a number too long, text where a number belongs). A trial whose
size is negative or not finite, or whose quality is not a finite number, is left out of every front, best, knee and
selection, and each command prints one line naming it and why ("1 trial left out: s/t3 quality NaN").
"""
from __future__ import annotations

import argparse

from kron.vocab import SIZE_AXES

_SELECT_HELP = ("knee (the front's best trade-off), front (every front trial), best-under-params:N, "
                "best-under-macs:N or best-under-bytes:N (best quality within N; N like 2.5e6, 2500000, 2.5M, 800k; "
                "bytes like 4MB, 4MiB)")


X_CHOICES = SIZE_AXES  # kron.vocab's size axes (= analysis.report.X_COLUMNS)

def add_parsers(subparsers) -> None:
    p = subparsers.add_parser(
        "analyze", help="report on saved search results: tables, Pareto front, plan heat map, report.md",
        description="Writes results.csv, pareto.csv, pareto.png (+ pareto.html with plotly), plans_heatmap.png "
                    "and report.md (status counts, front table, knee point, best plans, hypervolume against a "
                    "common reference point, failed trials) into --out.")
    p.add_argument("results", nargs="+", metavar="RESULTS", help="search directories or trial_summary.json files")
    p.add_argument("--out", required=True, help="output directory (created if missing)")
    p.add_argument("--x", default="params", choices=X_CHOICES,
                   help="size objective on the x axis (default: params)")
    p.add_argument("--title", default=None, help="title of the plot and the report")
    p.set_defaults(func=_analyze)

    p = subparsers.add_parser(
        "compare", help="overlay several searches and their baselines in one plot and one table",
        description="Writes compare.csv, compare.png (+ compare.html with plotly) and compare.md: each search's "
                    "hypervolume against a common reference point, and for every baseline (teacher, preset, "
                    "low-rank, layer-drop) the best search plan that dominates it and by how much.")
    p.add_argument("results", nargs="+", metavar="RESULTS", help="search directories (and baseline folders)")
    p.add_argument("--out", required=True, help="output directory (created if missing)")
    p.add_argument("--labels", nargs="+", default=None, metavar="LABEL",
                   help="a display name per RESULTS path, in the same order")
    p.add_argument("--title", default=None, help="title of the plot and of compare.md")
    p.add_argument("--x", default="params", choices=X_CHOICES,
                   help="size objective on the x axis (params_excl_output_embedding: the papers' convention)")
    p.set_defaults(func=_compare)

    p = subparsers.add_parser(
        "export", help="export selected plans (YAML) and optionally build the compressed models",
        description="Selects among the complete trials of RESULTS and writes <trial>.plan.yaml per selection and "
                    "selection.json; with --build also <trial>/, a compressed-model directory (the trial's "
                    "checkpoint when it kept one, else the teacher compressed with the plan, SVD-initialised).")
    p.add_argument("results", nargs="+", metavar="RESULTS", help="search directories or trial_summary.json files")
    p.add_argument("--select", required=True, metavar="RULE", help=_SELECT_HELP)
    p.add_argument("--out", required=True, help="output directory (created if missing)")
    p.add_argument("--build", action="store_true", help="also write a loadable compressed model per selection")
    p.set_defaults(func=_export)


def _analyze(args: argparse.Namespace) -> int:
    from analysis.report import analyze_with_summary as analyze, format_front_table

    written, summary = analyze(args.results, args.out, x=args.x, title=args.title)
    from analysis.results import counts_text, left_out_line, trial_counts

    marked = summary.marked
    print(counts_text(*trial_counts(marked)))  # the teacher and other references are not trials
    _print_left_out(left_out_line(marked, (args.x, "quality")))
    print(format_front_table(marked, x=args.x))
    _print_search_lines(summary)
    from analysis.fidelity import rung_agreement_text

    for name, table in (summary.agreement or {}).items():
        print(f"{name}: {rung_agreement_text(table)}")
    _print_paths(written)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from analysis.compare import compare_with_summary as compare
    from analysis.textfmt import fmt_delta, fmt_int, fmt_quality

    from analysis.results import left_out_line

    written, summary, dominance = compare(args.results, args.out, labels=args.labels, title=args.title, x=args.x)
    _print_left_out(left_out_line(summary.marked, (args.x, "quality")))
    _print_search_lines(summary)
    for _, row in dominance.iterrows():
        if row["best_trial"] is None:
            verdict = "no search plan this small"
        elif row["dominates"]:
            delta = fmt_delta(row["quality_delta"], row["quality_delta_pct"])
            verdict = (f"dominated by {row['best_search']}/{row['best_trial']} ({fmt_int(row['best_params'])} params, "
                       f"quality {fmt_quality(row['best_quality'])}, Δ {delta})")
        else:
            verdict = (f"none dominates (best at <= its params: {row['best_search']}/{row['best_trial']}, "
                       f"Δ {fmt_delta(row['quality_delta'], row['quality_delta_pct'])})")
        print(f"baseline {row['baseline']} [{row['method']}] {fmt_int(row['params'])} params, quality "
              f"{fmt_quality(row['quality'])}: {verdict}")
    _print_paths(written)
    return 0


def _export(args: argparse.Namespace) -> int:
    from analysis.export import export
    from analysis.results import left_out_text
    from analysis.textfmt import fmt_quality, human

    record = export(args.results, args.select, args.out, build=args.build)
    _print_left_out(left_out_text(record["left_out"]))
    print(f"selected {len(record['selected'])} trial(s) by {record['how']}:")
    for entry in record["selected"]:
        print(f"  {entry['search']}/{entry['trial_id']}: params {human(entry['params'])}, "
              f"{entry['quality_name']} {fmt_quality(entry['quality'])}, MACs/token {human(entry['macs_per_token'])}")
        print(f"    plan   {entry['plan_path']}")
        if "model_dir" in entry:
            print(f"    model  {entry['model_dir']} ({entry['model_params']:,} params; {entry['model_source']})")
    print(f"written: {record['selection_path']}")
    return 0


def _print_search_lines(summary) -> None:
    from analysis.report import HV_MARGIN, quality_name_of
    from analysis.textfmt import fmt_int, fmt_quality, fmt_sci, human

    ref = summary.reference
    if ref is not None:
        y_name = quality_name_of(summary.marked) if ref["columns"][1] == "quality" else ref["columns"][1]
        print(f"hypervolume reference point (common to all searches): {ref['columns'][0]}={fmt_int(ref['values'][0])}, "
              f"{y_name}={fmt_quality(ref['values'][1])} (worst observed values made {HV_MARGIN:.0%} worse)")
    for _, row in summary.stats.iterrows():
        if row["knee_trial"] is None:
            print(f"{row['search']}: {row['trials']} trials, none complete")
            continue
        print(f"{row['search']}: {row['complete']}/{row['trials']} complete, {row['on_front']} on front, "
              f"hypervolume {fmt_sci(row['hypervolume'])}; best {row['best_trial']} (quality "
              f"{fmt_quality(row['best_quality'])}, {human(row['best_params'])} params); knee {row['knee_trial']} "
              f"({human(row['knee_x'])} {summary.x}, quality {fmt_quality(row['knee_quality'])})")


def _print_left_out(line: str | None) -> None:
    if line:
        print(f"{line} (not on any front, nor best, knee or selected)")


def _print_paths(written: dict) -> None:
    print("written:")
    for path in written.values():
        print(f"  {path}")
