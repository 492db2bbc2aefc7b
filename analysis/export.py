"""Pick plans out of saved search results and export them: plan YAML files, a selection record and (optionally)
ready-to-load compressed models.

    select(df, "knee")                      # the knee of the Pareto front of every complete trial together
    select(df, "best-under-params:2.5M")    # best quality with params <= 2.5M (2.5e6, 2500000, 2500k work too)
    select(df, "best-under-macs:800k")      # best quality with macs_per_token <= 800k
    select(df, "best-under-bytes:4MB")      # best quality with weight storage <= 4·10^6 bytes (4MiB: 4·2^20)
    select(df, "front")                     # every Pareto-front trial, smallest first
    export(sources, "knee", "out/")         # out/<trial_id>.plan.yaml + out/selection.json
    export(sources, "knee", "out/", build=True)  # + out/<trial_id>/, a directory written by kron.io.save_compressed

Only complete, non-baseline trials (not teacher/preset/lowrank/layerdrop rows) with a finite quality and params
take part (one with a negative or non-finite size or quality is left out, and selection.json names it); when
several sources are given they form one pool (one front). Every file is written atomically and every model
directory is assembled in a temporary sibling directory, checked, then renamed into place.

Nothing here imports torch at module level: `export(..., build=True)` imports kron's model code when it runs.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.modelcard import model_card
from analysis.pareto import knee_point, pareto_mask
from analysis.results import (
    atomic_write_text,
    column_direction,
    is_reference,
    left_out_entries,
    left_out_text,
    load_results,
    read_summary,
    usable_rows,
)
from analysis.summary_checks import shown_value
from kron.errors import CheckpointError, DataError, UserError
from kron.fsutil import atomic_dir
from kron.vocab import AXES
from kron.yamlio import dump_yaml

__all__ = ["select", "export", "parse_amount", "parse_how", "SELECTIONS", "SELECTION_NAME"]

# best-under-<axis>:N for every size axis (kron.vocab.AXES), by the axis's budget spelling
_CONSTRAINT_COLUMNS = {a.spellings[0]: a.name for a in AXES.values()}
SELECTIONS = ("knee", "front", *(f"best-under-{k}:N" for k in _CONSTRAINT_COLUMNS))
SELECTION_NAME = "selection.json"
_SCALES = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}
_AMOUNT = re.compile(r"^([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)([kmbg]?)$", re.IGNORECASE)
_BYTES = re.compile(r"^([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*(?:([kmgt])(i?))?b?$", re.IGNORECASE)
_INFO_FILE = "kronsearch.json"  # marks a directory written by kron.io.save_compressed


# --- selection ----------------------------------------------------------------------------------------------


def parse_amount(text: str) -> int:
    """A positive count from "2.5e6", "2500000", "2,500,000", "2.5M", "800k" or "1.2B" (suffixes k/M/B/G)."""
    raw = str(text)
    cleaned = raw.strip().replace(",", "").replace("_", "")
    match = _AMOUNT.fullmatch(cleaned)
    if not match:
        raise UserError(f"cannot read {raw!r} as a number; write e.g. 2.5e6, 2500000, 2.5M or 800k")
    value = float(match.group(1)) * _SCALES[match.group(2).lower()]
    if not math.isfinite(value) or value <= 0:
        raise UserError(f"the limit must be a positive number, got {raw!r}")
    return int(round(value))


def parse_bytes(text: str) -> int:
    """A positive byte count from "4MB" (4·10^6), "4MiB" (4·2^20), "500kB", "1.5G", "4e6" or "4000000"."""
    raw = str(text)
    match = _BYTES.fullmatch(raw.strip().replace(",", "").replace("_", ""))
    if not match:
        raise UserError(f"cannot read {raw!r} as a size in bytes; write e.g. 4MB, 4MiB, 500kB or 4e6")
    power = "kmgt".index(match.group(2).lower()) + 1 if match.group(2) else 0
    value = float(match.group(1)) * ((1024 if match.group(3) else 1000) ** power)
    if not math.isfinite(value) or value <= 0:
        raise UserError(f"the limit must be a positive number, got {raw!r}")
    return int(round(value))


def parse_how(how: str) -> tuple[str, str | None, int | None]:
    """("knee" | "front" | "best-under", constrained column or None, limit or None) from a selection string."""
    text = str(how).strip()
    if text in ("knee", "front"):
        return text, None, None
    kind, sep, amount = text.partition(":")
    for key, column in _CONSTRAINT_COLUMNS.items():
        if kind == f"best-under-{key}":
            if not sep or not amount.strip():
                raise UserError(f"selection {text!r} needs a limit, e.g. best-under-{key}:"
                                f"{'4MB' if key == 'bytes' else '2.5M'}")
            return "best-under", column, parse_bytes(amount) if key == "bytes" else parse_amount(amount)
    raise UserError(f"unknown selection {text!r}; expected one of {', '.join(SELECTIONS)} "
                    "(N like 2.5e6, 2500000, 2.5M or 800k)")


def select(df: pd.DataFrame, how: str) -> pd.DataFrame:
    """The rows of `df` (a `load_results` table) that `how` picks, as a new table (index reset).

    how: "knee" (one row: the knee of the front of params vs quality), "front" (every front row, by params),
    "best-under-params:N" / "best-under-macs:N" / "best-under-bytes:N" (one row: the best quality with params /
    macs_per_token / bytes <= N; bytes take 4MB, 4MiB, 500kB).
    Candidates are the complete, non-baseline trials with finite params and quality; all searches in `df` form
    one pool. Ties: the better quality, then fewer params, then fewer MACs, then the smaller search/trial id.
    Raises `UserError` when nothing qualifies, naming the constraint and the smallest available value.
    """
    kind, column, limit = parse_how(how)
    pool = _candidates(df)
    direction = column_direction(pool, "quality")
    if kind == "best-under":
        values = pd.to_numeric(pool[column], errors="coerce").astype("float64")
        known = pool[np.isfinite(values.to_numpy())]
        if known.empty:
            raise UserError(f"{how}: no complete trial records {column}")
        fits = known[pd.to_numeric(known[column]).astype("float64") <= limit]
        if fits.empty:
            smallest = known.loc[pd.to_numeric(known[column]).astype("float64").idxmin()]
            raise UserError(
                f"{how}: no complete trial has {column} <= {limit:,} ({_human(limit)}); the smallest available is "
                f"{int(smallest[column]):,} ({_human(smallest[column])}, trial {smallest['trial_id']} of search "
                f"{smallest['search']})")
        return fits.iloc[[0]].reset_index(drop=True)  # `pool` is sorted best first
    values = np.column_stack([_floats(pool["params"]), _floats(pool["quality"])])
    directions = ["min", direction]
    if kind == "knee":
        return pool.iloc[[knee_point(values, directions)]].reset_index(drop=True)
    front = pool[pareto_mask(values, directions)]
    order = np.lexsort((front["trial_id"].astype(str).to_numpy(), front["search"].astype(str).to_numpy(),
                        _floats(front["params"])))
    return front.iloc[order].reset_index(drop=True)


def _candidates(df: pd.DataFrame) -> pd.DataFrame:
    """Complete non-baseline rows with finite params and quality, sorted best quality first (see `select`)."""
    for column in ("status", "method", "params", "quality", "quality_mode", "trial_id", "search"):
        if column not in df:
            raise DataError(f"results table has no column {column!r}; was it made by analysis.results.load_results?")
    done = (df["status"] == "complete").fillna(False).astype(bool)
    complete = df[done & ~is_reference(df)]
    pool = complete[usable_rows(complete, ("params", "quality"))]
    if pool.empty:
        counts = df["status"].value_counts()
        what = ", ".join(f"{n} {status}" for status, n in counts.items()) or "none"
        baselines = int((done & is_reference(df)).sum())
        extra = f"; {baselines} complete baseline(s) (teacher/preset/lowrank/layerdrop) are not candidates" \
            if baselines else ""
        left_out = left_out_text(left_out_entries(complete, ("params", "quality")))
        extra += f"; {left_out}" if left_out else ""
        raise UserError(f"no complete trials to select from: {len(df)} trials ({what}){extra}")
    direction = column_direction(pool, "quality")
    quality = _floats(pool["quality"]) * (1.0 if direction == "min" else -1.0)
    macs = _floats(pool["macs_per_token"]) if "macs_per_token" in pool else np.zeros(len(pool))
    macs = np.where(np.isfinite(macs), macs, np.inf)
    order = np.lexsort((pool["trial_id"].astype(str).to_numpy(), pool["search"].astype(str).to_numpy(), macs,
                        _floats(pool["params"]), quality))
    return pool.iloc[order]


# --- export -------------------------------------------------------------------------------------------------


def export(sources, how: str, out_dir, *, build: bool = False) -> dict:
    """Select trials of `sources` with `how` (see `select`) and write them to `out_dir`.

    Writes `<name>.plan.yaml` per selected trial (its summary's "plan"; <name> is the trial id made file-safe,
    prefixed with the search when two selected trials share an id) and `selection.json`. With `build=True`, also
    `<name>/`, a compressed-model directory: a copy of the trial's own checkpoint when it kept one (the `checkpoint`
    folder next to its summary), else the teacher named in the summary's config compressed with the plan (SVD
    initialisation, not distilled), with a model card (README.md: teacher, plan, sizes, quality, budget, loading). Every model is loaded back with `kron.io.load_compressed` and its parameter
    count checked against the summary's `params` before it is moved into place.

    Returns the selection record written to selection.json (with "selection_path"): {"how", "sources",
    "selected": [{trial_id, search, label, params, quality, quality_name, macs_per_token, compression_ratio,
    plan_summary, plan_path, checkpoint_path, summary_path, [model_dir, model_source, model_params]}], "left_out":
    [{search, trial_id, role, reason}] (complete trials no selection may pick: `analysis.results.left_out_reasons`)}.
    """
    source_list = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    if not source_list:
        raise DataError("no results sources given")
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {str(out)!r} exists and is not a directory")
    parse_how(how)  # a bad --select rule fails before any results are read
    df = load_results(source_list)
    chosen = select(df, how)
    summaries = [read_summary(path) for path in chosen["summary_path"]]
    for summary, row in zip(summaries, chosen.itertuples()):
        if not isinstance(summary.get("plan"), dict):
            raise CheckpointError(f"{summary['summary_path']}: trial {row.trial_id} records no plan "
                                  f"(its \"plan\" is {shown_value(summary.get('plan'))}); nothing to export")
    names = _file_names(chosen)
    out.mkdir(parents=True, exist_ok=True)
    selected = []
    for (_, row), summary, name in zip(chosen.iterrows(), summaries, names):
        plan_path = atomic_write_text(out / f"{name}.plan.yaml", plan_yaml(summary["plan"]))
        entry = {
            "trial_id": str(row["trial_id"]), "search": str(row["search"]), "label": _plain(row["label"]),
            "method": _plain(row["method"]), "params": _plain(row["params"]), "quality": _plain(row["quality"]),
            "quality_name": _plain(row["quality_name"]), "quality_mode": _plain(row["quality_mode"]),
            "macs_per_token": _plain(row["macs_per_token"]), "compression_ratio": _plain(row["compression_ratio"]),
            "plan_summary": _plain(row["plan_summary"]), "plan_path": str(plan_path.resolve()),
            "checkpoint_path": _checkpoint_dir(summary, existing_only=False),
            "summary_path": str(row["summary_path"]),
        }
        if build:
            entry.update(build_model(summary, out / name))
        selected.append(entry)
    done = (df["status"] == "complete").fillna(False).astype(bool)
    record = {"how": str(how), "sources": [str(Path(s).expanduser().resolve()) for s in source_list],
              "selected": selected, "left_out": left_out_entries(df[done & ~is_reference(df)], ("params", "quality"))}
    path = atomic_write_text(out / SELECTION_NAME, json.dumps(record, indent=2) + "\n")
    return {**record, "selection_path": str(path)}


def plan_yaml(plan: dict) -> str:
    """YAML text of a plan dict in `CompressionPlan.to_yaml`'s layout (short lists inline), without torch."""
    return dump_yaml(plan)

