"""Error types shared by every kronsearch package.

`UserError` (and its subclasses) mean "the input was wrong": the CLI prints its one-line message and exits
with status 2. Anything else reaching the CLI is an internal error (status 1). `one_line` puts a message (or an
exception's) on one line, for every package's error texts and console lines.
"""
from __future__ import annotations

__all__ = ["CheckpointError", "ConfigError", "DataError", "DiskFullError", "PlanError", "ShapeError", "UserError",
           "disk_full", "one_line", "shown_value", "text_or_none"]


class UserError(ValueError):
    """Bad input from the user: a config, a plan, a path, a model name. The message names the problem."""


class ShapeError(UserError):
    """A factor shape that does not divide the matrix it is meant for."""


class PlanError(UserError):
    """A compression plan that does not fit a model (unknown module, bad shape, unsupported type)."""


class ConfigError(UserError):
    """A trial or search configuration with an unknown key, a wrong type or an impossible value."""


class DataError(UserError):
    """A data source that is missing, empty or in an unexpected layout."""


class CheckpointError(UserError):
    """A saved model or results file that is missing, truncated or corrupt."""


class DiskFullError(UserError):
    """The disk (or quota) ran out while kronsearch wrote: the machine's to fix, not the input's nor a bug."""


def text_or_none(value) -> str | None:
    return value if isinstance(value, str) and value else None


def one_line(value, *, limit: int | None = 300, last_line: bool = False) -> str | None:
    """A text — or an exception's message (its type name when it has none) — on one line, whitespace collapsed,
    longer than `limit` cut with "…" (None: no limit); `last_line`: only its last non-empty line (Ray wraps a
    trial's exception in a traceback whose last line is the original "Type: message"). None for no text."""
    if isinstance(value, BaseException):
        value = str(value).strip() or type(value).__name__
    text = text_or_none(value)
    if text is None:
        return None
    if last_line:
        text = [line for line in text.splitlines() if line.strip()][-1]
    text = " ".join(text.split())
    return text if limit is None or len(text) <= limit else text[:limit - 1] + "…"


def _bounded_repr():
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxdict, r.maxlist, r.maxtuple, r.maxset = 2, 4, 4, 4, 4
    r.maxstring, r.maxother, r.maxlong = 60, 60, 40
    return r


_REPR = _bounded_repr()


def shown_value(value) -> str:
    """A value as an error message echoes it: bounded (`reprlib`: a few items per level, long strings and numbers
    cut), so a huge or deeply nested input never makes a huge message — and is never expanded to be shown."""
    return _REPR.repr(value)


_FULL_ERRNOS = (28, 122)  # ENOSPC, EDQUOT (Linux; macOS: 28, 69)
_FULL_WORDS = {"No space left on device": "No space left on device", "Disk quota exceeded": "Disk quota exceeded",
               "os error 28": "No space left on device"}  # in a message -> what ran out (first match)


def disk_full(exc: BaseException | str | None) -> str | None:
    """What ran out when `exc` (or an exception it was raised from or wraps, such as a Ray task error or a
    safetensors error that only carries the OS message; or the text of an error file) is a full disk or an exceeded
    quota: "No space left on device" with the file when known; None for any other error."""
    links = list(_chain(RuntimeError(exc) if isinstance(exc, str) else exc))
    for link in links:
        if isinstance(link, DiskFullError):  # already said, with what could not be written
            return str(link).removeprefix("the disk is full: ")
    for link in links:
        if isinstance(link, OSError) and link.errno in _FULL_ERRNOS:
            return f"{link.strerror or 'No space left on device'}" + (f" ({link.filename})" if link.filename else "")
        found = next((what for words, what in _FULL_WORDS.items() if words in str(link)), None)
        if found is not None:
            return found
    return None


def _next(exc: BaseException) -> BaseException | None:
    """The exception `exc` wraps: a Ray task error's `cause`, else the one it was raised from or during."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else (exc.__cause__ or exc.__context__)


def _chain(exc: BaseException | None):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = _next(exc)
