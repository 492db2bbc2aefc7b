"""End-to-end searches on a tiny GPT-2 with the session's Ray: multi-objective TPE + ASHA, what Optuna is told,
the files a search leaves, and resuming a search whose driver was killed."""
from __future__ import annotations

import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from kron.plan import CompressionPlan
from search.commands import write_analysis
from search.config import load_search_config
from search.prepare import prepared_space
from search.finalize import _saved_study
from search.tuner import run_search

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[2]


def _summaries(exp: Path) -> dict[str, dict]:
    out = {}
    for p in exp.glob("trial_*/trial_summary.json"):
        try:
            out[p.parent.name] = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):  # being replaced right now
            continue
    return out


def test_multi_objective_search_with_asha(ray_session, tiny_search, capsys):
    # One trial at a time, and the first two plans fixed: a mild compression, then the most aggressive plan, which
    # is far worse at the first rung (step 2) and must be stopped there. TPE proposes the other two. keep_front off:
    # the harsh plan is the smallest, so on the front of its step (test_searcher tests keep_front).
    raw = tiny_search(name="mo", num_samples=4, max_concurrent=1, reference=True,
                      asha={"grace_period": 2, "reduction_factor": 4, "size_buckets": 1, "keep_front": False})
    cfg = load_search_config(raw)
    space = prepared_space(cfg)
    mild = max((space.sample(i) for i in range(50)), key=lambda p: space.plan_costs(p)["params"])
    harsh = space.cheapest("params")
    outcome = run_search(cfg, space, initial_params=[mild, harsh])
    exp = outcome.local_dir
    assert not outcome.interrupted and len(outcome.trials) == 4

    meta = json.loads((exp / "search_meta.json").read_text())
    assert meta["name"] == "mo"
    assert [(o["name"], o["mode"]) for o in meta["objectives"]] == [("quality", "min"), ("params", "min")]
    assert meta["config"]["search"]["num_samples"] == 4

    summaries = _summaries(exp)
    assert len(summaries) == 4
    statuses = {s["trial_id"]: s["status"] for s in summaries.values()}
    assert set(statuses.values()) <= {"complete", "pruned"}
    by_plan = {json.dumps(s["search_params"], sort_keys=True): s["status"] for s in summaries.values()}
    assert by_plan[json.dumps(mild, sort_keys=True)] == "complete"
    assert by_plan[json.dumps(harsh, sort_keys=True)] == "pruned"
    assert all(s["search"] == "mo" for s in summaries.values())

    # what the searcher's Optuna study was told (its saved state, as the experiment keeps it)
    study = {t["user_attrs"]["ray_trial_id"]: t for t in _saved_study(exp) if "ray_trial_id" in t["user_attrs"]}
    assert set(study) == set(statuses)
    for trial_id, status in statuses.items():
        t = study[trial_id]
        summary = next(s for s in summaries.values() if s["trial_id"] == trial_id)
        if status == "pruned":  # stopped by ASHA before max_t: PRUNED, never COMPLETE with partial metrics
            assert t["state"] == "PRUNED" and t["values"] is None
            assert summary["steps"] < 6
        else:  # both objectives, as the trial measured them
            assert t["state"] == "COMPLETE"
            assert t["values"] == pytest.approx([summary["quality"], summary["params"]])
            assert summary["params"] == space.plan_costs(t["params"])["params"]
    assert json.loads((exp / "optuna_trials.json").read_text())

    # Ray's saved state of the ended trials: the last result and the metric statistics kept, the running windows
    # dropped (search.trialstate: the driver's memory per trial)
    state = json.loads(sorted(exp.glob("experiment_state-*.json"))[-1].read_text())
    run_meta = [json.loads(m) for _, m in state["trial_data"]]
    assert len(run_meta) == 4
    for m in run_meta:
        assert m["metric_n_steps"] == {}
        assert m["metric_analysis"]["quality"]["last-5-avg"] is not None and m["last_result"]["params"] > 0

    printed = capsys.readouterr().out
    assert "teacher reference: val_ppl" in printed
    assert "started" in printed and "finished at step 6" in printed and "pruned (stopped early)" in printed
    assert "best val_ppl by size" in printed

    # the uncompressed teacher, evaluated on the same data without training: a reference, not a trial
    ref = json.loads((exp / "reference_teacher" / "trial_summary.json").read_text())
    assert ref["method"] == "teacher" and ref["status"] == "complete" and ref["search"] == "mo"
    assert ref["params"] == space.info.params and ref["steps"] == 0
    assert 1 < ref["quality"] < 1e4

    paths = write_analysis(cfg, exp, space)
    table = capsys.readouterr().out
    assert "(teacher)" in table and "uncompressed reference" in table
    front = (exp / "analysis" / "pareto.csv").read_text().splitlines()
    # the report `kronsearch analyze` writes (one report path): the same pareto.csv format, report.md beside it
    from analysis.report import PARETO_COLUMNS

    assert len(front) >= 2 and front[0].startswith(",".join(PARETO_COLUMNS[:7]))
    assert (exp / "analysis" / "pareto.png").stat().st_size > 0
    assert paths["report (Markdown)"] == exp / "analysis" / "report.md" and (exp / "analysis" / "results.csv").is_file()
    plans = sorted((exp / "analysis" / "front").glob("*.yaml"))
    assert plans and len(plans) == len(front) - 1
    assert CompressionPlan.load(plans[0]).rules
    assert paths["Pareto plot"] == exp / "analysis" / "pareto.png"

    # sizes without the output embedding as the objective: the table shows the count the front was computed on
    excl = load_search_config({**raw, "search": {**raw["search"],
                                                 "objectives": ["quality", "params_excl_output_embedding"]}})
    write_analysis(excl, exp, space)
    table = capsys.readouterr().out
    assert "params excl. out-emb" in table
    assert f"{space.info.params_excl_output_embedding:,}" in table  # the teacher reference row


