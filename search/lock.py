"""One process per search folder: a run or a resume holds `<experiment>/.kronsearch.lock` from before its folder
checks until it ends, so two searches of the same name and storage cannot mix their trials, journals and
experiment states (they did: both reported 4 of 4 trials for num_samples 2, and one's journal repair moved the
other's journal aside).

The lock is a file created exclusively (`O_CREAT | O_EXCL`, atomic on local filesystems and NFSv3+) holding the
owner's host, pid, start time and command. A second process gets a `ConfigError` naming the holder (exit 2). A lock
whose owner is gone — same host, no such process — is stale: it is taken over, with a line saying so. A lock of
another host cannot be checked from here and is never broken: the message says how to remove it by hand. With
remote storage (s3://...) the lock guards the driver's local mirror only: two drivers on different machines
writing one bucket are not detected.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from kron.errors import ConfigError
from kron.fsutil import pid_alive

__all__ = ["LOCK_NAME", "search_lock"]

LOCK_NAME = ".kronsearch.lock"


def _host() -> str:
    return socket.gethostname() or "localhost"


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # being written, or damaged: treated as held by an unknown owner


def _try_create(path: Path, owner: dict) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(owner, fh)
        fh.flush()
        os.fsync(fh.fileno())
    return True


@contextlib.contextmanager
def search_lock(folder: str | os.PathLike, name: str, stream=None) -> Iterator[Path]:
    """Hold the lock of search `name` in its local experiment `folder` (created if missing) for the block."""
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    me = {"host": _host(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
          "command": " ".join(sys.argv)[:500]}
    for _ in range(3):  # a stale lock removed by two processes at once: only one of them creates the next
        if _try_create(path, me):
            break
        held = _read(path)
        pid, host = held.get("pid"), held.get("host")
        if host == me["host"] and isinstance(pid, int) and not pid_alive(pid):
            print(f"search {name}: taking over the lock of process {pid} (started {held.get('started', '?')}), "
                  "which is gone", file=stream or sys.stderr, flush=True)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        who = (f"process {pid} on {host}, started {held.get('started', '?')}" if pid is not None else
               "a process that left an unreadable lock")
        raise ConfigError(f"search {name!r} is already running in {folder}: locked by {who} ({path}); wait for it "
                          "to end, or remove that file if no such process runs")
    else:
        raise ConfigError(f"search {name!r}: could not take the lock {path}; another process keeps taking it")
    try:
        yield path
    finally:
        held = _read(path)
        if held.get("pid") == me["pid"] and held.get("host") == me["host"]:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        if created:  # a search that failed its checks leaves no empty folder behind
            with contextlib.suppress(OSError):
                folder.rmdir()
