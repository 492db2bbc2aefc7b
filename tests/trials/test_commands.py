"""`kronsearch trial` and `kronsearch eval` through the console entry point."""
import json

import pytest
import yaml

from search.cli import main


def test_trial_then_eval_the_checkpoint(tiny_lm_teacher, text_corpus, tmp_path, capsys):
    cfg = {
        "teacher": str(tiny_lm_teacher),
        "plan": {"preset": "uniform:2"},
        "data": {"source": str(text_corpus), "seq_len": 32, "val_blocks": 6},
        "stage1": {"lr": 3e-3, "batch_size": 4, "max_steps": 100, "eval_every": 3},
    }
    path = tmp_path / "trial.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    rc = main(["trial", str(path), "--out", str(out), "--set", "stage1.max_steps=3", "--no-progress"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and summary["status"] == "complete" and summary["steps"] == 3
    assert (out / "trial_summary.json").is_file()

    rc = main(["eval", "--model", str(out / "checkpoint"), "--tokenizer", str(tiny_lm_teacher),
               "--data", str(text_corpus), "--seq-len", "32", "--max-blocks", "6", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert result["perplexity"] == pytest.approx(summary["quality"], rel=1e-4)
    assert result["params"] == summary["params"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["trial", "missing.yaml"], "trial config file not found: missing.yaml"),
        (["eval", "--model", "x"], "give exactly one of --data"),
        (["trial", "{cfg}", "--set", "nonsense"], "--set expects KEY=VALUE"),
        (["trial", "{cfg}", "--set", "stage1.bogus=1"], "stage1.bogus: unknown key"),
    ],
)
def test_user_errors_exit_2_with_one_line(argv, message, tmp_path, capsys):
    cfg = tmp_path / "t.yaml"
    cfg.write_text("teacher: demo\nplan: {preset: kngpt2}\n")
    rc = main([a.replace("{cfg}", str(cfg)) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and len(err.strip().splitlines()) == 1