def test_seed_plans_run_first_as_labelled_trials_of_the_search(ray_session, tiny_search):
    """search.seed_plans: the hand-made plans are trials of the search, run first, named seed:<plan> in the
    results, and train exactly the preset's plan."""
    from kron.models import load_model
    from kron.presets import preset_plan

    raw = tiny_search(name="seeded", num_samples=3, max_concurrent=1, asha=None, seed_plans=["uniform:2"])
    raw["space"]["groups"] = ["attention", "attention_output", "ffn_in", "ffn_out"]  # all that uniform:2 compresses
    raw["space"]["methods"] = ["kronecker"]  # Kronecker trials (the default, both methods, trains them as "mixed")
    cfg = load_search_config(raw)
    outcome = run_search(cfg)
    summaries = list(_summaries(outcome.local_dir).values())
    assert len(summaries) == 3
    [seed] = [s for s in summaries if s["label"] == "seed:uniform:2"]
    assert seed["status"] == "complete" and seed["method"] == "kronecker"
    teacher = load_model(raw["trial"]["teacher"], device="cpu")
    expected = {n: s.to_dict() for n, s in preset_plan("uniform:2", teacher.config).resolve(teacher).items()
                if s != "keep"}
    assert {n: s for n, s in seed["plan_resolved"].items() if s != "keep"} == expected
    # the end-of-search report sets the seed against the searched plans, and counts the front's structures
    import io

    stream = io.StringIO()
    write_analysis(cfg, outcome.local_dir, stream=stream)
    out = stream.getvalue()
    assert "seed plans against the searched plans at no larger size:" in out
    assert re.search(r"seed:uniform:2: [\d.]+ at [\d,]+ — (best searched|no searched plan)", out), out
    assert re.search(r"structures in the front's plans: kronecker \d+ matrices", out), out


