"""Saving and loading compressed models; merging them back into plain dense transformers models.

A compressed-model directory holds:
    model.safetensors   every tensor of the compressed model, shared (tied) tensors stored once
    config.json         the base architecture's transformers config (untied if compression untied it)
    plan.yaml           the compression plan that was applied
    kronsearch.json     format version, model class, task, dtype, the per-module specs needed to rebuild the
                        structure, the compression report, and the size + sha256 of model.safetensors
It is written into a temporary sibling directory and renamed into place, so a reader never sees half of one.
`load_compressed` rebuilds the architecture from config.json (no teacher weights, no network), re-applies the
Kronecker structure and loads the tensors strictly.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError
from .fsutil import atomic_dir, atomic_write_json, atomic_write_text
from . import methods
from .methods.base import structure_of
from .plan import CompressionPlan, ModuleSpec, PlanError
from .surgery import (SOURCE_ATTR, CompressionReport, apply_specs, count_params, is_factored, macs_per_token,
                      source_types, specs_from_model)

__all__ = ["FORMAT", "FORMAT_VERSION", "TOKENIZER_FILES", "checkpoint_file", "load_compressed", "merge",
           "model_folder_file", "read_info", "save_compressed"]

FORMAT = "kronsearch.compressed"
FORMAT_VERSION = 1
WEIGHTS, CONFIG, PLAN, INFO = "model.safetensors", "config.json", "plan.yaml", "kronsearch.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "vocab.txt", "tokenizer.model", "added_tokens.json", "generation_config.json")
# what a saved model's config may name as its attention (transformers' implementations)
_ATTN_IMPLEMENTATIONS = frozenset({"eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention",
                                   "paged_attention"})
# what transformers' save_pretrained writes (one file, or shards and their index) beside the config
_HF_WEIGHTS = re.compile(r"model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json")


def checkpoint_file(name: str) -> bool:
    """Whether `name` is a file `save_compressed` writes into a model folder (the only ones it replaces)."""
    return name in (WEIGHTS, CONFIG, PLAN, INFO, *TOKENIZER_FILES)


def model_folder_file(name: str) -> bool:
    """Whether `name` is a file of a transformers model folder that kronsearch writes (merge, layer dropping): the
    config, the weights (or their shards and index), the tokenizer."""
    return name == CONFIG or name in TOKENIZER_FILES or _HF_WEIGHTS.fullmatch(name) is not None


def _task_of_class(name: str) -> str:
    if name.endswith(("LMHeadModel", "ForCausalLM")):
        return "causal-lm"
    if name.endswith("ForSequenceClassification"):
        return "sequence-classification"
    return "base"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _model_dtype(model: nn.Module) -> str:
    dtypes = [p.dtype for p in model.parameters() if p.is_floating_point()]
    dtype = max(set(dtypes), key=dtypes.count) if dtypes else torch.float32
    return str(dtype).removeprefix("torch.")


def save_compressed(model: nn.Module, plan: CompressionPlan | None, dir: str | os.PathLike, *,
                    report: CompressionReport | dict | None = None, task: str | None = None,
                    tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """Write a compressed transformers model to `dir` atomically (see the module docstring); returns the path.

    Args:
        model: a model compressed with `kron.compress` (an uncompressed model is saved as is).
        plan: the plan that was applied (stored as plan.yaml); None stores a plan of the model's exact modules.
        dir: output directory; replaced if it holds an earlier kronsearch checkpoint and nothing else, refused if it
            holds anything else (a user's file in it is never deleted).
        report: the CompressionReport (or its dict) to keep in kronsearch.json; when None, the current counts.
        task: "causal-lm", "sequence-classification" or "base"; default from the model's class name.
        tokenizer_dir: a directory whose tokenizer files are copied alongside (so evaluation needs no teacher).
    """
    out = Path(dir).expanduser()
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        raise CheckpointError(f"cannot save a {type(model).__name__} without a transformers config: "
                              "save_compressed stores transformers models")
    if any(p.device.type == "meta" for p in model.parameters()):
        raise CheckpointError("cannot save a model on the meta device (it has no weights)")
    if out.exists():
        if not out.is_dir():
            raise CheckpointError(f"output path {out} exists and is a file")
        if any(out.iterdir()) and not (out / INFO).is_file():
            raise CheckpointError(f"output directory {out} exists, is not empty and is not a kronsearch checkpoint; "
                                  "choose another directory")
    specs = specs_from_model(model)
    if plan is None:
        plan = CompressionPlan.from_resolved(specs, description="the exact modules of a saved model")
    if isinstance(report, CompressionReport):
        report = report.to_dict()
    if report is None:
        report = {"params": count_params(model),
                  "params_excluding_output_embedding": count_params(model, exclude_output_embedding=True),
                  "macs_per_token": macs_per_token(model)}
    cls_name = type(model).__name__
    with atomic_dir(out, owned=checkpoint_file) as tmp:
        from safetensors.torch import save_model

        weights = tmp / WEIGHTS
        save_model(model, str(weights), metadata={"format": "pt"})  # de-duplicates shared (tied) tensors
        with open(weights, "rb+") as fh:
            os.fsync(fh.fileno())
        atomic_write_text(tmp / CONFIG, config.to_json_string(use_diff=False))
        atomic_write_text(tmp / PLAN, plan.to_yaml())
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                src = Path(tokenizer_dir) / name
                if src.is_file():
                    shutil.copy2(src, tmp / name)
        from . import __version__

        info = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kronsearch_version": __version__,
            "model_class": cls_name,
            "task": task or _task_of_class(cls_name),
            "dtype": _model_dtype(model),
            "attn_implementation": getattr(config, "_attn_implementation", None),
            "modules": {name: spec.to_dict() for name, spec in specs.items()},
            "source_types": source_types(model),
            # every method a spec uses: a modifier's (int8) and the structure it wraps (prune under int8)
            "methods": {m: methods.get_method(m).spec_type.version
                        for m in sorted({x.method for s in specs.values() for x in (s, structure_of(s))})},
            "report": report,
            "files": {WEIGHTS: {"bytes": weights.stat().st_size, "sha256": _sha256(weights)}},
        }
        atomic_write_json(tmp / INFO, info)
    return out


def read_info(dir: str | os.PathLike) -> dict:
    """The parsed kronsearch.json of a compressed-model directory (CheckpointError if missing or corrupt)."""
    path = Path(dir).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"compressed-model directory {path} does not exist")
    f = path / INFO
    if not f.is_file():
        raise CheckpointError(f"{f} is missing: {path} is not a kronsearch checkpoint (written by save_compressed)")
    try:
        info = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{f} is corrupt or truncated ({exc})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise CheckpointError(f"{f} is not a kronsearch checkpoint description (format != {FORMAT!r})")
    version = info.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{f} has format_version {version!r}; this kronsearch reads up to {FORMAT_VERSION}")
    for key in ("model_class", "modules"):
        if key not in info:
            raise CheckpointError(f"{f} is incomplete: no {key!r}")
    if not isinstance(info["modules"], dict) or not isinstance(info["model_class"], str):
        raise CheckpointError(f"{f} is corrupt: 'modules' must be a mapping and 'model_class' a class name")
    used = info.get("methods") or {}
    if not isinstance(used, dict):
        raise CheckpointError(f"{f} is corrupt: 'methods' must map method names to spec versions")
    for name, version in used.items():
        try:
            method = methods.get_method(name)
        except PlanError as exc:
            raise CheckpointError(f"{f}: {exc} (a newer release wrote it?)") from None
        newest = method.spec_type.version
        if isinstance(version, bool) or not isinstance(version, int) or version > newest:
            raise CheckpointError(f"{f} uses method {name!r} at version {version!r}; this kronsearch reads it up to "
                                  f"version {newest} (a newer release wrote it?)")
    attn = info.get("attn_implementation")
    if attn is not None and (not isinstance(attn, str) or attn not in _ATTN_IMPLEMENTATIONS):
        raise CheckpointError(f"{f}: attn_implementation {attn!r} is not one of "
                              f"{', '.join(sorted(_ATTN_IMPLEMENTATIONS))}")
    return info


def _new_model(cls, config, dtype):
    """An instance of the architecture without spending time on random initialisation (all weights are loaded
    afterwards); buffers such as rotary frequencies are still computed by the constructors."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            no_init_weights = None
    kwargs = {"dtype": dtype} if dtype is not None else {}
    if no_init_weights is None:
        model = cls._from_config(config, **kwargs)
    else:
        with no_init_weights():
            model = cls._from_config(config, **kwargs)
    if callable(getattr(model, "tie_weights", None)):
        model.tie_weights()  # no_init_weights also skips the tying done in init_weights
    return model


def load_compressed(dir: str | os.PathLike, device=None, *, dtype=None, verify: bool = True) -> nn.Module:
    """Rebuild a model written by `save_compressed` (eval mode) on `device` ("auto"/None: cuda when available).

    Needs neither the teacher's weights nor network. dtype: None keeps the saved dtype. verify: check the weight
    file's size and sha256 against kronsearch.json first. The plan and info are attached as `model.kron_plan` and
    `model.kron_info`.
    """
    import transformers
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    from .devices import parse_dtype, pick_device

    path = Path(dir).expanduser()
    info = read_info(path)
    for name in (CONFIG, WEIGHTS):
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name} is missing: the checkpoint in {path} is incomplete")
    weights = path / WEIGHTS
    expected = (info.get("files") or {}).get(WEIGHTS) or {}
    if verify and expected:
        size = weights.stat().st_size
        if "bytes" in expected and size != expected["bytes"]:
            raise CheckpointError(f"{weights} is truncated or was replaced: {size:,} bytes, expected "
                                  f"{expected['bytes']:,}")
        if "sha256" in expected and _sha256(weights) != expected["sha256"]:
            raise CheckpointError(f"{weights} is corrupt: its sha256 does not match kronsearch.json")
    plan = None
    if (path / PLAN).is_file():
        try:
            plan = CompressionPlan.load(path / PLAN)
        except PlanError as exc:
            raise CheckpointError(f"{path / PLAN} is corrupt: {exc}") from None
    try:
        config = transformers.AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path / CONFIG} is corrupt or not a transformers config: "
                              f"{' '.join(str(exc).split())[:300]}") from None
    cls = getattr(transformers, info["model_class"], None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise CheckpointError(f"{path / INFO}: model class {info['model_class']!r} is not a transformers model class "
                              f"in this transformers {transformers.__version__}")
    if info.get("attn_implementation"):
        config._attn_implementation = info["attn_implementation"]
    saved_dtype = parse_dtype(info.get("dtype"))
    model = _new_model(cls, config, saved_dtype)
    try:
        specs = {n: ModuleSpec.from_dict(s) for n, s in info["modules"].items()}
        apply_specs(model, specs, init="none")
    except PlanError as exc:
        raise CheckpointError(f"{path / INFO}: its module specs do not fit {info['model_class']} built from "
                              f"config.json: {exc}") from None
    try:
        load_model(model, str(weights), strict=True)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights} is corrupt or truncated: {' '.join(str(exc).split())[:300]}") from None
    except RuntimeError as exc:  # missing / unexpected / mis-shaped tensors
        raise CheckpointError(f"{weights} does not match the architecture in {path / CONFIG}: "
                              f"{' '.join(str(exc).split())[:400]}") from None
    model.to(pick_device(device))
    dtype = parse_dtype(dtype)
    if dtype is not None:
        model.to(dtype)
    model.kron_plan = plan
    model.kron_info = info
    return model.eval()


