"""Selecting trials (knee, front, best-under-N) and exporting their plans and compressed models."""
from __future__ import annotations

import json
import math
import os

import pandas as pd
import pytest
import yaml

from analysis.export import export, parse_amount, parse_how, plan_yaml, select
from analysis.results import load_results
from kron.errors import CheckpointError, DataError, UserError


def write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


# --- parse_amount / parse_how -------------------------------------------------------------------------------


@pytest.mark.parametrize("text, value", [
    ("2.5e6", 2_500_000), ("2500000", 2_500_000), ("2.5M", 2_500_000), ("2.5m", 2_500_000), ("800k", 800_000),
    ("800K", 800_000), ("2,500,000", 2_500_000), ("2_500_000", 2_500_000), (" 1.2B ", 1_200_000_000),
    ("3G", 3_000_000_000), (".5M", 500_000), ("1e3k", 1_000_000),
])
def test_parse_amount(text, value):
    assert parse_amount(text) == value


@pytest.mark.parametrize("text", ["", "abc", "-5", "0", "2.5X", "M", "1.2.3", "nan", "inf"])
def test_parse_amount_rejects(text):
    with pytest.raises(UserError, match="number|positive"):
        parse_amount(text)


def test_parse_how():
    assert parse_how("knee") == ("knee", None, None)
    assert parse_how("front") == ("front", None, None)
    assert parse_how("best-under-params:2.5M") == ("best-under", "params", 2_500_000)
    assert parse_how("best-under-macs:800k") == ("best-under", "macs_per_token", 800_000)
    with pytest.raises(UserError, match="needs a limit"):
        parse_how("best-under-params")
    with pytest.raises(UserError, match="unknown selection 'best'.*knee, front, best-under-params:N"):
        parse_how("best")


# --- select on hand-made tables -----------------------------------------------------------------------------


