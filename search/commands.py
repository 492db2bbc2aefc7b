"""`kronsearch search CONFIG`: run, resume or dry-run a compression-plan search, then print its Pareto front.

A normal run ends with the Pareto table (complete trials, all searched objectives) and writes, under
`<experiment>/analysis/`: pareto.csv (the front), trials.csv (every trial), pareto.png, and front/<trial>.yaml
(the plans of the front, loadable as `plan: {file: ...}` in a trial config or by `kron.plan.CompressionPlan.load`).
"""
from __future__ import annotations

import argparse
import math
import random
import sys
from pathlib import Path

__all__ = ["add_parsers", "dry_run", "write_analysis"]


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser(
        "search",
        help="search Kronecker compression plans (Ray Tune + Optuna) and print the Pareto front",
        description="Search Kronecker compression plans of a teacher for the best quality/size trade-offs. "
                    "CONFIG is a YAML file with name, trial, space and search sections (see examples/).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("config", help="search config (YAML)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the size of the space and a few sampled plans with their costs; no Ray, no training")
    p.add_argument("--resume", action="store_true",
                   help="continue the search in <storage>/<name>: finished trials kept, unfinished ones rerun")
    p.add_argument("--address", default=None, help="Ray cluster: 'auto' or 'ray://host:10001' (default: local Ray)")
    p.add_argument("--storage", default=None, help="experiment parent folder or URI (s3://...), overrides the config")
    p.add_argument("--name", default=None, help="experiment name, overrides the config")
    p.add_argument("--num-samples", type=int, default=None, help="number of trials, overrides the config")
    p.add_argument("--max-concurrent", type=int, default=None, help="trials at once, overrides the config")
    p.add_argument("--smoke", "--smoke-test", dest="smoke", action="store_true",
                   help="shrink everything (2 trials x 4 steps on tiny data) for a quick end-to-end check")
    p.add_argument("--show", type=int, default=5, help="--dry-run: number of sampled plans to print")
    p.set_defaults(func=_search)


def _search(args) -> int:
    from .config import load_search_config
    from .space import SearchSpace

    overrides = {"name": args.name, "search.storage": args.storage, "search.address": args.address,
                 "search.num_samples": args.num_samples, "search.max_concurrent": args.max_concurrent}
    cfg = load_search_config(args.config, overrides=overrides, smoke=args.smoke)
    space = SearchSpace.from_config(cfg)  # everything model-dependent is checked here, before Ray starts
    if args.dry_run:
        dry_run(cfg, space, show=args.show)
        return 0
    from .tuner import run_search

    print(_header(cfg, space), flush=True)
    outcome = run_search(cfg, space, resume=args.resume)
    print(f"search {cfg.name}: {len(outcome.trials)} trials in {outcome.wall_time_s:.0f} s "
          f"({_counts(outcome)})", flush=True)
    paths = write_analysis(cfg, outcome.local_dir, space)
    for label, path in paths.items():
        print(f"{label}: {path}")
    if outcome.interrupted:
        print(f"search interrupted with unfinished trials; continue it with: kronsearch search {args.config} --resume"
              + (f" --name {cfg.name}" if args.name else ""), file=sys.stderr)
        return 130
    return 0


def _counts(outcome) -> str:
    by: dict[str, int] = {}
    for t in outcome.trials:
        by[t["status"] or t["outcome"]] = by.get(t["status"] or t["outcome"], 0) + 1
    text = ", ".join(f"{n} {s}" for s, n in sorted(by.items())) or "none"
    if outcome.rejected:
        text += f"; {outcome.rejected} sampled plans rejected untrained (over the budget, empty or duplicates)"
    return text


def _header(cfg, space) -> str:
    s = cfg.search
    metrics, modes = cfg.objective_metrics()
    objectives = ", ".join(f"{o} ({m})" for o, m in zip(s.objectives, modes))
    asha = (f"ASHA grace {s.asha.grace_period}, reduction {s.asha.reduction_factor:g}, max_t {cfg.asha_max_t}"
            + (f", within {s.asha.size_buckets} size strata" if s.asha.size_buckets > 1 else "")
            if s.asha else "no early stopping")
    where = s.address or f"local Ray ({s.num_cpus or 'all'} CPUs)"
    return (f"search {cfg.name}: {s.algorithm}, {s.num_samples} trials, {s.max_concurrent} at a time "
            f"({s.resources.cpu:g} CPU{'' if s.resources.cpu == 1 else 's'}"
            f"{f', {s.resources.gpu:g} GPU' if s.resources.gpu else ''} each) on {where}; objectives {objectives}; "
            f"{asha}\n  space: 10^{space.size_log10():.2f} plans; results in {s.storage}/{cfg.name}")


# ----------------------------------------------------------------------------------------------- dry run


def dry_run(cfg, space, *, show: int = 5, stream=None) -> list[dict]:
    """Print the space's size and `show` sampled plans with their costs; returns the sampled parameter dicts."""
    out = stream or sys.stdout
    print(_header(cfg, space), file=out)
    print(space.summary(), file=out)
    rng = random.Random(cfg.search.seed)
    samples = [space.sample_within_budget(rng) if space.budget is not None else space.sample(rng)
               for _ in range(show)]
    rows = []
    for i, p in enumerate(samples, 1):
        c = space.plan_costs(p)
        rows.append([str(i), f"{c['params']:,}", f"{c['params_excl_output_embedding']:,}",
                     f"{c['compression_ratio']:.2f}x", f"{c['macs_per_token']:,}", _short(space.describe(p), 90)])
    size_metric = next(m for m in cfg.objective_metrics()[0] if m != "quality")
    size_metric = size_metric if size_metric in ("params", "params_excl_output_embedding", "macs_per_token") \
        else "params"
    cheap = space.cheapest(size_metric)
    c = space.plan_costs(cheap)
    rows.append(["min", f"{c['params']:,}", f"{c['params_excl_output_embedding']:,}", f"{c['compression_ratio']:.2f}x",
                 f"{c['macs_per_token']:,}", _short(space.describe(cheap), 90)])
    fewest = {"params": "parameters", "params_excl_output_embedding": "parameters excluding the output embedding",
              "macs_per_token": "multiply-adds"}[size_metric]
    print(f"{show} sampled plans{' (within the budget)' if space.budget is not None else ''}, and the plan with "
          f"the fewest {fewest} (min):", file=out)
    print(_table(["#", "params", "params excl. out-emb", "compr.", "MACs/token", "plan"], rows), file=out)
    print("dry run: nothing was started or trained", file=out)
    return samples


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    right = [i for i, h in enumerate(header) if h not in ("plan", "trial", "status")]

    def fmt(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)])


