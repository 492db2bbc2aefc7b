"""Module surgery: swap a model's linear layers and embeddings for Kronecker ones (or, for the low-rank baseline,
U·V ones), following a plan.

The pattern is peft's: resolve the plan against `named_modules()` first (so every error is raised before the
model changes), then replace each selected module through its parent (`get_submodule` + `setattr`), keeping
device, dtype, train/eval mode and `requires_grad`.

Tied embeddings: GPT-2 (and Llama checkpoints with `tie_word_embeddings`) share the input embedding with the
LM head. When either side is compressed, the head keeps a dense copy of the original table as its own
Parameter and the config is untied (`tie_word_embeddings=False`), as in KnGPT2, where the output embedding
stays dense and is left out of the parameter counts.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Mapping

import torch
from torch import nn

from . import methods
from .errors import PlanError
from .methods import ModuleSpec, Slot
from .methods.base import structure_of, with_structure
from .modules import dense_dims, module_type
from .plan import KEEP, CompressionPlan, check_together

__all__ = [
    "CompressionReport",
    "ModuleRecord",
    "apply_specs",
    "as_plan",
    "compress",
    "count_bytes",
    "count_params",
    "default_split",
    "input_embedding",
    "is_factored",
    "is_kronecker",
    "macs_per_token",
    "output_embedding",
    "output_embedding_params",
    "source_types",
    "specs_from_model",
]

SOURCE_ATTR = "kron_source_type"  # the dense type a factored module replaced ("Linear", "Conv1D", "Embedding")


def _factored_types() -> tuple[type, ...]:
    return tuple(t for m in methods.all_methods() for t in m.layer_types())


def is_kronecker(module: nn.Module) -> bool:
    """Whether a module is one of the Kronecker methods' layers (linear or embedding)."""
    m = methods.method_of_module(module)
    return m is not None and m.name in ("kronecker", "kron_embedding")


def is_factored(module: nn.Module) -> bool:
    """Whether a module is one kronsearch put in place of a dense one, by any registered method."""
    return isinstance(module, _factored_types())


# ----------------------------------------------------------------------------------------------- counting


def count_params(model: nn.Module, *, exclude_output_embedding: bool = False) -> int:
    """Parameters of a model, each tensor counted once however many modules share it (tied embeddings).

    exclude_output_embedding: leave out the LM head's weight (the papers' "excluding the output embedding")
        unless it is tied to the input embedding, in which case the shared table is counted once, as the input
        embedding.
    """
    total = sum(p.numel() for p in _unique_params(model))
    total += stored_weight_count(model)
    if exclude_output_embedding:
        total -= output_embedding_params(model)
    return total


def stored_weight_count(model: nn.Module) -> int:
    """Weights kept as buffers, not Parameters, counted as parameters: the elements a module reports with
    `stored_weight_count()` (quantised layers: the logical element count of their int8 or packed 4-bit weights,
    whatever the storage's own element count)."""
    total = 0
    for mod in model.modules():
        get = getattr(mod, "stored_weight_count", None)
        if callable(get):
            total += int(get())
    return total


def count_bytes(model: nn.Module) -> int:
    """Bytes of the model's weight storage: every tensor of its state dict (parameters, int8 weights and their
    scales, persistent buffers) counted once, element count x element size (float32: 4, int8: 1)."""
    seen: set[int] = set()
    total = 0
    for t in model.state_dict(keep_vars=True).values():
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def float_width(model: nn.Module) -> int:
    """Bytes per element of the model's most common floating-point parameter dtype (float32: 4); 4 for a model
    without any."""
    sizes = [p.element_size() for p in model.parameters() if p.is_floating_point()]
    return max(set(sizes), key=sizes.count) if sizes else 4


def _unique_params(model: nn.Module):
    seen: set[int] = set()
    for p in model.parameters():  # parameters() already skips repeats; the id set also covers re-registered views
        if id(p) not in seen:
            seen.add(id(p))
            yield p


def _embedding(model: nn.Module, getter: str) -> nn.Module | None:
    """model.get_input_embeddings() / get_output_embeddings(), or None where the model has none."""
    get = getattr(model, getter, None)
    if not callable(get):
        return None
    try:
        return get()
    except (NotImplementedError, AttributeError):
        return None