def test_failed_trials_are_recorded_and_the_search_goes_on(ray_session, tiny_search, tmp_path):
    """A trial that raises (here: a data file that disappears after validation) is recorded as an error in its
    summary and in Optuna (FAIL); the other trials still run."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the teacher and the student\n" * 50)
    raw = tiny_search(name="fails", num_samples=2, max_concurrent=1, asha=None)
    raw["trial"]["data"] = {"source": str(corpus), "seq_len": 16, "val_blocks": 2}
    cfg = load_search_config(raw)
    space = prepared_space(cfg)
    corpus.unlink()  # valid when checked, gone when the trials run
    outcome = run_search(cfg, space)
    summaries = _summaries(outcome.local_dir)
    assert len(summaries) == 2
    assert {s["status"] for s in summaries.values()} == {"error"}
    assert all(s["error"] for s in summaries.values())
    study = [t for t in _saved_study(outcome.local_dir) if "ray_trial_id" in t["user_attrs"]]
    assert [t["state"] for t in study] == ["FAIL", "FAIL"]


def test_existing_experiment_needs_resume_and_resume_needs_one(ray_session, tiny_search):
    from kron.errors import ConfigError
    from search.resume import write_meta

    cfg = load_search_config(tiny_search(name="again", num_samples=1, asha=None))
    space = prepared_space(cfg)
    with pytest.raises(ConfigError, match="nothing to resume"):
        run_search(cfg, space, resume=True)
    exp = Path(cfg.search.storage) / "again"
    write_meta(cfg, space, exp)
    (exp / "experiment_state-2000-01-01_00-00-00.json").write_text("{}")
    with pytest.raises(ConfigError, match="already exists .* pass --resume"):
        run_search(cfg, space)
    changed = load_search_config({**tiny_search(name="again", num_samples=1, asha=None),
                                  "space": {"groups": ["attention"], "layers": "all"}})
    with pytest.raises(ConfigError, match="space section.* changed"):
        run_search(changed, resume=True)


def _start_search(ray_session, raw: dict, tmp_path: Path):
    """`kronsearch search` for `raw` in its own process group, attached to the session's Ray; returns what the
    kill-and-resume tests need: the command, its environment, the experiment folder, the process and its log."""
    cfg_path = tmp_path / "search.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    exp = Path(raw["search"]["storage"]) / raw["name"]
    address = ray_session.get_runtime_context().gcs_address
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "search.cli", "search", str(cfg_path), "--address", address]
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return cmd, env, exp, proc, log


def _kill(proc, log) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    log.close()


def _resume_and_check(cmd, env, exp: Path, kept: dict, context: str = ""):
    """Resume with --resume; the search must complete its 5 trials, the trials in `kept` (folder -> (history,
    progress.csv)) must be neither rerun nor reported again, and trials unknown to the saved state are closed.
    Returns the resumed run and the summaries after it."""
    result = subprocess.run(cmd + ["--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, context + result.stdout[-3000:] + result.stderr[-3000:]
    after = _summaries(exp)
    in_state = _all_in_state(exp)
    assert len(in_state) == 5, (context, in_state)  # the search completed its 5 trials
    assert all(after[d]["status"] == "complete" for d in in_state), {d: s["status"] for d, s in after.items()}
    for d, (history, progress) in kept.items():  # finished before the kill: kept, not rerun nor reported again
        assert after[d]["history"] == history, f"{d} was rerun"
        assert (exp / d / "progress.csv").read_text() == progress, f"{d} reported again"
    # a trial started after the last saved experiment state is unknown to the resumed search: closed, not left running
    for d in set(after) - in_state:
        assert after[d]["status"] == "error" and after[d]["error"].startswith("orphaned")
    return result, after


@pytest.mark.slow
def test_resume_after_the_driver_is_killed(ray_session, tiny_search, tmp_path):
    """SIGKILL the `kronsearch search` process once a trial has finished, resume with --resume, and check that no
    finished trial is lost or run again and that the search completes its trials."""
    raw = tiny_search(name="killed", num_samples=5, max_concurrent=1, asha=None)
    raw["trial"]["stage1"].update(max_steps=300, eval_every=50)  # ~3 s per trial: long enough to be caught mid-run
    cmd, env, exp, proc, log = _start_search(ray_session, raw, tmp_path)
    finished_before: dict[str, float] = {}
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            done = _terminated_in_state(exp)
            complete = {d: s for d, s in _summaries(exp).items() if s["status"] == "complete"}
            if done & set(complete):  # finished on disk AND recorded as finished in the experiment state
                finished_before = {d: (s["history"], (exp / d / "progress.csv").read_text())
                                   for d, s in complete.items()}
                break
            time.sleep(0.5)
    finally:
        _kill(proc, log)
    assert finished_before, f"no trial finished in time:\n{(tmp_path / 'first.log').read_text()[-3000:]}"
    recorded = _terminated_in_state(exp)
    assert len(finished_before) < 5, "the search ended before it could be killed"

    kept = {d: v for d, v in finished_before.items() if d in recorded}  # finished and recorded before the kill
    result, after = _resume_and_check(cmd, env, exp, kept)
    assert all(after[d]["search"] == "killed" for d in kept)  # the resumed driver did finalise them
    assert "Pareto front of killed" in result.stdout


def _terminated_in_state(exp: Path) -> set[str]:
    """Trial folders the experiment state (what a resume reads) records as TERMINATED."""
    return _all_in_state(exp, "TERMINATED")


def _all_in_state(exp: Path, status: str | None = None) -> set[str]:
    """Trial folders the latest experiment state records (with that status, if given)."""
    files = sorted(exp.glob("experiment_state-*.json"))  # named by the driver's start time: the last is current
    if not files:
        return set()
    try:
        state = json.loads(files[-1].read_text())
    except (OSError, json.JSONDecodeError):
        return set()
    out = set()
    for trial_json, _ in state["trial_data"]:
        t = json.loads(trial_json) if isinstance(trial_json, str) else trial_json
        if status is None or t.get("status") == status:
            out.add(f"trial_{t['trial_id']}")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("seed", [7])
def test_resume_after_a_kill_at_a_random_moment(ray_session, tiny_search, tmp_path, seed):
    """SIGKILL the `kronsearch search` process at a seeded random moment (once Ray has saved a first experiment
    state, whatever the trials are doing then), resume, and check that no trial recorded as finished is lost or run
    again and that the search ends with all its trials."""
    import random

    rng = random.Random(seed)
    raw = tiny_search(name="randkill", num_samples=5, max_concurrent=2, asha=None)
    raw["trial"]["stage1"].update(max_steps=200, eval_every=50)
    cmd, env, exp, proc, log = _start_search(ray_session, raw, tmp_path)
    delay = rng.uniform(0.0, 12.0)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not list(exp.glob("experiment_state-*.json")):
            time.sleep(0.2)
        time.sleep(delay)
    finally:
        _kill(proc, log)
    assert list(exp.glob("experiment_state-*.json")), (tmp_path / "first.log").read_text()[-3000:]
    recorded = _terminated_in_state(exp)
    before = {d: (s["history"], (exp / d / "progress.csv").read_text())
              for d, s in _summaries(exp).items() if s["status"] == "complete" and d in recorded}

    result, _ = _resume_and_check(cmd, env, exp, before, f"killed after {delay:.1f} s\n")
    assert "Pareto front of randkill" in result.stdout


def test_time_budget_ends_the_search(ray_session, tiny_search):
    """search.time_budget_minutes bounds the whole search: Ray Tune stops starting (and stops running) trials when
    what is left of it after the driver's own start-up is spent; finished trials are kept and reported."""
    # A fresh Ray worker's first trial needs ~15 s on this 2-core machine before it trains (worker start ~5 s,
    # torch + transformers imports ~4.5 s, teacher + student + first evaluation ~5 s, two workers starting at once),
    # so the budget must exceed that for any trial to finish — with room for a loaded machine, where 30 s left no trial
    # finished; 200 trials of 300 steps still cannot fit in it (40 of 150 did, on a quiet machine, once workers
    # reuse their teacher and inits).
    raw = tiny_search(name="budget", num_samples=200, max_concurrent=2, time_budget_minutes=0.75, asha=None)
    raw["trial"]["stage1"].update(max_steps=300, eval_every=50)
    raw["trial"]["init"] = "svd"  # no calibration pass in the driver or the trials: the budget is for training
    cfg = load_search_config(raw)
    t0 = time.time()
    outcome = run_search(cfg)
    wall = time.time() - t0
    assert wall < 45 + 8, wall  # 45 s of budget; the margin is for the last results and the analysis
    assert 0 < len(outcome.trials) < 200
    assert any(t["status"] == "complete" for t in outcome.trials)


