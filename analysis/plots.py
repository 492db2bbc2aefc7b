"""Figures of saved search results: Pareto fronts (PNG + optional interactive HTML) and plan heat maps.

Data gathering (`pareto_plot_data`, `heatmap_data`: small named tuples) is separate from drawing (matplotlib
with the Agg backend; plotly, imported lazily, for the HTML twin). Every file is written atomically.
"""
from __future__ import annotations

import math
import re
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from analysis.pareto import pareto_mask
from analysis.textfmt import human
from analysis.results import (
    REFERENCE_METHODS,
    PLAN_INDEX,
    atomic_path,
    as_floats,
    is_finite,
    column_direction,
    compression_factor,
    is_reference,
    left_out_reasons,
)
from kron.errors import DataError
from kron.vocab import OBJECTIVES

DPI = 150
# Marker per reference method; anything else (e.g. numbers from a paper) gets the last one.
_REFERENCE_MARKERS = {"teacher": "*", "preset": "D", "lowrank": "v", "layerdrop": "s", "other": "P"}
_REFERENCE_ORDER = {method: i for i, method in enumerate(_REFERENCE_MARKERS)}
_PLOTLY_SYMBOLS = {"*": "star", "D": "diamond", "v": "triangle-down", "s": "square", "P": "cross"}
_QUALITY_NAMES = {
    "val_ppl": "validation perplexity", "ppl": "perplexity", "accuracy": "accuracy", "acc": "accuracy",
    "f1": "F1", "mcc": "Matthews correlation", "pearson": "Pearson correlation", "spearman": "Spearman correlation",
}
_COLUMN_NAMES = {
    **{o.column: o.label for o in OBJECTIVES.values() if o.name != "quality"},
    "throughput_tokens_per_s": "throughput (tokens/s)", "wall_time_s": "wall time (s)",
    "compression_ratio": "compression ratio", "tokens_seen": "tokens seen",
}
_KEEP_COLOUR = "#e4e4e4"
_MISSING_COLOUR = "#ffffff"
_LOWRANK_COLOUR = "#f3d9a4"


class SearchSeries(NamedTuple):
    """The complete trials of one search, ready to draw."""

    search: str
    colour: str
    x: np.ndarray
    y: np.ndarray
    on_front: np.ndarray  # bool per point
    front_x: np.ndarray  # front points sorted by x, for the step line
    front_y: np.ndarray
    hover: list[str]
    n_trials: int  # all trials of the search, failed ones included
    n_pruned: int = 0  # stopped early by ASHA (not failures)
    # pruned trials at the quality they had reached when stopped (drawn hollow; never part of the front)
    pruned_x: np.ndarray = np.zeros(0)
    pruned_y: np.ndarray = np.zeros(0)
    pruned_hover: tuple = ()


class ReferencePoint(NamedTuple):
    label: str
    method: str
    x: float
    y: float


class ParetoPlotData(NamedTuple):
    series: list[SearchSeries]
    references: list[ReferencePoint]
    x_label: str
    y_label: str
    title: str | None