def build_model(summary: dict, dest: Path) -> dict:
    """Write the compressed model of one trial summary into `dest` (see `export`); returns the fields
    {"model_dir", "model_source", "model_params"} for selection.json."""
    from kron.io import load_compressed
    from kron.surgery import count_params

    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or (any(dest.iterdir()) and not (dest / _INFO_FILE).is_file())):
        raise CheckpointError(f"{dest} exists and is not a kronsearch model directory; remove it or choose another "
                              "output directory")
    expected = summary.get("params")
    checkpoint = _checkpoint_dir(summary, existing_only=True)
    from kron.io import checkpoint_file

    with atomic_dir(dest, create=False, owned=lambda n: n == "README.md" or checkpoint_file(n)) as tmp:
        if checkpoint is not None:
            shutil.copytree(checkpoint, tmp)
            source = "checkpoint"
        else:
            _rebuild(summary, tmp)
            source = "rebuilt from the teacher with SVD initialisation (not distilled)"
            recorded = _checkpoint_dir(summary, existing_only=False)
            if recorded is not None:
                source += f"; the recorded checkpoint {recorded} is missing"
        teacher_dir = _teacher_dir(summary)
        if teacher_dir is not None:  # a model directory that also holds its tokenizer is usable on its own
            from kron.io import TOKENIZER_FILES

            for file in TOKENIZER_FILES:
                if (teacher_dir / file).is_file() and not (tmp / file).exists():
                    shutil.copy2(teacher_dir / file, tmp / file)
        info = json.loads((tmp / _INFO_FILE).read_text(encoding="utf-8"))
        atomic_write_text(tmp / "README.md", model_card(summary, info, source=source))
        model = load_compressed(tmp, device="cpu")
        params = count_params(model)
        del model
        if expected is not None and params != int(expected):
            what = "the trial's checkpoint" if checkpoint is not None else "the model rebuilt from teacher + plan"
            raise CheckpointError(f"{what} for trial {summary.get('trial_id')} has {params:,} parameters but its "
                                  f"summary records {int(expected):,} ({summary['summary_path']}); was the teacher "
                                  "changed since the trial ran?")
    return {"model_dir": str(dest.resolve()), "model_source": source, "model_params": params}


