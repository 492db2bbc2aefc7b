"""Error types shared by every kronsearch package.

`UserError` (and its subclasses) mean "the input was wrong": the CLI prints its one-line message and exits
with status 2. Anything else reaching the CLI is an internal error (status 1). `one_line` puts a message (or an
exception's) on one line, for every package's error texts and console lines.
"""
from __future__ import annotations

__all__ = ["CheckpointError", "ConfigError", "DataError", "PlanError", "ShapeError", "UserError", "one_line",
           "text_or_none"]


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
