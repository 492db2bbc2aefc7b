"""A damaged saved state makes `--resume` refuse (exit 2, naming the file), never restart silently: Ray Tune logs
a failed restore and starts the experiment again (an extra trial beyond num_samples, a new one-trial experiment
state that later resumes take as current) unless kronsearch stops it."""
from __future__ import annotations

from pathlib import Path

import pytest

from kron.errors import CheckpointError
from search.config import load_search_config
from search.prepare import prepared_space
from search.statesign import sign_state
from search.tuner import run_search


def _states(exp: Path) -> list[Path]:
    return sorted(exp.glob("experiment_state-*.json"))


@pytest.mark.parametrize("damaged", ["searcher-state", "experiment_state"])
def test_a_damaged_state_is_refused_naming_the_file(ray_session, tiny_search, damaged):
    cfg = load_search_config(tiny_search(name=f"dmg-{damaged}", num_samples=2, max_concurrent=1, asha=None))
    space = prepared_space(cfg)
    outcome = run_search(cfg, space)
    exp = outcome.local_dir
    assert len(outcome.trials) == 2
    before = {p.name: p.read_bytes() for p in exp.iterdir() if p.is_file()}
    target = sorted(exp.glob(f"{damaged}-*"))[-1]
    target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 2])  # cut short, as a full disk leaves it
    sign_state(exp)  # damaged but signed (or --trust-state): the signature check cannot catch it

    with pytest.raises(CheckpointError) as err:
        run_search(cfg, space, resume=True)
    msg = str(err.value)
    assert target.name in msg and "--resume" in msg and "\n" not in msg, msg
    # nothing was started again: the same state files, no new trial, no new experiment state
    assert [p.name for p in _states(exp)] == [p for p in sorted(before) if p.startswith("experiment_state-")]
    assert len([d for d in exp.iterdir() if d.is_dir() and d.name.startswith("trial_")]) == 2