# ----------------------------------------------------------------------------------------------- merge


@torch.no_grad()
def merge(model: nn.Module, *, inplace: bool = True) -> nn.Module:
    """Replace every Kronecker (or low-rank U·V) module by the dense module it stands for (nn.Linear, GPT-2's Conv1D
    in its (in, out) orientation, nn.Embedding) holding `to_dense()`, so that transformers' save_pretrained /
    from_pretrained work without kronsearch. The LM head stays untied from the input embedding (their values
    differ). A pruned model (`prune`, int8 or not: int8 weights are dequantised) becomes plain smaller modules, its
    config updated where the config can describe the pruned widths (`Method.merge_config`); PlanError, before
    anything changes, where it cannot."""
    import copy

    # config entries the merged model needs (a pruned FFN's width...): asked first, so a structure the config cannot
    # describe raises before anything changes
    used = {methods.method_of_module(m).name: methods.method_of_module(m) for m in model.modules() if is_factored(m)}
    config_updates: dict = {}
    for method in used.values():
        config_updates.update(method.merge_config(model))
    if not inplace:
        model = copy.deepcopy(model)
    has_conv1d = any(type(m).__name__ == "Conv1D" for m in model.modules())
    done: list[str] = []
    for name, mod in list(model.named_modules()):
        if not is_factored(mod) or any(name.startswith(d + ".") for d in done):
            continue
        source = getattr(mod, SOURCE_ATTR, None)
        if "embedding" in methods.method_of_module(mod).module_kinds:
            W = mod.to_dense()
            dense = nn.Embedding(mod.num_embeddings, mod.embedding_dim, padding_idx=mod.padding_idx,
                                 device=W.device, dtype=W.dtype)
            dense.weight.copy_(W)
        else:
            W = mod.to_dense()  # (out, in)
            out_f, in_f = W.shape
            bias = mod.bias
            if source == "Conv1D" or (source is None and has_conv1d):
                from transformers.pytorch_utils import Conv1D

                dense = Conv1D(out_f, in_f).to(device=W.device, dtype=W.dtype)
                dense.weight.copy_(W.T)
                if bias is not None:
                    dense.bias.copy_(bias)
                else:
                    dense.bias.zero_()
            else:
                dense = nn.Linear(in_f, out_f, bias=bias is not None, device=W.device, dtype=W.dtype)
                dense.weight.copy_(W)
                if bias is not None:
                    dense.bias.copy_(bias)
        dense.train(mod.training)
        dense.requires_grad_(any(p.requires_grad for p in mod.parameters()))
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, dense)
        done.append(name)
    for key, value in config_updates.items():
        setattr(model.config, key, value)
    for attr in ("kron_plan", "kron_info"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model

