"""Signed search state: `--resume` hands Ray Tune only state files this user's kronsearch wrote.

Ray Tune's restore unpickles `tuner.pkl`, the searcher state (`searcher-state-*.pkl`) and cloudpickled blobs inside
`experiment_state-*.json` — so a pickle planted in a search folder (a shared disk, a bucket others can write) would
run code as whoever resumes it. kronsearch therefore signs every such file it leaves behind, HMAC-SHA256 with a key
kept outside the search folder (`~/.config/kronsearch/state.key`, 32 random bytes made on first use, mode 0600;
`$KRONSEARCH_STATE_KEY` names another file), in `<exp>/.kronsearch-state.json`; and before a resume it checks
every one of them: a file that is unsigned or altered stops the resume (exit 2, naming the file) before Ray reads
anything. `--trust-state` skips the check for a folder the user trusts (one written by an earlier release, by
another machine with another key, or left by a run killed before its last state was signed).

What is signed: the experiment folder's top-level `*.pkl` and `*state-*.json` files, which are what Ray's restore
reads (the `params.pkl` in trial folders is written by Ray's JSON logger and read by neither restore nor
kronsearch). The search re-signs them whenever they changed, right after Ray's periodic state saves (a Tune
callback in the driver, local storage), and once more when it ends or is interrupted; a run killed in the instant
between a save and its signing leaves a state only `--trust-state` resumes. A remote experiment (s3://...) is
signed at the end and checked through its pyarrow filesystem.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
from pathlib import Path

from kron.errors import ConfigError

from .progress import callback_base

__all__ = ["SIGNATURES", "StateSigner", "check_state", "sign_state", "state_key_path"]

SIGNATURES = ".kronsearch-state.json"
FORMAT = "kronsearch.state-signatures/1"


def state_key_path() -> Path:
    if os.environ.get("KRONSEARCH_STATE_KEY"):
        return Path(os.environ["KRONSEARCH_STATE_KEY"]).expanduser()
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "kronsearch" / "state.key"


def _key() -> bytes:
    path = state_key_path()
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            pass  # made by another process meanwhile
        else:
            with os.fdopen(fd, "wb") as fh:
                fh.write(secrets.token_bytes(32))
    key = path.read_bytes()
    if len(key) < 16:
        raise ConfigError(f"the state-signing key {path} is shorter than 16 bytes; remove it to make a new one")
    return key


def _fs(root: str):
    """(pyarrow filesystem, path) of a local folder or a URI (`search.storage.storage_args`)."""
    import pyarrow.fs

    from .storage import storage_args

    where = storage_args(root)
    if "storage_filesystem" in where:
        return where["storage_filesystem"], where["storage_path"].rstrip("/")
    return pyarrow.fs.LocalFileSystem(), str(Path(root).resolve())


def _is_state_file(name: str) -> bool:
    """A top-level file of an experiment folder that Ray's restore may unpickle."""
    return name.endswith(".pkl") or ("state-" in name and name.endswith(".json"))


def _state_files(fs, root: str) -> list[str]:
    """Names of the files Ray's restore may unpickle in the experiment folder `root`."""
    import pyarrow.fs

    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=False, allow_not_found=True))
    except OSError:
        return []
    names = (i.path.rstrip("/").rsplit("/", 1)[-1] for i in infos if i.type == pyarrow.fs.FileType.File)
    return sorted(n for n in names if _is_state_file(n))


def _mac(key: bytes, rel: str, data: bytes) -> str:
    return hmac.new(key, rel.encode() + b"\0" + data, hashlib.sha256).hexdigest()


def _read(fs, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def sign_state(root: str | os.PathLike) -> int:
    """Sign the state files of the experiment at `root` (a folder or a URI) into its signature file there.
    Returns how many files were signed."""
    root = str(root)
    fs, base = _fs(root)
    key = _key()
    files = {rel: _mac(key, rel, _read(fs, f"{base}/{rel}")) for rel in _state_files(fs, base)}
    text = json.dumps({"format": FORMAT, "signed_at": time.strftime("%Y-%m-%d %H:%M:%S"), "files": files},
                      indent=1).encode()
    if "://" in root:
        with fs.open_output_stream(f"{base}/{SIGNATURES}") as f:
            f.write(text)
    else:
        from kron.fsutil import atomic_write_bytes

        atomic_write_bytes(Path(base) / SIGNATURES, text)
    return len(files)


def check_state(root: str | os.PathLike) -> None:
    """ConfigError unless every state file of the experiment at `root` carries a valid signature of this key."""
    root = str(root)
    fs, base = _fs(root)
    files = _state_files(fs, base)
    if not files:
        return
    hint = ("; resume only a folder you trust, then with --trust-state (see docs/security.md: Ray unpickles these "
            "files)")
    try:
        signed = json.loads(_read(fs, f"{base}/{SIGNATURES}")).get("files") or {}
    except (OSError, ValueError, AttributeError):
        raise ConfigError(f"--resume: {root} has no valid kronsearch state signatures ({SIGNATURES}): its state "
                          f"files ({files[0]}{', ...' if len(files) > 1 else ''}) were not written by this user's "
                          f"kronsearch, or by a release before signing{hint}") from None
    key = _key()
    for rel in files:
        mac = signed.get(rel)
        if mac is None:
            raise ConfigError(f"--resume: {root}/{rel} is not signed (written after the last signature, by an older "
                              f"release, or planted){hint}")
        if not hmac.compare_digest(mac, _mac(key, rel, _read(fs, f"{base}/{rel}"))):
            raise ConfigError(f"--resume: {root}/{rel} was altered since kronsearch signed it, or signed with another "
                              f"key ({state_key_path()}){hint}")


class StateSigner(callback_base()):
    """A Tune callback (driver side) that re-signs a local experiment's state files after each step of Ray's loop
    in which they changed (Ray saves its state in the step, before this), so a killed search resumes without
    --trust-state; the search signs once more when `fit` returns (`search.tuner`)."""

    def __init__(self, root: str):
        self.root = str(root)
        self._seen: tuple = ()

    def _stamp(self) -> tuple:
        try:
            with os.scandir(self.root) as entries:
                return tuple(sorted((e.name, e.stat().st_mtime_ns, e.stat().st_size) for e in entries
                                    if e.is_file() and _is_state_file(e.name)))
        except OSError:
            return ()

    def on_step_end(self, iteration, trials, **info):
        if "://" in self.root:
            return  # remote: signed when the search ends
        stamp = self._stamp()
        if stamp != self._seen:
            try:
                sign_state(self.root)
            except OSError:
                return  # a file mid-write: the next step signs it
            self._seen = stamp