def table(rows, mode="min") -> pd.DataFrame:
    """A results-like table from (trial_id, params, quality[, macs[, status[, method[, search]]]]) tuples."""
    records = []
    for row in rows:
        trial_id, params, quality, macs, status, method, search = (*row, *[None] * (7 - len(row)))
        records.append({"search": search or "s", "trial_id": trial_id, "method": method or "kronecker",
                        "status": status or "complete", "quality_mode": mode, "quality": quality,
                        "params": params, "macs_per_token": macs if macs is not None else params // 2})
    df = pd.DataFrame(records)
    return df.astype({"params": "Int64", "macs_per_token": "Int64", "quality": "float64"})


def ids(df) -> list[str]:
    return list(df["trial_id"])


def test_best_under_params_picks_best_quality_within_the_limit():
    df = table([("a", 1_000, 50.0), ("b", 2_000, 30.0), ("c", 3_000, 10.0), ("d", 2_500, 20.0)])
    assert ids(select(df, "best-under-params:2.5k")) == ["d"]
    assert ids(select(df, "best-under-params:2499")) == ["b"]
    assert ids(select(df, "best-under-params:1e9")) == ["c"]


def test_best_under_ties_go_to_fewer_params_then_macs_then_id():
    df = table([("z", 2_000, 10.0, 900), ("y", 1_500, 10.0, 900), ("x", 1_500, 10.0, 800), ("w", 1_500, 10.0, 800)])
    assert ids(select(df, "best-under-params:5000")) == ["w"]  # same quality, params, macs: smaller id
    shuffled = df.sample(frac=1.0, random_state=3)
    assert ids(select(shuffled, "best-under-params:5000")) == ["w"]  # independent of row order


def test_best_under_for_a_maximised_metric():
    df = table([("a", 1_000, 0.80), ("b", 2_000, 0.91), ("c", 3_000, 0.95)], mode="max")
    assert ids(select(df, "best-under-params:2M")) == ["c"]
    assert ids(select(df, "best-under-params:2500")) == ["b"]


def test_best_under_macs():
    df = table([("a", 1_000, 50.0, 300), ("b", 2_000, 30.0, 700), ("c", 3_000, 10.0, 900)])
    assert ids(select(df, "best-under-macs:800")) == ["b"]
    with pytest.raises(UserError, match=r"macs_per_token <= 200 .*smallest available is 300 .*trial a"):
        select(df, "best-under-macs:200")


def test_only_complete_non_baseline_trials_are_candidates():
    df = table([
        ("good", 2_000, 30.0),
        ("pruned", 1_000, 5.0, None, "pruned"),
        ("error", 1_000, math.nan, None, "error"),
        ("teacher", 1_500, 1.0, None, "complete", "teacher"),
        ("preset", 1_500, 2.0, None, "complete", "preset"),
        ("nan", 1_000, math.nan),
    ])
    for how in ("knee", "front", "best-under-params:1M", "best-under-macs:1M"):
        assert ids(select(df, how)) == ["good"]


def test_no_match_names_the_constraint_and_the_smallest_value():
    df = table([("a", 3_000_000, 50.0), ("b", 2_600_000, 60.0, None, "complete", None, "other")])
    with pytest.raises(UserError) as info:
        select(df, "best-under-params:2.5M")
    message = str(info.value)
    assert "params <= 2,500,000" in message and "best-under-params:2.5M" in message
    assert "smallest available is 2,600,000" in message and "trial b of search other" in message


def test_no_complete_trial_at_all():
    df = table([("a", 1, 5.0, None, "error"), ("t", 2, 3.0, None, "complete", "teacher")])
    with pytest.raises(UserError, match=r"no complete trials to select from: 2 trials \(1 error, 1 complete\)"
                                        r"; 1 complete baseline\(s\) .* are not candidates"):
        select(df, "knee")


def test_knee_and_front():
    df = table([("a", 1, 100.0), ("b", 2, 20.0), ("c", 3, 15.0), ("d", 10, 10.0), ("e", 4, 50.0)])
    assert ids(select(df, "knee")) == ["b"]
    assert ids(select(df, "front")) == ["a", "b", "c", "d"]  # dominated "e" left out, smallest first


def test_knee_tie_between_duplicates_goes_to_the_smaller_id():
    df = table([("a", 1, 100.0), ("k2", 2, 20.0), ("k1", 2, 20.0), ("d", 10, 10.0)])
    assert ids(select(df, "knee")) == ["k1"]
    assert ids(select(df.iloc[::-1], "knee")) == ["k1"]
    assert ids(select(df, "front")) == ["a", "k1", "k2", "d"]  # duplicates are both on the front


def test_several_searches_form_one_pool():
    df = table([("a", 1, 100.0, None, None, None, "s1"), ("b", 2, 20.0, None, None, None, "s2"),
                ("c", 3, 90.0, None, None, None, "s1")])
    assert ids(select(df, "front")) == ["a", "b"]


def test_mixed_quality_modes_are_refused():
    df = pd.concat([table([("a", 1, 1.0)], mode="min"), table([("b", 2, 2.0)], mode="max")])
    with pytest.raises(DataError, match="mix quality modes"):
        select(df, "knee")


# --- export without --build (fake result folders) -----------------------------------------------------------


def test_export_knee_writes_plan_and_selection(fake_results, tmp_path):
    out = tmp_path / "export"
    record = export(fake_results["kron-gpt2-tpe"], "knee", out)
    df = load_results(fake_results["kron-gpt2-tpe"])
    knee = select(df, "knee").iloc[0]
    assert [e["trial_id"] for e in record["selected"]] == [knee["trial_id"]]
    entry = record["selected"][0]
    assert entry["params"] == int(knee["params"]) and entry["quality"] == pytest.approx(knee["quality"])
    assert entry["search"] == "kron-gpt2-tpe" and entry["macs_per_token"] == int(knee["macs_per_token"])
    plan_file = out / f"{knee['trial_id']}.plan.yaml"
    assert entry["plan_path"] == str(plan_file.resolve())
    summary = json.loads(open(knee["summary_path"]).read())
    assert yaml.safe_load(plan_file.read_text()) == summary["plan"]
    assert entry["checkpoint_path"].endswith("checkpoint") and "model_dir" not in entry
    on_disk = json.loads((out / "selection.json").read_text())
    assert on_disk["how"] == "knee" and on_disk["selected"] == record["selected"]
    assert sorted(os.listdir(out)) == sorted([plan_file.name, "selection.json"])  # no temporary files


def test_export_front_writes_one_plan_per_front_trial(fake_results, tmp_path):
    sources = [fake_results["kron-gpt2-asha"], fake_results["kron-gpt2-tpe"], fake_results["references"]]
    record = export(sources, "front", tmp_path / "out")
    expected = select(load_results(sources), "front")
    assert [e["trial_id"] for e in record["selected"]] == list(expected["trial_id"])
    assert [e["params"] for e in record["selected"]] == sorted(e["params"] for e in record["selected"])
    assert len(list((tmp_path / "out").glob("*.plan.yaml"))) == len(expected)


def test_duplicate_trial_ids_get_the_search_as_prefix(tmp_path, make_summary):
    for search, quality in (("s/1", 10.0), ("s2", 10.0)):
        write_json(tmp_path / "res" / search.replace("/", "_") / "trial_summary.json",
                   make_summary(trial_id="same id", search=search, quality=quality))
    record = export(tmp_path / "res", "front", tmp_path / "out")
    names = sorted(os.path.basename(e["plan_path"]) for e in record["selected"])
    assert names == ["s2__same_id.plan.yaml", "s_1__same_id.plan.yaml"]


def test_trial_without_plan_is_refused(tmp_path, make_summary):
    write_json(tmp_path / "res" / "t" / "trial_summary.json", make_summary(plan=None))
    with pytest.raises(CheckpointError, match="records no plan"):
        export(tmp_path / "res", "knee", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_errors(fake_results, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        export(tmp_path / "missing", "knee", tmp_path / "out")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        export(fake_results["kron-gpt2-tpe"], "knee", tmp_path / "file")
    with pytest.raises(UserError, match="best-under-params:10: no complete trial has params <= 10"):
        export(fake_results["kron-gpt2-tpe"], "best-under-params:10", tmp_path / "out")


def test_plan_yaml_matches_compression_plan_layout():
    from kron.plan import CompressionPlan

    plan = CompressionPlan.from_dict({"rules": [{"select": "mlp.c_fc", "shape": [8, 4, 8, 4], "rank": 2},
                                                {"select": ["a", "b"], "layers": [0, "2-3"], "factor": 4}]})
    assert plan_yaml(plan.to_dict()) == plan.to_yaml()


# --- export --build with a tiny real GPT-2 ------------------------------------------------------------------

PLAN = {"version": 1, "default": "keep", "rules": [
    {"select": "mlp.c_fc", "shape": [8, 4, 8, 4]},
    {"select": "mlp.c_proj", "shape": [4, 8, 4, 8]},
    {"select": "attn.c_attn", "shape": [4, 4, 4, 4], "blocks": 3},
]}


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """A tiny GPT-2 (2 layers, d=16, vocab 96) saved with save_pretrained."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("tiny-teacher")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=96, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(str(path))
    return path


def compressed_student(teacher):
    from kron.models import load_model
    from kron.plan import CompressionPlan
    from kron.surgery import compress

    model = load_model(str(teacher), device="cpu")
    plan = CompressionPlan.from_dict(PLAN)
    report = compress(model, plan, init="svd")
    return model, plan, report


@pytest.fixture
def write_trial(make_summary):
    return lambda *args, **kwargs: _write_trial(make_summary, *args, **kwargs)


def _write_trial(make_summary, root, teacher, *, trial_id="kt1", checkpoint=False, params_offset=0, config=None):
    """A fake complete trial of the tiny teacher; params as the trial would record them (count after compress)."""
    from kron.io import save_compressed

    model, plan, report = compressed_student(teacher)
    folder = root / trial_id
    if checkpoint:
        import torch

        with torch.no_grad():  # "training" moved the weights: an export must copy these, not rebuild
            next(p for n, p in model.named_parameters() if "c_fc" in n).add_(1.0)
        save_compressed(model, plan, folder / "checkpoint", report=report)
    data = make_summary(
        trial_id=trial_id, params=report.params_after + params_offset, quality=50.0,
        params_excl_output_embedding=report.params_after_excluding_output_embedding,
        macs_per_token=report.macs_per_token_after, plan=plan.to_dict(), plan_resolved={},
        config=config if config is not None else {"teacher": str(teacher), "dtype": "float32"},
        checkpoint="checkpoint" if checkpoint else None,
    )
    write_json(folder / "trial_summary.json", data)
    return data, model


def _params(model_dir):
    from kron.io import load_compressed
    from kron.surgery import count_params

    return count_params(load_compressed(model_dir, device="cpu"))


def test_build_rebuilds_from_the_teacher(tmp_path, tiny_teacher, write_trial):
    from kron.models import load_model
    from kron.plan import CompressionPlan
    from kron.surgery import compress, count_params

    data, _ = write_trial(tmp_path / "res", tiny_teacher)
    out = tmp_path / "out"
    record = export(tmp_path / "res", "knee", out, build=True)
    entry = record["selected"][0]
    assert entry["model_dir"] == str((out / "kt1").resolve()) and entry["model_params"] == data["params"]
    assert entry["model_source"].startswith("rebuilt")
    assert _params(out / "kt1") == data["params"]
    # the exported plan file alone rebuilds a model of the recorded size
    plan = CompressionPlan.load(out / "kt1.plan.yaml")
    assert plan == CompressionPlan.from_dict(PLAN)
    model = load_model(str(tiny_teacher), device="cpu")
    compress(model, plan, init="svd")
    assert count_params(model) == data["params"]
    assert sorted(os.listdir(out)) == ["kt1", "kt1.plan.yaml", "selection.json"]


def test_build_copies_the_trial_checkpoint(tmp_path, tiny_teacher, write_trial):
    import torch

    from kron.io import load_compressed

    data, trained = write_trial(tmp_path / "res", tiny_teacher, checkpoint=True)
    record = export(tmp_path / "res", "front", tmp_path / "out", build=True)
    entry = record["selected"][0]
    assert entry["model_source"] == "checkpoint" and entry["model_params"] == data["params"]
    exported = load_compressed(tmp_path / "out" / "kt1", device="cpu")
    for (name, a), (_, b) in zip(trained.state_dict().items(), exported.state_dict().items()):
        assert torch.equal(a, b), name  # the trained weights, not a fresh SVD initialisation
    assert entry["checkpoint_path"] == str((tmp_path / "res" / "kt1" / "checkpoint").resolve())


@pytest.mark.parametrize("checkpoint", [False, True])
def test_build_refuses_a_parameter_mismatch_and_leaves_nothing(tmp_path, tiny_teacher, write_trial, checkpoint):
    write_trial(tmp_path / "res", tiny_teacher, checkpoint=checkpoint, params_offset=1)
    with pytest.raises(CheckpointError, match="parameters but its summary records"):
        export(tmp_path / "res", "knee", tmp_path / "out", build=True)
    assert not (tmp_path / "out" / "kt1").exists()
    assert not [p for p in os.listdir(tmp_path / "out") if p.startswith(".")]  # no temporary directories
    assert not (tmp_path / "out" / "selection.json").exists()


def test_build_replaces_an_earlier_export_but_not_foreign_folders(tmp_path, tiny_teacher, write_trial):
    write_trial(tmp_path / "res", tiny_teacher)
    out = tmp_path / "out"
    export(tmp_path / "res", "knee", out, build=True)
    export(tmp_path / "res", "knee", out, build=True)  # again: replaces its own model directory
    assert sorted(os.listdir(out)) == ["kt1", "kt1.plan.yaml", "selection.json"]
    foreign = tmp_path / "out2" / "kt1"
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not a kronsearch model directory"):
        export(tmp_path / "res", "knee", tmp_path / "out2", build=True)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_build_resolves_the_demo_teacher(tmp_path, tiny_teacher, write_trial, monkeypatch):
    import kron.models

    seen = []
    monkeypatch.setattr(kron.models, "resolve_source",
                        lambda src: seen.append(src) or str(tiny_teacher))
    data, _ = write_trial(tmp_path / "res", tiny_teacher, config={"teacher": "demo"})
    record = export(tmp_path / "res", "knee", tmp_path / "out", build=True)
    assert "demo" in seen and record["selected"][0]["model_params"] == data["params"]


def test_build_without_checkpoint_or_teacher_is_refused(tmp_path, tiny_teacher, write_trial):
    write_trial(tmp_path / "res", tiny_teacher, config={})
    with pytest.raises(CheckpointError, match="names no teacher"):
        export(tmp_path / "res", "knee", tmp_path / "out", build=True)


def test_build_with_a_recorded_but_missing_checkpoint_rebuilds_and_says_so(tmp_path, tiny_teacher, write_trial):
    data, _ = write_trial(tmp_path / "res", tiny_teacher)
    summary_path = tmp_path / "res" / "kt1" / "trial_summary.json"
    summary = json.loads(summary_path.read_text())
    summary["checkpoint"] = "checkpoint"  # recorded, but the folder was deleted
    summary_path.write_text(json.dumps(summary))
    entry = export(tmp_path / "res", "knee", tmp_path / "out", build=True)["selected"][0]
    assert entry["model_source"].startswith("rebuilt") and "is missing" in entry["model_source"]
    assert entry["model_params"] == data["params"]


def test_built_folders_carry_a_model_card(tmp_path, tiny_teacher, write_trial):
    """README.md with Hugging Face front matter (library_name, tags, metrics), the teacher, the plan per matrix,
    sizes, quality and its data, the training budget and how to load the folder."""
    import yaml

    config = {"teacher": str(tiny_teacher), "dtype": "float32", "data": {"source": "wikitext-2"},
              "stage1": {"lr": 3e-4, "batch_size": 8, "max_steps": 150}}
    data, _ = write_trial(tmp_path / "res", tiny_teacher, checkpoint=True, config=config)
    export(tmp_path / "res", "knee", tmp_path / "out", build=True)
    card = (tmp_path / "out" / "kt1" / "README.md").read_text()
    head, _, body = card.removeprefix("---\n").partition("\n---\n")
    front = yaml.safe_load(head)
    assert front["library_name"] == "kronsearch" and "kronecker" in front["tags"]
    assert "base_model" not in front  # a local teacher path is not a hub id; the body names it
    metric = front["model-index"][0]["results"][0]["metrics"][0]
    assert metric["value"] == data["quality"] and metric["type"] == data["quality_name"]
    assert str(tiny_teacher) in body and "wikitext-2" in body
    assert f"| parameters | {data['params']:,} |" in body
    assert f"| weight bytes (float32) | {4 * data['params']:,} |" in body
    assert "`transformer.h.0.mlp.c_fc`" in body and "A " in body and "⊗ B" in body  # the plan per matrix
    assert "max_steps: 150" in body and "from kron import load_compressed" in body and "kronsearch merge" in body
    from kron.io import load_compressed

    load_compressed(tmp_path / "out" / "kt1", device="cpu")  # the card does not disturb loading


def test_best_under_bytes_reads_byte_sizes():
    from analysis.export import parse_bytes

    assert parse_how("best-under-bytes:4MB") == ("best-under", "bytes", 4_000_000)
    assert [parse_bytes(t) for t in ("4MiB", "500kB", "1.5G", "4e6", "12")] == [4 * 2**20, 500_000, 1_500_000_000,
                                                                                 4_000_000, 12]
    with pytest.raises(UserError, match="size in bytes"):
        parse_bytes("4 megs")
    df = table([("a", 1_000, 50.0), ("b", 2_000, 30.0), ("c", 3_000, 10.0)])
    df["bytes"] = pd.array([1_100, 3_000_000, 5_000_000], dtype="Int64")  # b: int8, c: float32
    assert ids(select(df, "best-under-bytes:4MB")) == ["b"]
    assert ids(select(df, "best-under-bytes:4.9MiB")) == ["c"]
