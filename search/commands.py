"""`kronsearch search CONFIG`: run, resume or dry-run a compression-plan search, then print its Pareto front.

A normal run ends with the Pareto table (complete trials, all searched objectives) and writes, under
`<experiment>/analysis/`, the report `kronsearch analyze` writes (results.csv, pareto.csv, pareto.png,
plans_heatmap.png, report.md), trials.csv (every trial), references.csv and front/<trial>.yaml (the plans of the
front, loadable as `plan: {file: ...}` in a trial config or by `kron.plan.CompressionPlan.load`).
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from analysis.textfmt import shown_path
from kron.vocab import AXES

__all__ = ["add_parsers", "dry_run", "write_analysis"]


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser(
        "search",
        help="search compression plans (Kronecker, low-rank, pruning, int8/int4; Ray Tune + Optuna) and print the "
             "Pareto front",
        description="Search compression plans of a teacher — per matrix Kronecker factors, low-rank, structured "
                    "pruning, 8- or 4-bit weights — for the best quality/size trade-offs. CONFIG is a YAML file with "
                    "name, trial, space and search sections (see examples/).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("config", help="search config (YAML)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the size of the space and a few sampled plans with their costs; no Ray, no training")
    p.add_argument("--resume", action="store_true",
                   help="continue the search in <storage>/<name>: finished trials kept, unfinished ones rerun")
    p.add_argument("--trust-state", action="store_true",
                   help="--resume a folder whose state files this kronsearch did not sign (an earlier release's, "
                        "another machine's); Ray unpickles them, so only for folders you trust (docs/security.md)")
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
    from .prepare import prepare_space
    from .space import SearchSpace

    overrides = {"name": args.name, "search.storage": args.storage, "search.address": args.address,
                 "search.num_samples": args.num_samples, "search.max_concurrent": args.max_concurrent}
    cfg = load_search_config(args.config, overrides=overrides, smoke=args.smoke)
    if args.resume:  # a search an earlier release started keeps the defaults it ran with
        from .resume import adopt_saved_defaults

        cfg = adopt_saved_defaults(cfg)
    if not args.dry_run:  # nothing to resume, or the name taken: say so before the space's profile, not after it
        from .tuner import check_experiment_folder

        check_experiment_folder(cfg, args.resume)
    space = SearchSpace.from_config(cfg)  # everything model-dependent is checked here, before Ray starts
    space = prepare_space(cfg, space)  # then what needs the teacher's weights: the prior, the seed plans
    if args.dry_run:
        dry_run(cfg, space, show=args.show)
        return 0
    from .tuner import run_search

    print(_header(cfg, space), flush=True)
    outcome = run_search(cfg, space, resume=args.resume, trust_state=args.trust_state)
    print(f"search {cfg.name}: {_counts(outcome)}", flush=True)
    paths = write_analysis(cfg, outcome.local_dir, space)
    for label, path in paths.items():
        print(f"{label}: {shown_path(path)}")
    if outcome.interrupted:
        print(f"search interrupted with unfinished trials; continue it with: kronsearch search {args.config} --resume"
              + (f" --name {cfg.name}" if args.name else ""), file=sys.stderr)
        return 130
    return 0


def _counts(outcome) -> str:
    """"8 trials in 45 s (4 complete, 4 pruned); references: teacher" — the trials counted as `kronsearch analyze`
    counts them (those with a summary; the teacher reference is a reference, never a trial)."""
    from kron.vocab import STATUSES, SUMMARY_NAME

    from .reference import REFERENCE_DIR

    by: dict[str, int] = {}
    never = 0
    for t in outcome.trials:
        if t["status"] is None:  # added by Ray but never run (the time budget ran out first): no summary
            never += 1
            continue
        by[t["status"]] = by.get(t["status"], 0) + 1
    order = [s for s in STATUSES if s in by] + sorted(s for s in by if s not in STATUSES)
    n = sum(by.values())
    text = f"{n} trial{'' if n == 1 else 's'} in {outcome.wall_time_s:.0f} s ("
    text += (", ".join(f"{by[s]} {s}" for s in order) or "none") + ")"
    if never:
        text += f"; {never} more never started"
    if outcome.rejected:
        text += f"; {outcome.rejected} sampled plans rejected untrained (over the budget, empty or duplicates)"
    if (Path(outcome.local_dir) / REFERENCE_DIR / SUMMARY_NAME).is_file():
        text += "; references: teacher"
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
            f"{asha}\n  space: 10^{space.size_log10():.2f} plans; results in {shown_path(f'{s.storage}/{cfg.name}')}")


# ----------------------------------------------------------------------------------------------- dry run


def dry_run(cfg, space, *, show: int = 5, stream=None) -> list[dict]:
    """Print the space's size and `show` sampled plans with their costs; returns the sampled parameter dicts."""
    from analysis.front import plan_text_table, shorten

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
                     f"{c['compression_ratio']:.2f}x", f"{c['macs_per_token']:,}", shorten(space.describe(p), 90)])
    for label, p in space.seeds:  # evaluated first, as trials of the search
        c = space.plan_costs(p)
        rows.append([label, f"{c['params']:,}", f"{c['params_excl_output_embedding']:,}",
                     f"{c['compression_ratio']:.2f}x", f"{c['macs_per_token']:,}", shorten(space.describe(p), 90)])
    size_metric = cfg.size_metric
    cheap = space.cheapest(size_metric)
    c = space.plan_costs(cheap)
    rows.append(["min", f"{c['params']:,}", f"{c['params_excl_output_embedding']:,}", f"{c['compression_ratio']:.2f}x",
                 f"{c['macs_per_token']:,}", shorten(space.describe(cheap), 90)])
    fewest = AXES[size_metric].words
    dropped = space.dropped_options
    if cfg.space.prior is not None:
        n = sum(len(v) for v in dropped.values())
        print(f"sensitivity prior (max_damage {cfg.space.prior.max_damage:g}): {n} option(s) dropped over "
              f"{len(dropped)} choice(s)", file=out)
    seeds = f", the {len(space.seeds)} seed plan(s)" if space.seeds else ""
    print(f"{show} sampled plans{' (within the budget)' if space.budget is not None else ''}{seeds}, and the plan "
          f"with the fewest {fewest} (min):", file=out)
    print(plan_text_table(["#", "params", "params excl. out-emb", "compr.", "MACs/token", "plan"], rows), file=out)
    print("dry run: nothing was started or trained", file=out)
    return samples


# ----------------------------------------------------------------------------------------------- analysis


def write_analysis(cfg, local_dir: Path, space=None, *, stream=None) -> dict[str, Path]:
    """Print the Pareto table of a finished search and write its analysis/ folder (`analysis.front.analyze_search`:
    the report of `kronsearch analyze`, trials.csv, references.csv, front/*.yaml over the search's objectives);
    returns the written paths by label."""
    from analysis.front import analyze_search

    _, modes = cfg.objective_metrics()
    report = analyze_search(local_dir, cfg.name, cfg.search.objectives, modes,
                            describe=space.describe if space is not None else None)
    print(report.text, file=stream or sys.stdout)
    return report.paths
