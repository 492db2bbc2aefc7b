"""Loading trial summaries into tables, plan tables, atomic writes, and the no-heavy-imports rule."""
from __future__ import annotations

import json
import math
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from analysis.results import (
    RESULT_COLUMNS,
    atomic_path,
    atomic_write_text,
    compression_factor,
    find_summaries,
    format_factorisation,
    load_history,
    load_results,
    mark_pareto,
    plan_table,
    read_summary,
)
from kron.errors import CheckpointError, DataError

REPO = Path(__file__).resolve().parents[2]


# --- load_results -------------------------------------------------------------------------------------------


def test_load_results_reads_every_trial(fake_results):
    df = load_results(list(fake_results.values()))
    assert list(df.columns) == list(RESULT_COLUMNS)
    assert len(df) == 15 + 15 + 4
    assert df.groupby("search").size().to_dict() == {"kron-gpt2-asha": 15, "kron-gpt2-tpe": 15, "references": 4}
    assert df["params"].dtype == "Int64" and df["quality"].dtype == "float64"
    assert set(df["status"]) == {"complete", "error", "diverged", "pruned"}
    assert set(df.loc[df["search"] == "references", "method"]) == {"teacher", "preset", "lowrank", "layerdrop"}


def test_search_name_from_meta_then_folder(fake_results):
    # asha: folder "asha_2024-11-21" but search_meta.json says "kron-gpt2-asha"; tpe has no meta file.
    assert set(load_results(fake_results["kron-gpt2-asha"])["search"]) == {"kron-gpt2-asha"}
    assert set(load_results(fake_results["kron-gpt2-tpe"])["search"]) == {"kron-gpt2-tpe"}


def test_search_field_in_summary_wins(write_summary, tmp_path):
    write_summary("exp/a", trial_id="a", search="explicit")
    write_summary("exp/b", trial_id="b", search=None)
    df = load_results(tmp_path / "exp").set_index("trial_id")
    assert df.loc["a", "search"] == "explicit" and df.loc["b", "search"] == "exp"


def test_single_file_source_and_relative_checkpoint(write_summary, tmp_path):
    path = write_summary("standalone/out", trial_id="solo", checkpoint="ckpt/model.safetensors")
    df = load_results(path)
    assert len(df) == 1
    row = df.iloc[0]
    assert row["search"] == "out"  # a single file's search defaults to its folder's name
    assert row["checkpoint"] == str((tmp_path / "standalone/out/ckpt/model.safetensors").resolve())
    assert row["summary_path"] == str(path.resolve())


def test_missing_checkpoint_is_none(fake_results):
    df = load_results(fake_results["kron-gpt2-asha"])
    failed = df[df["status"] == "error"]
    assert len(failed) == 1 and failed["checkpoint"].iloc[0] is None
    ok = df[df["status"] == "complete"]["checkpoint"]
    assert all(Path(p).is_absolute() for p in ok)


def test_overlapping_sources_are_loaded_once(fake_results):
    root = fake_results["kron-gpt2-tpe"].parent
    df = load_results([root, fake_results["kron-gpt2-tpe"]])
    assert df["summary_path"].is_unique and len(df) == 34


def test_nulls_and_nan_survive(fake_results):
    df = load_results(fake_results["kron-gpt2-asha"]).set_index("status")
    assert pd.isna(df.loc["error", "quality"]) and df.loc["error", "error"].startswith("RuntimeError")
    assert math.isnan(df.loc["diverged", "quality"])
    assert pd.isna(df.loc["complete", "label"]).all()


def test_with_history(fake_results):
    df = load_results(fake_results["kron-gpt2-tpe"], with_history=True)
    assert "history" in df and all(isinstance(h, list) for h in df["history"])
    assert df.loc[df["status"] == "complete", "history"].map(len).min() > 0


def test_load_history(fake_results):
    hist = load_history(fake_results["kron-gpt2-tpe"])
    full = load_results(fake_results["kron-gpt2-tpe"], with_history=True)
    assert len(hist) == full["history"].map(len).sum()
    for column in ("search", "trial_id", "step", "tokens_seen", "quality", "loss_att", "throughput_tokens_per_s"):
        assert column in hist
    assert hist["step"].dtype == "Int64" and hist["loss"].dtype == "float64"
    first = hist.groupby("trial_id")["step"].min()
    assert (first == 0).all()


def test_load_history_keeps_extra_fields(write_summary, tmp_path):
    write_summary("x", history=[{"step": 1, "quality": 5.0, "lr": 0.1}])
    hist = load_history(tmp_path / "x")
    assert hist["lr"].tolist() == [0.1] and math.isnan(hist["loss"].iloc[0])


# --- errors -------------------------------------------------------------------------------------------------


def test_missing_path_is_a_data_error(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="nope.*does not exist"):
        load_results(missing)