def output_embedding(model: nn.Module) -> nn.Module | None:
    """model.get_output_embeddings() (the LM head), or None where the model has none."""
    return _embedding(model, "get_output_embeddings")


def input_embedding(model: nn.Module) -> nn.Module | None:
    """model.get_input_embeddings(), or None where the model has none."""
    return _embedding(model, "get_input_embeddings")


def output_embedding_params(model: nn.Module) -> int:
    """Parameters of the output embedding (LM head weight, or its factors) that no other module shares."""
    head = output_embedding(model)
    if head is None:
        return 0
    own = {id(p): p for n, p in head.named_parameters() if n.rsplit(".", 1)[-1] != "bias"}
    for mod in model.modules():
        if mod is head:
            continue
        for p in mod.parameters(recurse=False):
            own.pop(id(p), None)  # shared with e.g. the input embedding: counted there
    return sum(p.numel() for p in own.values()) + stored_weight_count(head)


def macs_per_token(model: nn.Module) -> int:
    """Multiply-adds per token of every linear layer (nn.Linear, Conv1D, Kronecker and low-rank layers, the LM head
    included).

    Dense layers cost in·out, Kronecker layers the cheaper contraction order, low-rank layers r·(in + out). Embedding
    lookups, biases, norms, activations and the attention-score products QKᵀ and softmax·V (which grow with sequence
    length) are not counted. Heads that run once per sequence (BERT's pooler and classifier) are counted as if per token: a small
    overestimate that is the same before and after compression unless the plan compresses them.
    """
    return sum(_module_macs(m) for m in _mac_leaves(model))


def _mac_leaves(module: nn.Module):
    if _is_linear_leaf(module):
        yield module
        return
    for child in module.children():
        yield from _mac_leaves(child)


def _is_linear_leaf(module: nn.Module) -> bool:
    if module_type(module) in methods.LINEAR_KINDS:
        return True
    m = methods.method_of_module(module)
    return m is not None and set(m.module_kinds) & set(methods.LINEAR_KINDS) != set()


def _module_macs(module: nn.Module) -> int:
    if module_type(module) not in methods.LINEAR_KINDS:
        return int(module.macs_per_token)
    m, n = dense_dims(module)
    return m * n


# ----------------------------------------------------------------------------------------------- report


@dataclass
class ModuleRecord:
    """One replaced module: its dense size (out x in; vocab x dim for embeddings), the spec and the costs."""

    name: str
    kind: str  # "linear" | "fused" | "embedding" | "lowrank"
    module_type: str  # the replaced class: "Linear", "Conv1D", "Embedding"
    dense_shape: tuple[int, int]
    spec: dict
    params_before: int  # weight + bias
    params_after: int  # factors + bias
    macs_before: int
    macs_after: int
    init_error: float | None  # relative Frobenius (weight) error of the initialisation; None with init="none"
    # relative output error sqrt(E‖(W − Ŵ)x‖² / E‖Wx‖²) on held-out calibration tokens (None without calibration
    # statistics, for embeddings, and in reports written before it existed)
    output_error: float | None = None
    init: str | None = None  # how this module was initialised: "data", "svd" or "none" (None in older reports)
    bytes_before: int | None = None  # weight storage (weight + bias; None in older reports)
    bytes_after: int | None = None


