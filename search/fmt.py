"""Console formatting shared by the search's driver output: qualities, counts, ratios and one-line errors."""
from __future__ import annotations

import math

__all__ = ["fmt_n", "fmt_q", "fmt_x", "one_line"]


def fmt_q(q) -> str:
    try:
        q = float(q)
    except (TypeError, ValueError):
        return "-"
    if not math.isfinite(q):
        return str(q)
    return f"{q:.4g}" if abs(q) < 1e5 else f"{q:.3e}"


def fmt_n(n) -> str:
    if n is None:
        return "?"
    n = float(n)
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return f"{int(n)}"


def fmt_x(x) -> str:
    try:
        return f"{float(x):.2f}x"
    except (TypeError, ValueError):
        return "?x"


def one_line(exc) -> str:
    text = str(exc).strip().splitlines()
    # Ray wraps the trial's exception; its last line is the original "Type: message"
    return (text[-1] if text else type(exc).__name__)[:500]
