"""How much of a search's time goes to Ray and set-up rather than distillation, and what ASHA saves.

Runs a search config twice, each exactly as `kronsearch search` does (Ray started and stopped by the search, the
data and the teacher reference prepared in the driver first) — with its ASHA settings and with `asha: null`, same
seed and trial count — and reports:

* per-trial overhead as a fraction of the trial's wall time (target <= 10%), split into scheduling (the driver
  asks for the trial's actor, or reuses one, until the trainable runs: on a fresh worker this includes spawning the
  process), imports (torch/transformers: the first trial of a worker only), set-up (teacher and data from the
  worker's cache or the disk cache, plan -> student with SVD initialisation; the step-0 evaluation is subtracted)
  and tear-down (last report until the driver records the end); the evaluations and training steps are the useful
  part;
* the search's own set-up outside the trials, on the same table: config validation, the driver's teacher/data
  preparation and teacher reference, Ray start-up, and the end-to-end wall time;
* total trial-steps spent and the best quality reached, with and without ASHA.

The data cache starts empty (`$KRONSEARCH_CACHE` in the benchmark's folder), so the first run pays for sampling
the teacher's text, as a first search on a fresh machine does; the second run finds it on disk.

    python benchmarks/search_overhead.py                      # examples/quickstart.yaml, both runs (~3 min on 2 cores)
    python benchmarks/search_overhead.py --smoke              # tiny version: 2 trials x 4 steps each run
    python benchmarks/search_overhead.py --teacher DIR        # another teacher (e.g. while the demo one is missing)

Prints a table and, last, one JSON line.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ray.tune import Callback  # noqa: E402


class Timing(Callback):
    """Driver-side timestamps of every trial's creation (the searcher asked for its plan), start, results and end."""

    def __init__(self):
        self.asked: dict[str, float] = {}
        self.start: dict[str, float] = {}
        self.end: dict[str, float] = {}
        self.results: dict[str, list[dict]] = {}

    def on_trial_start(self, iteration, trials, trial, **info):
        self.start[trial.trial_id] = time.time()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.results.setdefault(trial.trial_id, []).append(dict(result))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.end[trial.trial_id] = time.time()

    def on_trial_error(self, iteration, trials, trial, **info):
        self.end[trial.trial_id] = time.time()


def _time_suggestions(timing: Timing) -> None:
    """Record when the search asks the searcher for each trial's plan: the moment a trial is wanted, before its
    plan is sampled, its actor is started (or a cached one reset) and its worker imports anything."""
    from search.searcher import PlanSearcher

    original = getattr(PlanSearcher.suggest, "__wrapped__", PlanSearcher.suggest)

    def suggest(self, trial_id):
        timing.asked.setdefault(trial_id, time.time())
        return original(self, trial_id)

    suggest.__wrapped__ = original
    PlanSearcher.suggest = suggest


def _eval_seconds(result: dict, trial_cfg) -> float:
    """Time of one evaluation, from the measured forward throughput (tokens / (tokens/s))."""
    tput = result.get("throughput_tokens_per_s")
    stage = trial_cfg.stage2 or trial_cfg.stage1
    if not tput:
        return 0.0
    blocks = trial_cfg.data.val_blocks
    if stage.eval_batches:
        blocks = min(blocks, stage.eval_batches * stage.batch_size)
    return blocks * trial_cfg.data.seq_len / tput


def trial_overheads(timing: Timing, trial_cfg) -> list[dict]:
    """Per trial: wall time and its overhead segments.

    A trial begins at the earliest of: the search asking the searcher for its plan, the driver's start event, and
    (on a fresh worker) the worker process's start. Segments: to_entry (sampling the plan, scheduling, starting or resetting
    the actor: on a fresh worker spawning the process, importing Ray Tune, unpickling the trainable), imports (torch/transformers/trials: the first trial of a worker only), setup (teacher and data from
    the worker cache or disk, plan -> student with SVD init; the step-0 evaluation is subtracted), teardown (last
    report until the driver records the end). Everything else is training steps and evaluations.
    """
    rows, seen_workers = [], set()
    for tid in sorted(timing.results, key=lambda t: timing.start.get(t, 0)):
        results = timing.results[tid]
        if tid not in timing.start or tid not in timing.end or not results:
            continue
        first, last = results[0], results[-1]
        enter, imported = first.get("trial_started_at"), first.get("trial_imported_at")
        if enter is None or imported is None:
            continue
        started = first.get("worker_started_at")
        worker = (first.get("worker_pid"), started)  # two workers can start in the same clock tick
        fresh = started is not None and worker not in seen_workers
        seen_workers.add(worker)
        # the earliest of: asked for, started by the driver, and (a fresh worker) its process started -- Tune can
        # spawn the process for a trial before it asks the searcher for that trial's plan
        begin = min(t for t in (timing.asked.get(tid), timing.start[tid], started if fresh else None) if t)
        wall = timing.end[tid] - begin
        to_entry = max(0.0, enter - begin)
        imports = max(0.0, imported - enter)
        setup = max(0.0, first["reported_at"] - imported - _eval_seconds(first, trial_cfg))
        teardown = max(0.0, timing.end[tid] - last["reported_at"])
        overhead = to_entry + imports + setup + teardown
        rows.append({"trial_id": tid, "fresh_worker": fresh, "wall_s": wall, "to_entry_s": to_entry,
                     "imports_s": imports, "setup_s": setup, "teardown_s": teardown, "overhead_s": overhead,
                     "overhead_fraction": overhead / wall if wall > 0 else math.nan,
                     "steps": int(last.get("step") or 0)})
    return rows


