"""Load saved search results (per-trial `trial_summary.json` files) into tidy pandas tables.

A *source* is a directory searched recursively for `trial_summary.json` (a Ray Tune experiment directory keeps
one per trial subfolder; a standalone trial writes one in its output directory) or a single summary file.
Nothing here imports Ray, torch or transformers: analysis works from the saved files alone.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.pareto import nondominated_ranks
from analysis.summary_checks import checked_number, read_json_object, shown_value, value_problems
from kron.errors import CheckpointError, DataError, one_line
from kron.fsutil import atomic_path, atomic_write_bytes, atomic_write_text  # noqa: F401 (re-exported)
from kron.vocab import (META_NAME, REFERENCE_METHODS, SCHEMA, STATUSES, SUMMARY_NAME,  # noqa: F401 (re-exported)
                        SIZE_AXES, SUMMARY_REQUIRED_KEYS)

# Column name -> dtype of the table returned by `load_results`, in column order.
RESULT_COLUMNS = {
    "search": "string",
    "trial_id": "string",
    "method": "string",
    "label": "string",
    "status": "string",
    "error": "string",
    "left_out": "string",  # why the row takes no part in fronts and selections (see `left_out_reasons`), else <NA>
    "quality_name": "string",
    "quality_mode": "string",
    "quality": "float64",
    "quality_at_init": "float64",
    "params": "Int64",
    "params_excl_output_embedding": "Int64",
    "compression_ratio": "float64",
    "macs_per_token": "Int64",
    "bytes": "Int64",
    "throughput_tokens_per_s": "float64",
    "wall_time_s": "float64",
    "steps": "Int64",
    "tokens_seen": "Int64",
    "plan_summary": "string",
    "summary_path": "string",
    "checkpoint": "object",
}
# Keys a summary must have; every other key may be missing (read as null).
_REQUIRED_KEYS = SUMMARY_REQUIRED_KEYS
# Columns of `load_history` that identify the trial, followed by the evaluation fields in this order.
_HISTORY_ID_COLUMNS = ("search", "trial_id", "method", "label", "status", "quality_name", "quality_mode")
_HISTORY_FIELDS = (
    "step", "tokens_seen", "wall_time_s", "quality", "loss", "loss_emb", "loss_att", "loss_hid", "loss_ce",
    "loss_logits", "throughput_tokens_per_s",
)


# --- reading ------------------------------------------------------------------------------------------------


def find_summaries(source: str | os.PathLike) -> list[Path]:
    """Absolute paths of the trial summaries in `source` (a directory, searched recursively, or one file).

    Raises `DataError` when the path does not exist or a directory holds no `trial_summary.json`.
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"results source {str(path)!r} does not exist")
    if path.is_file():
        return [path.resolve()]
    found = sorted(p.resolve() for p in path.rglob(SUMMARY_NAME) if p.is_file())
    if not found:
        raise DataError(f"no {SUMMARY_NAME} found under {str(path)!r}")
    return found


def read_summary(path: str | os.PathLike) -> dict:
    """Parse and validate one trial summary file; returns the dict with `summary_path` (absolute) added.

    Raises `CheckpointError` naming the file when it is unreadable, truncated, not a JSON object, lacks a
    required key, or has a schema version other than "kronsearch.trial/1".
    """
    path = Path(path).resolve()
    summary = read_json_object(path)
    missing = [key for key in _REQUIRED_KEYS if key not in summary]
    if missing:
        raise CheckpointError(f"{path}: trial summary lacks required key(s) {missing}")
    if summary["schema"] != SCHEMA:
        raise CheckpointError(
            f"{path}: unknown trial summary schema {shown_value(summary['schema'])}; this version reads {SCHEMA!r}"
        )
    if summary["status"] not in STATUSES:
        raise CheckpointError(f"{path}: unknown status {shown_value(summary['status'])}; expected one of "
                              f"{list(STATUSES)}")
    if summary["quality_mode"] not in ("min", "max"):
        raise CheckpointError(f"{path}: quality_mode must be 'min' or 'max', got "
                              f"{shown_value(summary['quality_mode'])}")
    summary["summary_path"] = str(path)
    return summary


