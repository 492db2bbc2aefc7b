"""Does a search of hundreds of trials stay as cheap per trial at the end as at the start?

Runs one search of a tiny GPT-2 teacher (2 layers, d=32; trained for a few seconds here, so ASHA has something to
rank) with `--trials` trials of a few ILKD steps each, on a local Ray, 2 at a time, exactly as `kronsearch search`
runs it (TPE + ASHA, the Optuna journal, the default loggers), and reports:

* the per-trial overhead (scheduling, set-up, tear-down: `benchmarks/search_overhead.py`'s accounting) of the last
  quarter of the trials against the first quarter (trials 151-200 vs 1-50 at 200 trials; target within 1.5x),
  reused workers only (the two fresh workers' first trials carry process start and imports);
* the driver's own time per trial in the searcher (`suggest`: Optuna's ask, TPE sampling; `on_trial_complete`:
  Optuna's tell), per save of Ray Tune's experiment state (all trials, the searcher, the callbacks), and the
  trials finished per minute, first quarter vs last;
* the driver's resident memory over the run (sampled every second; slope in MB per 100 trials after the first
  quarter, target: flat), and the sizes of what the driver rewrites (Ray's experiment state, the searcher
  checkpoint, the Optuna journal) at the end.

    python benchmarks/search_scale.py                  # 200 trials (~1 min on 2 quiet cores, 5 on busy ones)
    python benchmarks/search_scale.py --trials 80      # a shorter run
    python benchmarks/search_scale.py --smoke          # 12 trials, a minute: checks the script end to end
    python benchmarks/search_scale.py --malloc-trim    # RSS after glibc's malloc_trim(0): memory in use only
    python benchmarks/search_scale.py --bare           # the same number of trivial trials through plain Ray Tune +
                                                       # Optuna (no kronsearch): the driver's RSS slope to compare
    python benchmarks/search_scale.py --no-trim        # Ray Tune's state of ended trials kept whole (without
                                                       # search.trialstate): the A/B of that trim

Prints a table and, last, one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from search_overhead import Timing, _time_suggestions, trial_overheads  # noqa: E402

sys.path.insert(0, str(REPO / "tests" / "search"))
from conftest import make_tiny_teacher  # noqa: E402  (the search tests' teacher, built the same way)


def search_dict(teacher: Path, storage: Path, trials: int, name: str, address: str | None = None) -> dict:
    """The tiny search: free layers, 4 shapes per matrix of attention / FFN, 4 ILKD steps a trial, ASHA grace 2."""
    return {
        "name": name,
        "trial": {
            "teacher": str(teacher), "device": "cpu", "save_checkpoint": False,
            "data": {"source": "teacher-samples", "seq_len": 16, "num_samples": 16, "val_blocks": 4},
            "stage1": {"max_steps": 4, "eval_every": 2, "batch_size": 2, "early_stopping": None, "lr": 1e-3},
        },
        "space": {"groups": ["attention", "attention_output", "ffn_in", "ffn_out"], "layers": "free",
                  "max_shapes": 4},
        "search": {"num_samples": trials, "max_concurrent": 2, "resources": {"cpu": 1}, "storage": str(storage),
                   "seed": 0, "asha": {"grace_period": 2, "reduction_factor": 2}, "address": address},
    }


class LeanTiming(Timing):
    """Timing that keeps only each trial's first and last result (all `trial_overheads` reads), so the benchmark's
    own bookkeeping does not add to the driver memory it measures."""

    def on_trial_result(self, iteration, trials, trial, result, **info):
        kept = self.results.setdefault(trial.trial_id, [])
        keep = {k: result.get(k) for k in ("trial_started_at", "trial_imported_at", "worker_started_at", "worker_pid",
                                           "reported_at", "throughput_tokens_per_s", "step")}
        if len(kept) < 2:
            kept.append(keep)
        else:
            kept[1] = keep


def rss_mb(pid: int | str = "self") -> float:
    """Resident memory of a process in MB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _malloc_trim() -> None:
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)