@dataclass
class CompressionReport:
    """What `compress` did. Parameter counts count a shared (tied) tensor once.

    The `*_excluding_output_embedding` counts leave out the LM head weight (the papers' convention; it is kept
    dense), unless it is tied to the input embedding, whose table is then counted once.
    compression_ratio = params_before_excluding_output_embedding / params_after_excluding_output_embedding.
    macs_per_token_*: see `macs_per_token` — every linear layer including the LM head; attention-score products,
    which depend on the sequence length, are excluded.
    """

    params_before: int
    params_after: int
    params_before_excluding_output_embedding: int
    params_after_excluding_output_embedding: int
    compression_ratio: float
    macs_per_token_before: int
    macs_per_token_after: int
    modules: list[ModuleRecord] = field(default_factory=list)
    untied_output_embedding: bool = False
    init: str = "svd"
    calib: dict | None = None  # the calibration statistics used: tokens, heldout_tokens, key (None without)
    notes: list[str] = field(default_factory=list)  # e.g. modules a method could not initialise from data
    # weight storage in bytes (`count_bytes`: each tensor's elements x stored width, int8 scales included; None in
    # reports written before it existed)
    bytes_before: int | None = None
    bytes_after: int | None = None
    model: nn.Module | None = field(default=None, repr=False, compare=False)  # the compressed model

    @property
    def mac_reduction(self) -> float:
        return self.macs_per_token_before / max(self.macs_per_token_after, 1)

    def sizes(self, *, before: bool = False) -> dict[str, int | None]:
        """The model's size on every axis of `kron.vocab.AXES` after compression (before=True: the dense model's),
        as a cost dict keyed by axis."""
        if before:
            return {"params": self.params_before, "params_excl_output_embedding":
                    self.params_before_excluding_output_embedding, "macs_per_token": self.macs_per_token_before,
                    "bytes": self.bytes_before}
        return {"params": self.params_after, "params_excl_output_embedding": self.params_after_excluding_output_embedding,
                "macs_per_token": self.macs_per_token_after, "bytes": self.bytes_after}

    def init_errors(self) -> dict[str, float | None]:
        return {r.name: r.init_error for r in self.modules}

    def output_errors(self) -> dict[str, float | None]:
        """Module -> relative output error on held-out calibration tokens (None where not measured)."""
        return {r.name: r.output_error for r in self.modules}

    def to_dict(self) -> dict:
        # not asdict(self): it would deep-copy the model
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("model", "modules")}
        d["mac_reduction"] = self.mac_reduction
        d["modules"] = [{**asdict(r), "dense_shape": list(r.dense_shape)} for r in self.modules]
        return d

    def summary(self, *, max_modules: int | None = 40) -> str:
        """A human-readable table of the replaced modules and the totals."""
        lines = []
        rows = self.modules if max_modules is None else self.modules[:max_modules]
        if rows:
            w = max(len(r.name) for r in rows)
            with_out = any(r.output_error is not None for r in self.modules)
            head = f"{'module':<{w}}  {'type':<9} {'dense':>12}  {'spec':<36} {'params':>23}  init_err"
            lines.append(head + ("  out_err  init" if with_out else ""))
            for r in rows:
                dense = f"{r.dense_shape[0]}x{r.dense_shape[1]}"
                spec = ModuleSpec.from_dict(r.spec).describe(*r.dense_shape)
                line = (f"{r.name:<{w}}  {r.module_type:<9} {dense:>12}  {spec:<36} "
                        f"{r.params_before:>11,}->{r.params_after:<11,} {_fmt_err(r.init_error)}")
                if with_out:
                    line = f"{line:<{len(head)}}  {_fmt_err(r.output_error):<7}  {r.init or '-'}"
                lines.append(line)
            if len(self.modules) > len(rows):
                lines.append(f"... and {len(self.modules) - len(rows)} more modules")
        else:
            lines.append("no module replaced")
        lines.append(f"parameters: {self.params_before:,} -> {self.params_after:,}")
        lines.append(f"parameters excluding the output embedding: {self.params_before_excluding_output_embedding:,} "
                     f"-> {self.params_after_excluding_output_embedding:,} ({self.compression_ratio:.2f}x)")
        lines.append(f"multiply-adds per token (linear layers): {self.macs_per_token_before:,} -> "
                     f"{self.macs_per_token_after:,} ({self.mac_reduction:.2f}x)")
        if self.bytes_before is not None and self.bytes_after is not None:
            lines.append(f"weight storage (bytes): {self.bytes_before:,} -> {self.bytes_after:,} "
                         f"({self.bytes_before / max(self.bytes_after, 1):.2f}x)")
        if self.untied_output_embedding:
            lines.append("the LM head was untied from the input embedding and kept dense")
        if self.calib is not None:
            held = self.calib.get("heldout_tokens") or 0
            lines.append(f"init {self.init}: calibration statistics of {self.calib.get('tokens', 0):,} tokens"
                         + (f"; out_err = relative output error on {held:,} held-out tokens, init_err = relative "
                            "weight error" if held else "; out_err on the same tokens (no held-out tokens)"))
        lines.extend(self.notes)
        return "\n".join(lines)


