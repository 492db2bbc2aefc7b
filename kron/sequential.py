"""Layer by layer, in bounded memory: a model whose weights stay on disk until a layer needs them, and the
calibration statistics collected one transformer layer at a time (SparseGPT / GPTQ's `llama_sequential`,
llm-compressor's sequential onloading).

`LazyModel.open(src)` builds the model's structure with its parameters on the meta device (buffers real:
`accelerate.init_empty_weights(include_buffers=False)`) and reads tensors from its safetensors files, memory-mapped,
only when `load(prefix)` asks for a module's weights; `unload(prefix)` puts them back on the meta device. The
modules outside the transformer layers (embeddings, final norm, head) are loaded by `load_outside()`.

`sequential_stats(lazy, batches, heldout=...)` then:

1. runs the model on the calibration batches up to its first layer, whose inputs (positional and keyword:
   hidden states, attention mask, rotary position embeddings, ...) are captured per batch — the layer itself never
   runs (a stand-in raises once it has them);
2. for each layer in turn: loads its weights onto the device, runs it on every batch's inputs with forward
   pre-hooks on its linear modules accumulating S = E[x xᵀ] exactly as `kron.calibration.collect_input_stats`
   does (per batch in float32, summed in float64, padding left out), keeps its outputs as the next layer's inputs,
   and unloads it.

Memory: one layer's weights, its matrices' S (two per matrix with held-out batches) and the hidden states of the
calibration tokens (tokens x width floats), instead of the whole model and every S at once; one pass over the
data. The statistics equal `collect_input_stats` on the whole model (tested to a tolerance on tiny GPT-2, BERT and
Llama models). Only the transformer layers' matrices are collected (what plans compress; the head's input is not).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

from .calibration import (CalibStats, _Accumulator, _as_inputs, _count_tokens, _in_features, input_rows,
                          linear_modules, module_stats)
from .errors import CheckpointError, DataError, PlanError

__all__ = ["LazyModel", "sequential_stats"]


class _Captured(Exception):
    pass


class LazyModel:
    """A transformers model whose parameters live in its safetensors files until `load` asks for them (see the
    module docstring). `model`: the nn.Module (meta parameters until loaded); `layers_name`, `layers`: its
    transformer layer list (`kron.baselines.layer_list`); `loaded_bytes`: the parameter bytes on a device now."""

    def __init__(self, model: nn.Module, files: dict[str, Path], device, dtype=None):
        from .baselines import layer_list

        self.model = model
        self.device = torch.device(device)
        from .devices import parse_dtype

        self.dtype = parse_dtype(dtype)
        self.files = files  # checkpoint key -> its safetensors file
        self.layers_name, self.layers = layer_list(model)
        self._handles: dict[Path, object] = {}
        prefix = getattr(model, "base_model_prefix", "") or ""
        self._prefix = prefix + "." if prefix else ""

    @classmethod
    def open(cls, src: str | os.PathLike, *, task: str = "auto", device="cpu", dtype=None,
             trust_remote_code: bool = False) -> "LazyModel":
        """The model in folder `src` (config.json + model.safetensors, or a sharded index) with no weight read yet."""
        from accelerate import init_empty_weights

        from .models import _auto_class, _resolve_task, load_config, resolve_source

        path = Path(resolve_source(src)).expanduser()
        if not path.is_dir():
            raise CheckpointError(f"the layer-by-layer path reads a local model folder; {path} is not one")
        files: dict[str, Path] = {}
        index = path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as exc:
                raise CheckpointError(f"{index} is not a safetensors index ({exc})") from None
            files = {k: path / v for k, v in weight_map.items()}
        elif (path / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(str(path / "model.safetensors"), framework="pt") as f:
                files = {k: path / "model.safetensors" for k in f.keys()}
        else:
            raise CheckpointError(f"{path} has no model.safetensors (or index): the layer-by-layer path reads "
                                  "safetensors only")
        config = load_config(str(path), trust_remote_code=trust_remote_code)
        kwargs = {"trust_remote_code": trust_remote_code, "attn_implementation": "eager"}
        with init_empty_weights(include_buffers=False):
            model = _auto_class(_resolve_task(task, config)).from_config(config, **kwargs)
        model.tie_weights()  # a tied head shares the embedding's (meta) parameter, as the loaded model will
        model.eval().requires_grad_(False)
        return cls(model, files, device, dtype)

    def _key(self, name: str) -> str | None:
        """The checkpoint key of parameter `name` (a base model saved alone lacks the task model's prefix)."""
        if name in self.files:
            return name
        if self._prefix and name.startswith(self._prefix) and name[len(self._prefix):] in self.files:
            return name[len(self._prefix):]
        if self._prefix + name in self.files:
            return self._prefix + name
        return None

    def _tensor(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        file = self.files[key]
        if file not in self._handles:
            self._handles[file] = safe_open(str(file), framework="pt", device="cpu")
        return self._handles[file].get_tensor(key)

    def _params(self, prefix: str):
        module = self.model.get_submodule(prefix) if prefix else self.model
        for name, p in module.named_parameters(recurse=True):
            yield (f"{prefix}.{name}" if prefix else name), p

    def _set(self, full: str, value: torch.Tensor) -> None:
        owner, _, leaf = full.rpartition(".")
        module = self.model.get_submodule(owner) if owner else self.model
        module._parameters[leaf] = nn.Parameter(value, requires_grad=False)

    def load(self, prefix: str) -> None:
        """Read the weights of module `prefix` (dotted name) onto the device. A parameter the checkpoint lacks
        (a head tied to the embedding) is tied again after loading; any other is an error naming it."""
        missing = []
        for full, p in list(self._params(prefix)):
            if not p.is_meta:
                continue
            key = self._key(full)
            if key is None:
                missing.append(full)
                continue
            t = self._tensor(key)
            self._set(full, t.to(device=self.device, dtype=self.dtype or t.dtype))
        self.model.tie_weights()  # a new embedding Parameter: the tied head points at it again
        still = [n for n in missing if self.model.get_parameter(n).is_meta]
        if still:
            raise CheckpointError(f"the checkpoint has no tensor for {', '.join(still[:3])}")

    def unload(self, prefix: str) -> None:
        """Put module `prefix`'s parameters back on the meta device (their memory freed)."""
        for full, p in list(self._params(prefix)):
            if not p.is_meta:
                self._set(full, torch.empty_like(p, device="meta"))

    def load_outside(self) -> None:
        """Load every parameter outside the transformer layers (embeddings, norms, head)."""
        layer_prefix = self.layers_name + "."
        for name, _ in self.model.named_parameters():
            if not name.startswith(layer_prefix):
                owner = name.rpartition(".")[0]
                self.load(owner)

    @property
    def loaded_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters() if not p.is_meta)


def _layer_inputs(lazy: LazyModel, batches: list) -> list[tuple[list, dict, torch.Tensor | None]]:
    """Per batch, (positional args, keyword args, padding mask) the first transformer layer is called with."""
    first = lazy.layers[0]
    got: list = []

    def grab(module, args, kwargs):
        got.append((list(args), dict(kwargs)))
        raise _Captured

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    no_cache = _takes_cache(lazy.model)  # no key/value cache of every layer for every batch
    out = []
    try:
        with torch.no_grad():
            for batch in batches:
                kw, mask = _as_inputs(batch)
                kw = {k: v.to(lazy.device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
                if no_cache:
                    kw.setdefault("use_cache", False)
                got.clear()
                try:
                    lazy.model(**kw)
                except _Captured:
                    pass
                if not got:
                    raise PlanError(f"the {type(lazy.model).__name__} never called its first layer "
                                    f"({lazy.layers_name}.0): the layer-by-layer path cannot run it")
                args, kwargs = got[0]
                out.append((args, kwargs, mask.to(lazy.device) if mask is not None else None))
    finally:
        handle.remove()
    return out


def _takes_cache(model) -> bool:
    import inspect

    return "use_cache" in inspect.signature(model.forward).parameters


def _hidden(args: list, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: list, kwargs: dict, h: torch.Tensor) -> tuple[list, dict]:
    if args:
        return [h, *args[1:]], kwargs
    return args, {**kwargs, "hidden_states": h}


def _collect_layer(lazy: LazyModel, i: int, inputs: dict, heldout: bool) -> tuple[dict, dict]:
    """Layer i's matrices' statistics on `inputs` ({"fit": [...], "heldout": [...]}) and its outputs as the next
    layer's inputs (same structure), in one pass."""
    prefix = f"{lazy.layers_name}.{i}"
    layer = lazy.layers[i]
    mods = {f"{prefix}.{n}": m for n, m in linear_modules(layer).items()}
    acc: dict = {}
    state = {"mask": None, "target": "fit"}

    def hook(module, args, kwargs, name):
        acc[(name, state["target"])].add(input_rows(args, kwargs, state["mask"]))

    handles = []
    for n, m in mods.items():
        width = _in_features(m)
        acc[(n, "fit")] = _Accumulator(width, lazy.device)
        if heldout:
            acc[(n, "heldout")] = _Accumulator(width, lazy.device)
        handles.append(m.register_forward_pre_hook(
            lambda mod, args, kwargs, _n=n: hook(mod, args, kwargs, _n), with_kwargs=True))
    try:
        outputs = {}
        for target in ("fit", "heldout"):
            state["target"] = target
            outputs[target] = _run_layer(layer, inputs[target], state)
    finally:
        for h in handles:
            h.remove()
    stats = {n: module_stats(n, acc.pop((n, "fit")), acc.pop((n, "heldout")) if heldout else None) for n in mods}
    return stats, outputs


def _run_layer(layer: nn.Module, inputs: list, state: dict | None = None) -> list:
    out = []
    for args, kwargs, mask in inputs:
        if state is not None:
            state["mask"] = mask
        res = layer(*args, **kwargs)
        h = res[0] if isinstance(res, (tuple, list)) else res
        out.append((*_with_hidden(args, kwargs, h), mask))
    return out


def _start(lazy: LazyModel, batches: Iterable, heldout: Iterable | None):
    batches = list(batches)
    heldout = list(heldout) if heldout is not None else []
    if sum(_count_tokens(b) for b in batches) == 0:
        raise DataError("the calibration batches hold no tokens")
    lazy.load_outside()
    inputs = {"fit": _layer_inputs(lazy, batches), "heldout": _layer_inputs(lazy, heldout) if heldout else []}
    return batches, heldout, inputs


def sequential_stats(lazy: LazyModel, batches: Iterable, *, heldout: Iterable | None = None,
                     key: Mapping | None = None, progress=None) -> CalibStats:
    """S = E[x xᵀ] of every linear matrix of the transformer layers, one layer loaded at a time (see the module
    docstring); the same CalibStats as `kron.calibration.collect_input_stats` (in memory). progress(i, n) after
    each layer."""
    t0 = time.time()
    batches, heldout, inputs = _start(lazy, batches, heldout)
    memory, dims = {}, {}
    n_layers = len(lazy.layers)
    with torch.no_grad():
        for i in range(n_layers):
            prefix = f"{lazy.layers_name}.{i}"
            lazy.load(prefix)
            stats, inputs = _collect_layer(lazy, i, inputs, bool(heldout))
            memory.update(stats)
            dims.update({n: st.S.shape[0] for n, st in stats.items()})
            lazy.unload(prefix)
            if progress is not None:
                progress(i + 1, n_layers)
    return CalibStats(list(memory), sum(_count_tokens(b) for b in batches), sum(_count_tokens(b) for b in heldout),
                      dict(key or {}), time.time() - t0, None, memory, dims)


def sequential_compress(lazy: LazyModel, plan, batches: Iterable, *, heldout: Iterable | None = None,
                        init: str = "data", feed: str = "teacher", ridge: float | None = None,
                        split: str | None = None, progress=None):
    """The model compressed by `plan` one transformer layer at a time: each layer loaded, its matrices' statistics
    collected on its inputs, its modules replaced (`kron.surgery.apply_specs`, data-aware init), its compressed
    layers kept (the teacher's weights of the layer unloaded); the modules outside the layers (a factored
    embedding) last, data-free. feed: what the next layer's inputs are — "teacher" (the uncompressed layer's
    outputs: the statistics, and so the result, equal whole-model compression's) or "compressed" (the compressed
    layer's outputs: each layer fitted to the inputs it will see, as SparseGPT / GPTQ do). Returns (the model,
    one CompressionReport of the whole model: the counts before and after, every module's record)."""
    from .plan import KEEP
    from .surgery import CompressionReport, apply_specs, as_plan, count_bytes, count_params, default_split, macs_per_token

    if feed not in ("teacher", "compressed"):
        raise PlanError(f"feed must be 'teacher' or 'compressed', got {feed!r}")
    model = lazy.model
    resolved = as_plan(plan, getattr(model, "config", None)).resolve(model, split=split or default_split(init))
    prefix_of = lambda i: f"{lazy.layers_name}.{i}"  # noqa: E731
    before = (count_params(model), count_params(model, exclude_output_embedding=True), macs_per_token(model),
              count_bytes(model))
    batches, heldout, inputs = _start(lazy, batches, heldout)
    reports = []
    n_layers = len(lazy.layers)
    with torch.no_grad():
        for i in range(n_layers):
            p = prefix_of(i) + "."
            specs = {n: s for n, s in resolved.items() if n.startswith(p) and s != KEEP}
            lazy.load(prefix_of(i))
            stats, outputs = _collect_layer(lazy, i, inputs, bool(heldout))
            if specs:
                calib = CalibStats(list(stats), stats[next(iter(stats))].tokens, 0, {}, 0.0, None, stats,
                                   {n: st.S.shape[0] for n, st in stats.items()})
                reports.append(apply_specs(model, specs, inplace=True, init=init, calib=calib, ridge=ridge))
                model.requires_grad_(False)
                if feed == "compressed":
                    outputs = {t: _run_layer(lazy.layers[i], inputs[t]) for t in inputs}
            inputs = outputs
            if progress is not None:
                progress(i + 1, n_layers)
        outside = {n: s for n, s in resolved.items() if not n.startswith(lazy.layers_name + ".") and s != KEEP}
        if outside:
            reports.append(apply_specs(model, outside, inplace=True, init="svd"))
    after_excl = count_params(model, exclude_output_embedding=True)
    report = CompressionReport(
        params_before=before[0], params_after=count_params(model), params_before_excluding_output_embedding=before[1],
        params_after_excluding_output_embedding=after_excl, compression_ratio=before[1] / max(after_excl, 1),
        macs_per_token_before=before[2], macs_per_token_after=macs_per_token(model),
        modules=[m for r in reports for m in r.modules],
        untied_output_embedding=any(r.untied_output_embedding for r in reports), init=init,
        calib={"tokens": sum(_count_tokens(b) for b in batches), "heldout_tokens": sum(_count_tokens(b) for b in heldout),
               "key": {"layer_by_layer": True, "feed": feed}},
        notes=[n for r in reports for n in r.notes] + [f"compressed layer by layer (feed: {feed})"],
        bytes_before=before[3], bytes_after=count_bytes(model), model=model)
    return model.eval(), report
