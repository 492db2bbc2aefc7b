"""One process per search folder (search.lock): a second run or resume of the same search exits 2 naming the
holder; a lock whose process is gone is taken over; another host's lock is never broken."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kron.errors import ConfigError
from search.lock import LOCK_NAME, search_lock

REPO = Path(__file__).resolve().parents[2]


def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
    with search_lock(tmp_path / "exp", "s") as path:
        held = json.loads(path.read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
        with pytest.raises(ConfigError, match=rf"search 's' is already running in .*exp: locked by process "
                                              rf"{os.getpid()} on {socket.gethostname()}"):
            with search_lock(tmp_path / "exp", "s"):
                pass
        assert path.is_file()  # the refused one did not remove the holder's lock
    assert not (tmp_path / "exp").exists()  # released; the folder it created for nothing removed


def test_a_stale_lock_is_taken_over_and_another_hosts_is_not(tmp_path, capsys):
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "keep.txt").write_text("x")
    dead = _dead_pid()
    (exp / LOCK_NAME).write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "started": "then"}))
    with search_lock(exp, "s"):
        assert json.loads((exp / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert f"taking over the lock of process {dead}" in capsys.readouterr().err
    assert not (exp / LOCK_NAME).exists() and (exp / "keep.txt").is_file()
    (exp / LOCK_NAME).write_text(json.dumps({"pid": dead, "host": "elsewhere.example", "started": "then"}))
    with pytest.raises(ConfigError, match="locked by process .* on elsewhere.example.*remove that file"):
        with search_lock(exp, "s"):
            pass
    (exp / LOCK_NAME).write_text("{not json")
    with pytest.raises(ConfigError, match="a process that left an unreadable lock"):
        with search_lock(exp, "s"):
            pass


def test_run_search_takes_the_lock_before_anything_else(tmp_path):
    """The lock comes first: a held one stops a run before its folder checks, the space or Ray."""
    from search.config import load_search_config
    from search.tuner import run_search

    raw = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    raw["search"]["storage"] = str(tmp_path / "runs")
    cfg = tmp_path / "q.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    exp = tmp_path / "runs" / raw["name"]
    with search_lock(exp, raw["name"]):
        with pytest.raises(ConfigError, match="is already running"):
            run_search(load_search_config(str(cfg)))
    assert not exp.exists()
