"""Number and text formatting shared by analysis's Markdown reports and console output ("—" for missing values)."""
from __future__ import annotations

from analysis.results import is_finite

__all__ = ["text_table", "fmt_delta", "fmt_int", "fmt_percent", "fmt_quality", "fmt_ratio", "fmt_sci", "human", "md_cell",
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




def human(value) -> str:
    """2.51M, 800k, 12.3 — or "—" when missing."""
    if not is_finite(value):
        return "—"
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


def fmt_quality(value) -> str:
    return f"{float(value):.4g}" if is_finite(value) else "—"


def fmt_ratio(value) -> str:
    return f"{float(value):.2f}×" if is_finite(value) else "—"


def fmt_sci(value) -> str:
    return f"{float(value):.4g}" if is_finite(value) else "—"


def fmt_percent(value) -> str:
    return f"{100 * float(value):.1f}%" if is_finite(value) else "—"


def fmt_delta(value, pct=None) -> str:
    if not is_finite(value):
        return "—"
    text = f"{float(value):+.4g}"
    return text + (f" ({float(pct):+.1f}%)" if is_finite(pct) else "")


def text_or_none(value) -> str | None:
    return value if isinstance(value, str) and value else None


def one_line(value) -> str | None:
    text = text_or_none(value)
    if text is None:
        return None
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:299] + "…"
