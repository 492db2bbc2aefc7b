"""Sensitivity profile: the damage of compressing each matrix alone, for every candidate, with data-aware init.

For every compressible linear matrix of a model (the attention and FFN groups of its `kron.vocab` family; GPT-2's
fused `c_attn` as its 3 blocks, which share one S) and every candidate — each registered method's
`candidates(m, n, constraints)` for the methods asked for (default kronecker and lowrank), plus keep — the matrix
is built with its method's data-aware init (`method.build(module, spec, "data", stats)`, `kron.datainit`) and its
damage is the relative output error

    damage = tr((W − Ŵ) S (W − Ŵ)ᵀ) / tr(W S Wᵀ)        (S = E[x xᵀ] on the calibration inputs)

with the candidate's parameters and multiply-adds per token (`spec.params` / `spec.macs`). For a subset of the
candidates (`kl_subset` per matrix, spread over its candidates) the matrix is also swapped into the model alone and
a model-level measure is taken on held-out batches: KL(teacher ‖ student) of the next-token distribution (or of a
classifier's outputs; a base model without logits: the relative squared error of its last hidden state). The rank
correlation (Spearman) between the proxy and that measure says how far the cheap proxy can be trusted.

The profile is a JSON dict (`profile_model` writes it atomically after each matrix when given a path, and resumes
from it): a header naming the model (source, config hash), the calibration data (key digest), the constraints and
the methods — a profile for anything else is refused with a message naming the mismatch (`check_header`) — then
per matrix its candidates. `kron.autoplan` turns a profile and a budget into a plan.

Pure torch: no data loading (the CLI gets calibration batches and statistics from `trials.calibration`).
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from .autoplan import DEFAULT_METHODS, Constraints
from .damage import Proxy, candidate_damage, matrix_blocks, weight_of
from .errors import DataError, PlanError, one_line
from .measure import ModelMeasure, spread_indices
from .modules import LINEAR_GROUPS, Matrix, input_embedding_matrix, matrices

__all__ = ["DEFAULT_METHODS", "FORMAT", "Constraints", "Matrix", "candidates_for", "check_header", "check_matrices",
           "compressible_matrices", "embedding_matrices", "load_profile", "model_identity", "profile_header",
           "profile_model", "spearman"]

FORMAT = "kronsearch.profile/2"  # /2: constraints hold each method's options; candidates record bytes
FORMATS = ("kronsearch.profile/1", FORMAT)  # read: /1 profiles migrate on read (`check_header`, `Constraints`)
HEADER_KEYS = ("model", "calibration", "constraints", "methods", "ridge")  # what must match to reuse a profile


def compressible_matrices(model: nn.Module, groups: Sequence[str] = LINEAR_GROUPS) -> list[Matrix]:
    """The model's attention and FFN matrices (`kron.modules.matrices`), in model order; for a model of no known
    family, every nn.Linear / Conv1D except the output embedding. PlanError when there is none."""
    out = matrices(model, groups, any_linear=True)
    if not out:
        raise PlanError("the model has no compressible attention or FFN matrix")
    return out


def embedding_matrices(model: nn.Module) -> list[Matrix]:
    """The model's word embedding (`kron.modules.input_embedding_matrix`) as a one-element list; [] when it has
    none."""
    emb = input_embedding_matrix(model)
    return [] if emb is None else [emb]


def candidates_for(mx: Matrix, methods: Sequence[str], constraints: Constraints) -> list:
    """The candidates of one matrix (each spec for one output block, its `blocks` set for a fused matrix): each
    structure method's `candidates` with its options from `constraints`, all of them (max_shapes lifted), thinned per
    method to `max_shapes` compression levels spread evenly over log-compression with at most `shapes_per_level`
    candidates per level (in the method's `level_order`); then each modifier's variants of every one of them and of
    the dense matrix (without the unmodified ones where the modifier's options say so)."""
    from .methods import get_method

    rows, n = mx.m // mx.blocks, mx.n
    every = replace(constraints.span, max_shapes=None)
    out = []
    for name in methods:
        method = get_method(name)
        if method.modifier:
            continue
        specs = method.candidates(rows, n, constraints.options_for(name), every)
        levels: dict[float, list] = {}
        for spec in specs:
            levels.setdefault(round(math.log(spec.compression(rows, n)), 6), []).append(spec)
        keys = sorted(levels)
        k = constraints.max_shapes
        if k is not None and len(keys) > k:
            picked: list[int] = []
            for i in range(k):
                target = keys[0] + (keys[-1] - keys[0]) * i / max(k - 1, 1)
                j = min((j for j in range(len(keys)) if j not in picked), key=lambda j: (abs(keys[j] - target), j))
                picked.append(j)
            keys = [keys[j] for j in sorted(picked)]
        for key in keys:
            out += sorted(levels[key], key=lambda s: method.level_order(s, rows, n))[:constraints.shapes_per_level]
    for name in methods:
        method = get_method(name)
        if not method.modifier:
            continue
        options = constraints.options_for(name)
        dense = method.variants(None, options)
        wrapped = [method.variants(sp, options) for sp in out]
        out = (out if method.keeps_unmodified(options) else []) + [
            v for j in range(len(dense)) for v in [w[j] for w in wrapped if len(w) == len(dense)] + [dense[j]]]
    if mx.blocks == 1:
        return out
    # a fused projection: each spec describes one block; a method whose specs cannot say blocks cannot take it
    return [replace(spec, blocks=mx.blocks) for spec in out if "blocks" in {f.name for f in fields(spec)}]


def method_names(methods: Sequence[str]) -> tuple[list[str], dict[str, dict]]:
    """(registered names, options the names imply) of method names or aliases ("int4": quant with bits [4])."""
    from .methods import get_method

    names, implied = [], {}
    for m in methods:
        method = get_method(m)
        if method.name not in names:
            names.append(method.name)
        for k, v in method.alias_options(m if m != method.name else None).items():
            got = implied.setdefault(method.name, {})
            got[k] = [*got.get(k, []), *(x for x in v if x not in got.get(k, []))] if isinstance(v, list) else v
    return names, implied


# ----------------------------------------------------------------------------------------------- identity


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_identity(model: nn.Module, source: str | None = None, *, weights_dir=None) -> dict:
    """What names a model in a profile: its source, model type, a hash of its config and a fingerprint of its
    weights (of a model built on the meta device: read from `weights_dir`'s model.safetensors when given)."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        d = {k: v for k, v in config.to_dict().items()
             if k not in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures")}
        h = _digest(d)
    else:
        h = _digest([(n, tuple(p.shape)) for n, p in model.named_parameters()])
    fingerprint = None
    named = list(model.named_parameters())
    picked = named[:2] + named[-2:]
    if picked and all(p.device.type != "meta" for _, p in picked):
        fingerprint = _fingerprint(p for _, p in picked)
    elif picked and weights_dir is not None:
        fingerprint = _file_fingerprint([n for n, _ in picked], weights_dir)
    return {"source": str(source) if source is not None else None,
            "model_type": getattr(config, "model_type", None), "config_hash": h, "fingerprint": fingerprint}


def _file_fingerprint(names: Sequence[str], source) -> str | None:
    """The weights fingerprint `model_identity` computes on a loaded model, read from a local model folder's
    model.safetensors for a model built on the meta device (4 tensors, memory-mapped; None when the folder, the file
    or one of those tensors is not there, e.g. a hub name or tied weights stored once)."""
    from safetensors import safe_open

    path = Path(str(source)).expanduser() / "model.safetensors"
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            found = [name if name in keys else next((k for k in keys if k.endswith("." + name)
                                                     or name.endswith("." + k)), None) for name in names]
            if None in found:
                return None
            return _fingerprint(f.get_tensor(key) for key in found)
    except Exception:  # an unreadable file: no fingerprint (the load that follows names the problem)
        return None


def _fingerprint(tensors) -> str:
    """sha256 of the first 4,096 values (float32) of each tensor, 16 hex digits: a profile's weights fingerprint."""
    hw = hashlib.sha256()
    for t in tensors:
        hw.update(t.detach().float().cpu().flatten()[:4096].numpy().tobytes())
    return hw.hexdigest()[:16]


def profile_header(model: nn.Module, stats, *, source: str | None, methods: Sequence[str], constraints: Constraints,
                   ridge: float) -> dict:
    key = dict(getattr(stats, "key", {}) or {})
    return {
        "format": FORMAT,
        "model": model_identity(model, source),
        "calibration": {"key": _digest(key), "tokens": int(getattr(stats, "tokens", 0)),
                        "source": key.get("source")},
        "constraints": constraints.to_dict(methods),
        "methods": list(methods),
        "ridge": float(ridge),
    }


def _mismatch(got, want, where: str) -> list[str]:
    if isinstance(got, Mapping) and isinstance(want, Mapping):
        out = []
        for k in sorted(set(got) | set(want)):
            if where == "calibration" and k in ("source", "tokens"):
                continue  # descriptive: the key digest decides
            if where == "model" and k in ("params", "params_excl_output_embedding", "macs", "bytes", "float_width"):
                continue  # derived from the config
            if where == "model" and k == "fingerprint" and (got.get(k) is None or want.get(k) is None):
                continue  # a model built without weights (meta device) has no fingerprint
            out += _mismatch(got.get(k), want.get(k), f"{where}.{k}")
        return out
    return [] if got == want else [f"{where}: the profile has {got!r}, this run {want!r}"]


def check_header(profile: Mapping, want: Mapping, *, path: str | Path = "profile") -> None:
    """DataError naming every difference between a saved profile's header and what this run asks for (constraints
    compared by the candidates they offer the profile's methods: an earlier release's flat constraints equal this
    release's nested ones when they offer the same)."""
    if profile.get("format") not in FORMATS:
        raise DataError(f"{path} is not a kronsearch profile (format {profile.get('format')!r}, expected {FORMAT})")
    diffs = []
    methods = want.get("methods", profile.get("methods")) or DEFAULT_METHODS
    for k in HEADER_KEYS:
        if k in want:
            got, wanted = profile.get(k), want[k]
            if k == "constraints":
                got, wanted = (_normal_constraints(c, methods) for c in (got, wanted))
            diffs += _mismatch(got, wanted, k)
    if diffs:
        model = profile.get("model", {})
        raise DataError(f"{path} was made for another setting (model {model.get('source')!r}, config hash "
                        f"{model.get('config_hash')}): {'; '.join(diffs)}. Give --profile a new file (or "
                        "--fresh to overwrite it), or run with the settings it was made for")


def check_matrices(profile: Mapping, model: nn.Module, *, path: str | Path = "profile") -> None:
    """DataError unless the profile covers exactly the model's compressible matrices, each complete and of the
    model's shape (an embedding entry is optional: only profiles made with embedding factors have one). A header
    that matches proves the same config; this catches a profile cut short or edited by hand, whose missing matrix
    a plan would otherwise keep dense without a word, and an extra one no module answers to."""
    want = {mx.name: mx for mx in compressible_matrices(model)}
    optional = {mx.name: mx for mx in embedding_matrices(model)}
    have = profile.get("matrices", {})
    problems = []
    missing = [n for n in want if n not in have]
    if missing:
        problems.append(f"{len(missing)} of the model's matrices have no entry (e.g. {missing[0]})")
    extra = [n for n in have if n not in want and n not in optional]
    if extra:  # names read from the file: shown bounded, on one line
        problems.append(f"{len(extra)} entries name no matrix of the model (e.g. {one_line(extra[0], limit=80)})")
    for name, entry in have.items():
        mx = want.get(name) or optional.get(name)
        if mx is None:
            continue
        if not isinstance(entry, Mapping) or entry.get("complete") is not True:
            problems.append(f"{name} is marked incomplete")
        elif (entry.get("m"), entry.get("n")) != (mx.m, mx.n):
            problems.append(f"{name} is {entry.get('m')} x {entry.get('n')} in the profile, {mx.m} x {mx.n} in the "
                            "model")
    if problems:
        raise DataError(f"{path} does not match the model: {'; '.join(problems[:4])}"
                        f"{f' and {len(problems) - 4} more' if len(problems) > 4 else ''}; make the profile again "
                        "with `kronsearch profile` (--fresh to overwrite it)")


def _normal_constraints(c, methods) -> dict | None:
    if isinstance(c, Constraints):
        return c.to_dict(methods)
    try:
        return Constraints.from_dict(c).to_dict(methods)
    except (TypeError, ValueError, PlanError):
        return c  # compared as it is (and reported as different)


def load_profile(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"profile {path} does not exist (make one with `kronsearch profile`)") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"profile {path} is unreadable ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict) or data.get("format") not in FORMATS or not isinstance(data.get("matrices"), dict):
        raise DataError(f"{path} is not a kronsearch profile (expected format {FORMAT})")
    for name, entry in data["matrices"].items():
        _check_entry(entry, f"{path}: matrix {name}")
    return data


_COUNTS = ("params", "params_excl_output_embedding", "macs", "bytes")
_DAMAGE_TOLERANCE = 1e-6  # a measured KL or error a rounding below zero is still a zero


def _check_entry(entry, where: str) -> None:
    """DataError naming what is wrong with one matrix of a saved profile: no candidates, a method this release
    lacks, a count that is not a whole number >= 0, a damage that is negative or not finite."""
    if not isinstance(entry, dict) or not isinstance(entry.get("candidates"), list) or not entry["candidates"]:
        raise DataError(f"{where}: no candidates (a damaged or hand-edited profile; make it again)")
    for c in entry["candidates"]:
        if not isinstance(c, dict):
            raise DataError(f"{where}: a candidate is not a mapping")
        label = c.get("label", c.get("method"))
        method = c.get("method")
        if not isinstance(method, str):
            raise DataError(f"{where}, candidate {label!r}: method must be a name, got {method!r}")
        if method != "keep":
            from .methods import get_method

            try:
                get_method(method)
            except PlanError as exc:
                raise DataError(f"{where}, candidate {label!r}: {exc}") from None
        for key in _COUNTS:
            v = c.get(key)
            if key in c and v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise DataError(f"{where}, candidate {label!r}: {key} must be a whole number >= 0, got {v!r}")
        for key in ("damage", "model_damage"):
            v = c.get(key)
            if v is None and key == "model_damage":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v < -_DAMAGE_TOLERANCE:
                raise DataError(f"{where}, candidate {label!r}: {key} must be a finite number >= 0, got {v!r}")


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Spearman rank correlation (scipy), None with fewer than 3 pairs or a constant side."""
    if len(xs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return None
    from scipy.stats import spearmanr

    r = spearmanr(xs, ys).statistic if hasattr(spearmanr(xs, ys), "statistic") else spearmanr(xs, ys)[0]
    return float(r) if math.isfinite(r) else None


def correlation(profile: Mapping) -> dict:
    """Spearman correlation of proxy vs model-level damage over every measured candidate of the linear matrices
    (an embedding's proxy, its table's weight error, is another quantity), and its count."""
    xs, ys = [], []
    for mx in profile["matrices"].values():
        if mx.get("group") == "embedding":
            continue
        for c in mx["candidates"]:
            if c.get("model_damage") is not None and c["method"] != "keep":
                xs.append(c["damage"])
                ys.append(c["model_damage"])
    return {"spearman": spearman(xs, ys), "pairs": len(xs)}


# ----------------------------------------------------------------------------------------------- profiling


def _tied(model: nn.Module, emb: nn.Module) -> bool:
    """Whether the LM head shares the embedding's table (compressing the embedding then leaves the head a dense
    copy of it: trials and plans count that copy)."""
    from .surgery import output_embedding

    head = output_embedding(model)
    return head is not None and getattr(head, "weight", None) is emb.weight


def embedding_entry(model: nn.Module, mx: Matrix, factors: Sequence[int],
                    measure: "ModelMeasure | None") -> dict:
    """The profile entry of a word embedding: keep and A (v x d/f) ⊗ B (1 x f) for each factor f of `factors` that
    divides the width, each built with its data-free SVD init (as trials build it; an embedding has no input
    activations). damage: the relative weight error ‖E − Ê‖²/‖E‖² of the table; model_damage: the model-level
    measure of every candidate (few of them, and no proxy to interpolate along) when `measure` is given.
    params: the model's parameter change (tied: plus the LM head's dense copy); params_excl_output_embedding: the
    factors alone."""
    from .methods import get_method
    from .methods.base import spec_from_dict

    t0 = time.time()
    module = model.get_submodule(mx.name)
    tied = _tied(model, module)
    from .surgery import float_width

    v, d = mx.m, mx.n
    dense = v * d
    width = float_width(model)
    E = module.weight.detach().double()
    base = float(E.pow(2).sum())
    cands = [{"method": "keep", "label": "keep", "spec": None, "params": dense,
              "params_excl_output_embedding": dense, "macs": 0, "bytes": dense * width, "compression": 1.0,
              "damage": 0.0, "model_damage": 0.0 if measure is not None else None, "seconds": 0.0}]
    method = get_method("kron_embedding")
    used = _dividing(factors, d)
    for f in used:
        ts = time.time()
        spec = spec_from_dict({"embedding_factor": f})
        with torch.no_grad():
            new = method.build(module, spec, "svd").eval()
            err = float((new.to_dense().double() - E).pow(2).sum()) / base if base > 0 else 0.0
        kl = measure.with_layers({mx.name: new}) if measure is not None else None
        p = spec.params(v, d)
        cands.append({"method": spec.method, "label": spec.label(), "spec": spec.to_dict(),
                      "params": p + (dense if tied else 0), "params_excl_output_embedding": p, "macs": 0,
                      "bytes": spec.bytes(v, d, width) + (dense * width if tied else 0), "compression": dense / p, "damage": err, "model_damage": kl, "init": "svd",
                      "seconds": round(time.time() - ts, 4)})
        del new
    return {"group": "embedding", "m": v, "n": d, "blocks": 1, "dense_params": dense,
            "dense_params_excl_output_embedding": dense, "dense_macs": 0, "tied": tied, "factors": used,
            "candidates": cands, "seconds": round(time.time() - t0, 3), "complete": True}


def profile_model(model: nn.Module, stats, *, methods: Sequence[str] = DEFAULT_METHODS,
                  constraints: Constraints | None = None, source: str | None = None,
                  heldout: Sequence | None = None, kl_subset: int = 2, kl_tokens: int | None = 1024,
                  path: str | Path | None = None, fresh: bool = False, ridge: float | None = None,
                  matrices: Sequence[Matrix] | None = None, fast: bool = True,
                  embedding_factors: Sequence[int] = (),
                  progress: Callable[[int, int, str], None] | None = None) -> dict:
    """The sensitivity profile of `model` on calibration statistics `stats` (`kron.calibration.CalibStats`).

    methods: method names (or aliases: int8, int4) whose candidates are profiled: structures of linear layers
    (built with their data-aware init, or their data-free one for a method without), and modifiers (each
    structure's candidates and the dense matrix also in their variants). constraints: the candidates' span and
    each method's options (Constraints). heldout: batches for the model-level measure (None or
    kl_subset 0: no model-level measure). kl_tokens: at most this many held-out tokens for it.
    path: a JSON file written atomically after each matrix; an existing one with the same header is resumed
    (its matrices are not computed again), one with another header is refused (DataError naming the difference)
    unless `fresh`. embedding_factors: also profile the word embedding as A (v x d/f) ⊗ B (1 x f) for these f
    (`embedding_entry`: data-free init, every candidate measured at model level); not part of the header, so an
    older profile resumed with them gains the embedding entry. progress(done, total, name) is called after each
    matrix. fast: compute the damages in closed form where a method has one (`kron.damage`: Kronecker, low-rank;
    the same results as building each layer, much faster on large matrices); other methods are always built.
    Returns the profile dict (see the module docstring).
    """
    from .calibration import ModuleStats
    from .datainit import DEFAULT_RIDGE
    from .fsutil import atomic_write_json
    from .methods import get_method, structure_of
    from .methods.base import LINEAR_KINDS
    from .surgery import count_bytes, count_params, float_width, macs_per_token

    constraints = constraints or Constraints()
    ridge = DEFAULT_RIDGE if ridge is None else float(ridge)
    methods, implied = method_names(methods)
    if implied:  # "int4" in the list: quantisation in 4 bits, as if its options said so
        opts = constraints.options_dict()
        merged = {m: {**implied.get(m, {}), **opts.get(m, {})} for m in {**implied, **opts}}
        constraints = replace(constraints, options=Constraints(options=merged).options)
    if not [m for m in methods if not get_method(m).modifier]:
        raise PlanError("give at least one compression method to profile (e.g. kronecker, lowrank)")
    for name in methods:
        m = get_method(name)
        if not set(m.module_kinds) & set(LINEAR_KINDS):
            raise PlanError(f"method {name} does not compress linear layers; the profile covers linear matrices "
                            "only")
        if m.block_parts:
            raise PlanError(f"method {name} is chosen per block of matrices, not per matrix: a profile measures one "
                            "matrix at a time")
    mats = list(matrices) if matrices is not None else compressible_matrices(model)
    missing = [mx.name for mx in mats if mx.name not in stats]
    factors = sorted({int(f) for f in embedding_factors})
    if any(f < 2 for f in factors):
        raise PlanError(f"embedding factors must be integers > 1, got {list(embedding_factors)}")
    emb_mats = embedding_matrices(model) if factors else []
    for mx in emb_mats:
        if not _dividing(factors, mx.n):
            raise PlanError(f"no embedding factor of {factors} divides the width {mx.n} of {mx.name} "
                            f"({mx.m} x {mx.n}); valid factors divide {mx.n}, e.g. "
                            f"{[f for f in (2, 3, 4, 6, 8, 12, 16) if mx.n % f == 0]}")
    if missing:
        raise DataError(f"the calibration statistics have no entry for {', '.join(missing[:3])}"
                        f"{' ...' if len(missing) > 3 else ''}: they were collected for another model")
    header = profile_header(model, stats, source=source, methods=methods, constraints=constraints, ridge=ridge)
    done: dict = {}
    if path is not None and Path(path).is_file() and not fresh:
        old = load_profile(path)
        check_header(old, header, path=path)
        done = dict(old.get("matrices", {}))
    profile = dict(header)
    width = float_width(model)
    profile["model"] = dict(header["model"], params=count_params(model),
                            params_excl_output_embedding=count_params(model, exclude_output_embedding=True),
                            macs=macs_per_token(model), bytes=count_bytes(model), float_width=width)
    profile["matrices"] = {}
    profile["model_measure"] = None
    modules = dict(model.named_modules())
    measure = None
    was_training = model.training
    model.eval()
    t_start = time.time()
    mats = emb_mats + mats
    measuring = heldout is not None and kl_subset > 0

    def model_measure() -> ModelMeasure:
        """The model-level measure, made on first use (the reference pass over the held-out batches)."""
        nonlocal measure
        if measure is None:
            measure = ModelMeasure(model, heldout, kl_tokens)
            profile["model_measure"] = {"kind": measure.kind, "tokens": measure.tokens}
        return measure

    try:
        for i, mx in enumerate(mats):
            if _reusable(done.get(mx.name), mx, factors, measuring):
                profile["matrices"][mx.name] = done[mx.name]
                if progress is not None:
                    progress(i + 1, len(mats), mx.name)
                continue
            if mx.group == "embedding":
                profile["matrices"][mx.name] = embedding_entry(model, mx, factors, model_measure() if measuring
                                                               else None)
            else:
                t0 = time.time()
                module = modules[mx.name]
                st = stats.stats(mx.name)
                S = st.S
                if not torch.isfinite(S).all():
                    raise DataError(f"the calibration statistics of {mx.name} hold NaN or inf values")
                proxy = Proxy(weight_of(module), S) if not fast else None
                fast_blocks = matrix_blocks(weight_of(module), S, mx.blocks, ridge) if fast else None
                stats_one = ModuleStats(S=S, tokens=st.tokens)
                specs = candidates_for(mx, methods, constraints)
                dense = mx.m * mx.n
                cands = [{"method": "keep", "label": "keep", "spec": None, "params": dense, "macs": dense,
                          "bytes": dense * width, "compression": 1.0, "damage": 0.0, "model_damage": 0.0 if heldout else None, "seconds": 0.0}]
                kl_idx = set(spread_indices(len(specs), kl_subset)) if measuring else set()
                for j, spec in enumerate(specs):
                    method = get_method(spec.method)
                    ts = time.time()
                    damage, init_src, new = candidate_damage(mx.name, module, spec, stats_one, fast_blocks, proxy)
                    kl = None
                    if j in kl_idx:
                        if new is None and fast_blocks is not None:  # the factors just found, not a second solve
                            new = method.layer_from_factors(module, spec, fast_blocks)
                        if new is None:
                            kw = {"stats": stats_one} if method.data_init else {}
                            new = method.build(module, spec, "data" if method.data_init else "svd", **kw)
                        kl = model_measure().with_layers({mx.name: new.eval()})
                    p = spec.params(mx.m, mx.n)
                    cand = {"method": spec.method, "label": spec.label(), "spec": spec.to_dict(), "params": p,
                            "macs": spec.macs(mx.m, mx.n), "bytes": spec.bytes(mx.m, mx.n, width),
                            "compression": dense / p, "damage": damage, "model_damage": kl, "init": init_src,
                            "seconds": round(time.time() - ts, 4)}
                    structure = structure_of(spec)
                    if structure is not spec:  # a modified structure: both methods, for plan --auto --methods
                        cand["methods"] = [method.name, get_method(structure.method).name]
                    cands.append(cand)
                    del new
                profile["matrices"][mx.name] = {"group": mx.group, "m": mx.m, "n": mx.n, "blocks": mx.blocks,
                                                "dense_params": dense, "dense_macs": dense, "candidates": cands,
                                                "seconds": round(time.time() - t0, 3), "complete": True}
            profile["correlation"] = correlation(profile)
            if path is not None:
                atomic_write_json(path, _with_pending(profile, mats))
            if progress is not None:
                progress(i + 1, len(mats), mx.name)
    finally:
        model.train(was_training)
    profile["correlation"] = correlation(profile)
    profile["seconds"] = round(time.time() - t_start, 3)
    if path is not None:
        atomic_write_json(path, profile)
    return profile


def _dividing(factors: Sequence[int], width: int) -> list[int]:
    """The embedding factors f > 1 of `factors` that divide `width`, sorted: the ones an embedding entry holds."""
    return sorted({int(f) for f in factors if int(f) > 1 and width % int(f) == 0})


def _reusable(entry: Mapping | None, mx: Matrix, factors: Sequence[int], measured: bool) -> bool:
    """Whether a resumed profile's entry serves this run: complete, and for an embedding made for the same factors
    (and measured at model level when this run measures)."""
    if not entry or not entry.get("complete"):
        return False
    if mx.group != "embedding":
        return True
    if entry.get("factors") != _dividing(factors, mx.n):
        return False
    return not measured or all(c.get("model_damage") is not None for c in entry["candidates"])


def _with_pending(profile: dict, mats: Sequence[Matrix]) -> dict:
    out = dict(profile)
    out["pending"] = [mx.name for mx in mats if mx.name not in profile["matrices"]]
    return out


# ----------------------------------------------------------------------------------------------- display


def matrix_table(entry: Mapping) -> tuple[tuple[str, ...], list[tuple]]:
    """(header, rows) of one matrix's candidates, cheapest damage first within each compression."""
    header = ("candidate", "params", "compression", "macs", "damage", "model")
    rows = []
    for c in sorted(entry["candidates"], key=lambda c: (c["compression"], c["damage"])):
        md = c.get("model_damage")
        rows.append((c["label"], f"{c['params']:,}", f"{c['compression']:.2f}x", f"{c['macs']:,}",
                     f"{c['damage']:.4g}", "-" if md is None else f"{md:.4g}"))
    return header, rows
