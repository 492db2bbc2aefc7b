"""Atomic file and directory writes, stdlib only (importable without torch, e.g. by `analysis`).

A reader never sees a half-written results file, plan or checkpoint: either the old content or the new. A folder
replaced by `atomic_dir` is replaced only when everything in it is what the writer owns (`owned`): a user's own
files in an output folder are never deleted. The temporary folders carry the writer's host and pid, so a run killed
with SIGKILL leaves one that the next write into the same parent removes.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

from .errors import CheckpointError

__all__ = ["atomic_dir", "atomic_path", "atomic_write_bytes", "atomic_write_json", "atomic_write_text",
           "clean_stale_temporaries", "foreign_entries", "pid_alive", "replace_dir"]

# an earlier release's temporary folders had no owner in their name: removed once this old (no writer is that slow)
_UNOWNED_STALE_S = 6 * 3600


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path` atomically.

    On an exception the temporary file is removed and `path` is left as it was. For writers that want a
    filename (`savefig`, `write_html`, `save_file`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the final file ordinary permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically (temporary file in the same folder, fsync, os.replace)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike, obj, *, indent: int | None = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, default=_jsonable) + "\n")


def foreign_entries(dest: str | os.PathLike, owned: Callable[[str], bool]) -> list[str]:
    """The names in folder `dest` that `owned` does not claim (sorted; [] for a missing or empty folder)."""
    dest = Path(dest)
    if not dest.is_dir():
        return []
    return sorted(e.name for e in dest.iterdir() if not owned(e.name))


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def pid_alive(pid: int) -> bool:
    """Whether a process of this id exists on this host (someone else's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's live process
    return True


def clean_stale_temporaries(dest: str | os.PathLike) -> list[Path]:
    """Remove the temporary siblings of `dest` that a killed writer left: `.NAME.tmp-HOST-PID-XXXXXXXX` of this host
    whose process is gone, and an earlier release's unowned `.NAME.tmp-XXXXXXXX` older than 6 hours. Such a
    `.NAME.old-...` is put back as `dest` instead when `dest` is gone (the swap was cut short). Returns what it
    removed; a live writer's folder, or another host's, is left."""
    dest = Path(dest)
    if not dest.parent.is_dir():
        return []
    mine = re.compile(rf"\.{re.escape(dest.name)}\.(tmp|old)-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{{8}}")
    unowned = re.compile(rf"\.{re.escape(dest.name)}\.(tmp|old)-[0-9a-f]{{8}}")
    host, now, removed = _host(), time.time(), []
    for entry in sorted(dest.parent.iterdir()):  # ".old-" before ".tmp-": a swap cut short is restored first
        if (m := mine.fullmatch(entry.name)) is not None:
            stale = m["host"] == host and not pid_alive(int(m["pid"]))
        elif (m := unowned.fullmatch(entry.name)) is not None:
            try:
                stale = now - entry.stat().st_mtime > _UNOWNED_STALE_S
            except OSError:
                stale = False
        else:
            continue
        if not stale:
            continue
        if m[1] == "old" and not dest.exists():
            os.rename(entry, dest)  # killed between moving the old folder aside and the new one in: restore it
            continue
        shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _sibling(dest: Path, kind: str) -> Path:
    return dest.parent / f".{dest.name}.{kind}-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def replace_dir(tmp: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Move a fully written directory `tmp` to `dest`, replacing an earlier one (moved aside, then deleted).

    `tmp` must be on the same filesystem as `dest` (make it with tempfile.mkdtemp(dir=dest.parent)).
    """
    tmp, dest = Path(tmp), Path(dest)
    old = None
    if dest.exists():
        old = _sibling(dest, "old")
        os.rename(dest, old)
    os.rename(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dest


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike, *, create: bool = True,
               owned: Callable[[str], bool] | None = None) -> Iterator[Path]:
    """Yield a temporary sibling folder of `dest` to fill; on success it replaces `dest` (see `replace_dir`),
    on an exception it is removed and `dest` is left as it was.

    create=False leaves the folder to the writer (for `shutil.copytree` or `save_pretrained`). `owned`: which
    names of an existing `dest` the writer may replace; any other entry (a user's notes, another tool's files) makes
    it refuse before anything is written, naming them — checked again just before the swap. Leftovers of killed
    writers into the same `dest` are removed first (`clean_stale_temporaries`).
    """
    dest = Path(dest)

    def check() -> None:
        foreign = foreign_entries(dest, owned) if owned is not None else []
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise CheckpointError(f"{dest} holds files kronsearch did not write ({shown}); it never deletes them: "
                                  "move them away or choose another output folder")

    check()
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(dest)
    tmp = _sibling(dest, "tmp")
    if create:
        tmp.mkdir()
    try:
        yield tmp
        check()
        replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _jsonable(obj):
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
