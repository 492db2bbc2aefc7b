"""Module selectors, the one matching rule of plan files, families and search spaces (torch-free).

A selector is `re:PATTERN` (a regex full match on the dotted module name), a glob (`*`, `?` or `[`: fnmatch, `*`
also crosses dots), or a plain name; a non-regex selector may match the full name or any dotted suffix of it, so
`mlp.c_fc` selects `transformer.h.3.mlp.c_fc` (peft's `target_modules` rule).
"""
from __future__ import annotations

import fnmatch
import re

__all__ = ["GLOB_CHARS", "selector_matches"]

GLOB_CHARS = frozenset("*?[")


def selector_matches(selector: str, name: str) -> bool:
    """Whether a selector (exact / `.suffix`, glob, or `re:` regex) matches a dotted module name."""
    if selector.startswith("re:"):
        return re.fullmatch(selector[3:], name) is not None
    parts = name.split(".")
    suffixes = (".".join(parts[i:]) for i in range(len(parts)))
    if GLOB_CHARS & set(selector):
        return any(fnmatch.fnmatchcase(s, selector) for s in suffixes)
    return any(s == selector for s in suffixes)
