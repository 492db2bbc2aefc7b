"""Every example config passes `--dry-run`.

Examples whose teacher is not available offline are dry-run with an offline stand-in of the same architecture
(`config:gpt2` for the hub's GPT-2, the shared MiniLM for the fine-tuned BERT classifier, the tiny test GPT-2 while
the bundled demo teacher is not built yet); their configs are always validated as written.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from search.commands import dry_run
from search.config import load_search_config
from search.prepare import prepared_space

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
SHARED = REPO.parent / "shared"
MINILM = SHARED / "models" / "all-MiniLM-L6-v2"


def _demo_ready() -> bool:
    from kron.errors import UserError
    from trials.teacher import demo_teacher_dir

    try:
        demo_teacher_dir()
    except UserError:
        return False
    return True


def _needs_shared(name: str) -> bool:
    return name in ("wikitext2.yaml", "bert-glue.yaml")


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)  # the examples' relative paths (../shared/..., runs) are relative to the repo root


def test_every_search_example_is_tested():
    import yaml

    searches = sorted(p.name for p in EXAMPLES.glob("*.yaml")
                      if {"space", "search"} & set(yaml.safe_load(p.read_text()) or {}))
    assert searches == ["bert-glue.yaml", "gpt2-kngpt2.yaml", "quickstart.yaml", "wikitext2.yaml"]


@pytest.mark.parametrize("name", ["quickstart.yaml", "wikitext2.yaml", "gpt2-kngpt2.yaml", "bert-glue.yaml"])
def test_example_config_is_valid(name):
    if _needs_shared(name) and not SHARED.is_dir():
        pytest.skip("needs ../shared data")
    cfg = load_search_config(EXAMPLES / name)
    assert cfg.name and cfg.search.num_samples >= 1
    assert "quality" in cfg.search.objectives
    if name == "quickstart.yaml":  # small enough for a laptop: a few trials of a few dozen steps
        assert cfg.search.num_samples <= 8 and cfg.final_stage_steps <= 50 and cfg.search.resources.cpu == 1


def _stand_in(name: str, tiny_teacher: Path) -> str | None:
    if name in ("quickstart.yaml", "wikitext2.yaml"):
        return None if _demo_ready() else str(tiny_teacher)
    if name == "gpt2-kngpt2.yaml":
        return "config:gpt2"  # GPT-2 small's architecture, known offline
    if name == "bert-glue.yaml":
        teacher = REPO / "runs" / "teachers" / "minilm-sst2"
        return None if teacher.is_dir() else str(MINILM)
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["quickstart.yaml", "wikitext2.yaml", "gpt2-kngpt2.yaml", "bert-glue.yaml"])
def test_example_dry_run(name, tiny_teacher, capsys):
    if _needs_shared(name) and not SHARED.is_dir():
        pytest.skip("needs ../shared data")
    teacher = _stand_in(name, tiny_teacher)
    if name == "bert-glue.yaml" and teacher == str(MINILM) and not MINILM.is_dir():
        pytest.skip("needs ../shared/models/all-MiniLM-L6-v2")
    overrides = {"trial.teacher": teacher} if teacher else None
    cfg = load_search_config(EXAMPLES / name, overrides=overrides)
    space = prepared_space(cfg)
    samples = dry_run(cfg, space, show=3)
    out = capsys.readouterr().out
    assert f"search {cfg.name}:" in out and "distinct plans" in out and "dry run: nothing was started" in out
    assert len(samples) == 3 and all(space.within_budget(p) and not space.is_empty(p) for p in samples)
    assert space.size() > 1
    if name == "gpt2-kngpt2.yaml":
        # GPT-2 small: 124,439,808 parameters; every sampled plan fits KnGPT2's size
        assert space.info.params == 124_439_808
        assert all(space.plan_costs(p)["params_excl_output_embedding"] <= 86_000_000 for p in samples)


def test_quickstart_dry_run_through_the_cli(tiny_teacher, tmp_path, capsys):
    """`kronsearch search examples/quickstart.yaml --dry-run` (with the tiny stand-in teacher until the demo teacher
    is built), through the console entry point."""
    from search.cli import main

    path = EXAMPLES / "quickstart.yaml"
    if not _demo_ready():
        text = path.read_text().replace("teacher: demo", f"teacher: {tiny_teacher}")
        path = tmp_path / "quickstart.yaml"
        path.write_text(text)
    assert main(["search", str(path), "--dry-run", "--show", "2"]) == 0
    out = capsys.readouterr().out
    assert "search quickstart:" in out and "2 sampled plans" in out and not os.path.exists(tmp_path / "runs")