def _tb_scalars(folder: Path) -> dict[str, list[float]]:
    """Every scalar in the TensorBoard event files under `folder` (read back with tensorboardX's protobufs)."""
    import struct

    from tensorboardX.proto import event_pb2

    out: dict[str, list[float]] = {}
    for path in folder.rglob("events.out.tfevents.*"):
        data = path.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    out.setdefault(value.tag, []).append(value.simple_value)
    return out


def test_trackers_study_journal_and_one_count_of_trials(ray_session, tiny_search, capsys, tmp_path):
    """One finished search, read back as a researcher would: TensorBoard event files and the MLflow store hold every
    trial's plan and per-evaluation metrics (quality, ILKD loss terms, throughput); optuna.load_study on the journal
    has every trial with its state; the search's line, `kronsearch analyze`, `compare` and the CSVs count the same
    trials, the teacher reference apart."""
    import pandas as pd

    from analysis.cli import add_parsers  # noqa: F401  (the CLI below)
    from search.cli import main
    from search.commands import _counts
    from search.searcher import STUDY_JOURNAL, load_journal_study

    loggers = ["tensorboard", "mlflow"]  # mlflow-skinny comes with the dev extra: both trackers are read back for real
    # one trial at a time: the harsh plan reaches ASHA's first rung after the mild one, so it is pruned for sure
    raw = tiny_search(name="tracked", num_samples=4, max_concurrent=1, reference=True, loggers=loggers,
                      asha={"grace_period": 2, "reduction_factor": 2, "size_buckets": 1})
    cfg = load_search_config(raw)
    space = prepared_space(cfg)
    harsh = space.cheapest("params")
    mild = max((space.sample(i) for i in range(50)), key=lambda p: space.plan_costs(p)["params"])
    outcome = run_search(cfg, space, initial_params=[mild, harsh])
    exp = outcome.local_dir
    summaries = {s["trial_id"]: s for s in _summaries(exp).values()}
    assert len(summaries) == 4

    # TensorBoard: per trial, the evaluations' quality, every ILKD loss term and throughput
    for trial_id, s in summaries.items():
        scalars = _tb_scalars(exp / f"trial_{trial_id}")
        assert "ray/tune/eval_quality" in scalars and "ray/tune/throughput_tokens_per_s" in scalars, sorted(scalars)
        if s["steps"] > 0:
            losses = {k for k in scalars if k.startswith("ray/tune/loss")}
            assert {"ray/tune/loss", "ray/tune/loss_emb", "ray/tune/loss_att", "ray/tune/loss_hid",
                    "ray/tune/loss_ce"} <= losses, sorted(scalars)
        # every evaluation, and for a trial that finished, its final report
        assert len(scalars["ray/tune/eval_quality"]) == len(s["history"]) + (s["status"] == "complete")

    from mlflow.tracking import MlflowClient

    client = MlflowClient((exp / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("tracked")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {f"trial_{t}" for t in summaries}
    for trial_id, s in summaries.items():
        run = runs[f"trial_{trial_id}"]
        assert int(run.data.params["plan_params"]) == s["params"] and run.data.params["plan_summary"]
        history = client.get_metric_history(run.info.run_id, "eval_quality")
        assert len(history) == len(s["history"]) + (s["status"] == "complete")
        assert {"loss_emb", "loss_att", "loss_hid", "loss_ce", "throughput_tokens_per_s"} <= set(run.data.metrics)

    # the Optuna study, as optuna.load_study reads it: every trial with its state
    study = load_journal_study(exp / STUDY_JOURNAL, "tracked")
    states = {t.user_attrs["ray_trial_id"]: t.state.name for t in study.trials if "ray_trial_id" in t.user_attrs}
    assert states == {t: {"complete": "COMPLETE", "pruned": "PRUNED"}[s["status"]] for t, s in summaries.items()}
    assert "PRUNED" in states.values()

    # one count everywhere
    by = {st: sum(1 for s in summaries.values() if s["status"] == st) for st in ("complete", "pruned")}
    words = ", ".join(f"{n} {st}" for st, n in by.items() if n)
    line = _counts(outcome)
    assert line.startswith("4 trials in ") and f"({words})" in line and line.endswith("; references: teacher")
    write_analysis(cfg, exp, space)
    capsys.readouterr()
    trials_csv = pd.read_csv(exp / "analysis" / "trials.csv")
    assert len(trials_csv) == 4 and "teacher" not in set(trials_csv["trial_id"].astype(str))
    assert list(pd.read_csv(exp / "analysis" / "references.csv")["trial_id"]) == ["teacher"]
    assert main(["analyze", str(exp), "--out", str(tmp_path / "report")]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0] == f"4 trials: {words}; references: teacher"
    assert f"tracked: {by['complete']}/4 complete" in printed
    results = pd.read_csv(tmp_path / "report" / "results.csv")
    assert (results["role"] == "trial").sum() == 4 and list(results.loc[results["role"] == "reference", "method"]) \
        == ["teacher"]
    assert "4 trials in 1 search(es)" in (tmp_path / "report" / "report.md").read_text()
    assert main(["compare", str(exp), "--out", str(tmp_path / "compare")]) == 0
    table = pd.read_csv(tmp_path / "compare" / "compare.csv")
    row = table[table["kind"] == "search"].iloc[0]
    assert (row["trials"], row["complete"]) == (4, by["complete"])
    assert list(table.loc[table["kind"] == "baseline", "method"]) == ["teacher"]


def test_bad_loggers_are_refused_before_ray_starts(tiny_search, tmp_path, monkeypatch):
    """An unknown logger (the valid ones listed), a tracker whose extra is missing (the extra named) and a tracker
    folder that cannot be written: errors before any data is built or Ray is started."""
    from kron.errors import ConfigError
    import search.tracking as tracking

    with pytest.raises(ConfigError, match=r"unknown logger\(s\) \['tb'\]; valid: \['tensorboard', 'mlflow', 'wandb'\]"):
        load_search_config(tiny_search(name="bad", loggers=["tb"]))
    started = []
    monkeypatch.setattr("search.tuner.start_ray", lambda cfg: started.append(1))
    monkeypatch.setattr("search.tuner.prepare_locally", lambda *a, **k: started.append(1))
    real = tracking._importable
    monkeypatch.setattr(tracking, "_importable", lambda m: False if m == "wandb" else real(m))
    cfg = load_search_config(tiny_search(name="nowandb", loggers=["tensorboard", "wandb"]))
    with pytest.raises(ConfigError, match=r"'wandb' needs the wandb package.*pip install 'kronsearch\[wandb\]'"):
        run_search(cfg)
    assert real("mlflow"), "mlflow-skinny comes with the dev extra"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_search_config(tiny_search(name="blocked", loggers=["mlflow"]))
    exp = Path(cfg.search.storage) / "blocked"
    exp.mkdir(parents=True)
    (exp / "mlruns").write_text("a file where the MLflow store should go")
    with pytest.raises(ConfigError, match="mlflow cannot write to .*mlruns"):
        run_search(cfg)
    assert not started
