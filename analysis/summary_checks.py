"""Bounded reading and checking of the numbers in saved results files (trial summaries, search_meta.json).

`read_json_object` reads a file within caps — `MAX_JSON_BYTES`, integers of at most `MAX_INT_DIGITS` digits,
`MAX_DEPTH` levels of nesting — and refuses anything else with a `CheckpointError` naming the file, so a huge or deeply
nested input is one short error, never a hang or an internal error. `checked_number` refuses text, bools and
containers where a number belongs; `value_problems` names the values no front may use (see
`analysis.results.left_out_reasons`). `shown_value` is the bounded echo of a value in error messages.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from kron.errors import CheckpointError, one_line, shown_value  # shown_value: also imported from here
from kron.vocab import SIZE_AXES

__all__ = ["MAX_DEPTH", "MAX_INT_DIGITS", "MAX_JSON_BYTES", "checked_number", "read_json_object", "shown_value", "value_problems"]

# Reading caps: a results file is refused (naming it) past these, never read into a hang or a huge message.
MAX_JSON_BYTES = 64 * 2**20
MAX_INT_DIGITS = 4300  # Python's own cap on int(str); JSON integers beyond it are refused with this file's name
MAX_DEPTH = 64  # levels of arrays/objects (a summary has about 6): deeper values would overflow the stack later
_INT64 = 2**63  # counts are stored as Int64


_TOO_DEEP = object()


class _TooLarge(Exception):
    def __init__(self, size: int):
        super().__init__(size)
        self.size = size


class _LongInteger(ValueError):
    def __init__(self, digits: int):
        super().__init__(digits)
        self.digits = digits


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _LongInteger(len(text.lstrip("-")))
    return int(text)


def read_json_object(path: Path) -> dict:
    """The JSON object in file `path`, read within `MAX_JSON_BYTES`, `MAX_INT_DIGITS` and `MAX_DEPTH`; anything
    else (missing, unreadable, not JSON, not an object) raises `CheckpointError` naming the file."""
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise _TooLarge(size)
        with open(path, encoding="utf-8") as handle:
            data = json.loads(handle.read(), parse_int=_bounded_int)
    except _TooLarge as exc:
        raise CheckpointError(f"{path}: {exc.size:,} bytes, more than the {MAX_JSON_BYTES:,} a results file may "
                              "have") from None
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file is missing") from None
    except RecursionError:  # the decoder recurses once per level of nesting
        data = _TOO_DEEP  # deeper than the decoder goes: refused below, like anything past MAX_DEPTH
    except _LongInteger as exc:
        raise CheckpointError(f"{path}: an integer of {exc.digits:,} digits (at most {MAX_INT_DIGITS:,} are read)"
                              ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: truncated or corrupt JSON ({one_line(exc, limit=200)})") from None
    except ValueError as exc:
        raise CheckpointError(f"{path}: cannot be read as JSON ({one_line(exc, limit=200)})") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if data is _TOO_DEEP or _deeper_than(data, MAX_DEPTH):
        raise CheckpointError(f"{path}: nested more than {MAX_DEPTH} levels deep (arrays/objects)")
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _deeper_than(data, limit: int) -> bool:
    stack = [(data, 1)] if isinstance(data, (dict, list)) else []  # a loop: no recursion to overflow the stack
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return True
        items = value.values() if isinstance(value, dict) else value
        stack.extend((item, depth + 1) for item in items if isinstance(item, (dict, list)))
    return False


def checked_number(path, column: str, value, *, whole: bool):
    """`value` as the column stores it (None, an int for a count, a float else); `CheckpointError` if it is no number,
    a count that is not whole, or out of range. NaN and ±inf are kept (as floats) for `value_problems` to name."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CheckpointError(f"{path}: {column!r} must be a number, got {type(value).__name__} {shown_value(value)}")
    if isinstance(value, int):
        if whole and not -_INT64 < value < _INT64:
            raise CheckpointError(f"{path}: {column!r} is out of range: {shown_value(value)}")
        if not whole:
            try:
                return float(value)
            except OverflowError:
                raise CheckpointError(f"{path}: {column!r} is out of range: {shown_value(value)}") from None
        return value
    if not whole or not math.isfinite(value):
        return value
    if not value.is_integer():
        raise CheckpointError(f"{path}: {column!r} must be a whole number, got {value!r}")
    if not -_INT64 < value < _INT64:
        raise CheckpointError(f"{path}: {column!r} is out of range: {value!r}")
    return int(value)


def value_problems(row: Mapping, *, nan_is_missing: bool) -> list[str]:
    """What keeps a row off every front: sizes negative or not finite, a complete row's quality missing or not
    finite. `nan_is_missing`: a NaN size counts as missing (a table's float column cannot tell NaN from null)."""
    problems = []
    for column in SIZE_AXES:
        value = row.get(column)
        if value is None or value is pd.NA or (nan_is_missing and _is_nan(value)):
            continue
        if not math.isfinite(float(value)) or float(value) < 0:
            problems.append(f"{column} {_number_text(value)}")
    if row.get("status") == "complete":
        quality = row.get("quality")
        if quality is None or quality is pd.NA:
            problems.append("quality missing")
        elif not math.isfinite(float(quality)):
            problems.append(f"quality {_number_text(quality)}")
    return problems


def _is_nan(value) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _number_text(value) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return shown_value(value.item() if isinstance(value, np.generic) else value)
