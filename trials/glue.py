"""GLUE tasks: a spec table, loaders (datasets hub or the original GLUE TSV layout), encoding and metrics.

Local directories use the layout written by GLUE's `download_glue_data.py`: `<TASK>/train.tsv` and
`<TASK>/dev.tsv` (MNLI: `dev_matched.tsv`), read with `csv` and QUOTE_NONE because sentences contain bare
quote characters. CoLA has no header (source, label, original label, sentence); MRPC's header starts with a
UTF-8 BOM; the others are found by header name. Labels follow the HF `glue` datasets' ids, so a model
fine-tuned on either source gives the same predictions. Metrics use scikit-learn / scipy only.
"""
from __future__ import annotations

import csv
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from kron.errors import ConfigError, DataError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task: where its text and labels live, and how it is scored."""

    name: str  # canonical short name: "sst2"
    hub_config: str  # config of the `glue` hub dataset
    dir_names: tuple[str, ...]  # directory names in a local GLUE checkout ("SST-2")
    hub_columns: tuple[str, ...]  # text columns of the hub dataset (1 or 2)
    tsv_columns: tuple  # text columns of the TSV: header names, or int positions when headerless
    tsv_label: str | int  # label column of the TSV
    labels: tuple[str, ...] | None  # class names by id; None for regression
    metrics: tuple[str, ...]
    main_metric: str
    has_header: bool = True
    dev_file: str = "dev.tsv"
    skip_malformed: bool = False  # QQP's train.tsv has a few broken rows that every reader skips

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def is_pair(self) -> bool:
        return len(self.hub_columns) == 2


TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in (
        GlueTask("cola", "cola", ("CoLA",), ("sentence",), (3,), 1, ("unacceptable", "acceptable"),
                 ("matthews_corr", "accuracy"), "matthews_corr", has_header=False),
        GlueTask("sst2", "sst2", ("SST-2", "SST2"), ("sentence",), ("sentence",), "label", ("negative", "positive"),
                 ("accuracy",), "accuracy"),
        GlueTask("mrpc", "mrpc", ("MRPC",), ("sentence1", "sentence2"), ("#1 String", "#2 String"), "Quality",
                 ("not_equivalent", "equivalent"), ("f1", "accuracy"), "f1"),
        GlueTask("qqp", "qqp", ("QQP",), ("question1", "question2"), ("question1", "question2"), "is_duplicate",
                 ("not_duplicate", "duplicate"), ("f1", "accuracy"), "f1", skip_malformed=True),
        GlueTask("stsb", "stsb", ("STS-B", "STSB"), ("sentence1", "sentence2"), ("sentence1", "sentence2"), "score",
                 None, ("pearson", "spearman"), "pearson"),
        GlueTask("mnli", "mnli", ("MNLI",), ("premise", "hypothesis"), ("sentence1", "sentence2"), "gold_label",
                 ("entailment", "neutral", "contradiction"), ("accuracy",), "accuracy",
                 dev_file="dev_matched.tsv"),
        GlueTask("qnli", "qnli", ("QNLI",), ("question", "sentence"), ("question", "sentence"), "label",
                 ("entailment", "not_entailment"), ("accuracy",), "accuracy"),
        GlueTask("rte", "rte", ("RTE",), ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label",
                 ("entailment", "not_entailment"), ("accuracy",), "accuracy"),
        GlueTask("wnli", "wnli", ("WNLI",), ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label",
                 ("not_entailment", "entailment"), ("accuracy",), "accuracy"),
    )
}
_EXTRA_ALIASES = {"stsbenchmark": "stsb", "mnlim": "mnli", "mnlimatched": "mnli", "sst": "sst2"}


def get_task(task: str | GlueTask) -> GlueTask:
    """The spec of a task named in any common spelling (sst2, SST-2, sst-2, STS-B, stsb, CoLA, ...)."""
    if isinstance(task, GlueTask):
        return task
    key = "".join(ch for ch in str(task).lower() if ch.isalnum())
    key = _EXTRA_ALIASES.get(key, key)
    if key not in TASKS:
        raise ConfigError(f"unknown GLUE task {task!r}; valid: {', '.join(TASKS)}")
    return TASKS[key]


def main_metric(task: str | GlueTask) -> tuple[str, str]:
    """(metric name, direction) used to rank models on `task`; every GLUE metric is maximised."""
    return get_task(task).main_metric, "max"


@dataclass
class GlueExample:
    text_a: str
    text_b: str | None
    label: float | int | None  # None for unlabelled test rows


# -------------------------------------------------------------------------------------------- loading


def _split_kind(split: str) -> str:
    s = split.lower()
    if s == "train":
        return "train"
    if s in ("dev", "valid", "validation", "val", "dev_matched", "validation_matched"):
        return "dev"
    if s in ("dev_mismatched", "validation_mismatched"):
        return "dev_mismatched"
    if s == "test":
        return "test"
    raise ConfigError(f"unknown GLUE split {split!r}; valid: train, dev (validation), test")


def _task_dir(spec: GlueTask, source: Path) -> Path:
    """`source` is the task directory itself, or a GLUE root holding it."""
    for name in spec.dir_names + (spec.name, spec.name.upper()):
        if (source / name).is_dir():
            return source / name
    return source


def _tsv_file(spec: GlueTask, directory: Path, kind: str) -> Path:
    name = {"train": "train.tsv", "dev": spec.dev_file, "dev_mismatched": "dev_mismatched.tsv", "test": "test.tsv"}
    path = directory / name[kind]
    if not path.is_file():
        raise DataError(
            f"no {kind} file for GLUE task {spec.name}: {path} does not exist "
            f"(expected the GLUE layout <dir>/{spec.dir_names[0]}/{name[kind]} or <dir>/{name[kind]})"
        )
    return path


def _parse_label(spec: GlueTask, raw: str, where: str):
    raw = raw.strip()
    if spec.is_regression:
        try:
            return float(raw)
        except ValueError:
            raise DataError(f"{where}: score {raw!r} is not a number") from None
    if raw in spec.labels:
        return spec.labels.index(raw)
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if not 0 <= value < spec.num_labels:
        raise DataError(f"{where}: label {raw!r} is not one of {list(spec.labels)} or 0..{spec.num_labels - 1}")
    return value


def read_glue_tsv(task: str | GlueTask, path: str | os.PathLike, *, require_labels: bool = True) -> list[GlueExample]:
    """Examples of one GLUE TSV file in the original layout (test files, without labels: require_labels=False)."""
    spec = get_task(task)
    path = Path(path)
    if not path.is_file():
        raise DataError(f"GLUE file {path} does not exist")
    examples: list[GlueExample] = []
    skipped = 0
    csv.field_size_limit(sys.maxsize)
    # utf-8-sig drops MRPC's byte-order mark, so its first header cell reads "Quality"
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if spec.has_header:
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path} is empty")
            header = [h.strip() for h in header]
            missing = [c for c in spec.tsv_columns if c not in header]
            if missing:
                raise DataError(f"{path}: header {header} lacks column(s) {missing} needed for {spec.name}")
            text_idx = [header.index(c) for c in spec.tsv_columns]
            label_idx = header.index(spec.tsv_label) if spec.tsv_label in header else None  # test files: no label
            if label_idx is None and require_labels:
                raise DataError(f"{path}: header {header} has no label column {spec.tsv_label!r} for {spec.name}")
            width = len(header)
        else:
            text_idx, label_idx, width = list(spec.tsv_columns), spec.tsv_label, 4
        for lineno, row in enumerate(reader, start=2 if spec.has_header else 1):
            if not row or row == [""]:
                continue
            need = max(text_idx + ([label_idx] if label_idx is not None else [])) + 1
            if len(row) < need:
                if spec.skip_malformed:
                    skipped += 1
                    continue
                raise DataError(f"{path}:{lineno}: {len(row)} columns, expected {width} for {spec.name}")
            texts = [row[i] for i in text_idx]
            label = None if label_idx is None else _parse_label(spec, row[label_idx], f"{path}:{lineno}")
            examples.append(GlueExample(texts[0], texts[1] if len(texts) > 1 else None, label))
    if skipped:
        warnings.warn(f"{path}: skipped {skipped} malformed row(s)", stacklevel=2)
    return examples


def load_glue(
    task: str | GlueTask,
    source: str | os.PathLike | None = None,
    split: str = "train",
    *,
    cache_dir: str | os.PathLike | None = None,
    max_examples: int | None = None,
) -> list[GlueExample]:
    """Examples (text_a, text_b or None, label) of one split of a GLUE task.

    `source`: a local directory in the GLUE TSV layout (the task directory, or the GLUE root holding it), or
    None / "glue" for the `glue` dataset of the datasets hub (needs network). `split`: train, dev
    (validation; MNLI: matched), dev_mismatched, test.
    """
    spec = get_task(task)
    kind = _split_kind(split)
    if source is None or str(source) in ("glue", "nyu-mll/glue"):
        examples = _load_hub(spec, kind, str(source or "glue"), cache_dir)
    else:
        root = Path(source).expanduser()
        if not root.is_dir():
            raise DataError(f"GLUE data directory {root} does not exist")
        examples = read_glue_tsv(spec, _tsv_file(spec, _task_dir(spec, root), kind), require_labels=kind != "test")
    if not examples:
        raise DataError(f"the {split} split of GLUE {spec.name} in {source or 'the hub'} is empty")
    return examples[:max_examples] if max_examples is not None else examples


def _load_hub(spec: GlueTask, kind: str, name: str, cache_dir) -> list[GlueExample]:
    import datasets

    hub_split = {"train": "train", "dev": "validation", "dev_mismatched": "validation_mismatched", "test": "test"}[kind]
    if spec.name == "mnli" and hub_split == "validation":
        hub_split = "validation_matched"
    try:
        ds = datasets.load_dataset(name, spec.hub_config, split=hub_split, cache_dir=cache_dir)
    except Exception as exc:
        raise DataError(
            f"could not load GLUE {spec.name} ({hub_split}) from the datasets hub: {type(exc).__name__}: {exc}; "
            "pass a local directory in the GLUE TSV layout instead"
        ) from exc
    cols = [list(ds[c]) for c in spec.hub_columns]
    labels = list(ds["label"])
    return [
        GlueExample(cols[0][i], cols[1][i] if len(cols) > 1 else None, None if labels[i] == -1 else labels[i])
        for i in range(len(labels))
    ]


# ------------------------------------------------------------------------------------------- encoding


def _pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id", "sep_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def encode_glue(examples: Sequence[GlueExample], tokenizer, max_len: int = 128) -> dict[str, "torch.Tensor"]:
    """input_ids / attention_mask (/ token_type_ids) / labels tensors, right-padded to the longest example.

    Padding uses the tokenizer's pad token, else EOS (GPT-2 has no pad token). Sentence pairs use the
    tokenizer's own pair template ([CLS] a [SEP] b [SEP]); tokenizers without a SEP token get `a EOS b`.
    Labels are float for regression (STS-B), long otherwise; unlabelled rows get -100.
    """
    import torch

    if max_len < 2:
        raise ConfigError(f"max_len must be >= 2, got {max_len}")
    rows: list[list[int]] = []
    type_rows: list[list[int]] | None = []
    has_sep = getattr(tokenizer, "sep_token_id", None) is not None
    sep = getattr(tokenizer, "eos_token_id", None)
    for ex in examples:
        if ex.text_b is None or has_sep:
            enc = tokenizer(ex.text_a, ex.text_b, truncation=True, max_length=max_len)
            rows.append(list(enc["input_ids"]))
            if type_rows is not None and "token_type_ids" in enc:
                type_rows.append(list(enc["token_type_ids"]))
            else:
                type_rows = None
        else:
            a = tokenizer(ex.text_a, add_special_tokens=False)["input_ids"]
            b = tokenizer(ex.text_b, add_special_tokens=False)["input_ids"]
            budget = max_len - (1 if sep is not None else 0)
            while len(a) + len(b) > budget:  # longest-first truncation
                if len(a) >= len(b):
                    a = a[:-1]
                else:
                    b = b[:-1]
            rows.append(a + ([sep] if sep is not None else []) + b)
            type_rows = None
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), _pad_id(tokenizer), dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        attention_mask[i, : len(r)] = 1
    if any(ex.label is not None and isinstance(ex.label, float) for ex in examples):
        labels = torch.tensor([float("nan") if ex.label is None else float(ex.label) for ex in examples])
    else:
        labels = torch.tensor([-100 if ex.label is None else int(ex.label) for ex in examples], dtype=torch.long)
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if type_rows:
        token_type_ids = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(type_rows):
            token_type_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        out["token_type_ids"] = token_type_ids
    return out


# -------------------------------------------------------------------------------------------- metrics


def glue_metrics(task: str | GlueTask, predictions, labels) -> dict[str, float]:
    """The task's metrics: accuracy, F1 (MRPC/QQP, positive class 1), Matthews corr (CoLA), Pearson/Spearman.

    `predictions`: class ids, or logits of shape (n, num_labels) (argmax is taken); for STS-B, scores of
    shape (n,) or (n, 1).
    """
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    spec = get_task(task)
    preds = np.asarray(_to_numpy(predictions))
    gold = np.asarray(_to_numpy(labels))
    if spec.is_regression:
        preds = preds.reshape(len(preds), -1)[:, 0].astype(float) if preds.ndim > 1 else preds.astype(float)
        gold = gold.astype(float)
    else:
        if preds.ndim == 2:
            preds = preds.argmax(axis=-1)
        preds, gold = preds.astype(int), gold.astype(int)
    if preds.shape != gold.shape or len(gold) == 0:
        raise DataError(f"{spec.name}: {preds.shape[0]} predictions for {gold.shape[0]} labels")
    out: dict[str, float] = {}
    for metric in spec.metrics:
        if metric == "accuracy":
            out[metric] = float(accuracy_score(gold, preds))
        elif metric == "f1":
            out[metric] = float(f1_score(gold, preds, pos_label=1, average="binary", zero_division=0))
        elif metric == "matthews_corr":
            out[metric] = float(matthews_corrcoef(gold, preds))
        elif metric in ("pearson", "spearman"):
            fn = pearsonr if metric == "pearson" else spearmanr
            # a constant prediction has no correlation; report 0 rather than NaN so ranking still works
            out[metric] = 0.0 if np.std(preds) == 0 or np.std(gold) == 0 else float(fn(preds, gold)[0])
    return out


def _to_numpy(x):
    if hasattr(x, "detach"):
        return x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return x