def read_search_meta(path: str | os.PathLike) -> dict:
    """Parse one `search_meta.json` ({"name", "objectives", "method"}); `CheckpointError` if corrupt."""
    path = Path(path).resolve()
    meta = read_json_object(path)
    if "name" in meta and not isinstance(meta["name"], str):
        raise CheckpointError(f"{path}: 'name' must be a string, got {shown_value(meta['name'])}")
    return meta


def iter_summaries(sources) -> Iterator[dict]:
    """Yield every validated summary of `sources` (one path or a list) once, with `search` filled in.

    The search name is, in order: the summary's own `search` field; the `name` in the nearest
    `search_meta.json` between the summary's folder and the source root; the source directory's name (for a
    single-file source, its parent folder's name).
    """
    seen: set[Path] = set()
    for source in _as_list(sources):
        root = Path(source).expanduser()
        paths = find_summaries(root)
        root = root.resolve()
        if root.is_file():
            root = root.parent
        for path in paths:
            if path in seen:  # the same file reached through two overlapping sources
                continue
            seen.add(path)
            summary = read_summary(path)
            if not summary.get("search"):
                summary["search"] = _search_name(path.parent, root)
            yield summary


def load_results(sources, *, with_history: bool = False) -> pd.DataFrame:
    """One row per trial of `sources` (a path or a list of paths), columns as in `RESULT_COLUMNS`.

    `checkpoint` is an absolute path string (resolved against the summary's folder) or None. With
    `with_history=True` a `history` column holds each trial's list of evaluation dicts.

    A number field holding text, a bool, a list or an object, a count (params, macs, bytes, steps, tokens) that is
    not a whole number, or a number out of range raises `CheckpointError` naming the file and the field. A row
    whose values no front may use — a size (`kron.vocab.SIZE_AXES`) negative or not finite, a complete row's
    quality missing or not finite — is kept, with the reason in `left_out` (non-finite counts read as <NA>).
    """
    rows = []
    for summary in iter_summaries(sources):
        row = _checked_row(summary)
        if with_history:
            row["history"] = list(summary.get("history") or [])
        rows.append(row)
    columns = list(RESULT_COLUMNS) + (["history"] if with_history else [])
    frame = pd.DataFrame(rows, columns=columns)
    return _with_dtypes(frame, RESULT_COLUMNS)


def load_history(sources) -> pd.DataFrame:
    """One row per evaluation of every trial in `sources`: trial identity columns, then the history fields."""
    rows = []
    extra: list[str] = []
    for summary in iter_summaries(sources):
        ident = {column: summary.get(column) for column in _HISTORY_ID_COLUMNS}
        history = summary.get("history") or []
        if not isinstance(history, list):
            raise CheckpointError(f"{summary['summary_path']}: history must be a list, got {type(history).__name__}")
        for entry in history:
            if not isinstance(entry, Mapping):
                raise CheckpointError(f"{summary['summary_path']}: history entries must be objects, got "
                                      f"{shown_value(entry)}")
            extra += [key for key in entry if key not in _HISTORY_FIELDS and key not in extra]
            rows.append({**ident, **entry})
    columns = [*_HISTORY_ID_COLUMNS, *_HISTORY_FIELDS, *sorted(set(extra) - set(_HISTORY_ID_COLUMNS))]
    frame = pd.DataFrame(rows, columns=columns)
    dtypes = {column: "string" for column in _HISTORY_ID_COLUMNS}
    dtypes.update({"step": "Int64", "tokens_seen": "Int64"})
    dtypes.update({field: "float64" for field in _HISTORY_FIELDS if field not in dtypes})
    return _with_dtypes(frame, dtypes)


def mark_pareto(df: pd.DataFrame, x: str = "params", y: str = "quality", *, by: str = "search") -> pd.DataFrame:
    """Copy of `df` with `front_rank` (0 = Pareto front) and `on_front` columns, computed per `by` group.

    Only complete, non-reference rows that `left_out_reasons` passes take part (others get `front_rank` <NA>,
    `on_front` False); the copy's `left_out` column says why a row was left out. The direction of `y` = "quality"
    comes from `quality_mode` (which must agree within a group); see `column_direction` for the others.
    """
    work = df.reset_index(drop=True)  # positional labels: df's own index may have duplicates
    ranks = pd.array([pd.NA] * len(work), dtype="Int64")
    reasons = left_out_reasons(work, (x, y))
    eligible = usable_rows(work, (x, y)) & ~is_reference(work)
    for _, group in work[eligible].groupby(by, sort=False, dropna=False):
        directions = [column_direction(group, x), column_direction(group, y)]
        values = np.column_stack([_as_float(group[x]), _as_float(group[y])])
        ranks[group.index.to_numpy()] = nondominated_ranks(values, directions)
    out = df.copy()
    out["left_out"] = pd.array(reasons.to_numpy(), dtype="string")
    out["front_rank"] = ranks
    out["on_front"] = (ranks == 0).fillna(False).astype(bool)
    return out


