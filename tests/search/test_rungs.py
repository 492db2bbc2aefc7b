"""An explicit rung schedule (`search.asha.rungs`, `promote`): the trials are judged at exactly those steps, the
best share going on; bad schedules are config errors naming the key before Ray starts; a resumed search must keep
its schedule."""
from __future__ import annotations

import json

import pytest

from kron.errors import ConfigError
from search.config import config_fingerprint, load_search_config


def _cfg(tiny_search, **asha):
    data = tiny_search()
    data["search"]["asha"] = {"size_buckets": 2, **asha}
    data["trial"]["stage1"]["max_steps"] = 60
    return load_search_config(data)


def test_explicit_rungs_are_the_schedulers_milestones(tiny_search):
    from search.scheduler import make_scheduler, milestones
    from search.space import SearchSpace

    cfg = _cfg(tiny_search, rungs=[6, 20, 60], promote=0.25)
    assert cfg.search.asha.grace_period == 6 and cfg.asha_max_t == 60 and cfg.search.asha.reduction_factor == 4
    sched = make_scheduler(cfg, SearchSpace.from_config(cfg))
    got = milestones(sched)
    assert got and all(m == [6, 20, 60] for m in got)
    plain = _cfg(tiny_search, grace_period=5, reduction_factor=2, max_t=40)
    assert all(m == [5, 10, 20, 40] for m in milestones(make_scheduler(plain, SearchSpace.from_config(plain))))


@pytest.mark.parametrize("asha, word", [
    ({"rungs": [20, 6, 60]}, "increasing"),
    ({"rungs": [6, 6, 60]}, "increasing"),
    ({"rungs": [0, 60]}, "positive"),
    ({"rungs": [60]}, "rungs"),
    ({"rungs": [6, 20, 600]}, "top rung 600 is beyond the final stage's max_steps 60"),
    ({"rungs": [6, 60], "max_t": 40}, "max_t 40 contradicts rungs"),
    ({"rungs": [6, 60], "grace_period": 2}, "grace_period 2 contradicts rungs"),
    ({"promote": 1.5}, "promote"),
    ({"promote": 0}, "promote"),
    ({"promote": 0.5, "reduction_factor": 3}, "promote 0.5 contradicts reduction_factor 3"),
])
def test_bad_schedules_name_the_key(tiny_search, asha, word):
    with pytest.raises(ConfigError, match=word):
        _cfg(tiny_search, **asha)


def test_a_changed_schedule_is_refused_on_resume(tiny_search):
    from search.resume import _check_fingerprint

    old = _cfg(tiny_search, rungs=[6, 20, 60])
    meta = json.dumps({"fingerprint": config_fingerprint(old)}).encode()
    _check_fingerprint(old, lambda: meta, "meta")
    with pytest.raises(ConfigError, match="search.asha.rungs"):
        _check_fingerprint(_cfg(tiny_search, rungs=[6, 30, 60]), lambda: meta, "meta")
    plain = _cfg(tiny_search)
    assert "asha_rungs" not in config_fingerprint(plain)  # searches without rungs keep their fingerprint