def pareto_plot_data(df: pd.DataFrame, *, x: str = "params", y: str = "quality", references=None,
                     title: str | None = None) -> ParetoPlotData:
    """Gather what `plot_pareto` draws from a `load_results` table (see `plot_pareto` for the arguments)."""
    for column in (x, y, "search", "status", "method"):
        if column not in df:
            raise DataError(f"results table has no column {column!r}; columns are {list(df.columns)}")
    if isinstance(references, str):
        references = [references]
    if isinstance(references, pd.DataFrame):
        missing = [column for column in (x, y) if column not in references]
        if missing:
            raise DataError(f"references table has no column(s) {missing}")
    usable = left_out_reasons(df, (x, y)).isna()  # a negative or non-finite size or quality is never drawn
    complete = df[(df["status"] == "complete").fillna(False) & usable]
    ref_mask = is_reference(complete)
    if isinstance(references, Sequence) and not isinstance(references, (str, pd.DataFrame)):
        names = set(references)
        picked = complete["label"].isin(names).fillna(False) | complete["trial_id"].isin(names).fillna(False)
        unknown = names - set(complete.loc[picked, "label"].dropna()) - set(complete.loc[picked, "trial_id"])
        if unknown:
            raise DataError(f"references {sorted(unknown)} match no complete trial's label or trial_id")
        ref_mask = ref_mask | picked.astype(bool)
    trials = complete[~ref_mask]

    x_dir, y_dir = column_direction(trials, x), column_direction(trials, y)
    quality_names = trials["quality_name"].dropna().unique() if "quality_name" in trials else []
    if y == "quality" and len(quality_names) > 1:
        raise DataError(f"cannot overlay different quality metrics {sorted(quality_names)} on one y axis")

    searches = sorted(df.loc[~is_reference(df), "search"].dropna().unique(), key=str)
    colours = _colours(len(searches))
    series = []
    for search, colour in zip(searches, colours):
        group = trials[trials["search"] == search]
        gx, gy = as_floats(group[x]), as_floats(group[y])
        keep = np.isfinite(gx) & np.isfinite(gy)
        group, gx, gy = group[keep], gx[keep], gy[keep]
        on_front = pareto_mask(np.column_stack([gx, gy]), [x_dir, y_dir]) if len(gx) else np.zeros(0, bool)
        order = np.lexsort((gy[on_front] * (1 if y_dir == "min" else -1), gx[on_front]))
        mine = ((df["search"] == search) & ~is_reference(df)).fillna(False)
        n_trials = int(mine.sum())
        pruned = df[mine & (df["status"] == "pruned").fillna(False) & usable]
        px, py = as_floats(pruned[x]), as_floats(pruned[y])
        shown = np.isfinite(px) & np.isfinite(py)
        series.append(SearchSeries(
            search=str(search), colour=colour, x=gx, y=gy, on_front=on_front,
            front_x=gx[on_front][order], front_y=gy[on_front][order],
            hover=[_hover(row, x, y) for _, row in group.iterrows()], n_trials=n_trials, n_pruned=len(pruned),
            pruned_x=px[shown], pruned_y=py[shown],
            pruned_hover=tuple(_hover(row, x, y) + f"<br>pruned at step {row.get('steps')}"
                               for _, row in pruned[shown].iterrows()),
        ))

    refs = [
        ReferencePoint(_reference_label(row), str(row["method"]), float(row[x]), float(row[y]))
        for _, row in complete[ref_mask].iterrows() if is_finite(row[x]) and is_finite(row[y])
    ]
    if isinstance(references, pd.DataFrame):
        extra = references[(references["status"] == "complete").fillna(False)] if "status" in references else references
        refs += [ReferencePoint(_reference_label(row), str(row.get("method", "other")), float(row[x]), float(row[y]))
                 for _, row in extra.iterrows() if is_finite(row[x]) and is_finite(row[y])]
    elif isinstance(references, Mapping):
        refs += [ReferencePoint(str(label), "other", float(px), float(py)) for label, (px, py) in references.items()]
    elif references is not None and not isinstance(references, Sequence):
        raise DataError(f"references must be a DataFrame, a {{label: (x, y)}} mapping or a list of labels, "
                        f"got {type(references).__name__}")

    refs.sort(key=lambda ref: (_REFERENCE_ORDER.get(ref.method, len(_REFERENCE_ORDER)), ref.x))
    if not len(quality_names) and "quality_name" in df:  # nothing complete: name the metric anyway
        quality_names = df["quality_name"].dropna().unique()
    quality_name = str(quality_names[0]) if len(quality_names) else "quality"
    y_label = _axis_label(y, quality_name) + ("  (lower is better ↓)" if y_dir == "min" else "  (higher is better ↑)")
    x_label = _axis_label(x, quality_name) + ("  (lower is better ←)" if x_dir == "min" else "  (higher is better →)")
    return ParetoPlotData(series, refs, x_label, y_label, title)