def _rebuild(summary: dict, tmp: Path) -> None:
    """Compress the summary's teacher with its plan (SVD init) and save it into `tmp`."""
    from kron.io import save_compressed
    from kron.models import load_model
    from kron.plan import CompressionPlan
    from kron.surgery import compress

    config = summary.get("config") if isinstance(summary.get("config"), dict) else {}
    method = summary.get("method")
    if method not in ("kronecker", "mixed"):
        raise CheckpointError(f"trial {summary.get('trial_id')} ({method}) kept no checkpoint and only search "
                              f"trials (kronecker, mixed) can be rebuilt from a plan ({summary['summary_path']})")
    teacher = config.get("teacher")
    if not teacher:
        raise CheckpointError(f"trial {summary.get('trial_id')} kept no checkpoint and its summary names no teacher "
                              f"(config.teacher) to rebuild it from ({summary['summary_path']})")
    source = _resolve_teacher(teacher)
    task = "sequence-classification" if config.get("glue") else "auto"
    model = load_model(source, task=task, device="cpu", dtype=config.get("dtype"),
                       trust_remote_code=bool(config.get("trust_remote_code", False)))
    plan = CompressionPlan.from_dict(summary["plan"])
    report = compress(model, plan, init="svd")
    save_compressed(model, plan, tmp, report=report)


