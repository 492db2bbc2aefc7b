"""Baselines to Kronecker compression at equal size: layer dropping (DistilGPT2-style), and helpers for the low-rank
baseline (whose layers, plan rules and `lowrank:<factor>` preset live with the Kronecker ones, so compress / save /
load / merge treat both alike).

    student, layer_map = drop_layers(copy.deepcopy(teacher), "odd")   # keep h.1, h.3, ...: layer_map = [1, 3, ...]
    report = size_report(teacher, student)                            # the keys of CompressionReport.to_dict()
    save_layerdrop(student, "out/checkpoint", layer_map=layer_map)    # plain transformers directory

A layer-dropped model is an ordinary transformers model of the same class with fewer layers: its config says so, so
`save_pretrained` / `from_pretrained` (and `kron.models.load_model`) round-trip it without this package.
"""
from __future__ import annotations

import copy
import inspect
import json
import os
import shutil
from pathlib import Path
from typing import Mapping, Sequence

from torch import nn

from .errors import CheckpointError, PlanError
from .fsutil import atomic_dir, atomic_write_json
from .surgery import CompressionReport, count_bytes, count_params, macs_per_token
from .vocab import FAMILIES

__all__ = ["LAYERDROP_INFO", "describe_lowrank", "drop_layers", "layer_list", "parse_keep", "read_layerdrop_info",
           "save_layerdrop", "size_report"]

LAYERDROP_INFO = "layerdrop.json"  # provenance written next to config.json; loading does not need it
# Config entries holding one value per layer, subset together with the layers (Qwen2/Mistral's sliding-window
# `layer_types`; SmolLM3-style `no_rope_layers`), so the reloaded config describes the kept layers.
_PER_LAYER_CONFIG = ("layer_types", "no_rope_layers")


# ----------------------------------------------------------------------------------------------- layer dropping


def layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(dotted name, ModuleList) of the transformer layers of a GPT-2, BERT/RoBERTa or Llama-family model."""
    from .presets import model_family

    config = getattr(model, "config", None)
    if config is None:
        raise PlanError(f"cannot drop layers of a {type(model).__name__} without a transformers config")
    try:
        family = model_family(config)
    except PlanError as exc:
        raise PlanError(f"layer dropping supports GPT-2, BERT/RoBERTa and Llama-family models: {exc}") from None
    # a dotted suffix of the ModuleList's name (GPT2LMHeadModel: transformer.h; BertForSequenceClassification:
    # bert.encoder.layer; LlamaForCausalLM: model.layers)
    suffix = FAMILIES[family].layer_list
    found = [(n, m) for n, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and (n == suffix or n.endswith("." + suffix))]
    if len(found) != 1:
        names = ", ".join(n for n, _ in found) or "none"
        raise PlanError(f"expected one layer list named '{suffix}' (or '….{suffix}') in this {type(model).__name__}, "
                        f"found {names}")
    return found[0]


def parse_keep(keep, num_layers: int) -> list[int]:
    """The kept layer indices (zero-based, increasing) from "odd" (1, 3, ...), "even" (0, 2, ...) or a list."""
    if isinstance(keep, str):
        if keep not in ("odd", "even"):
            raise PlanError(f"keep must be 'odd', 'even' or a list of layer indices, got {keep!r}")
        out = list(range(1 if keep == "odd" else 0, num_layers, 2))
        if not out:
            raise PlanError(f"keep {keep!r} selects no layer of a {num_layers}-layer model")
        return out
    if (not isinstance(keep, Sequence) or isinstance(keep, (bytes, str))
            or any(isinstance(i, bool) or not isinstance(i, int) for i in keep)):
        raise PlanError(f"keep must be 'odd', 'even' or a list of layer indices, got {keep!r}")
    out = list(keep)
    if not out:
        raise PlanError(f"keep is empty: a model needs at least one layer (the teacher has layers 0-{num_layers - 1})")
    bad = [i for i in out if not 0 <= i < num_layers]
    if bad:
        raise PlanError(f"keep {out}: layers {bad} do not exist; the model has layers 0-{num_layers - 1}")
    if any(b <= a for a, b in zip(out, out[1:])):
        raise PlanError(f"keep {out}: list layer indices in increasing order, each once (the kept layers stay in the "
                        "teacher's order)")
    return out


def drop_layers(model: nn.Module, keep: list[int] | str, *, inplace: bool = True) -> tuple[nn.Module, list[int]]:
    """Keep only some transformer layers of a GPT-2, BERT/RoBERTa or Llama-family model (DistilGPT2-style).

    Args:
        model: a transformers model; its layers stay the teacher's modules and weights (a copy when inplace=False).
        keep: "odd" (layers 1, 3, ...: DistilGPT2/KnGPT2's "every other layer"), "even" (0, 2, ...) or zero-based
            layer indices in increasing order.
        inplace: modify `model`; if False a deep copy is changed and returned.
    Returns (model, layer_map) with layer_map[i] = the teacher layer now at position i (the ILKD layer_map).
    The config's layer count (n_layer / num_hidden_layers) and per-layer lists (layer_types) are updated and each
    kept layer's attention `layer_idx` is renumbered, so the KV cache works and save_pretrained + from_pretrained
    rebuild the same model.
    """
    name, layers = layer_list(model)
    keep = parse_keep(keep, len(layers))
    if not inplace:
        model = copy.deepcopy(model)
        name, layers = layer_list(model)
    n_old = len(layers)
    kept = nn.ModuleList([layers[i] for i in keep])
    for new, (old, layer) in enumerate(zip(keep, kept)):
        _renumber(layer, old, new)
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, kept)
    for cfg in _configs(model):
        for key in _PER_LAYER_CONFIG:
            value = getattr(cfg, key, None)
            if isinstance(value, (list, tuple)) and len(value) == n_old:
                setattr(cfg, key, type(value)(value[i] for i in keep))
        cfg.num_hidden_layers = len(keep)  # GPT-2's attribute_map points this at n_layer
    return model, list(keep)


def _configs(model: nn.Module) -> list:
    """The distinct config objects of a model and its submodules (a deep copy may hold more than one)."""
    seen, out = set(), []
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "num_hidden_layers") and id(cfg) not in seen:
            seen.add(id(cfg))
            out.append(cfg)
    return out


def _renumber(layer: nn.Module, old: int, new: int) -> None:
    """Give every module of a kept layer that knows its position (attention `layer_idx`, used to index the KV
    cache) the new one, as a model built with the smaller config would."""
    for mod in layer.modules():
        idx = getattr(mod, "layer_idx", None)
        if isinstance(idx, bool) or not isinstance(idx, int):
            continue
        # GPT-2 with scale_attn_by_inverse_layer_idx divides its attention scale by (layer_idx + 1) at construction
        if getattr(mod, "scale_attn_by_inverse_layer_idx", False) and isinstance(getattr(mod, "scaling", None),
                                                                                  float):
            mod.scaling = mod.scaling * (idx + 1) / (new + 1)
        mod.layer_idx = new


# ----------------------------------------------------------------------------------------------- reports


def size_report(before: nn.Module, after: nn.Module, *, init: str = "teacher") -> dict:
    """Counts of a teacher and its baseline student, with the keys of `CompressionReport.to_dict()` (no per-module
    records: nothing was factored). init: how the student's weights were initialised (layer dropping: "teacher")."""
    excl_before = count_params(before, exclude_output_embedding=True)
    excl_after = count_params(after, exclude_output_embedding=True)
    return CompressionReport(
        params_before=count_params(before),
        params_after=count_params(after),
        params_before_excluding_output_embedding=excl_before,
        params_after_excluding_output_embedding=excl_after,
        compression_ratio=excl_before / max(excl_after, 1),
        macs_per_token_before=macs_per_token(before),
        macs_per_token_after=macs_per_token(after),
        modules=[],
        init=init,
        bytes_before=count_bytes(before),
        bytes_after=count_bytes(after),
    ).to_dict()


def describe_lowrank(plan, report: Mapping) -> str:
    """One line for a low-rank baseline: "lowrank 2x on attention+FFN" for the preset, otherwise the number of
    low-rank matrices and their ranks ("lowrank: 8 matrices, rank 2-6")."""
    name = getattr(plan, "name", None) or ""
    if name.startswith("lowrank:"):
        return f"lowrank {name.partition(':')[2]}x on attention+FFN"
    ranks = [m["spec"]["lowrank_rank"] for m in report.get("modules", []) if "lowrank_rank" in (m.get("spec") or {})]
    if not ranks:
        return "lowrank: no matrix factored"
    lo, hi = min(ranks), max(ranks)
    return f"lowrank: {len(ranks)} matrices, rank {lo if lo == hi else f'{lo}-{hi}'}"


# ----------------------------------------------------------------------------------------------- saving


def save_layerdrop(model: nn.Module, dir: str | os.PathLike, *, layer_map: Sequence[int], report: Mapping | None = None,
                   tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """Write a layer-dropped model as a plain transformers directory (save_pretrained, safetensors), atomically.

    Args:
        model: from `drop_layers` (any transformers model works).
        dir: output directory; replaced if it holds an earlier one written here (it has layerdrop.json), refused if
            it holds anything else.
        layer_map: the teacher layer of each kept layer, stored in layerdrop.json with the report.
        report: the `size_report` dict to keep in layerdrop.json.
        tokenizer_dir: a directory whose tokenizer files are copied alongside.
    Reload with `transformers.AutoModel*.from_pretrained(dir)` or `kron.models.load_model(dir)`. There is no
    kronsearch.json: that file marks a `save_compressed` directory (Kronecker / low-rank modules to rebuild), and
    this one holds none.
    """
    from .io import TOKENIZER_FILES, model_folder_file

    out = Path(dir).expanduser()
    if not callable(getattr(model, "save_pretrained", None)):
        raise CheckpointError(f"cannot save a {type(model).__name__}: save_layerdrop stores transformers models")
    if out.exists():
        if not out.is_dir():
            raise CheckpointError(f"output path {out} exists and is a file")
        if any(out.iterdir()) and not (out / LAYERDROP_INFO).is_file():
            raise CheckpointError(f"output directory {out} exists, is not empty and is not a layer-dropped checkpoint; "
                                  "choose another directory")
    with atomic_dir(out, create=False, owned=lambda n: n == LAYERDROP_INFO or model_folder_file(n)) as tmp:
        kwargs = {}
        if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
            kwargs["safe_serialization"] = True  # transformers 4.x; 5.x always writes safetensors
        model.save_pretrained(str(tmp), **kwargs)
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                src = Path(tokenizer_dir) / name
                if src.is_file() and not (tmp / name).exists():
                    shutil.copy2(src, tmp / name)
        from . import __version__

        atomic_write_json(tmp / LAYERDROP_INFO, {
            "method": "layerdrop", "kronsearch_version": __version__, "model_class": type(model).__name__,
            "layer_map": [int(i) for i in layer_map], "report": dict(report) if report is not None else None,
        })
    return out


def read_layerdrop_info(dir: str | os.PathLike) -> dict:
    """The parsed layerdrop.json of a directory written by `save_layerdrop`."""
    f = Path(dir).expanduser() / LAYERDROP_INFO
    if not f.is_file():
        raise CheckpointError(f"{f} is missing: {f.parent} was not written by save_layerdrop")
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{f} is corrupt or truncated ({exc})") from None
