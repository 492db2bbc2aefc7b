"""Module selectors, the one matching rule of plan files, families and search spaces (torch-free).

A selector is `re:PATTERN` (a regex full match on the dotted module name), a glob (`*`, `?` or `[`: fnmatch, `*`
also crosses dots), or a plain name; a non-regex selector may match the full name or any dotted suffix of it, so
`mlp.c_fc` selects `transformer.h.3.mlp.c_fc` (peft's `target_modules` rule).

A regex is matched by the `regex` package (the syntax of Python's `re`) with a time limit: a pattern that
backtracks catastrophically (`re:(.|.)*Q` against a long module name) is a PlanError naming it, not a hang.
"""
from __future__ import annotations

import fnmatch
import functools

import regex

from .errors import PlanError

__all__ = ["GLOB_CHARS", "MATCH_SECONDS", "compile_regex", "selector_matches"]

GLOB_CHARS = frozenset("*?[")
MATCH_SECONDS = 0.25  # one regex selector against one module name (a sane one takes microseconds)


@functools.lru_cache(maxsize=4096)
def compile_regex(pattern: str):
    """The compiled pattern of a `re:` selector; `regex.error` when it is not a valid regular expression."""
    return regex.compile(pattern)


def selector_matches(selector: str, name: str) -> bool:
    """Whether a selector (exact / `.suffix`, glob, or `re:` regex) matches a dotted module name."""
    if selector.startswith("re:"):
        try:
            return compile_regex(selector[3:]).fullmatch(name, timeout=MATCH_SECONDS) is not None
        except TimeoutError:
            raise PlanError(f"select {selector!r}: matching module {name!r} took over {MATCH_SECONDS} s (a pattern "
                            "that backtracks catastrophically, e.g. a repeated group of alternatives that overlap); "
                            "simplify it") from None
    parts = name.split(".")
    suffixes = (".".join(parts[i:]) for i in range(len(parts)))
    if GLOB_CHARS & set(selector):
        return any(fnmatch.fnmatchcase(s, selector) for s in suffixes)
    return any(s == selector for s in suffixes)