def _resolve_teacher(teacher: str) -> str:
    if teacher == "demo":
        from kron.models import resolve_source

        return resolve_source(teacher)
    return teacher


def _teacher_dir(summary: dict) -> Path | None:
    config = summary.get("config") if isinstance(summary.get("config"), dict) else {}
    teacher = config.get("teacher")
    if not isinstance(teacher, str) or not teacher or teacher.startswith("config:"):
        return None
    try:
        path = Path(_resolve_teacher(teacher)).expanduser()
    except UserError:  # e.g. the demo teacher is not installed: tokenizer files are a convenience only
        return None
    return path if path.is_dir() else None


def _checkpoint_dir(summary: dict, *, existing_only: bool) -> str | None:
    """The trial's checkpoint directory (absolute), from the summary's relative `checkpoint` entry.

    A path to a file inside a checkpoint directory (older summaries) is taken as its folder. With
    `existing_only`, None unless the directory holds a kronsearch checkpoint.
    """
    entry = summary.get("checkpoint")
    if not entry:
        return None
    path = (Path(summary["summary_path"]).parent / entry).resolve()
    if path.suffix and not path.is_dir():  # "checkpoint/model.safetensors"
        path = path.parent
    if existing_only and not (path / _INFO_FILE).is_file():
        return None
    return str(path)


def _file_names(chosen: pd.DataFrame) -> list[str]:
    ids = [_safe(t) for t in chosen["trial_id"]]
    duplicated = {name for name in ids if ids.count(name) > 1}
    return [f"{_safe(s)}__{name}" if name in duplicated else name for s, name in zip(chosen["search"], ids)]


def _safe(text) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._") or "trial"
    return name[:120]


def _plain(value):
    """A JSON-ready Python scalar (None for missing values)."""
    if value is None or value is pd.NA:
        return None
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def _floats(values) -> np.ndarray:
    return pd.to_numeric(pd.Series(values), errors="coerce").astype("float64").to_numpy()


def _human(value) -> str:
    value = float(value)
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"