def plot_pareto(df: pd.DataFrame, *, x: str = "params", y: str = "quality", out_png, title: str | None = None,
                references=None, logx: bool = True, logy: bool = False, html_out=None) -> Path:
    """Draw each search's Pareto front of `y` against `x` into `out_png` (and an interactive `html_out`).

    df: a `load_results` table; one colour per `search`, complete trials' front points solid and joined by a step
    line, dominated points faint, pruned trials hollow at the quality they had reached when stopped (never on the
    front, which is computed from complete trials only). Reference points (method teacher/preset/lowrank/layerdrop)
    get labelled black markers; `references` adds more: a DataFrame of extra rows, a {label: (x, y)} mapping
    (e.g. numbers from a paper) or a list of labels/trial_ids of `df` rows. `y="quality"` takes its direction
    from `quality_mode`. `html_out` needs plotly; without it a warning is issued and only the PNG is written.
    Returns the PNG path.
    """
    data = pareto_plot_data(df, x=x, y=y, references=references, title=title)
    fig = _render_pareto_matplotlib(data, logx=logx, logy=logy)
    out_png = _save_figure(fig, out_png)
    if html_out is not None:
        try:
            import plotly.graph_objects  # noqa: F401  (optional dependency)
        except ImportError:
            warnings.warn(f"plotly is not installed; skipping {html_out} (pip install plotly)", stacklevel=2)
        else:
            html = _render_pareto_plotly(data, logx=logx, logy=logy)
            with atomic_path(html_out) as tmp:
                html.write_html(str(tmp), include_plotlyjs=True, full_html=True)
    return out_png


class HeatmapData(NamedTuple):
    row_labels: list[str]
    column_labels: list[str]  # short module names
    layers: list[str]  # layer group of each column ("" outside the repeated blocks)
    factors: np.ndarray  # (rows, columns) compression factor; 1 = keep, NaN = not in the plan or low-rank
    keep: np.ndarray  # bool: cell is "keep"
    cells: np.ndarray  # the plan_table strings, for hover text
    groups: list[str]  # search of each row (rows of one search are adjacent)

    @property
    def kinds(self) -> np.ndarray:
        """Per cell: "keep" (kept dense by the plan), "dense" (not in the plan, so dense too), "factor" (a
        compression factor to colour) or "lowrank" (a low-rank entry: its factor needs the matrix size, which
        the plan table does not hold, so the cell shows the rank)."""
        kinds = np.full(self.factors.shape, "factor", dtype=object)
        for (i, j), cell in np.ndenumerate(self.cells):
            if self.keep[i, j]:
                kinds[i, j] = "keep"
            elif cell is None:
                kinds[i, j] = "dense"
            elif not np.isfinite(self.factors[i, j]):
                kinds[i, j] = "lowrank"
        return kinds


def heatmap_data(plan_table: pd.DataFrame) -> HeatmapData:
    """Gather what `plot_plan_heatmap` draws: rows sorted by search then params, columns grouped by layer."""
    if plan_table.empty or plan_table.shape[1] == 0:
        raise DataError("plan table is empty: no trials or no resolved plans to draw")
    table = plan_table
    if list(table.index.names) == list(PLAN_INDEX):
        meta = table.index.to_frame(index=False)
        order = np.lexsort((as_floats(meta["params"]), meta["search"].astype(str).to_numpy()))
        table, meta = table.iloc[order], meta.iloc[order]
        many = meta["search"].nunique() > 1
        row_labels = [_plan_row_label(row, many) for _, row in meta.iterrows()]
        groups = [str(search) for search in meta["search"]]
    else:
        row_labels = [" ".join(map(str, key)) if isinstance(key, tuple) else str(key) for key in table.index]
        groups = [""] * len(row_labels)
    keys = [_module_key(name, position) for position, name in enumerate(table.columns)]
    columns = [table.columns[i] for i in sorted(range(len(keys)), key=lambda i: keys[i])]
    table = table[columns]
    cells = table.astype(object).where(table.notna(), None).to_numpy()
    factors = np.vectorize(compression_factor, otypes=[float])(cells) if cells.size else np.zeros(cells.shape)
    short = [short_module_name(name) for name in columns]
    layers = [_module_key(name, 0)[1] for name in columns]
    return HeatmapData(row_labels, short, [f"{layer}" if layer >= 0 else "" for layer in layers],
                       factors, cells == "keep", cells, groups)


