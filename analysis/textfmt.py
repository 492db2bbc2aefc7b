"""The number and text formatting of kronsearch — analysis's Markdown reports and every console line of the CLI and
the search: counts (`human`: 2.51M, 800k, 1.2B), qualities, ratios, one-line texts and errors, tables. Missing
values print as "—" unless a caller asks for another mark."""
from __future__ import annotations

from analysis.results import is_finite
from kron.errors import one_line, text_or_none  # noqa: F401 (the one one-liner, here for the console's users)

__all__ = ["shown_path", "text_table", "error_line", "fmt_delta", "fmt_int", "fmt_percent", "fmt_quality", "fmt_ratio", "fmt_sci", "human", "md_cell",
           "md_table", "one_line", "text_or_none"]


def text_table(header, rows, *, right=None, rule: bool = True, indent: str = "", strip: bool = False) -> str:
    """The console table of kronsearch: cells as text, columns padded to their widest cell and two spaces apart,
    `right` the indices of the right-aligned columns (None: all of them), a dashed rule under the header when `rule`,
    every line prefixed by `indent` (and right-stripped when `strip`)."""
    header = [str(h) for h in header]
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    right = set(range(len(header))) if right is None else set(right)

    def line(cells):
        text = indent + "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in
                                  enumerate(zip(cells, widths)))
        return text.rstrip() if strip else text

    return "\n".join([line(header), *([line(["-" * w for w in widths])] if rule else []), *(line(r) for r in rows)])


def md_table(header, rows, numeric=()) -> list[str]:
    numeric = set(numeric)
    out = ["| " + " | ".join(md_cell(h) for h in header) + " |",
           "|" + "|".join("---:" if i in numeric else "---" for i in range(len(header))) + "|"]
    out += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows]
    return out


def md_cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")




def human(value, missing: str = "—") -> str:
    """2.51M, 800k, 1.2B, 12.3 — or `missing` when there is no number."""
    if not is_finite(value):
        return missing
    value = float(value)
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def fmt_int(value) -> str:
    """"2.51M (2,512,345)" for counts, "—" when missing."""
    if not is_finite(value):
        return "—"
    value = float(value)
    return f"{human(value)} ({value:,.0f})" if abs(value) >= 1e3 else f"{value:,.0f}"


def fmt_quality(value, missing: str = "—", *, nonfinite: bool = False) -> str:
    """A quality (perplexity, accuracy) to 4 significant digits; `missing` for none — and for inf/NaN unless
    `nonfinite`, which prints them ("inf": a diverged trial's is a value, not a gap)."""
    if is_finite(value):
        return f"{float(value):.4g}"
    if nonfinite:
        try:
            return str(float(value))
        except (TypeError, ValueError):
            return missing
    return missing


def fmt_ratio(value, sign: str = "×", missing: str = "—") -> str:
    """A compression ratio: 1.92× (the console writes 1.92x)."""
    return f"{float(value):.2f}{sign}" if is_finite(value) else missing


def fmt_sci(value) -> str:
    return f"{float(value):.4g}" if is_finite(value) else "—"


def fmt_percent(value) -> str:
    return f"{100 * float(value):.1f}%" if is_finite(value) else "—"


def fmt_delta(value, pct=None) -> str:
    if not is_finite(value):
        return "—"
    text = f"{float(value):+.4g}"
    return text + (f" ({float(pct):+.1f}%)" if is_finite(pct) else "")


def shown_path(path) -> str:
    """A path as the console shows it: relative to the working directory when it lies inside it (so a transcript
    holds no machine's absolute paths), else as given; a URI (s3://...) unchanged."""
    text = str(path)
    if "://" in text:
        return text
    from pathlib import Path

    try:
        return str(Path(text).resolve().relative_to(Path.cwd().resolve()))
    except (ValueError, OSError):
        return text


def error_line(error) -> str | None:
    """A failed trial's error as the search records and prints it: the last line of its text (the original
    "Type: message" Ray's traceback ends with), at most 500 characters."""
    return one_line(error, last_line=True, limit=500)
