"""Model cards (`README.md`, Hugging Face conventions) for the compressed-model folders that `export --build` writes,
so that someone who receives a folder can tell which teacher, plan, data and quality it came from without
kronsearch, and how to load it.

The card is built from what is on disk only: the trial summary (teacher, plan, quality, data, training budget) and
the folder's `kronsearch.json` (per-module specs, parameter and multiply-add counts). No torch.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping

import yaml

from kron.methods import spec_from_dict

__all__ = ["model_card"]

_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_TASK_TYPES = {"causal-lm": "text-generation", "sequence-classification": "text-classification"}
_BYTES_PER = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}


def model_card(summary: Mapping, info: Mapping, *, source: str) -> str:
    """The README.md text of a model folder built from trial `summary` (a trial_summary.json dict) whose
    kronsearch.json is `info`; `source` says where its weights came from (the trial's checkpoint, or rebuilt)."""
    config = summary.get("config") if isinstance(summary.get("config"), Mapping) else {}
    teacher = str(config.get("teacher") or "unknown")
    task = str(info.get("task") or "base")
    report = info.get("report") if isinstance(info.get("report"), Mapping) else {}
    data = _data_source(config)
    qname, quality = summary.get("quality_name"), summary.get("quality")
    methods = sorted({spec_from_dict(s).method for s in (info.get("modules") or {}).values()})
    front = {
        "library_name": "kronsearch",
        "tags": ["kronsearch", "compressed", "knowledge-distillation", *methods],
        "pipeline_tag": _TASK_TYPES.get(task),
    }
    if _HUB_NAME.match(teacher):
        front["base_model"] = teacher
    if _finite(quality):
        front["model-index"] = [{
            "name": str(summary.get("label") or summary.get("trial_id")),
            "results": [{
                "task": {"type": _TASK_TYPES.get(task, task)},
                "dataset": {"name": data, "type": data},
                "metrics": [{"type": str(qname), "value": round(float(quality), 4),
                             "name": f"{qname} ({summary.get('quality_mode')} is better)"}],
            }],
        }]
    front = {k: v for k, v in front.items() if v is not None}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", ""]
    lines.append(f"# {summary.get('label') or summary.get('trial_id')}: a compressed {info.get('model_class')}")
    lines.append("")
    where = (f"trial `{summary.get('trial_id')}` of search `{summary['search']}`" if summary.get("search")
             else f"the standalone trial `{summary.get('trial_id')}`")
    weights = "the trial's best checkpoint (distilled)" if source == "checkpoint" else source
    lines.append(f"Compressed from **{_teacher_words(teacher)}** with kronsearch "
                 f"({info.get('kronsearch_version', 'unknown version')}), {where} (method `{summary.get('method')}`). "
                 f"Weights: {weights}.")
    lines.append("")
    lines.append(f"**Plan:** {summary.get('plan_summary') or 'see plan.yaml'}.")
    lines.append("")
    lines += _counts(summary, report, info)
    lines += _quality(summary, data)
    lines += _budget(summary, config)
    lines += _modules(info)
    lines += _how_to_load(info, task)
    return "\n".join(lines).rstrip() + "\n"


def _counts(summary: Mapping, report: Mapping, info: Mapping) -> list[str]:
    params = summary.get("params") or report.get("params_after") or report.get("params")
    teacher = summary.get("params_teacher") or report.get("params_before")
    width = _BYTES_PER.get(str(info.get("dtype")), 4)
    rows = [("parameters", params, teacher),
            ("parameters excl. output embedding", summary.get("params_excl_output_embedding"),
             report.get("params_before_excluding_output_embedding")),
            ("multiply-adds per token (linear layers)", summary.get("macs_per_token"),
             summary.get("macs_per_token_teacher")),
            (f"weight bytes ({info.get('dtype', 'float32')})", _times(params, width), _times(teacher, width))]
    out = ["## Size", "", "| | this model | teacher |", "|---|---:|---:|"]
    out += [f"| {name} | {_int(a)} | {_int(b)} |" for name, a, b in rows if a is not None]
    return out + [""]


def _quality(summary: Mapping, data: str) -> list[str]:
    qname, mode = summary.get("quality_name"), summary.get("quality_mode")
    out = ["## Quality", ""]
    if not _finite(summary.get("quality")):
        return out + ["No finite quality was recorded for this trial.", ""]
    line = (f"{qname} **{float(summary['quality']):.4g}** ({mode} is better) on `{data}`, measured by kronsearch at "
            f"the end of the trial (best checkpoint)")
    if _finite(summary.get("teacher_quality")):
        line += f"; the teacher scored {float(summary['teacher_quality']):.4g} on the same data"
    if _finite(summary.get("quality_at_init")):
        line += f"; right after initialisation, before distillation: {float(summary['quality_at_init']):.4g}"
    return out + [line + ".", ""]


def _budget(summary: Mapping, config: Mapping) -> list[str]:
    out = ["## Training budget", ""]
    parts = [f"{_int(summary.get('steps'))} steps", f"{_int(summary.get('tokens_seen'))} tokens seen"]
    if _finite(summary.get("wall_time_s")):
        parts.append(f"{float(summary['wall_time_s']):.0f} s wall time on {summary.get('device') or 'unknown device'}")
    out.append("Intermediate-layer knowledge distillation from the teacher: " + ", ".join(parts) + ".")
    for stage in ("stage1", "stage2"):
        s = config.get(stage)
        if isinstance(s, Mapping):
            keep = {k: s[k] for k in ("lr", "batch_size", "seq_len", "max_steps", "max_minutes", "distill") if k in s}
            out.append(f"- {stage}: `{yaml.safe_dump(keep, default_flow_style=True, width=1000).strip()}`")
    return out + [""]


def _modules(info: Mapping) -> list[str]:
    modules = info.get("modules") or {}
    out = ["## Compressed matrices", ""]
    if not modules:
        return out + ["None: the model is dense.", ""]
    records = {r.get("name"): r for r in ((info.get("report") or {}).get("modules") or []) if isinstance(r, Mapping)}
    out += ["| module | dense (out x in) | factors | params before → after |", "|---|---|---|---|"]
    for name, d in modules.items():
        spec = spec_from_dict(d)
        rec = records.get(name, {})
        shape = rec.get("dense_shape")
        m, n = (shape if shape else (None, None))
        dense = f"{m} x {n}" if m else "?"
        counts = (f"{rec['params_before']:,} → {rec['params_after']:,}" if "params_before" in rec else "")
        out.append(f"| `{name}` | {dense} | {spec.describe(m, n)} | {counts} |")
    return out + [""]


def _how_to_load(info: Mapping, task: str) -> list[str]:
    auto = {"causal-lm": "AutoModelForCausalLM", "sequence-classification": "AutoModelForSequenceClassification"}
    cls = auto.get(task, "AutoModel")
    return ["## How to load", "", "With kronsearch (the factored model, as trained):", "", "```python",
            "from kron import load_compressed", "model = load_compressed(\"path/to/this/folder\")", "```", "",
            "As a plain dense transformers model (the factors multiplied out, so no size gain at inference):", "",
            "```bash", "kronsearch merge path/to/this/folder --out dense/", "```", "", "```python",
            f"from transformers import {cls}", f"model = {cls}.from_pretrained(\"dense/\")", "```", ""]


def _data_source(config: Mapping) -> str:
    glue = config.get("glue")
    if isinstance(glue, Mapping) and glue.get("task"):
        return f"GLUE {glue['task']} ({glue.get('split', 'dev')})"
    data = config.get("data")
    if isinstance(data, Mapping) and data.get("source"):
        return str(data["source"])
    return "unknown data"


def _teacher_words(teacher: str) -> str:
    if teacher == "demo":
        return "the demo teacher bundled with kronsearch (a 4-layer GPT-2 trained on WikiText-2)"
    return f"`{teacher}`"


def _finite(x) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def _times(x, k):
    return None if x is None else int(x) * k


def _int(x) -> str:
    return f"{int(x):,}" if _finite(x) else "-"