def plot_plan_heatmap(plan_table: pd.DataFrame, out_png, *, title: str | None = None) -> Path:
    """Heat map of plans: a row per trial (usually the front ones), a column per module, grouped by layer.

    plan_table: from `analysis.results.plan_table`, e.g. `plan_table(mark_pareto(df).query("on_front"))`.
    Colour = compression factor of that matrix (dense / factored params, log scale); "keep" cells are grey.
    Cells are annotated with the factor when there is room. Returns the PNG path.
    """
    data = heatmap_data(plan_table)
    fig = _render_heatmap_matplotlib(data, title=title)
    return _save_figure(fig, out_png)


def short_module_name(name: str) -> str:
    """Compact module name: "transformer.h.1.attn.c_attn" -> "h1.attn.c_attn",
    "bert.encoder.layer.3.attention.self.query" -> "l3.attention.self.query"."""
    name = re.sub(r"^(transformer|model|bert|roberta|encoder|decoder|gpt_neox)\.", "", name)
    name = re.sub(r"^(encoder|decoder)\.", "", name)
    name = re.sub(r"(^|\.)h\.(\d+)\.", r"\1h\2.", name)
    return re.sub(r"(^|\.)(layer|layers|blocks|block)\.(\d+)\.", r"\1l\3.", name)


# --- matplotlib renderers -----------------------------------------------------------------------------------


def _render_pareto_matplotlib(data: ParetoPlotData, *, logx: bool, logy: bool):
    plt = _pyplot()
    from matplotlib import ticker

    fig, ax = plt.subplots(figsize=(10, 5.8), layout="constrained")
    for s in data.series:
        n_front, n_complete = int(s.on_front.sum()), len(s.x)
        label = f"{s.search}\n{n_front} on front · {n_complete} complete"
        label += f" · {s.n_pruned} pruned" if s.n_pruned else ""
        n_failed = s.n_trials - n_complete - s.n_pruned
        label += f" · {n_failed} failed" if n_failed > 0 else ""
        ax.step(s.front_x, s.front_y, where="post", color=s.colour, lw=1.8, alpha=0.9, zorder=2)
        ax.scatter(s.x[~s.on_front], s.y[~s.on_front], s=28, color=s.colour, alpha=0.25, lw=0, zorder=1)
        ax.scatter(s.x[s.on_front], s.y[s.on_front], s=40, color=s.colour, edgecolor="white", lw=0.8,
                   zorder=3, label=label)
        if len(s.pruned_x):
            ax.scatter(s.pruned_x, s.pruned_y, s=30, facecolor="none", edgecolor=s.colour, lw=1.0, alpha=0.7,
                       zorder=1, label=f"{s.search}: pruned (quality when stopped)")
    seen_methods = set()
    for ref in data.references:
        method = ref.method if ref.method in _REFERENCE_MARKERS else "other"
        ax.scatter([ref.x], [ref.y], marker=_REFERENCE_MARKERS[method], s=150 if method == "teacher" else 70,
                   color="#222222", edgecolor="white", lw=0.8, zorder=4,
                   label=None if method in seen_methods else
                   ("other reference" if method == "other" else f"{method} (reference)"))
        seen_methods.add(method)
    if not data.references and not any(len(s.x) or len(s.pruned_x) for s in data.series):
        ax.text(0.5, 0.5, "no complete trials to draw", transform=ax.transAxes, ha="center", va="center",
                fontsize=12, color="#666666")
        ax.set_xticks([])
        ax.set_yticks([])
        logx = logy = False  # a log axis needs data
    if logx:
        ax.set_xscale("log")
        _log_ticks(ax.xaxis, ticker)
    else:
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: human(v)))
    if logy:
        ax.set_yscale("log")
        _log_ticks(ax.yaxis, ticker)
    ax.set_xlabel(data.x_label, fontsize=11)
    ax.set_ylabel(data.y_label, fontsize=11)
    if data.title:
        ax.set_title(data.title, fontsize=13)
    ax.grid(True, which="major", alpha=0.3)
    ax.grid(True, which="minor", alpha=0.1)
    ax.spines[["top", "right"]].set_visible(False)
    ax.margins(x=0.06, y=0.08)
    _label_references(ax, data.references)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=9, borderaxespad=0,
                  labelspacing=0.9)
    return fig


