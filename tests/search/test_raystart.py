"""How often Ray Tune saves a search's experiment state (search.raystart.set_checkpoint_period)."""
import pytest

from search.raystart import checkpoint_period_s, set_checkpoint_period


@pytest.mark.parametrize(("num_samples", "period"), [(1, 2.0), (8, 2.0), (100, 2.0), (200, 4.0), (1000, 20.0)])
def test_period_grows_with_the_search(num_samples, period):
    assert checkpoint_period_s(num_samples) == period


def test_the_users_period_wins(monkeypatch):
    monkeypatch.delenv("TUNE_GLOBAL_CHECKPOINT_S", raising=False)
    set_checkpoint_period(1000)
    import os

    assert os.environ["TUNE_GLOBAL_CHECKPOINT_S"] == "20"
    set_checkpoint_period(8)  # the next search in this process: its own period
    assert os.environ["TUNE_GLOBAL_CHECKPOINT_S"] == "2"
    monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "7")
    set_checkpoint_period(1000)
    assert os.environ["TUNE_GLOBAL_CHECKPOINT_S"] == "7"