def left_out_reasons(df: pd.DataFrame, columns: Sequence[str] = ()) -> pd.Series:
    """Why each row of a results table takes no part in fronts, best and knee points, hypervolumes, selections and
    baseline comparisons ("quality NaN", "params -5, bytes -10", "macs_per_token missing"); <NA> for a usable row.

    A row is left out when a size (`kron.vocab.SIZE_AXES`) is negative or not finite, or when it is complete and its
    quality, or one of `columns` (the objectives in use), is missing or not finite. The reasons
    come from the table's `left_out` column when it has one (`load_results` fills it from the files' own values),
    else from its values. Rows that are not complete are never on a front anyway; a bad size still names them.
    """
    if "left_out" in df:
        reasons = df["left_out"].astype("string").copy()
    else:
        records = df[[c for c in (*SIZE_AXES, "quality", "status") if c in df]].to_dict("records")
        reasons = pd.Series([", ".join(value_problems(r, nan_is_missing=True)) or None for r in records],
                            index=df.index, dtype="string")
    complete = (df["status"] == "complete").fillna(False).astype(bool)
    for column in dict.fromkeys(columns):
        if column in df:
            missing = complete & reasons.isna() & ~np.isfinite(as_floats(df[column]))
            reasons[missing.to_numpy()] = f"{column} missing"
    return reasons


def usable_rows(df: pd.DataFrame, columns: Sequence[str] = ("params", "quality")) -> pd.Series:
    """Boolean Series: complete rows that `left_out_reasons(df, columns)` passes (references included)."""
    return (df["status"] == "complete").fillna(False).astype(bool) & left_out_reasons(df, columns).isna()


def left_out_entries(df: pd.DataFrame, columns: Sequence[str] = ()) -> list[dict]:
    """[{"search", "trial_id", "role": "trial" | "reference", "reason"}] of the rows `left_out_reasons` names."""
    reasons = left_out_reasons(df, columns)
    bad = reasons.notna().to_numpy()
    rows = df[bad]
    return [{"search": None if pd.isna(s) else str(s), "trial_id": str(t), "role": "reference" if ref else "trial",
             "reason": str(r)}
            for s, t, ref, r in zip(rows["search"], rows["trial_id"], is_reference(rows), reasons[bad])]


def left_out_text(entries: Sequence[Mapping], most: int = 10) -> str | None:
    """"2 trials left out: s/t3 quality NaN; s/t5 params -5" (at most `most` named), or None when none is."""
    if not entries:
        return None
    n_ref = sum(1 for e in entries if e.get("role") == "reference")
    counts = [f"{n} {noun}{'' if n == 1 else 's'}" for n, noun in ((len(entries) - n_ref, "trial"),
                                                                   (n_ref, "reference")) if n]
    names = [f"{one_line(str(e['search']), limit=60)}/{one_line(e['trial_id'], limit=60)} {e['reason']}"
             for e in entries[:most]]
    more = f"; and {len(entries) - most} more" if len(entries) > most else ""
    return f"{' and '.join(counts)} left out: {'; '.join(names)}{more}"


def left_out_line(df: pd.DataFrame, columns: Sequence[str] = ()) -> str | None:
    """`left_out_text` of a results table (None when every row is usable)."""
    return left_out_text(left_out_entries(df, columns))


def is_reference(df: pd.DataFrame) -> pd.Series:
    """Boolean Series: rows that are reference points (method teacher/preset/lowrank/layerdrop)."""
    return df["method"].isin(REFERENCE_METHODS).fillna(False).astype(bool)


def reference_names(df: pd.DataFrame) -> list[str]:
    """Display names of the reference rows of `df` (the teacher, presets, baselines), in order, repeats as
    "name ×n": what reports list as "references: ..."."""
    ref = df[is_reference(df)]
    names: dict[str, int] = {}
    for _, row in ref.iterrows():
        label, method = row.get("label"), row.get("method")
        name = str(method) if method == "teacher" or not isinstance(label, str) or not label else label
        names[name] = names.get(name, 0) + 1
    return [n if k == 1 else f"{n} ×{k}" for n, k in names.items()]