def _fmt_err(err: float | None) -> str:
    if err is None:
        return "-"
    return f"{err:.4f}" if err >= 1e-3 else f"{err:.1e}"


# ----------------------------------------------------------------------------------------------- compress


def as_plan(plan, config=None) -> CompressionPlan:
    """A CompressionPlan from a plan, a plan dict, a .yaml/.json path, or a preset name (needs the config)."""
    from .presets import get_plan

    return get_plan(plan, config)


INITS = ("svd", "data", "none")


def default_split(init: str) -> str:
    """The side `factor:` rules split by default under an init: "input" for data-aware init, else "output"."""
    return "input" if init == "data" else "output"


def compress(model: nn.Module, plan, *, inplace: bool = True, init: str = "svd", calib=None,
             split: str | None = None, ridge: float | None = None) -> CompressionReport:
    """Replace the modules a plan selects with Kronecker layers.

    Args:
        model: a transformers model (GPT-2 with Conv1D, BERT, Llama-family, ...) or any nn.Module.
        plan: a CompressionPlan, a plan dict, a plan file path, or a preset name ("kngpt2", "uniform:4", ...).
        inplace: modify `model`; if False a deep copy is compressed (find it in `report.model`).
        init: "svd" initialises the factors with the nearest Kronecker product of each weight (truncated SVD for
            low-rank); "data" minimises the output error on calibration inputs instead (`kron.datainit`; needs
            `calib`); "none" only builds the structure (factors random), for loading saved weights into it.
        calib: `kron.calibration.CalibStats` of this model (`collect_input_stats`). Needed by init="data"; with
            init="svd" it only adds each module's output error to the report.
        split: which side `factor:` rules and `uniform:` presets split among equally compressing shapes: "output"
            (the papers' tie-break) or "input"; default "input" with init="data" (what it serves best), else
            "output".
        ridge: the data-aware init's ridge, λ = ridge · mean(diag S) added to S (default
            `kron.datainit.DEFAULT_RIDGE`, 1e-2): larger keeps the factors nearer the weight's own SVD, 0 trusts the
            calibration data fully.
    Returns a CompressionReport (counts before and after, per-module records).
    """
    _check_init(init, calib)
    plan = as_plan(plan, getattr(model, "config", None))
    resolved = plan.resolve(model, split=split or default_split(init))  # raises before anything changes
    return apply_specs(model, resolved, inplace=inplace, init=init, calib=calib, ridge=ridge)


def _check_init(init: str, calib) -> None:
    if init not in INITS:
        raise ValueError(f"init must be 'svd', 'data' or 'none', got {init!r}")
    if init == "data" and calib is None:
        raise PlanError("init 'data' needs calibration statistics (calib=kron.calibration.collect_input_stats(...); "
                        "on the command line --calib SRC)")