def _label_references(ax, references: list[ReferencePoint]) -> None:
    """Name each reference next to its marker, on the side that keeps the text inside the axes."""
    ax.autoscale_view()
    to_axes = ax.transData + ax.transAxes.inverted()  # data -> axes fraction, honouring log scales
    for ref in references:
        fx, fy = to_axes.transform((ref.x, ref.y))
        right, top = fx > 0.8, fy > 0.9
        ax.annotate(ref.label, (ref.x, ref.y), xytext=(-8 if right else 8, -6 if top else 5),
                    textcoords="offset points", ha="right" if right else "left", va="top" if top else "bottom",
                    fontsize=9, color="#222222", zorder=5,
                    bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.7))


def _render_heatmap_matplotlib(data: HeatmapData, *, title: str | None):
    plt = _pyplot()
    from matplotlib import colors as mcolors
    from matplotlib.patches import Patch, Rectangle

    n_rows, n_cols = data.factors.shape
    cell_w = 0.5 if n_cols <= 40 else max(0.18, 20.0 / n_cols)
    label_w = 0.075 * max(len(label) for label in data.row_labels) + 0.4
    width = min(label_w + n_cols * cell_w + 1.6, 32.0)
    height = min(max(1.0 + 0.32 * n_rows + 0.09 * max(len(c) for c in data.column_labels) + 0.5, 3.6), 40.0)
    fig, ax = plt.subplots(figsize=(width, height), layout="constrained")

    kinds = data.kinds
    finite = data.factors[kinds == "factor"]
    # Round the top of the scale up to a power of two so the colour bar ends on a labelled tick.
    vmax = 2.0 ** math.ceil(math.log2(max(float(finite.max()) if finite.size else 2.0, 2.0) * 0.999))
    norm = mcolors.LogNorm(vmin=1.0, vmax=vmax)
    cmap = plt.get_cmap("viridis_r")
    rgba = np.empty((n_rows, n_cols, 4))
    for i in range(n_rows):
        for j in range(n_cols):
            colour = {"keep": _KEEP_COLOUR, "dense": _MISSING_COLOUR, "lowrank": _LOWRANK_COLOUR}.get(kinds[i, j])
            rgba[i, j] = mcolors.to_rgba(colour) if colour else cmap(norm(data.factors[i, j]))
    ax.imshow(rgba, aspect="auto", interpolation="nearest")
    for i, j in zip(*np.nonzero(kinds == "dense")):  # hatch the modules a plan does not mention (left dense)
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///", edgecolor="#c8c8c8", lw=0))

    if cell_w >= 0.36 and n_rows <= 60:  # room for "12×" at 7 pt
        for i in range(n_rows):
            for j in range(n_cols):
                factor = data.factors[i, j]
                if kinds[i, j] == "lowrank":
                    text = str(data.cells[i, j]).split()[1]  # "lowrank r64 b3" -> "r64"
                elif kinds[i, j] == "factor":
                    text = f"{factor:.0f}×" if factor >= 9.5 else f"{factor:.2g}×"
                else:
                    continue
                r, g, b, _ = rgba[i, j]
                ink = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.55 else "white"
                ax.text(j, i, text, ha="center", va="center", fontsize=7, color=ink)

    # Layer groups: separators between layers and the layer name above each group.
    boundaries = [j for j in range(1, n_cols) if data.layers[j] != data.layers[j - 1]]
    for j in boundaries:
        ax.axvline(j - 0.5, color="white", lw=2.5)
    starts = [0, *boundaries]
    ends = [*boundaries, n_cols]
    top = ax.secondary_xaxis("top")
    top.set_xticks([(a + b - 1) / 2 for a, b in zip(starts, ends)],
                   [f"layer {data.layers[a]}" if data.layers[a] else "" for a in starts], fontsize=9)
    top.tick_params(length=0)
    for spine in top.spines.values():
        spine.set_visible(False)
    ax.set_xticks(range(n_cols), data.column_labels, rotation=90, fontsize=8 if cell_w >= 0.3 else 6)
    ax.set_yticks(range(n_rows), data.row_labels, fontsize=8 if n_rows <= 40 else 6)
    ax.tick_params(length=0)
    for i in range(1, n_rows):  # separate the searches' groups of rows
        if data.groups[i] != data.groups[i - 1]:
            ax.axhline(i - 0.5, color="white", lw=2.5)
    for spine in ax.spines.values():
        spine.set_visible(False)

    mappable = plt.cm.ScalarMappable(norm=norm, cmap=cmap)
    bar = fig.colorbar(mappable, ax=ax, fraction=0.04 if width > 10 else 0.06, pad=0.01)
    bar.set_label("compression (× fewer params)", fontsize=9)
    ticks = [2.0**p for p in range(round(math.log2(vmax)) + 1)]
    bar.set_ticks(ticks, labels=[f"{t:g}×" for t in ticks])
    bar.ax.yaxis.set_minor_locator(plt.NullLocator())
    bar.ax.tick_params(labelsize=8)
    handles = [Patch(facecolor=_KEEP_COLOUR, label="keep (dense, 1×)")]
    if np.any(kinds == "dense"):
        handles.append(Patch(facecolor=_MISSING_COLOUR, edgecolor="#c8c8c8", hatch="///",
                             label="not in the plan (dense, 1×)"))
    if np.any(kinds == "lowrank"):
        handles.append(Patch(facecolor=_LOWRANK_COLOUR, label="low-rank (rank shown)"))
    fig.legend(handles=handles, loc="outside lower right", frameon=False, fontsize=8,
               ncols=len(handles) if width >= 9 else 1)  # one column when the figure is too narrow for a row
    if title:
        ax.set_title(title, fontsize=12)
    return fig