def trial_counts(df: pd.DataFrame) -> tuple[int, dict[str, int], list[str]]:
    """(number of trials, trials per status, reference names) of a results table. References (the teacher
    evaluated without training, presets and baselines: `is_reference`) are never counted as trials."""
    trials = df[~is_reference(df)]
    counts = trials["status"].astype("string").fillna("unknown").value_counts()
    order = [s for s in STATUSES if s in counts.index] + sorted(s for s in counts.index if s not in STATUSES)
    return len(trials), {s: int(counts[s]) for s in order}, reference_names(df)


def counts_text(n: int, by_status: dict[str, int], references: list[str]) -> str:
    """"8 trials: 4 complete, 4 pruned; references: teacher" (the one wording of trial counts)."""
    text = f"{n} trial{'' if n == 1 else 's'}"
    if by_status:
        text += ": " + ", ".join(f"{k} {s}" for s, k in by_status.items())
    if references:
        text += "; references: " + ", ".join(references)
    return text


def column_direction(df: pd.DataFrame, column: str) -> str:
    """"min" or "max" for an objective column: `quality` follows `quality_mode`; throughput and
    compression_ratio are maximised; everything else (params, macs, time) is minimised."""
    if column == "quality":
        modes = df["quality_mode"].dropna().unique()
        if len(modes) > 1:
            raise DataError(f"trials mix quality modes {sorted(modes)}; compare one quality metric at a time")
        return str(modes[0]) if len(modes) else "min"
    return "max" if column in ("throughput_tokens_per_s", "compression_ratio") else "min"


# --- plans --------------------------------------------------------------------------------------------------

# Index levels of `plan_table`: enough to label a heat-map row without the results table.
PLAN_INDEX = ("search", "trial_id", "label", "params", "quality", "quality_name")


def plan_table(df_or_summaries) -> pd.DataFrame:
    """Trial x module table of factorisations, for the plan heat map.

    Accepts a `load_results` DataFrame (plans are re-read from each row's `summary_path`) or an iterable of
    summary dicts. Cells are shape strings such as "384x768⊗2x1 r1" (with " b3" when a matrix is split into 3
    blocks), "keep", or <NA> when a plan does not mention the module. The index has levels `PLAN_INDEX`;
    columns keep the order modules first appear in.
    """
    if isinstance(df_or_summaries, pd.DataFrame):
        summaries = [read_summary(path) for path in df_or_summaries["summary_path"]]
        for summary, search in zip(summaries, df_or_summaries["search"]):
            summary["search"] = search  # the table's search name may come from search_meta / the folder
    else:
        summaries = list(df_or_summaries)
    index, rows = [], []
    for summary in summaries:
        index.append(tuple(summary.get(level) for level in PLAN_INDEX))
        resolved = summary.get("plan_resolved") or {}
        if not isinstance(resolved, Mapping):
            raise CheckpointError(f"{summary.get('summary_path', 'summary')}: plan_resolved must be an object")
        rows.append({module: format_factorisation(spec) for module, spec in resolved.items()})
    columns = list(dict.fromkeys(module for row in rows for module in row))
    table = pd.DataFrame(rows, columns=columns, dtype="string")
    table.index = pd.MultiIndex.from_tuples(index, names=PLAN_INDEX) if index else pd.MultiIndex.from_arrays(
        [[]] * len(PLAN_INDEX), names=PLAN_INDEX
    )
    table.columns.name = "module"
    return table


def format_factorisation(spec) -> str:
    """"keep" or the method's short label of one `plan_resolved` entry: "m1xn1⊗m2xn2 rR" (+ " bB" for B > 1 blocks)
    for Kronecker factors, "emb fF" for an embedding A (v x d/F) ⊗ B (1 x F), "lowrank rR" (+ " bB") for U·V."""
    from kron.errors import PlanError
    from kron.methods import spec_from_dict

    if spec == "keep":
        return "keep"
    try:
        if not isinstance(spec, Mapping):
            raise PlanError("not a mapping")
        return spec_from_dict(spec).label()
    except (PlanError, KeyError, TypeError):
        raise CheckpointError(f"plan_resolved entry must be 'keep' or {{'shape': [m1, n1, m2, n2], ...}}, got "
                              f"{shown_value(spec)}") from None


