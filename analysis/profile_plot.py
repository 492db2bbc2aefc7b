"""Heat map of a sensitivity profile (`kronsearch profile`): matrix x compression -> damage, one panel per method.

Takes the profile dict (the JSON `kron.profile` writes); torch-free and Ray-free like the rest of `analysis`.
Each cell is the least damage (relative output error after data-aware init) among the matrix's candidates of that
method whose compression falls in the column's bin (log scale colours; blank: no candidate there).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np

from kron.errors import DataError
from kron.fsutil import atomic_path

__all__ = ["ProfileHeatmap", "profile_heatmap", "profile_heatmap_data"]

DPI = 150


class ProfileHeatmap(NamedTuple):
    matrices: list[str]
    methods: list[str]
    edges: list[float]  # compression bin edges (len = columns + 1)
    centres: list[float]  # the compression each column stands for (1.5, 2, 3, 4, 6, 8, ...)
    values: dict[str, np.ndarray]  # method -> (matrices x columns), NaN where no candidate


def _bins(lo: float, hi: float) -> tuple[list[float], list[float]]:
    """Bins centred on 1.5, 2, 3, 4, 6, 8, 12, 16, ... (geometric midpoints between them)."""
    centres = [1.0, 1.5]
    while centres[-1] < hi * 1.01:
        c = centres[-2] * 2
        centres.append(c)
    centres = sorted(set(c for c in centres if c >= min(lo, 1.5) / 1.3))
    edges = [centres[0] / math.sqrt(centres[1] / centres[0])]
    for a, b in zip(centres, centres[1:]):
        edges.append(math.sqrt(a * b))
    edges.append(centres[-1] * math.sqrt(centres[-1] / centres[-2]))
    return edges, centres


def profile_heatmap_data(profile: Mapping) -> ProfileHeatmap:
    mats = profile.get("matrices") if isinstance(profile, Mapping) else None
    if not mats:
        raise DataError("the profile holds no matrices to draw")
    methods = [m for m in profile.get("methods", []) if m != "keep"]
    comps = [c["compression"] for mx in mats.values() for c in mx["candidates"] if c["method"] != "keep"]
    if not comps:
        raise DataError("the profile holds no compressed candidates to draw")
    edges, centres = _bins(min(comps), max(comps))
    names = list(mats)
    values = {}
    for method in methods:
        arr = np.full((len(names), len(edges) - 1), np.nan)
        for i, name in enumerate(names):
            for c in mats[name]["candidates"]:
                if c["method"] != method:
                    continue
                j = int(np.searchsorted(edges, c["compression"], side="right") - 1)
                j = min(max(j, 0), len(edges) - 2)
                if not (arr[i, j] <= c["damage"]):
                    arr[i, j] = c["damage"]
        values[method] = arr
    return ProfileHeatmap(names, methods, edges, centres, values)


def profile_heatmap(profile: Mapping, path: str | Path) -> Path:
    """Draw the heat map to a PNG (written atomically); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    data = profile_heatmap_data(profile)
    finite = np.concatenate([v[np.isfinite(v)] for v in data.values.values()] or [np.array([])])
    pos = finite[finite > 0]
    vmin = float(pos.min()) if pos.size else 1e-6
    vmax = float(pos.max()) if pos.size else 1.0
    if vmax <= vmin:
        vmax = vmin * 10
    cols = len(data.edges) - 1
    rows = len(data.matrices)
    fig, axes = plt.subplots(1, len(data.methods), figsize=(2.5 + 0.55 * cols * len(data.methods),
                                                            1.2 + 0.22 * rows), squeeze=False, sharey=True)
    labels = [f"{c:g}x" for c in data.centres]
    im = None
    for ax, method in zip(axes[0], data.methods):
        v = np.where(data.values[method] > 0, data.values[method], np.nan if not pos.size else vmin)
        v = np.where(np.isfinite(data.values[method]), v, np.nan)
        im = ax.imshow(np.ma.masked_invalid(v), aspect="auto", cmap="viridis", norm=LogNorm(vmin=vmin, vmax=vmax),
                       interpolation="nearest")
        ax.set_title(method)
        ax.set_xticks(range(cols))
        ax.set_xticklabels(labels, rotation=60, fontsize=7)
        ax.set_xlabel("compression (per matrix)")
        ax.set_yticks(range(rows))
        ax.set_yticklabels(data.matrices, fontsize=6)
    if im is not None:
        fig.colorbar(im, ax=axes[0].tolist(), label="damage: relative output error (log)")
    src = (profile.get("model") or {}).get("source")
    fig.suptitle(f"sensitivity profile{f' of {src}' if src else ''}", fontsize=9)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=DPI, format="png", bbox_inches="tight")
    plt.close(fig)
    return path