def test_directory_without_summaries_is_a_data_error(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "result.json").write_text("{}")
    with pytest.raises(DataError, match="no trial_summary.json found under .*empty"):
        load_results(tmp_path / "empty")


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"schema": "kronsearch.trial/1", "trial_id": ', "truncated or corrupt JSON"),
        ("", "truncated or corrupt JSON"),
        (b"\xff\xfe\x00garbage", "truncated or corrupt JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        (json.dumps({"schema": "kronsearch.trial/2", "trial_id": "x", "method": "kronecker", "status": "complete",
                     "quality_name": "val_ppl", "quality_mode": "min"}), "unknown trial summary schema"),
        (json.dumps({"trial_id": "x"}), "lacks required key"),
    ],
)
def test_corrupt_summary_is_a_checkpoint_error_naming_the_file(tmp_path, write_summary, content, match):
    write_summary("exp/good")
    bad = tmp_path / "exp" / "bad" / "trial_summary.json"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(CheckpointError, match=match) as info:
        load_results(tmp_path / "exp")
    assert str(bad) in str(info.value)


@pytest.mark.parametrize("override, match", [({"status": "done"}, "unknown status 'done'"),
                                             ({"quality_mode": "lower"}, "quality_mode must be")])
def test_invalid_field_values(write_summary, override, match):
    path = write_summary("t", **override)
    with pytest.raises(CheckpointError, match=match):
        read_summary(path)


def test_corrupt_search_meta_is_a_checkpoint_error(write_summary, tmp_path):
    write_summary("exp/t1")
    (tmp_path / "exp" / "search_meta.json").write_text('{"name": "x", "obj')
    with pytest.raises(CheckpointError, match="search_meta.json"):
        load_results(tmp_path / "exp")


def test_find_summaries_is_sorted_and_absolute(fake_results):
    paths = find_summaries(fake_results["references"])
    assert paths == sorted(paths) and all(p.is_absolute() for p in paths) and len(paths) == 4


# --- mark_pareto --------------------------------------------------------------------------------------------


def test_mark_pareto_ranks_each_search_without_failures_or_references(fake_results):
    df = mark_pareto(load_results(list(fake_results.values())))
    assert df.loc[df["status"] != "complete", "front_rank"].isna().all()
    assert df.loc[df["method"] == "teacher", "front_rank"].isna().all()
    assert not df.loc[df["status"] != "complete", "on_front"].any()
    for _, group in df[df["front_rank"].notna()].groupby("search"):
        assert (group["front_rank"] == 0).any()
        front = group[group["on_front"]]
        # on a params/ppl front, fewer params always means a higher perplexity
        front = front.sort_values("params")
        assert front["quality"].is_monotonic_decreasing


def test_mark_pareto_with_duplicate_index(fake_results):
    df = load_results(fake_results["kron-gpt2-tpe"])
    doubled = pd.concat([df, df])  # index labels repeat
    marked = mark_pareto(doubled)
    assert (marked["on_front"].to_numpy()[: len(df)] == marked["on_front"].to_numpy()[len(df):]).all()
    assert marked["on_front"].sum() == 2 * mark_pareto(df)["on_front"].sum()


def test_mark_pareto_rejects_mixed_quality_modes(write_summary, tmp_path):
    write_summary("exp/a", trial_id="a")
    write_summary("exp/b", trial_id="b", quality_name="accuracy", quality_mode="max", quality=0.8)
    with pytest.raises(DataError, match="mix quality modes"):
        mark_pareto(load_results(tmp_path / "exp"))


def test_mark_pareto_maximises_accuracy(write_summary, tmp_path):
    for i, (params, acc) in enumerate([(1, 0.70), (2, 0.90), (3, 0.80)]):
        write_summary(f"exp/{i}", trial_id=str(i), params=params, quality=acc, quality_name="accuracy",
                      quality_mode="max")
    df = mark_pareto(load_results(tmp_path / "exp")).set_index("trial_id")
    assert df["on_front"].to_dict() == {"0": True, "1": True, "2": False}


# --- plans --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, text, factor",
    [
        ("keep", "keep", 1.0),
        ({"shape": [384, 768, 2, 1], "rank": 1, "blocks": 1}, "384x768⊗2x1 r1", (768 * 768) / (384 * 768 + 2)),
        ({"shape": [96, 96, 4, 4], "rank": 2, "blocks": 3}, "96x96⊗4x4 r2 b3", (384 * 384) / (2 * (9216 + 16))),
        ({"shape": [2, 2, 2, 2]}, "2x2⊗2x2 r1", 2.0),
    ],
)
def test_format_and_factor(spec, text, factor):
    assert format_factorisation(spec) == text
    assert compression_factor(text) == pytest.approx(factor)


