"""`kronsearch search`: arguments, exit codes and messages (no Ray: dry runs and config errors only)."""
from __future__ import annotations

import yaml

from search.cli import main


def _write(tmp_path, raw) -> str:
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_help_lists_the_flags(capsys):
    try:
        main(["search", "--help"])
    except SystemExit as exc:
        assert exc.code == 0
    out = capsys.readouterr().out
    for flag in ("--dry-run", "--resume", "--address", "--storage", "--name", "--num-samples", "--max-concurrent",
                 "--smoke"):
        assert flag in out


def test_dry_run_with_overrides_and_smoke(tiny_search, tmp_path, capsys):
    path = _write(tmp_path, tiny_search())
    assert main(["search", path, "--dry-run", "--name", "renamed", "--num-samples", "7", "--max-concurrent", "1",
                 "--show", "2"]) == 0
    out = capsys.readouterr().out
    assert "search renamed: tpe, 7 trials, 1 at a time" in out
    assert main(["search", path, "--dry-run", "--smoke", "--show", "1"]) == 0
    out = capsys.readouterr().out
    assert "search tiny-smoke: tpe, 2 trials" in out and "max_t 4" in out
    assert not (tmp_path / "runs").exists()  # a dry run creates nothing


def test_config_errors_exit_2_with_one_line(tiny_search, tmp_path, capsys):
    raw = tiny_search()
    raw["space"]["budget"] = {"max_params": 10}
    path = _write(tmp_path, raw)
    assert main(["search", path, "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kronsearch search: error: space.budget.max_params: 10 cannot be met")
    assert len(err.splitlines()) == 1
    raw = tiny_search()
    raw["search"]["sampler"] = "tpe"
    assert main(["search", _write(tmp_path, raw), "--dry-run"]) == 2
    assert "search.sampler: unknown key; valid keys: algorithm" in capsys.readouterr().err
    assert main(["search", str(tmp_path / "nope.yaml")]) == 2
    assert "not found" in capsys.readouterr().err