class MemorySampler(threading.Thread):
    """The driver's RSS every `every` seconds, with how many trials had ended by then."""

    def __init__(self, timing: Timing, every: float = 1.0, snapshot_at: int | None = None, trim: bool = False,
                 snapshot_end_at: int | None = None):
        super().__init__(daemon=True)
        self.timing, self.every = timing, every
        # trim: hand glibc's free heap back to the OS before each sample (malloc_trim(0)), so that RSS counts only
        # memory in use: growth that this removes is freed memory the allocator kept, not a leak
        self.trim = _malloc_trim if trim else None
        self.snapshot_at, self.snapshot = snapshot_at, None  # tracemalloc snapshot once that many trials ended
        # and a second one near the end, while the search still runs (after it returns, its objects are gone)
        self.snapshot_end_at, self.snapshot_end = snapshot_end_at, None
        self.samples: list[tuple[float, int, float]] = []  # (seconds since start, trials ended, RSS MB)
        self._halt = threading.Event()
        self.t0 = time.time()

    def run(self):
        while not self._halt.is_set():
            if self.trim is not None:
                self.trim()
            ended = len(self.timing.end)
            self.samples.append((time.time() - self.t0, ended, rss_mb()))
            for at, attr in ((self.snapshot_at, "snapshot"), (self.snapshot_end_at, "snapshot_end")):
                if at is not None and getattr(self, attr) is None and ended >= at:
                    import tracemalloc

                    setattr(self, attr, tracemalloc.take_snapshot())
                    break  # one snapshot per sample: the second comes at a later one
            self._halt.wait(self.every)

    def stop(self):
        self._halt.set()
        self.join()


def _time_searcher(calls: dict[str, list[float]]) -> None:
    """Time the driver's searcher calls (Optuna ask + TPE sampling; Optuna tell) per trial."""
    from search.searcher import PlanSearcher

    for name in ("suggest", "on_trial_complete"):
        original = getattr(PlanSearcher, name)

        def timed(self, *a, _original=original, _name=name, **kw):
            t = time.perf_counter()
            try:
                return _original(self, *a, **kw)
            finally:
                calls[_name].append(time.perf_counter() - t)

        timed.__wrapped__ = getattr(original, "__wrapped__", original)
        setattr(PlanSearcher, name, timed)


def _time_state_saves(saves: list, timing: Timing) -> None:
    """Time every save of Ray Tune's experiment state (trials, searcher, callbacks; every TUNE_GLOBAL_CHECKPOINT_S)
    with how many trials had ended by then."""
    from ray.tune.execution.tune_controller import TuneController

    original = getattr(TuneController.save_to_dir, "__wrapped__", TuneController.save_to_dir)

    def save_to_dir(self, *a, **kw):
        t = time.perf_counter()
        try:
            return original(self, *a, **kw)
        finally:
            saves.append((len(timing.end), time.perf_counter() - t))

    save_to_dir.__wrapped__ = original
    TuneController.save_to_dir = save_to_dir


def _files(exp: Path) -> dict[str, int]:
    """Sizes (bytes) of what the driver rewrites during a search."""
    out = {}
    for pattern, key in (("experiment_state-*.json", "experiment_state"), ("searcher-state-*.pkl", "searcher_state"),
                         ("optuna_study.journal", "optuna_journal")):
        files = sorted(exp.glob(pattern))
        out[key] = sum(f.stat().st_size for f in files)
    return out