def run_once(cfg, label: str) -> dict:
    from search.prepare import prepared_space
    from search.tuner import run_search

    timing = Timing()
    _time_suggestions(timing)
    t0 = time.time()
    space = prepared_space(cfg)  # as `kronsearch search` does: validation is part of the wall time
    t_space = time.time() - t0
    outcome = run_search(cfg, space, callbacks=[timing], stream=open(os.devnull, "w"))
    wall = time.time() - t0
    rows = trial_overheads(timing, cfg.trial)
    summaries = []
    for t in outcome.trials:
        path = Path(t["dir"]) / "trial_summary.json"
        if path.is_file():
            summaries.append(json.loads(path.read_text()))
    mode = cfg.quality_mode()
    complete = [s for s in summaries if s["status"] == "complete" and s.get("quality") is not None]
    best = (min if mode == "min" else max)((s["quality"] for s in complete), default=None)
    fractions = [r["overhead_fraction"] for r in rows if math.isfinite(r["overhead_fraction"])]
    tm = outcome.timings
    return {
        "label": label,
        "trials": len(summaries),
        "complete": len(complete),
        "pruned": sum(s["status"] == "pruned" for s in summaries),
        "failed": sum(s["status"] in ("error", "diverged") for s in summaries),
        "trial_steps": sum(int(s.get("steps") or 0) for s in summaries),
        "best_quality": best,
        "quality_name": summaries[0]["quality_name"] if summaries else None,
        "search_wall_s": round(wall, 1),
        "validate_s": round(t_space + tm.get("validate_s", 0), 2),
        "prepare_s": round(tm.get("teacher_s", 0) + tm.get("data_s", 0), 2),
        "reference_s": round(tm.get("reference_s", 0), 2),
        "ray_start_s": round(tm.get("ray_start_s", 0), 2),
        "fit_s": round(tm.get("fit_s", 0), 1),
        "trial_wall_s_mean": _mean([r["wall_s"] for r in rows], 2),
        "overhead_fraction_mean": _mean(fractions, 4),
        "overhead_fraction_median": round(statistics.median(fractions), 4) if fractions else None,
        # time-weighted: all overhead seconds / all trial seconds
        "overhead_fraction_total": round(sum(r["overhead_s"] for r in rows) / sum(r["wall_s"] for r in rows), 4)
        if rows else None,
        "fresh_workers": sum(r["fresh_worker"] for r in rows),
        # one-time cost of a worker's first trial vs. the steady state of a reused worker
        "fresh_worker_overhead_s_mean": _mean([r["overhead_s"] for r in rows if r["fresh_worker"]]),
        "reused_worker_overhead_s_mean": _mean([r["overhead_s"] for r in rows if not r["fresh_worker"]]),
        "reused_worker_overhead_fraction_mean": _mean([r["overhead_fraction"] for r in rows if not r["fresh_worker"]],
                                                      4),
        **{f"{k}_mean": _mean([r[k] for r in rows])
           for k in ("to_entry_s", "imports_s", "setup_s", "teardown_s")},
        "per_trial": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
    }


def _mean(values: list[float], digits: int = 3) -> float | None:
    return round(statistics.mean(values), digits) if values else None