# --- plotly renderer ----------------------------------------------------------------------------------------


def _render_pareto_plotly(data: ParetoPlotData, *, logx: bool, logy: bool):
    import plotly.graph_objects as go

    fig = go.Figure()
    for s in data.series:
        hover = np.asarray(s.hover, dtype=object)
        fig.add_trace(go.Scatter(x=s.front_x, y=s.front_y, mode="lines", line=dict(color=s.colour, shape="hv"),
                                 legendgroup=s.search, showlegend=False, hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=s.x[s.on_front], y=s.y[s.on_front], mode="markers", name=f"{s.search} (front)",
                                 legendgroup=s.search, marker=dict(color=s.colour, size=9),
                                 text=hover[s.on_front], hovertemplate="%{text}<extra></extra>"))
        fig.add_trace(go.Scatter(x=s.x[~s.on_front], y=s.y[~s.on_front], mode="markers",
                                 name=f"{s.search} (dominated)", legendgroup=s.search,
                                 marker=dict(color=s.colour, size=7, opacity=0.3),
                                 text=hover[~s.on_front], hovertemplate="%{text}<extra></extra>"))
        if len(s.pruned_x):
            fig.add_trace(go.Scatter(x=s.pruned_x, y=s.pruned_y, mode="markers", name=f"{s.search} (pruned)",
                                     legendgroup=s.search, marker=dict(color=s.colour, size=7, symbol="circle-open"),
                                     text=list(s.pruned_hover), hovertemplate="%{text}<extra></extra>"))
    for ref in data.references:
        symbol = _PLOTLY_SYMBOLS[_REFERENCE_MARKERS.get(ref.method, "P")]
        fig.add_trace(go.Scatter(x=[ref.x], y=[ref.y], mode="markers+text", name=ref.label, text=[ref.label],
                                 textposition="top right", marker=dict(color="#222222", size=12, symbol=symbol),
                                 hovertemplate=f"{ref.label} ({ref.method})<br>x=%{{x:.4g}}<br>y=%{{y:.4g}}"
                                               "<extra></extra>"))
    fig.update_layout(title=data.title, template="plotly_white", xaxis_title=data.x_label,
                      yaxis_title=data.y_label, legend=dict(groupclick="togglegroup"))
    if logx:
        fig.update_xaxes(type="log")
    if logy:
        fig.update_yaxes(type="log")
    return fig