# ----------------------------------------------------------------------------------------------- analysis

_OBJECTIVE_COLUMNS = {"quality": "quality", "params": "params",
                      "params_excl_output_embedding": "params_excl_output_embedding", "macs": "macs_per_token",
                      "latency": "latency_us_per_token"}


def write_analysis(cfg, local_dir: Path, space=None, *, stream=None) -> dict[str, Path]:
    """Print the Pareto table of a finished search and write analysis/{pareto.csv, trials.csv, pareto.png,
    front/*.yaml}; returns the written paths by label."""
    import numpy as np
    import pandas as pd

    from analysis.pareto import pareto_mask
    from analysis.plots import plot_pareto
    from analysis.results import load_results, read_summary
    from kron.errors import DataError
    from kron.fsutil import atomic_write_text

    out = stream or sys.stdout
    local_dir = Path(local_dir)
    try:
        df = load_results(local_dir)
    except DataError as exc:
        print(f"no results to analyse: {exc}", file=out)
        return {}
    df = df[df["search"] == cfg.name].copy()
    if df.empty:
        print(f"no trials of search {cfg.name!r} in {local_dir}", file=out)
        return {}
    tput = pd.to_numeric(df["throughput_tokens_per_s"], errors="coerce")
    df["latency_us_per_token"] = 1e6 / tput.where(tput > 0)
    metrics, modes = cfg.objective_metrics()
    columns = [_OBJECTIVE_COLUMNS[o] for o in cfg.search.objectives]
    from analysis.results import is_reference

    complete = df[(df["status"] == "complete").fillna(False) & ~is_reference(df)].copy()
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
    keep = ["trial_id", "status", "quality_name", "quality", "params", "params_excl_output_embedding",
            "compression_ratio", "macs_per_token", "latency_us_per_token", "steps", "wall_time_s", "on_front",
            "plan_summary", "summary_path", "checkpoint"]
    atomic_write_text(adir / "pareto.csv", front[[c for c in keep if c in front]].to_csv(index=False))
    paths["Pareto front (CSV)"] = adir / "pareto.csv"
    atomic_write_text(adir / "trials.csv", df[[c for c in keep if c in df]].sort_values(
        ["status", size_col]).to_csv(index=False))
    paths["all trials (CSV)"] = adir / "trials.csv"
    if len(complete):
        try:
            x = size_col if size_col in ("params", "params_excl_output_embedding", "macs_per_token") else "params"
            what = {"params": "parameters", "params_excl_output_embedding": "parameters excl. output embedding",
                    "macs_per_token": "MACs per token"}[x]
            paths["Pareto plot"] = plot_pareto(df.drop(columns=["on_front"]), x=x, y="quality",
                                               out_png=adir / "pareto.png",
                                               title=f"{cfg.name}: {df['quality_name'].iloc[0]} vs {what}")
        except Exception as exc:  # a plot problem must not hide the table
            print(f"warning: could not draw the Pareto plot: {type(exc).__name__}: {exc}", file=out)
    fdir = adir / "front"
    for old in fdir.glob("*.yaml") if fdir.exists() else []:
        old.unlink()
    for rank, (_, row) in enumerate(front.iterrows(), 1):
        summary = read_summary(row["summary_path"])
        plan = summary.get("plan") or {"rules": []}
        header = (f"# {cfg.name} trial {row['trial_id']}: {row['quality_name']} {row['quality']:.6g}, "
                  f"{int(row['params']):,} parameters ({float(row['compression_ratio']):.2f}x excl. output "
                  f"embedding), {int(row['macs_per_token']):,} MACs/token\n")
        if space is not None and summary.get("search_params"):
            try:
                header += f"# {space.describe(summary['search_params'])}\n"
            except Exception:
                pass
        try:
            from kron.plan import CompressionPlan

            body = CompressionPlan.from_dict(plan).to_yaml()
        except Exception:  # an unexpected plan format: still write what the trial used
            import yaml

            body = yaml.safe_dump(plan, sort_keys=False, width=120)
        text = header + body
        path = fdir / f"{rank:02d}_{row['trial_id']}.yaml"
        atomic_write_text(path, text)
    if len(front):
        paths["front plans (YAML)"] = fdir
    print(_pareto_table(cfg, front, columns, complete, df, space, size_col), file=out)
    return paths