def _table(header: list[str], rows: list[list[str]]) -> None:
    from analysis.textfmt import text_table

    print(text_table(header, rows, right=(), rule=False))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "examples" / "quickstart.yaml"))
    p.add_argument("--smoke", action="store_true", help="shrink the config (2 trials x 4 steps)")
    p.add_argument("--teacher", default=None, help="override trial.teacher")
    p.add_argument("--storage", default=None, help="where the two experiments go (default: a temporary folder)")
    p.add_argument("--no-compare", action="store_true", help="only the run with ASHA")
    args = p.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from search.config import load_search_config

    storage = args.storage or tempfile.mkdtemp(prefix="ksb", dir="/tmp")
    os.environ.setdefault("KRONSEARCH_CACHE", str(Path(storage) / "cache"))
    overrides = {"search.storage": storage, "trial.teacher": args.teacher}
    cfg = load_search_config(args.config, overrides=overrides, smoke=args.smoke)
    runs = []
    asha_cfg = load_search_config(cfg, overrides={"name": f"{cfg.name}-asha"})
    runs.append(run_once(asha_cfg, "with ASHA" if cfg.search.asha else "no ASHA (config)"))
    if not args.no_compare and cfg.search.asha is not None:
        plain = cfg.model_dump(mode="json")
        plain["name"] = f"{cfg.name}-noasha"
        plain["search"]["asha"] = None
        runs.append(run_once(load_search_config(plain), "without ASHA"))

    header = ["run", "trials", "complete/pruned/failed", "trial-steps", "best " + str(runs[0]["quality_name"]),
              "trial s", "overhead mean/total", "entry s", "imports s", "set-up s", "tear-down s", "fresh workers"]
    rows = [[r["label"], str(r["trials"]), f"{r['complete']}/{r['pruned']}/{r['failed']}", str(r["trial_steps"]),
             f"{r['best_quality']:.4g}" if r["best_quality"] is not None else "-",
             f"{r['trial_wall_s_mean']:.1f}" if r["trial_wall_s_mean"] else "-",
             f"{100 * r['overhead_fraction_mean']:.1f}% / {100 * r['overhead_fraction_total']:.1f}%"
             if r["overhead_fraction_mean"] is not None else "-",
             *(f"{r[k + '_mean']:.2f}" if r[k + "_mean"] is not None else "-"
               for k in ("to_entry_s", "imports_s", "setup_s", "teardown_s")), str(r["fresh_workers"])]
            for r in runs]
    print(f"config {args.config}{' (smoke)' if args.smoke else ''}; experiments in {storage}")
    _table(header, rows)
    print("search-level set-up and wall time (s):")
    header2 = ["run", "validate", "teacher+data", "reference", "Ray start", "fit", "end-to-end"]
    _table(header2, [[r["label"], f"{r['validate_s']:.1f}", f"{r['prepare_s']:.1f}", f"{r['reference_s']:.1f}",
                      f"{r['ray_start_s']:.1f}", f"{r['fit_s']:.1f}", f"{r['search_wall_s']:.1f}"] for r in runs])
    print("per trial (s; * = first trial of a fresh worker):")
    cols = ["wall_s", "to_entry_s", "imports_s", "setup_s", "teardown_s", "overhead_s", "steps"]
    print("  " + "run".ljust(14) + "trial".ljust(11) + "".join(c.removesuffix("_s").rjust(10) for c in cols))
    for r in runs:
        for t in r["per_trial"]:
            cells = "".join((f"{t[c]:.2f}" if isinstance(t[c], float) else str(t[c])).rjust(10) for c in cols)
            print("  " + r["label"][:13].ljust(14) + (t["trial_id"] + ("*" if t["fresh_worker"] else "")).ljust(11)
                  + cells)
    print("steady state (reused workers): "
          + "; ".join(f"{r['label']} {r['reused_worker_overhead_s_mean']:.2f} s per trial "
                      f"({100 * r['reused_worker_overhead_fraction_mean']:.1f}%)" if r["reused_worker_overhead_s_mean"]
                      is not None else f"{r['label']} -" for r in runs)
          + "; a fresh worker's first trial: "
          + "; ".join(f"{r['label']} {r['fresh_worker_overhead_s_mean']:.2f} s" for r in runs))
    # the headline is the config as written (its ASHA settings); the target must hold for every run
    means = [r["overhead_fraction_mean"] for r in runs]
    record = {"benchmark": "search_overhead", "config": args.config, "smoke": args.smoke,
              "overhead_fraction_mean": means[0], "overhead_fraction_total": runs[0]["overhead_fraction_total"],
              "overhead_fraction_mean_by_run": {r["label"]: r["overhead_fraction_mean"] for r in runs},
              "target": 0.10, "meets_target": all(m is not None and m <= 0.10 for m in means),
              "runs": [{k: v for k, v in r.items() if k != "per_trial"} for r in runs]}
    if len(runs) == 2 and runs[1]["trial_steps"]:
        record["asha_step_ratio"] = round(runs[0]["trial_steps"] / runs[1]["trial_steps"], 3)
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