def compression_factor(cell) -> float:
    """Dense / factored parameter count of one `plan_table` cell: 1.0 for "keep", NaN for missing, and NaN where the
    method needs the matrix size, which the cell does not hold (low-rank: m·n / (r·(m+n)))."""
    from kron.methods import parse_label

    if cell is None or cell is pd.NA or (isinstance(cell, float) and math.isnan(cell)):
        return math.nan
    if cell == "keep":
        return 1.0
    spec = parse_label(str(cell))
    if spec is None:
        raise DataError(f"cannot parse factorisation {cell!r}; expected e.g. '384x768⊗2x1 r1'")
    return spec.compression()


# --- writing ------------------------------------------------------------------------------------------------


# atomic_path / atomic_write_text / atomic_write_bytes live in kron.fsutil (stdlib only) and are re-exported here.


def as_floats(values) -> np.ndarray:
    """Numbers as a float64 array; anything non-numeric (None, pd.NA, text) becomes NaN."""
    return pd.to_numeric(pd.Series(values), errors="coerce").astype("float64").to_numpy()


def is_finite(value) -> bool:
    """True for a real, finite number (False for None, pd.NA, NaN, ±inf and non-numbers)."""
    try:
        return value is not None and value is not pd.NA and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


# --- internals ----------------------------------------------------------------------------------------------


def _checked_row(summary: Mapping) -> dict:
    """The `RESULT_COLUMNS` values of one summary, type-checked (see `load_results`), with `left_out` filled in."""
    path = summary["summary_path"]
    row = {}
    for column, dtype in RESULT_COLUMNS.items():
        value = summary.get(column)
        if dtype in ("float64", "Int64"):
            value = checked_number(path, column, value, whole=dtype == "Int64")
        elif dtype == "string" and value is not None and not isinstance(value, (str, int, float)):
            raise CheckpointError(f"{path}: {column!r} must be a string, got {type(value).__name__} "
                                  f"{shown_value(value)}")
        row[column] = value
    if summary.get("checkpoint") is not None and not isinstance(summary["checkpoint"], str):
        raise CheckpointError(f"{path}: 'checkpoint' must be a path string, got {shown_value(summary['checkpoint'])}")
    row["left_out"] = ", ".join(value_problems(row, nan_is_missing=False)) or None
    for column, dtype in RESULT_COLUMNS.items():  # a count column holds <NA>, not NaN/inf; left_out says why
        if dtype == "Int64" and isinstance(row[column], float):
            row[column] = None
    row["checkpoint"] = _checkpoint_path(summary)
    return row


def _search_name(folder: Path, root: Path) -> str:
    """Name from the nearest search_meta.json from `folder` up to `root`, else `root`'s folder name."""
    for candidate in (folder, *folder.parents):
        meta = candidate / META_NAME
        if meta.is_file():
            name = read_search_meta(meta).get("name")
            if name:
                return name
        if candidate == root:
            break
    return root.name


def _checkpoint_path(summary: Mapping) -> str | None:
    checkpoint = summary.get("checkpoint")
    if not checkpoint:
        return None
    return str((Path(summary["summary_path"]).parent / checkpoint).resolve())


def _with_dtypes(frame: pd.DataFrame, dtypes: Mapping[str, str]) -> pd.DataFrame:
    for column, dtype in dtypes.items():
        if column not in frame:
            continue
        if dtype == "object":  # keep None as None (pandas would infer a str column with NaN)
            frame[column] = pd.Series([None if pd.isna(v) else v for v in frame[column]], index=frame.index,
                                      dtype=object)
            continue
        try:
            values = frame[column]
            if dtype in ("float64", "Int64"):
                values = pd.to_numeric(values)
            frame[column] = values.astype(dtype)
        except (TypeError, ValueError) as exc:
            raise DataError(f"column {column!r} cannot be read as {dtype}: {exc}") from None
    return frame


def _as_float(series: pd.Series) -> np.ndarray:
    return pd.to_numeric(series, errors="coerce").astype("float64").to_numpy()


def _as_list(sources) -> list:
    if isinstance(sources, (str, os.PathLike)):
        return [sources]
    if isinstance(sources, Iterable):
        return list(sources)
    raise DataError(f"results sources must be a path or a list of paths, got {type(sources).__name__}")

