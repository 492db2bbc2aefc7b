"""Signed search state (search.statesign): --resume hands Ray only state files this kronsearch signed."""
from __future__ import annotations

import json
import pickle

import pytest

from kron.errors import ConfigError
from search.statesign import SIGNATURES, StateSigner, check_state, sign_state


def _experiment(tmp_path):
    exp = tmp_path / "exp"
    (exp / "trial_1").mkdir(parents=True)
    (exp / "experiment_state-2026.json").write_text(json.dumps({"trial_data": ["..."]}))
    (exp / "searcher-state-2026.pkl").write_bytes(pickle.dumps({"ok": 1}))
    (exp / "tuner.pkl").write_bytes(pickle.dumps([1, 2]))
    (exp / "search_meta.json").write_text("{}")  # not Ray state: not signed, not checked
    return exp


def test_signed_state_passes_and_any_change_is_refused_naming_the_file(tmp_path):
    exp = _experiment(tmp_path)
    assert sign_state(exp) == 3
    check_state(exp)
    (exp / "search_meta.json").write_text('{"changed": 1}')
    check_state(exp)  # not a file Ray unpickles

    class Planted:  # what an attacker would drop: a pickle whose load runs a command
        def __reduce__(self):
            return (print, ("pwned",))

    (exp / "searcher-state-2026.pkl").write_bytes(pickle.dumps(Planted()))
    with pytest.raises(ConfigError, match=r"searcher-state-2026.pkl was altered since kronsearch signed it.*"
                                          r"--trust-state"):
        check_state(exp)
    sign_state(exp)
    (exp / "extra-state-1.pkl").write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"extra-state-1.pkl is not signed"):
        check_state(exp)
    (exp / "extra-state-1.pkl").unlink()
    check_state(exp)
    (exp / SIGNATURES).unlink()
    with pytest.raises(ConfigError, match="has no valid kronsearch state signatures"):
        check_state(exp)


def test_another_key_does_not_verify(tmp_path, monkeypatch):
    exp = _experiment(tmp_path)
    sign_state(exp)
    monkeypatch.setenv("KRONSEARCH_STATE_KEY", str(tmp_path / "other.key"))
    with pytest.raises(ConfigError, match="signed with another key"):
        check_state(exp)
    assert (tmp_path / "other.key").stat().st_mode & 0o777 == 0o600


def test_the_callback_resigns_after_each_change(tmp_path):
    exp = _experiment(tmp_path)
    signer = StateSigner(str(exp))
    signer.on_step_end(0, [])
    check_state(exp)
    (exp / "experiment_state-2026.json").write_text(json.dumps({"trial_data": ["more"]}))
    signer.on_step_end(1, [])
    check_state(exp)