def test_compression_factor_of_missing_and_garbage():
    assert math.isnan(compression_factor(None)) and math.isnan(compression_factor(pd.NA))
    with pytest.raises(DataError, match="cannot parse"):
        compression_factor("3 by 4")


def test_format_rejects_bad_spec():
    with pytest.raises(CheckpointError, match="plan_resolved entry"):
        format_factorisation({"shape": [1, 2]})


def test_plan_table_from_dataframe_and_summaries(fake_results):
    df = load_results(fake_results["kron-gpt2-asha"])
    df = df[df["status"] == "complete"]
    table = plan_table(df)
    assert table.shape == (len(df), 16)
    assert table.index.names == ["search", "trial_id", "label", "params", "quality", "quality_name"]
    assert set(table.index.get_level_values("search")) == {"kron-gpt2-asha"}  # name from search_meta.json
    assert table.columns[0] == "transformer.h.0.attn.c_attn"
    cells = set(table.stack().unique())
    assert "keep" in cells and any("⊗" in cell for cell in cells)
    summaries = [read_summary(p) for p in df["summary_path"]]
    again = plan_table(summaries)
    assert again.to_numpy().tolist() == table.to_numpy().tolist()


def test_plan_table_missing_modules_are_na(make_summary):
    a = make_summary(trial_id="a", plan_resolved={"m1": "keep", "m2": {"shape": [2, 2, 2, 2], "rank": 1}})
    b = make_summary(trial_id="b", plan_resolved={"m2": "keep", "m3": "keep"})
    table = plan_table([a, b])
    assert list(table.columns) == ["m1", "m2", "m3"]
    assert pd.isna(table.iloc[1, 0]) and table.iloc[0, 1] == "2x2⊗2x2 r1"


# --- atomic writes ------------------------------------------------------------------------------------------


def test_atomic_write_text_creates_and_replaces(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two ⊗")
    assert target.read_text(encoding="utf-8") == "two ⊗"
    assert [p.name for p in target.parent.iterdir()] == ["out.txt"]  # no temporary files left behind
    mode = stat.S_IMODE(target.stat().st_mode)
    assert mode & 0o044, "the final file is readable by others (not mkstemp's 0600)"


def test_atomic_path_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer crashed")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["out.txt"]


# --- dependency rule ----------------------------------------------------------------------------------------


def test_analysis_never_imports_ray_torch_or_transformers(tmp_path):
    """Import every analysis module and exercise each lazy import path; none may pull in Ray or torch."""
    script = textwrap.dedent(f"""
        import sys, traceback
        # Record who imports a heavy package first, so a failure names the culprit.
        class Spy:
            culprits = {{}}
            def find_spec(self, name, path=None, target=None):
                if name in ("ray", "torch", "transformers") and name not in self.culprits:
                    frames = [f for f in traceback.extract_stack() if {str(REPO)!r} in f.filename]
                    self.culprits[name] = [f"{{f.filename}}:{{f.lineno}}" for f in frames]
                return None
        spy = Spy()
        sys.meta_path.insert(0, spy)
        sys.path.insert(0, {str(REPO)!r})
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import analysis, analysis.pareto, analysis.results, analysis.plots
        from conftest import make_fake_results
        from analysis.results import load_results, load_history, mark_pareto, plan_table
        from analysis.plots import plot_pareto, plot_plan_heatmap
        from analysis.pareto import hypervolume
        dirs = make_fake_results({str(tmp_path)!r} + "/res")
        df = mark_pareto(load_results(list(dirs.values())))
        load_history(list(dirs.values()))
        hypervolume([[1, 2, 3]], ["min"] * 3, [4, 4, 4])
        plot_pareto(df, out_png={str(tmp_path)!r} + "/p.png", html_out={str(tmp_path)!r} + "/p.html")
        plot_plan_heatmap(plan_table(df[df.on_front]), {str(tmp_path)!r} + "/h.png")
        heavy = sorted(m for m in ("ray", "torch", "transformers") if m in sys.modules)
        print("HEAVY", heavy)
        for name in heavy:
            print(name, "imported via", " <- ".join(reversed(spy.culprits.get(name, ["?"]))))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "MPLBACKEND": "Agg"})
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout, result.stdout


def test_factorisation_cells_for_embeddings_and_lowrank():
    from analysis.results import compression_factor, format_factorisation

    assert format_factorisation({"embedding_factor": 2}) == "emb f2"
    assert compression_factor("emb f2") == 2.0
    assert format_factorisation({"lowrank_rank": 8, "blocks": 3}) == "lowrank r8 b3"
    assert math.isnan(compression_factor("lowrank r8 b3"))
    assert format_factorisation({"shape": [384, 768, 2, 1], "rank": 1, "blocks": 3}) == "384x768⊗2x1 r1 b3"
    assert compression_factor("384x768⊗2x1 r1 b3") == pytest.approx(384 * 768 * 2 / (384 * 768 + 2))
