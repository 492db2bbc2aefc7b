"""`kronsearch analyze | compare | export`: output, exit codes, one-line errors, and light imports."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from search.cli import main

REPO = Path(__file__).resolve().parents[2]


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, command, *fragments):
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"kronsearch {command}: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in err


def test_analyze(capsys, fake_results, tmp_path):
    out = tmp_path / "report"
    rc, stdout, err = run(capsys, "analyze", *fake_results.values(), "--out", out, "--title", "T")
    assert rc == 0, err
    # the 4 references (teacher, presets, low-rank) are listed as references, never counted as trials (#14)
    assert "30 trials: 26 complete, 1 pruned, 1 diverged, 2 error; references: kngpt2, uniform:2, lowrank r96, " \
           "teacher\n" in stdout
    assert "(* = knee point)" in stdout and "hypervolume reference point" in stdout
    assert "kron-gpt2-asha: 12/15 complete" in stdout and "knee" in stdout
    for name in ("results.csv", "pareto.csv", "pareto.png", "plans_heatmap.png", "report.md"):
        assert str(out / name) in stdout and (out / name).is_file()
    assert (out / "report.md").read_text().startswith("# T\n")


def test_analyze_on_macs(capsys, fake_results, tmp_path):
    rc, stdout, _ = run(capsys, "analyze", fake_results["kron-gpt2-tpe"], "--out", tmp_path, "--x", "macs_per_token")
    assert rc == 0 and "macs_per_token" in stdout


def test_compare(capsys, fake_results, tmp_path):
    rc, stdout, err = run(capsys, "compare", fake_results["kron-gpt2-asha"], fake_results["kron-gpt2-tpe"],
                          fake_results["references"], "--out", tmp_path, "--labels", "asha", "tpe", "refs")
    assert rc == 0, err
    assert "asha: 12/15 complete" in stdout and "tpe: 14/15 complete" in stdout
    assert "baseline kngpt2 [preset]" in stdout and "baseline teacher [teacher]" in stdout
    assert str(tmp_path / "compare.md") in stdout


def test_export(capsys, fake_results, tmp_path):
    rc, stdout, err = run(capsys, "export", fake_results["kron-gpt2-tpe"], "--select", "best-under-params:3M",
                          "--out", tmp_path)
    assert rc == 0, err
    record = json.loads((tmp_path / "selection.json").read_text())
    (entry,) = record["selected"]
    assert entry["params"] <= 3_000_000 and f"{entry['search']}/{entry['trial_id']}" in stdout
    assert entry["plan_path"] in stdout and str(tmp_path / "selection.json") in stdout


def test_export_build(capsys, tmp_path):
    """--build rebuilds a model from the teacher named in the summary; the printed count is the recorded one."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from kron.models import load_model
    from kron.surgery import compress

    teacher = tmp_path / "teacher"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=32, n_embd=16, n_layer=2, n_head=2)).save_pretrained(teacher)
    plan = {"version": 1, "default": "keep", "rules": [{"select": "mlp.c_fc", "shape": [8, 4, 8, 4]}]}
    report = compress(load_model(str(teacher), device="cpu"), plan)
    summary = {"schema": "kronsearch.trial/1", "trial_id": "t1", "method": "kronecker", "status": "complete",
               "quality_name": "val_ppl", "quality_mode": "min", "quality": 40.0, "params": report.params_after,
               "macs_per_token": report.macs_per_token_after, "plan": plan, "config": {"teacher": str(teacher)}}
    (tmp_path / "res" / "t1").mkdir(parents=True)
    (tmp_path / "res" / "t1" / "trial_summary.json").write_text(json.dumps(summary))
    rc, stdout, err = run(capsys, "export", tmp_path / "res", "--select", "knee", "--out", tmp_path / "out", "--build")
    assert rc == 0, err
    assert f"({report.params_after:,} params; rebuilt" in stdout
    assert (tmp_path / "out" / "t1" / "kronsearch.json").is_file()


@pytest.mark.parametrize("command", ["analyze", "compare", "export"])
def test_missing_path_is_one_line_exit_2(capsys, tmp_path, command):
    extra = ["--select", "knee"] if command == "export" else []
    rc, _, err = run(capsys, command, tmp_path / "nope", "--out", tmp_path / "out", *extra)
    assert_one_line_error(rc, err, command, "nope", "does not exist")


def test_no_results_is_one_line_exit_2(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    rc, _, err = run(capsys, "analyze", tmp_path / "empty", "--out", tmp_path / "out")
    assert_one_line_error(rc, err, "analyze", "no trial_summary.json")


def test_export_errors_are_one_line(capsys, fake_results, tmp_path):
    rc, _, err = run(capsys, "export", fake_results["kron-gpt2-tpe"], "--select", "best-under-params:1k",
                     "--out", tmp_path)
    assert_one_line_error(rc, err, "export", "params <= 1,000", "smallest available is")
    rc, _, err = run(capsys, "export", fake_results["kron-gpt2-tpe"], "--select", "cheapest", "--out", tmp_path)
    assert_one_line_error(rc, err, "export", "unknown selection 'cheapest'")
    rc, _, err = run(capsys, "export", fake_results["kron-gpt2-tpe"], "--select", "best-under-macs:lots",
                     "--out", tmp_path)
    assert_one_line_error(rc, err, "export", "'lots'", "2.5M")
    assert not (tmp_path / "selection.json").exists()


def test_compare_label_mismatch_and_out_file(capsys, fake_results, tmp_path):
    rc, _, err = run(capsys, "compare", fake_results["kron-gpt2-asha"], fake_results["kron-gpt2-tpe"],
                     "--out", tmp_path / "o", "--labels", "only-one")
    assert_one_line_error(rc, err, "compare", "1 label(s)", "2 source(s)")
    (tmp_path / "file").write_text("")
    rc, _, err = run(capsys, "analyze", fake_results["kron-gpt2-tpe"], "--out", tmp_path / "file")
    assert_one_line_error(rc, err, "analyze", "not a directory")


def test_bad_x_is_an_argparse_error(capsys, fake_results, tmp_path):
    with pytest.raises(SystemExit) as info:
        main(["analyze", str(fake_results["kron-gpt2-tpe"]), "--out", str(tmp_path), "--x", "wall_time_s"])
    assert info.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_cli_report_export_import_no_heavy_modules(tmp_path):
    """analysis.cli / report / export, and running analyze, compare and export (no --build), import no Ray, torch
    or transformers."""
    script = textwrap.dedent(f"""
        import argparse, sys
        sys.path.insert(0, {str(REPO)!r})
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import analysis.cli, analysis.report, analysis.export
        from conftest import make_fake_results
        dirs = make_fake_results({str(tmp_path)!r} + "/res")
        parser = argparse.ArgumentParser()
        analysis.cli.add_parsers(parser.add_subparsers())
        out = {str(tmp_path)!r}
        for argv in (["analyze", *map(str, dirs.values()), "--out", out + "/a"],
                     ["compare", *map(str, dirs.values()), "--out", out + "/c"],
                     ["export", str(dirs["kron-gpt2-tpe"]), "--select", "front", "--out", out + "/e"]):
            args = parser.parse_args(argv)
            assert args.func(args) == 0
        print("HEAVY", sorted(m for m in ("ray", "torch", "transformers") if m in sys.modules))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "MPLBACKEND": "Agg"})
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout, result.stdout
