"""`kronsearch profile` and `kronsearch plan --auto` end to end on a tiny GPT-2 with a text corpus (calibration data
through trials.calibration): tables, heat map, resume, refusal of a profile for another model or constraints,
budgets (one, several, unreachable), and clear errors for bad input."""
from __future__ import annotations

import json

import pytest

from kron.plan import CompressionPlan

FAST = ["--max-shapes", "2", "--shapes-per-level", "1", "--max-compression", "8", "--threads", "1"]


@pytest.fixture
def env(tiny_lm_teacher, text_corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("KRONSEARCH_CACHE", str(tmp_path / "cache"))
    calib = ["--calib", str(text_corpus), "--calib-tokens", "512", "--calib-seq-len", "32"]
    return str(tiny_lm_teacher), calib, tmp_path


def run(capsys, *argv):
    from search.cli import main

    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_profile_then_auto_plans(env, capsys):
    model, calib, tmp = env
    prof = tmp / "profile.json"
    rc, out, err = run(capsys, "profile", "--model", model, *calib, "--out", prof, "--kl-subset", "1", *FAST)
    assert rc == 0, err
    assert "transformer.h.0.attn.c_attn (attention, 96 x 32, 3 blocks)" in out
    assert "candidate" in out and "damage" in out and "keep" in out
    assert "Spearman" in out and "held-out tokens" in out
    assert "profile [" in err and "9/9" in err  # the progress bar
    assert (tmp / "profile.png").read_bytes()[:4] == b"\x89PNG"
    data = json.loads(prof.read_text())
    assert len(data["matrices"]) == 9 and data["model"]["source"] == model
    # the word embedding by default (factors 2, 4, 8), every factor measured at model level
    assert "transformer.wte (embedding, " in out and "emb f8" in out
    emb = data["matrices"]["transformer.wte"]
    assert emb["factors"] == [2, 4, 8] and all(c["model_damage"] is not None for c in emb["candidates"])

    # resume: nothing recomputed, same result
    rc, out2, _ = run(capsys, "profile", "--model", model, *calib, "--out", prof, "--kl-subset", "1", *FAST,
                      "--json", "--heatmap", "none")
    assert rc == 0 and json.loads(out2)["matrices"] == 9
    assert json.loads(prof.read_text())["matrices"] == data["matrices"]

    # one budget from the saved profile
    rc, out, err = run(capsys, "plan", "--model", model, "--auto", "--budget", "ratio=1.2", "--profile", prof,
                       "--out", tmp / "plan.yaml", *FAST[:6])
    assert rc == 0, err
    assert "auto plan for ratio=1.2" in out and "predicted damage" in out and "exact" in out
    plan = CompressionPlan.load(tmp / "plan.yaml")
    assert plan.rules and plan.name == "auto ratio=1.2"

    # several budgets at once: a front, one file each, damage falling with size
    rc, out, err = run(capsys, "plan", "--model", model, "--auto", "--budgets", "ratio=1.1,ratio=1.3,ratio=1.6",
                       "--profile", prof, "--out", tmp / "front.yaml", "--json", *FAST[:6])
    assert rc == 0, err
    plans = json.loads(out)["plans"]
    assert [p["budget"] for p in plans] == ["ratio=1.1", "ratio=1.3", "ratio=1.6"]
    assert all(p["ratio"] >= float(p["budget"].split("=")[1]) for p in plans)
    assert plans[0]["damage"] <= plans[1]["damage"] <= plans[2]["damage"]
    assert (tmp / "front-ratio1.1.yaml").is_file() and (tmp / "front-ratio1.6.yaml").is_file()
    rc, out, err = run(capsys, "plan", "--model", model, "--auto", "--budgets", "ratio=1.1,ratio=50", "--profile",
                       prof, "--json", *FAST[:6])
    assert rc == 0 and len(json.loads(out)["plans"]) == 1 and "skipped ratio=50" in err
    rc, out, _ = run(capsys, "plan", "--model", model, "--auto", "--budget", f"params={plans[1]['params']}",
                     "--profile", prof, "--methods", "lowrank", "--solver", "lagrange", "--json", *FAST[:6])
    p = json.loads(out)["plans"][0]
    assert rc == 0 and p["params"] <= plans[1]["params"] and p["solver"] == "lagrange"
    assert all(c["spec"] == "keep" or c["spec"]["method"] == "lowrank" for c in p["choice"].values())
    # --damage kl: the summed model-level KL (measured for one candidate per matrix here, the rest estimated)
    rc, out, err = run(capsys, "plan", "--model", model, "--auto", "--budget", "ratio=1.3", "--profile", prof,
                       "--damage", "kl", "--json", *FAST[:6])
    assert rc == 0, err
    p = json.loads(out)["plans"][0]
    assert p["damage_kind"] == "kl" and p["ratio"] >= 1.3 and p["damage"] >= 0
    rc, out, _ = run(capsys, "plan", "--model", model, "--auto", "--budget", "ratio=1.3", "--profile", prof,
                     "--damage", "kl", *FAST[:6])
    assert rc == 0 and "sum of model-level KLs" in out

    # the embedding: --embedding-factors none keeps it; factors the profile lacks are refused
    rc, out, err = run(capsys, "plan", "--model", model, "--auto", "--budget", "ratio=1.6", "--profile", prof,
                       "--embedding-factors", "none", "--json", *FAST[:6])
    assert rc == 0, err
    assert "transformer.wte" not in json.loads(out)["plans"][0]["choice"]  # not planned: the model's table stays
    rc, out, err = run(capsys, "plan", "--model", model, "--auto", "--budget", "ratio=1.6", "--profile", prof,
                       "--embedding-factors", "8", "--json", *FAST[:6])
    assert rc == 0 and json.loads(out)["plans"][0]["choice"]["transformer.wte"]["label"] in ("keep", "emb f8"), err
    rc, out, err = run(capsys, "plan", "--model", model, "--auto", "--budget", "ratio=3", "--profile", prof,
                       "--json", *FAST[:6])  # the knapsack factors the embedding at this size
    plan = json.loads(out)["plans"][0]
    assert rc == 0 and plan["choice"]["transformer.wte"]["label"].startswith("emb f") and plan["ratio"] >= 3, err

    # bad input: clear one-line errors, never a traceback
    for argv, message in [
        (["--budget", "ratio=2", "--profile", prof, *FAST[:6], "--embedding-factors", "16"],
         "the profile has no embedding candidate with factor 16"),
        (["--budget", "ratio=2", "--profile", prof, *FAST[:6], "--embedding-factors", "1"],
         "--embedding-factors takes integers > 1"),
        (["--budget", "ratio=50", "--profile", prof, *FAST[:6]], "unreachable with these candidates: the smallest "
                                                                 "reachable size is ratio="),
        (["--budget", "params=10", "--profile", prof, *FAST[:6]], "smallest reachable size is params="),
        (["--budget", "ratio=2", "--profile", prof, "--max-shapes", "3"],
         "constraints.max_shapes: the profile has 2, this run 3"),
        (["--budget", "ratio=2", "--profile", prof, *FAST[:6], "--methods", "kron_embedding"], "has no candidates of"),
        (["--budget", "size=2", "--profile", prof], "unknown axis 'size'"),
        (["--profile", prof], "--auto needs --budget"),
        (["--budget", "ratio=2"], "--auto needs a profile"),
        (["--budget", "ratio=2", "--profile", tmp / "missing.json"], "does not exist"),
    ]:
        rc, _, err = run(capsys, "plan", "--model", model, "--auto", *argv)
        assert rc == 2 and message in err and "Traceback" not in err, (argv, err)
    # a profile made for another model is refused, naming the mismatch
    rc, _, err = run(capsys, "plan", "--model", "config:gpt2", "--auto", "--budget", "ratio=2", "--profile", prof,
                     *FAST[:6])
    assert rc == 2 and "was made for another setting" in err and "model.source" in err
    # and so is resuming it with other constraints
    rc, _, err = run(capsys, "profile", "--model", model, *calib, "--out", prof, "--max-shapes", "3")
    assert rc == 2 and "constraints.max_shapes" in err and "--fresh" in err


def test_profile_kl_tokens_below_one_batch(env, capsys):
    """`--kl-tokens` smaller than a held-out batch measures only that many tokens (whole rows of the batch)."""
    model, calib, tmp = env
    prof = tmp / "p.json"
    rc, _, err = run(capsys, "profile", "--model", model, *calib, "--out", prof, "--kl-subset", "1", "--kl-tokens",
                     "32", "--heatmap", "none", *FAST)
    assert rc == 0, err
    data = json.loads(prof.read_text())
    assert data["model_measure"]["tokens"] == 32  # one row of the held-out batch (2 rows of 32)


def test_plan_auto_with_calib_and_plain_plan_still_works(env, capsys):
    model, calib, tmp = env
    rc, out, err = run(capsys, "plan", "--model", model, "--auto", "--budget", "ratio=1.3", *calib, *FAST,
                       "--out", tmp / "p.yaml")
    assert rc == 0, err
    assert "auto plan for ratio=1.3" in out and (tmp / "p.yaml").is_file()
    rc, out, err = run(capsys, "plan", "--model", model, "--plan", tmp / "p.yaml")
    assert rc == 0 and "modules factored" in out
    rc, out, err = run(capsys, "plan", "--model", model, "--preset", "uniform:2")
    assert rc == 0 and "modules factored" in out
    rc, _, err = run(capsys, "plan", "--model", model, "--preset", "uniform:2", "--budget", "ratio=2")
    assert rc == 2 and "--budget goes with --auto" in err
    # --damage kl with --calib: the profile measures the KL it needs
    rc, out, err = run(capsys, "plan", "--model", model, "--auto", "--budget", "ratio=1.3", *calib, *FAST,
                       "--damage", "kl", "--profile", tmp / "kl.json", "--json")
    assert rc == 0, err
    made = json.loads((tmp / "kl.json").read_text())
    assert all(any(c.get("model_damage") for c in m["candidates"]) for m in made["matrices"].values())
    assert json.loads(out)["plans"][0]["damage_kind"] == "kl"
    # a profile without model-level measurements cannot give a KL plan: a clear error when asked for, and the
    # default falls back to the proxy, saying so
    rc, _, err = run(capsys, "plan", "--model", model, "--auto", "--budget", "ratio=1.3", "--profile", tmp / "x0.json",
                     *calib, *FAST, "--damage", "proxy")
    assert rc == 0 and not any(c.get("model_damage") for m in json.loads((tmp / "x0.json").read_text())[
        "matrices"].values() for c in m["candidates"] if c["method"] != "keep")
    rc, _, err = run(capsys, "plan", "--model", model, "--auto", "--budget", "ratio=1.3", "--profile", tmp / "x0.json",
                     "--damage", "kl", *FAST[:6])
    assert rc == 2 and "--kl-subset" in err and "Traceback" not in err
    rc, out, err = run(capsys, "plan", "--model", model, "--auto", "--budget", "ratio=1.3", "--profile", tmp / "x0.json",
                       *FAST[:6], "--json")
    assert rc == 0 and json.loads(out)["plans"][0]["damage_kind"] == "proxy"
    assert "no model-level (KL) measurement" in err and "--kl-subset 4" in err
    # by default a plan made with --calib minimises the KL (4 measurements per matrix)
    rc, out, err = run(capsys, "plan", "--model", model, "--auto", "--budget", "ratio=1.3", *calib, *FAST, "--json")
    assert rc == 0 and json.loads(out)["plans"][0]["damage_kind"] == "kl", err
    rc, _, err = run(capsys, "profile", "--model", model, *calib, "--out", tmp / "x.json", "--ranks", "a")
    assert rc == 2 and "--ranks must be integers" in err
    rc, _, err = run(capsys, "profile", "--model", model, *calib, "--out", tmp / "x.json", "--embedding-factors", "5")
    assert rc == 2 and "divides the width 32" in err and "Traceback" not in err
    rc, _, err = run(capsys, "plan", "--model", model, "--preset", "uniform:2", "--embedding-factors", "2")
    assert rc == 2 and "--embedding-factors goes with --auto" in err


def test_plan_auto_refine(env, capsys):
    """`plan --auto --refine N`: the knapsack's plan improved on the model, never over its budget; --refine needs
    --calib."""
    model, calib, tmp = env
    rc, out, err = run(capsys, "plan", "--model", model, "--auto", "--budget", "ratio=1.3", *calib, *FAST,
                       "--refine", "6", "--json", "--out", tmp / "r.yaml")
    assert rc == 0, err
    p = json.loads(out)["plans"][0]
    r = p["refinement"]
    assert 1 <= r["evals"] <= 6 and r["kl"] <= r["start_kl"] and p["ratio"] >= 1.3
    assert p["damage"] == r["kl"] and p["solver"].endswith("+refine")
    assert CompressionPlan.load(tmp / "r.yaml").rules
    # several budgets: each plan is refined on the model itself (not on the sized skeleton of the previous plan)
    rc, out, err = run(capsys, "plan", "--model", model, "--auto", "--budgets", "ratio=1.2,ratio=1.4", *calib, *FAST,
                       "--refine", "3", "--json")
    assert rc == 0, err
    plans = json.loads(out)["plans"]
    assert len(plans) == 2 and all(p["refinement"]["evals"] >= 1 and p["refinement"]["kl"] <= p["refinement"][
        "start_kl"] for p in plans)
    assert [p["ratio"] >= float(p["budget"].split("=")[1]) for p in plans] == [True, True]
    rc, out, err = run(capsys, "plan", "--model", model, "--auto", "--budget", "ratio=1.3", *calib, *FAST,
                       "--refine", "3")
    assert rc == 0 and "held-out calibration tokens" in out and "refined from the knapsack" in out, err
    assert "refine ratio=1.3: 1/3 measurements" in err
    rc, _, err = run(capsys, "plan", "--model", model, "--auto", "--budget", "ratio=1.3", "--profile",
                     tmp / "nope.json", "--refine", "5")
    assert rc == 2 and "--refine measures plans on the model: give --calib" in err
    rc, _, err = run(capsys, "plan", "--model", model, "--auto", "--budget", "ratio=1.3", *calib, "--refine", "-1")
    assert rc == 2 and "--refine takes a number" in err