def apply_specs(model: nn.Module, specs: Mapping[str, ModuleSpec | str | Mapping], *, inplace: bool = True,
                init: str = "svd", calib=None, ridge: float | None = None, init_cache=None,
                cache_scope: str | None = None) -> CompressionReport:
    """Replace modules by name following resolved specs (name -> ModuleSpec | spec dict | "keep").

    init / calib / ridge: as in `compress`. A module whose method has no data-aware init is initialised by SVD under
    init="data" (a note in the report says which); embeddings are always data-free.
    init_cache / cache_scope: a `kron.initcache.InitCache` and the name of what the layers are built from (the
    model's weights and `calib`: the caller's promise that the same scope means the same weights and statistics);
    linear layers already built under the same scope, name, spec, init and ridge are restored from it instead of
    initialised again (the same values), and new ones are added. Layers a structured method prepares together
    (pruning) are always built."""
    _check_init(init, calib)
    if ridge is not None and not (isinstance(ridge, (int, float)) and not isinstance(ridge, bool)
                                  and math.isfinite(ridge) and ridge >= 0):
        raise PlanError(f"ridge must be a finite number >= 0 (λ = ridge · mean(diag S)), got {ridge!r}")
    if not inplace:
        model = copy.deepcopy(model)
    specs = {n: s if s == KEEP or isinstance(s, ModuleSpec) else ModuleSpec.from_dict(s) for n, s in specs.items()}
    modules = dict(model.named_modules())  # snapshot before any swap
    todo = [(n, s) for n, s in specs.items() if s != KEEP]
    for name, spec in todo:  # check everything before changing anything
        if name not in modules:
            raise PlanError(f"the model has no module named {name!r}")
        _check_kind(name, modules[name], spec)
    if init == "data":
        missing = [n for n, s in todo if module_type(modules[n]) in methods.LINEAR_KINDS
                   and methods.get_method(s.method).data_init and n not in calib]
        if missing:
            raise PlanError(f"the calibration statistics have no entry for {', '.join(missing[:3])}"
                            f"{' ...' if len(missing) > 3 else ''}: they were collected for another model or other "
                            "modules; collect them for this model")
    check_together(dict(todo), model)
    # structured methods decide for several modules at once (which heads a pruned block keeps) before any swap; a
    # modifier's spec (int8) hands them its structure, and keeps wrapping the structure they return
    extras: dict[str, dict] = {}
    structures = {n: structure_of(s) for n, s in todo}
    for method_name in dict.fromkeys(s.method for s in structures.values()):
        own = {n: s for n, s in structures.items() if s.method == method_name}
        extras.update(methods.get_method(method_name).prepare(model, own, init, calib) or {})
    todo = [(n, with_structure(s, extras[n]["spec"]) if "spec" in extras.get(n, {}) else s) for n, s in todo]

    params_before = count_params(model)
    bytes_before = count_bytes(model)
    excl_before = count_params(model, exclude_output_embedding=True)
    macs_before = macs_per_token(model)
    in_emb, out_emb = input_embedding(model), output_embedding(model)
    tied = (in_emb is not None and out_emb is not None
            and getattr(out_emb, "weight", None) is not None and out_emb.weight is getattr(in_emb, "weight", None))

    records: list[ModuleRecord] = []
    notes: list[str] = []
    no_data: dict[str, list[str]] = {}
    replaced: set[int] = set()
    for name, spec in todo:
        old = modules[name]
        method = methods.get_method(spec.method)
        linear = module_type(old) in methods.LINEAR_KINDS
        stats = calib.stats(name) if calib is not None and linear and name in calib else None
        if stats is not None and ridge is not None:
            stats = dataclasses.replace(stats, ridge=float(ridge))
        extra = {k: v for k, v in extras.get(name, {}).items() if k != "spec"}
        if init == "data" and linear and not method.data_init:
            no_data.setdefault(method.name, []).append(name)
        key = (init_cache.key(cache_scope, name, spec, init, ridge)
               if init_cache is not None and cache_scope is not None and linear and not extra and init != "none"
               else None)
        hit = init_cache.get(key) if key is not None else None
        if hit is not None:
            new = init_cache.restore(hit, method.build(old, spec, "none"))
            out_err = hit.output_error
        else:
            if init == "data" and linear and method.data_init:
                new = method.build(old, spec, "data", stats=stats, **extra)
            else:
                new = method.build(old, spec, "svd" if init == "data" else init, **extra)
            out_err = _output_error(old, new, stats) if stats is not None and init != "none" else None
            if key is not None:
                init_cache.put(key, new, out_err)
        new.train(old.training)
        weight = old.weight
        if not weight.requires_grad:
            new.requires_grad_(False)
        setattr(new, SOURCE_ATTR, type(old).__name__ if module_type(old) != "conv1d" else "Conv1D")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
        replaced.add(id(old))
        m, n = dense_dims(old)
        records.append(ModuleRecord(
            name=name, kind=spec.kind, module_type=getattr(new, SOURCE_ATTR), dense_shape=(m, n),
            spec=spec.to_dict(), params_before=sum(p.numel() for p in old.parameters()),
            params_after=sum(p.numel() for p in new.parameters()) + stored_weight_count(new),
            macs_before=m * n if module_type(old) in methods.LINEAR_KINDS else 0,
            macs_after=int(new.macs_per_token) if module_type(old) in methods.LINEAR_KINDS else 0,
            init_error=new.init_error, output_error=out_err,
            init="none" if init == "none" else (getattr(new, "init_source", None) or "svd"),
            bytes_before=count_bytes(old), bytes_after=count_bytes(new),
        ))
    structures = {n: structure_of(s).method for n, s in todo}
    for method_name in dict.fromkeys(structures.values()):
        methods.get_method(method_name).finish(model, [n for n, m in structures.items() if m == method_name])
    for method_name, names in no_data.items():
        notes.append(f"method {method_name} has no data-aware init: {len(names)} module(s) initialised by SVD "
                     f"({', '.join(names[:3])}{' ...' if len(names) > 3 else ''})")

    untied = False
    if tied and (id(in_emb) in replaced or id(out_emb) in replaced):
        if id(out_emb) not in replaced:  # the head keeps the dense table, now as its own tensor
            w = out_emb.weight
            out_emb.weight = nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad)
        untie_word_embeddings(model)
        untied = True

    excl_after = count_params(model, exclude_output_embedding=True)
    return CompressionReport(
        params_before=params_before,
        params_after=count_params(model),
        params_before_excluding_output_embedding=excl_before,
        params_after_excluding_output_embedding=excl_after,
        compression_ratio=excl_before / max(excl_after, 1),
        macs_per_token_before=macs_before,
        macs_per_token_after=macs_per_token(model),
        modules=records,
        untied_output_embedding=untied,
        init=init,
        calib=None if calib is None else {"tokens": calib.tokens, "heldout_tokens": calib.heldout_tokens,
                                          "key": dict(calib.key)},
        notes=notes,
        bytes_before=bytes_before,
        bytes_after=count_bytes(model),
        model=model,
    )


