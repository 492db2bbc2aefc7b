"""`kronsearch search`: arguments, exit codes and messages (no Ray: dry runs and config errors only)."""
from __future__ import annotations

import pytest
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


def test_resume_of_nothing_and_a_taken_name_fail_before_the_space_is_built(tiny_search, tmp_path, capsys,
                                                                           monkeypatch):
    """Building the space can mean a sensitivity profile of the teacher (seed_plans: [auto], minutes on a large
    model): a --resume with nothing to resume, or a new search under a name already used, must say so first."""
    import search.space

    def never(*a, **k):
        raise AssertionError("the space was built before the storage checks")

    raw = tiny_search(seed_plans=["auto"])
    path = _write(tmp_path, raw)
    monkeypatch.setattr(search.space.SearchSpace, "from_config", classmethod(never))
    assert main(["search", path, "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--resume: nothing to resume" in err and len(err.splitlines()) == 1
    from kron.errors import ConfigError
    from search.config import load_search_config
    from search.tuner import run_search

    with pytest.raises(ConfigError, match="nothing to resume"):  # the API builds the space after the check too
        run_search(load_search_config(path), resume=True)
    folder = tmp_path / "runs" / "tiny"
    folder.mkdir(parents=True)
    (folder / "experiment_state-2026-01-01_00-00-00.json").write_text("{}")
    assert main(["search", path]) == 2
    err = capsys.readouterr().err.strip()
    assert "an experiment named 'tiny' already exists" in err and len(err.splitlines()) == 1
    assert main(["search", path, "--dry-run"]) == 1  # a dry run checks no storage: it reaches the space
    assert "the space was built before the storage checks" in capsys.readouterr().err