# --- helpers ------------------------------------------------------------------------------------------------


def _pyplot():
    """pyplot on the Agg backend (no display needed), without disturbing a backend someone already chose."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, out_png) -> Path:
    plt = _pyplot()
    out_png = Path(out_png)
    try:
        with atomic_path(out_png) as tmp:
            fig.savefig(tmp, dpi=DPI, format="png", facecolor="white")
    finally:
        plt.close(fig)
    return out_png


def _colours(n: int) -> list[str]:
    from matplotlib import colormaps, colors

    palette = colormaps["tab10"].colors if n <= 10 else colormaps["tab20"].colors
    return [colors.to_hex(palette[i % len(palette)]) for i in range(n)]


def _log_ticks(axis, ticker) -> None:
    low, high = axis.get_view_interval()
    decades = math.log10(max(high, 1e-300) / max(low, 1e-300)) if low > 0 else 2
    subs = tuple(range(1, 10)) if decades < 1.2 else (1.0, 2.0, 5.0)
    axis.set_major_locator(ticker.LogLocator(base=10, subs=subs))
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: human(v)))
    axis.set_minor_formatter(ticker.NullFormatter())


def _axis_label(column: str, quality_name: str) -> str:
    if column == "quality":
        return _QUALITY_NAMES.get(quality_name, quality_name.replace("_", " "))
    return _COLUMN_NAMES.get(column, column.replace("_", " "))


def _reference_label(row) -> str:
    label = row.get("label")
    if label is None or label is pd.NA or label != label:
        label = row.get("trial_id")
    return str(label)  # the method shows in the marker and the legend


def _hover(row, x: str, y: str) -> str:
    parts = [f"<b>{row.get('trial_id')}</b>"]
    if isinstance(row.get("label"), str):
        parts.append(str(row["label"]))
    parts += [f"{x}={human(float(row[x]))}", f"{row.get('quality_name', y) if y == 'quality' else y}={float(row[y]):.4g}"]
    if isinstance(row.get("plan_summary"), str):
        parts.append(row["plan_summary"])
    return "<br>".join(parts)


def _plan_row_label(row, with_search: bool) -> str:
    name = row["label"] if isinstance(row["label"], str) else str(row["trial_id"])
    parts = [f"{row['search']}/{name}" if with_search else name]
    if is_finite(row["params"]):
        parts.append(f"{human(float(row['params']))}")
    if is_finite(row["quality"]):
        short = {"val_ppl": "ppl"}.get(str(row["quality_name"]), str(row["quality_name"]))
        quality = float(row["quality"])
        parts.append(f"{short} {quality:.1f}" if abs(quality) >= 10 else f"{short} {quality:.3f}")
    return "  ·  ".join(parts)


def _module_key(name: str, position: int) -> tuple[int, int, int]:
    """Sort key grouping modules by layer: (section, layer, first position); embeddings first, heads last."""
    match = re.search(r"(?:^|\.)(?:h|layer|layers|block|blocks)\.(\d+)\.", name)
    if match:
        return (1, int(match.group(1)), position)
    return (0, -1, position) if re.search(r"emb|wte|wpe", name) else (2, -1, position)




__all__ = ["plot_pareto", "plot_plan_heatmap", "pareto_plot_data", "heatmap_data", "short_module_name",
           "ParetoPlotData", "HeatmapData", "SearchSeries", "ReferencePoint", "REFERENCE_METHODS"]