def _quarter(values: list, first: bool) -> list:
    q = max(1, len(values) // 4)
    return values[:q] if first else values[-q:]


def _mean(xs, digits=3):
    xs = [x for x in xs if x is not None]
    return round(statistics.mean(xs), digits) if xs else None


def summarise(timing: Timing, calls: dict, sampler: MemorySampler, cfg, n_trials: int) -> dict:
    rows = trial_overheads(timing, cfg.trial)  # in start order
    reused = [r for r in rows if not r["fresh_worker"]]
    q = max(1, n_trials // 4)
    # trial number = order of start; compare the first and the last quarter of the trials (reused workers)
    numbered = list(enumerate(rows, start=1))
    first = [r for i, r in numbered if i <= q and not r["fresh_worker"]]
    last = [r for i, r in numbered if i > len(rows) - q and not r["fresh_worker"]]
    ov_first, ov_last = _mean([r["overhead_s"] for r in first]), _mean([r["overhead_s"] for r in last])
    ends = sorted(timing.end.values())
    # trials per minute over the first and the last quarter of the trial ends
    def rate(ts):
        return round(60 * (len(ts) - 1) / (ts[-1] - ts[0]), 2) if len(ts) > 1 and ts[-1] > ts[0] else None

    samples = sampler.samples
    # RSS against trials ended, after the first quarter (start-up, imports and caches settle there)
    slope = _slope([(n, mb) for _, n, mb in samples if n >= q])

    def rss_at(n):
        return next((round(mb, 1) for _, k, mb in samples if k >= n), None)

    return {
        "trials_started": len(rows), "trials_ended": len(timing.end),
        "quarter": q,
        "overhead_s_first_quarter": ov_first, "overhead_s_last_quarter": ov_last,
        "overhead_ratio": round(ov_last / ov_first, 3) if ov_first and ov_last else None,
        "to_entry_s_first": _mean([r["to_entry_s"] for r in first]),
        "to_entry_s_last": _mean([r["to_entry_s"] for r in last]),
        "setup_s_first": _mean([r["setup_s"] for r in first]), "setup_s_last": _mean([r["setup_s"] for r in last]),
        "teardown_s_first": _mean([r["teardown_s"] for r in first]),
        "teardown_s_last": _mean([r["teardown_s"] for r in last]),
        "trial_wall_s_first": _mean([r["wall_s"] for r in first]), "trial_wall_s_last": _mean([r["wall_s"] for r in last]),
        "suggest_ms_first": _mean([1000 * x for x in _quarter(calls["suggest"], True)], 1),
        "suggest_ms_last": _mean([1000 * x for x in _quarter(calls["suggest"], False)], 1),
        "tell_ms_first": _mean([1000 * x for x in _quarter(calls["on_trial_complete"], True)], 1),
        "tell_ms_last": _mean([1000 * x for x in _quarter(calls["on_trial_complete"], False)], 1),
        "trials_per_min_first": rate(_quarter(ends, True)), "trials_per_min_last": rate(_quarter(ends, False)),
        "fresh_workers": sum(r["fresh_worker"] for r in rows), "reused_rows": len(reused),
        "driver_rss_mb_start": round(samples[0][2], 1) if samples else None,
        "driver_rss_mb_at_quarter": rss_at(q), "driver_rss_mb_at_half": rss_at(n_trials // 2),
        "driver_rss_mb_end": round(samples[-1][2], 1) if samples else None,
        "driver_rss_mb_max": round(max(mb for *_, mb in samples), 1) if samples else None,
        "driver_rss_slope_mb_per_100_trials": slope,
    }


def bare_tune(n: int, trim: bool) -> dict:
    """n trivial trials (4 reports each) through plain Ray Tune + Optuna, 2 at a time, reused actors, default
    loggers: the driver's RSS slope of Ray Tune itself, for comparison with a kronsearch search."""
    import types

    import ray
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    def trainable(config):
        for i in range(4):
            tune.report({"loss": config["x"] + i, "step": i})

    ended = types.SimpleNamespace(end={})

    class Ended(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            ended.end[trial.trial_id] = time.time()

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    sampler = MemorySampler(ended, trim=trim)
    sampler.start()
    t0 = time.time()
    try:
        tune.Tuner(trainable, param_space={"x": tune.uniform(0, 1)},
                   tune_config=tune.TuneConfig(num_samples=n, metric="loss", mode="min", reuse_actors=True,
                                               search_alg=ConcurrencyLimiter(OptunaSearch(), 2)),
                   run_config=tune.RunConfig(storage_path=tempfile.mkdtemp(prefix="kss-bare"), callbacks=[Ended()],
                                             verbose=0)).fit()
    finally:
        sampler.stop()
        ray.shutdown()
    q = max(1, n // 4)
    late = [(k, mb) for _, k, mb in sampler.samples if k >= q]
    return {"benchmark": "search_scale", "bare_ray_tune": True, "trials": n, "malloc_trim": trim,
            "wall_s": round(time.time() - t0, 1), "driver_rss_mb_start": round(sampler.samples[0][2], 1),
            "driver_rss_mb_end": round(sampler.samples[-1][2], 1),
            "driver_rss_slope_mb_per_100_trials": _slope(late)}


def _slope(points: list[tuple[int, float]]) -> float | None:
    """Least-squares MB per 100 trials of (trials ended, RSS MB) points."""
    if len(points) < 3 or points[-1][0] <= points[0][0]:
        return None
    xs, ys = [n for n, _ in points], [mb for _, mb in points]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return round(100 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var, 2) if var else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=200)
    p.add_argument("--smoke", action="store_true", help="12 trials: checks the script end to end")
    p.add_argument("--storage", default=None, help="where the experiment goes (default: a temporary folder)")
    p.add_argument("--address", default=None, help="run on this Ray cluster instead of a local Ray")
    p.add_argument("--tracemalloc", action="store_true",
                   help="trace the driver's Python allocations: what grew between the first quarter and the end")
    p.add_argument("--malloc-trim", action="store_true",
                   help="call glibc's malloc_trim(0) before every RSS sample: tells retained free heap from growth "
                        "in use (Linux/glibc)")
    p.add_argument("--bare", action="store_true",
                   help="instead of a kronsearch search, the same number of trivial trials through plain Ray Tune + "
                        "Optuna: the driver's RSS slope of Ray Tune itself")
    p.add_argument("--no-trim", action="store_true",
                   help="keep Ray Tune's full state of ended trials (search.trialstate off): the A/B of that trim")
    p.add_argument("--memory-trace", default=None, help="also write the RSS samples (t, trials ended, MB) as CSV")
    args = p.parse_args(argv)
    n = 12 if args.smoke else args.trials
    if args.bare:
        res = bare_tune(n, args.malloc_trim)
        print(f"plain Ray Tune + Optuna, {n} trivial trials, 2 at a time: {res['wall_s']} s; driver RSS (MB) start "
              f"{res['driver_rss_mb_start']}, end {res['driver_rss_mb_end']}; slope after the first quarter "
              f"{res['driver_rss_slope_mb_per_100_trials']} MB per 100 trials"
              f"{' (after malloc_trim)' if args.malloc_trim else ''}")
        print(json.dumps(res))
        return 0

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    storage = Path(args.storage or tempfile.mkdtemp(prefix="kss", dir="/tmp"))
    os.environ.setdefault("KRONSEARCH_CACHE", str(storage / "cache"))
    import optuna

    from search.config import load_search_config
    from search.prepare import prepared_space
    from search.tuner import run_search

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.no_trim:  # the callback looks the function up at each call (the driver runs it)
        import search.trialstate

        search.trialstate.trim_trial_state = lambda trial: False
    teacher = make_tiny_teacher(storage / "teacher")
    name = f"scale-{n}"
    cfg = load_search_config(search_dict(teacher, storage / "runs", n, name, args.address))
    timing = LeanTiming()
    _time_suggestions(timing)
    calls: dict[str, list[float]] = {"suggest": [], "on_trial_complete": []}
    _time_searcher(calls)
    saves: list[tuple[int, float]] = []
    _time_state_saves(saves, timing)
    if args.tracemalloc:
        import tracemalloc

        tracemalloc.start(8)
    sampler = MemorySampler(timing, snapshot_at=max(1, n // 4) if args.tracemalloc else None,
                            trim=args.malloc_trim,
                            snapshot_end_at=max(n // 4 + 1, n - max(2, n // 20)) if args.tracemalloc else None)
    sampler.start()
    t0 = time.time()
    outcome = run_search(cfg, prepared_space(cfg), callbacks=[timing], stream=open(os.devnull, "w"))
    wall = time.time() - t0
    sampler.stop()
    grown, grown_total = [], None
    if args.tracemalloc and sampler.snapshot is not None:
        import tracemalloc

        end = sampler.snapshot_end or tracemalloc.take_snapshot()
        filters = [tracemalloc.Filter(False, tracemalloc.__file__)]
        stats = end.filter_traces(filters).compare_to(sampler.snapshot.filter_traces(filters), "filename")
        grown = [(str(st.traceback[0].filename).split("site-packages/")[-1], round(st.size_diff / 2**20, 2))
                 for st in stats[:12]]
        grown_total = round(sum(st.size_diff for st in stats) / 2**20, 2)
        tracemalloc.stop()
    res = summarise(timing, calls, sampler, cfg, n)
    res["python_growth_mb_by_file"] = grown
    # every file's growth summed: many files growing a little each add up where the top 12 look flat
    res["python_growth_mb_total"] = grown_total if grown else None
    res["malloc_trim"] = args.malloc_trim
    res["trim_ended_trials"] = not args.no_trim
    q = res["quarter"]
    res["state_save_ms_first"] = _mean([1000 * d for k, d in saves if k < q], 1)
    res["state_save_ms_last"] = _mean([1000 * d for k, d in saves if k >= n - q], 1)
    res["state_saves"] = len(saves)
    res["state_save_period_s"] = float(os.environ.get("TUNE_GLOBAL_CHECKPOINT_S", "nan"))
    for k in ("first", "last"):  # share of the driver's time spent saving the experiment state
        ms = res[f"state_save_ms_{k}"]
        res[f"state_save_share_{k}"] = round(ms / 1000 / res["state_save_period_s"], 4) if ms else None
    exp = storage / "runs" / name
    res.update(trials=n, wall_s=round(wall, 1), fit_s=outcome.timings.get("fit_s"),
               statuses={s: sum(t["status"] == s for t in outcome.trials) for s in {t["status"] for t in outcome.trials}},
               files_bytes=_files(exp))
    if args.memory_trace:
        Path(args.memory_trace).write_text("t_s,trials_ended,rss_mb\n" + "".join(
            f"{t:.1f},{k},{mb:.1f}\n" for t, k, mb in sampler.samples))

    q = res["quarter"]
    print(f"search of {n} tiny trials (4 ILKD steps, 2 at a time, local Ray{' at ' + args.address if args.address else ''}); "
          f"{wall:.0f} s; experiment in {exp}; load average at the end {os.getloadavg()[0]:.1f}")
    header = ["", f"trials 1-{q}", f"trials {n - q + 1}-{n}", "ratio"]
    lines = [
        ("overhead per trial (s, reused workers)", "overhead_s"),
        ("  scheduling to trainable entry (s)", "to_entry_s"),
        ("  set-up in the worker (s)", "setup_s"),
        ("  tear-down (s)", "teardown_s"),
        ("trial wall time (s)", "trial_wall_s"),
        ("searcher suggest (ms)", "suggest_ms"),
        ("searcher tell (ms)", "tell_ms"),
        ("experiment-state save (ms)", "state_save_ms"),
        ("  share of the driver's time", "state_save_share"),
        ("trials finished per minute", "trials_per_min"),
    ]
    table = []
    for label, key in lines:
        a = res.get(f"{key}_first") if key != "overhead_s" else res["overhead_s_first_quarter"]
        b = res.get(f"{key}_last") if key != "overhead_s" else res["overhead_s_last_quarter"]
        ratio = f"{b / a:.2f}x" if a and b else "-"
        table.append([label, "-" if a is None else f"{a:g}", "-" if b is None else f"{b:g}", ratio])
    from analysis.textfmt import text_table

    print(text_table(header, table, right=(1, 2, 3), rule=False))
    print(f"experiment state saved every {res['state_save_period_s']:g} s ({res['state_saves']} saves)")
    print(f"driver RSS (MB): start {res['driver_rss_mb_start']}, after {q} trials {res['driver_rss_mb_at_quarter']}, "
          f"after {n // 2} {res['driver_rss_mb_at_half']}, end {res['driver_rss_mb_end']}, max {res['driver_rss_mb_max']}; "
          f"slope after the first quarter {res['driver_rss_slope_mb_per_100_trials']} MB per 100 trials")
    if grown:
        print(f"Python allocations grown in the driver after {q} trials (MB, by file): "
              + "; ".join(f"{f} {mb:+g}" for f, mb in grown))
    print(f"files the driver rewrites (bytes at the end): {res['files_bytes']}; statuses {res['statuses']}")
    ok_overhead = res["overhead_ratio"] is not None and res["overhead_ratio"] <= 1.5
    record = {"benchmark": "search_scale", "smoke": args.smoke, "target_overhead_ratio": 1.5,
              "meets_overhead_target": ok_overhead, "loadavg_end": round(os.getloadavg()[0], 2), **res}
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
