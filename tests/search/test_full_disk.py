"""A full disk stops a search at the first trial it fails (exit 2, one line), instead of failing every later trial
the same way and reporting them done with exit 0; after freeing space `--resume` finishes the search, keeping the
trials that had finished (the one that hit the full disk stays recorded as failed, saying so). The full disk is injected (KRONSEARCH_FAULT_INJECT=nospace:..., an ENOSPC OSError in the
trial); a real one (a 2 MB tmpfs as storage) was checked by hand: docs/security.md."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from kron.errors import DiskFullError
from search.config import load_search_config
from search.prepare import prepared_space
from search.tuner import run_search
from trials.faults import plan_digest

pytestmark = pytest.mark.ray


def _summaries(exp: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in exp.glob("trial_*/trial_summary.json")}


def test_a_full_disk_stops_the_search_and_resume_finishes_it(ray_session, tiny_search, monkeypatch, capsys):
    cfg = load_search_config(tiny_search(name="full", num_samples=3, max_concurrent=1, asha=None))
    space = prepared_space(cfg)
    first, second = space.sample(0), space.cheapest("params")
    assert first != second
    monkeypatch.setenv("KRONSEARCH_FAULT_INJECT", f"nospace:{plan_digest(space.to_plan_rules(second))}")
    with pytest.raises(DiskFullError) as info:
        run_search(cfg, space, initial_params=[first, second])
    msg = str(info.value)
    assert msg.startswith("the disk is full: ") and "No space left on device" in msg and "--resume" in msg, msg
    assert "\n" not in msg
    exp = Path(cfg.search.storage) / "full"
    done = {d: s for d, s in _summaries(exp).items() if s["status"] == "complete"}
    assert len(done) == 1  # the first trial; the search stopped at the second instead of running a third
    assert len(_summaries(exp)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Unhandled error" not in err, err[-3000:]

    monkeypatch.delenv("KRONSEARCH_FAULT_INJECT")  # space freed
    outcome = run_search(cfg, space, resume=True)
    after = _summaries(exp)
    assert sorted(s["status"] for s in after.values()) == ["complete", "complete", "error"], after
    (full,) = [s for s in after.values() if s["status"] == "error"]  # recorded as failed, saying why
    assert "No space left on device" in full["error"]
    for d, s in done.items():  # kept, not rerun
        assert after[d]["history"] == s["history"]
    assert not outcome.interrupted and len(outcome.trials) == 3