def _output_error(old: nn.Module, new: nn.Module, stats) -> float | None:
    """Relative output error of the new module against the dense one on the held-out S (the fit S without one)."""
    from .datainit import output_error
    from .methods.layers import linear_weight

    # to_full: a layer smaller than the module it replaced (pruned rows/columns) at the dense size, zeros filled in
    to_dense = getattr(new, "to_full", None) or getattr(new, "to_dense", None)
    if not callable(to_dense):
        return None
    S = stats.S_heldout if stats.S_heldout is not None else stats.S
    W = linear_weight(old)[0]
    with torch.no_grad():
        W_hat = to_dense()
        return output_error(W, S, W_hat) if W_hat.shape == W.shape else None


def untie_word_embeddings(model: nn.Module) -> None:
    """Tell transformers the input and output embeddings are separate tensors from now on (config and the
    tied-keys table used by save_pretrained / from_pretrained / tie_weights)."""
    config = getattr(model, "config", None)
    if config is not None:
        config.tie_word_embeddings = False
        text = getattr(config, "get_text_config", None)
        if callable(text):
            try:
                text().tie_word_embeddings = False
            except AttributeError:
                pass
    for mod in model.modules():
        if hasattr(mod, "all_tied_weights_keys") and hasattr(mod, "get_expanded_tied_weights_keys"):
            mod.all_tied_weights_keys = {}


def _check_kind(name: str, module: nn.Module, spec: ModuleSpec) -> None:
    kind = module_type(module)
    if kind is None:
        from .modules import unsupported_message

        raise PlanError(unsupported_message(name, module))
    method = methods.get_method(spec.method)
    if kind not in method.module_kinds:
        raise PlanError(f"module {name} is a {type(module).__name__} but its spec is {spec.describe()!r}: "
                        "embedding_factor is for nn.Embedding, shape or lowrank_rank for linear layers")
    m, n = dense_dims(module)
    spec.check(Slot("spec", name, kind, type(module).__name__, m, n))


def specs_from_model(model: nn.Module) -> dict[str, ModuleSpec]:
    """Name -> spec of every module a registered method built in a (compressed) model: enough to rebuild its
    structure."""
    out: dict[str, ModuleSpec] = {}
    skip: set[str] = set()
    for name, mod in model.named_modules():
        if any(name.startswith(s + ".") for s in skip):
            continue
        method = methods.method_of_module(mod)
        if method is None:
            continue
        try:
            out[name] = method.recognise(mod)
        except PlanError as exc:
            raise PlanError(f"module {name}: {exc}") from None
        skip.add(name)
    return out


def source_types(model: nn.Module) -> dict[str, str]:
    """Name -> the dense class each factored module replaced ("Linear", "Conv1D", "Embedding"), when recorded."""
    return {n: getattr(m, SOURCE_ATTR) for n, m in model.named_modules() if is_factored(m)
            and hasattr(m, SOURCE_ATTR)}