def _plan_text(row, space) -> str:
    if space is not None:
        try:
            from analysis.results import read_summary

            params = read_summary(row["summary_path"]).get("search_params")
            if params:
                return space.describe(params)
        except Exception:
            pass
    return str(row["plan_summary"] or "")


def _pareto_table(cfg, front, columns, complete, df, space=None, size_col: str = "params") -> str:
    """The front as a text table; its parameter column is the count the front was computed on (the total, or
    without the output embedding when that is the objective)."""
    pcol = "params_excl_output_embedding" if size_col == "params_excl_output_embedding" else "params"
    qname = df["quality_name"].dropna().iloc[0] if df["quality_name"].notna().any() else "quality"
    from analysis.results import is_reference

    ref = df[is_reference(df)]
    df = df[~is_reference(df)]
    n_pruned = int((df["status"] == "pruned").sum())
    n_fail = int(df["status"].isin(["error", "diverged"]).sum())
    lines = [f"Pareto front of {cfg.name} over {', '.join(cfg.search.objectives)}: {len(front)} of {len(complete)} "
             f"complete trials ({n_pruned} pruned, {n_fail} failed or diverged not ranked)"]
    if front.empty:
        return "\n".join(lines + ["  (no complete trial)"])
    rows = []
    for _, r in front.iterrows():
        lat = r.get("latency_us_per_token")
        rows.append([str(r["trial_id"]), f"{r['quality']:.4g}", f"{int(r[pcol]):,}",
                     f"{float(r['compression_ratio']):.2f}x", f"{int(r['macs_per_token']):,}",
                     f"{lat:.1f}" if lat is not None and not (isinstance(lat, float) and math.isnan(lat)) else "-",
                     str(r["steps"]) if r["steps"] is not None else "-", _short(_plan_text(r, space), 70)])
    for _, r in ref.iterrows():
        if r["quality"] is None or (isinstance(r["quality"], float) and math.isnan(r["quality"])):
            continue
        rows.append([f"({r['method']})", f"{r['quality']:.4g}", f"{int(r[pcol]):,}", "1.00x",
                     f"{int(r['macs_per_token']):,}" if r["macs_per_token"] is not None else "-", "-", "0",
                     "uncompressed reference, not trained"])
    pname = "params excl. out-emb" if pcol != "params" else "params"
    lines.append(_table(["trial", qname, pname, "compr.", "MACs/token", "us/token", "steps", "plan"], rows))
    return "\n".join(lines)
