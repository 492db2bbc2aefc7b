"""Compression plans: which modules of a model become Kronecker layers, and with which factor shapes.

A plan is a list of rules applied in order (a later rule overrides an earlier one for the modules both match),
over a default of "keep" (stay dense). As YAML:

    version: 1
    default: keep
    rules:
      - select: transformer.wte              # exact name, or a `.suffix` of it (peft-style)
        embedding_factor: 2                  # nn.Embedding v x d -> A (v x d/2) ⊗ B (1 x 2)
      - select: "h.*.mlp.c_fc"               # glob (fnmatch; `*` also crosses dots)
        layers: odd                          # odd | even | all | 3 | [0, 2, "4-7"]
        shape: [1536, 768, 2, 1]             # (m1, n1, m2, n2) for the (out x in) weight
      - select: "re:.*\\.attn\\.c_attn"      # regex, full match on the dotted name
        factor: 4                            # nearest valid shape to 4x compression (see `nearest_shape`)
        blocks: 3                            # fused [Q; K; V]: each block factored separately
        rank: 1                              # number of summed Kronecker products
      - select: transformer.h.0.mlp.c_fc
        keep: true                           # per-module override back to dense
      - select: mlp.c_proj                   # the low-rank baseline instead of Kronecker: W ≈ U (m x r) · V (r x n)
        lowrank_ratio: 2                     # r = max(1, floor(m·n / (2·(m + n)))); or `lowrank_rank: r`

Selectors: `re:PATTERN` is a regex full match on the dotted module name; a pattern with `*`, `?` or `[` is an
fnmatch glob; anything else must equal the name. A non-regex selector may match the full name or any dotted
suffix of it, so `mlp.c_fc` selects `transformer.h.3.mlp.c_fc` (peft's `target_modules` rule). The layer index of
a module is the first all-digit component of its name (`transformer.h.3.mlp.c_fc` -> 3, zero-based); with a
`layers` filter, modules without one (embeddings, heads) never match.

`CompressionPlan.resolve(model)` validates a plan against a concrete model and returns name -> ModuleSpec | "keep"
for every module the plan could touch (nn.Linear, transformers' Conv1D, nn.Embedding).
"""
from __future__ import annotations

import difflib
import fnmatch
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from torch import nn

from .errors import PlanError, ShapeError
from .factor import FactorShape, factor_shapes, kron_params, lowrank_params, lowrank_rank_for_ratio, validate_shape
from .yamlio import dump_yaml

__all__ = [
    "KEEP",
    "SUPPORTED_TYPES",
    "CompressionPlan",
    "ModuleSpec",
    "Rule",
    "dense_dims",
    "layer_index",
    "module_type",
    "nearest_shape",
    "selector_matches",
]

KEEP = "keep"
PLAN_VERSION = 1
SUPPORTED_TYPES = ("torch.nn.Linear", "transformers.pytorch_utils.Conv1D", "torch.nn.Embedding")
_RULE_KEYS = ("select", "layers", "shape", "factor", "rank", "blocks", "embedding_factor", "keep", "lowrank_rank",
              "lowrank_ratio")
_PLAN_KEYS = ("version", "name", "description", "default", "rules")
_GLOB_CHARS = set("*?[")


# ----------------------------------------------------------------------------------------------- modules


def module_type(module: nn.Module) -> str | None:
    """"linear", "conv1d" (transformers' Conv1D, weight stored in x out), "embedding", or None if unsupported."""
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.Linear):
        return "linear"
    # duck-typed so that kron does not import transformers just to recognise GPT-2's layer
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None:
        return "conv1d"
    return None


def dense_dims(module: nn.Module) -> tuple[int, int]:
    """(m, n) of the weight in kronsearch's orientation: (out, in) for linear layers, (vocab, dim) for embeddings."""
    kind = module_type(module)
    if kind == "embedding":
        return module.num_embeddings, module.embedding_dim
    if kind == "linear":
        return module.out_features, module.in_features
    if kind == "conv1d":
        return module.nf, module.weight.shape[0]
    raise PlanError(_unsupported_message("?", module))


def layer_index(name: str) -> int | None:
    """The first all-digit component of a dotted module name (`transformer.h.3.attn` -> 3), or None."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


def selector_matches(selector: str, name: str) -> bool:
    """Whether a selector (exact / `.suffix`, glob, or `re:` regex) matches a dotted module name."""
    if selector.startswith("re:"):
        return re.fullmatch(selector[3:], name) is not None
    parts = name.split(".")
    suffixes = (".".join(parts[i:]) for i in range(len(parts)))
    if _GLOB_CHARS & set(selector):
        return any(fnmatch.fnmatchcase(s, selector) for s in suffixes)
    return any(s == selector for s in suffixes)


def _unsupported_message(name: str, module: nn.Module) -> str:
    t = type(module)
    hint = ""
    if t.__name__.startswith(("Kronecker", "FusedKronecker")):
        hint = " (it is already compressed)"
    elif len(list(module.children())):
        hint = " (a container: select its linear layers instead, or narrow the pattern)"
    return (
        f"module {name} is a {t.__module__}.{t.__name__}{hint}, which cannot be compressed; supported types: "
        f"{', '.join(SUPPORTED_TYPES)}"
    )


# ----------------------------------------------------------------------------------------------- shapes


def nearest_shape(m: int, n: int, factor: float, rank: int = 1) -> FactorShape:
    """The valid non-trivial split of an m x n weight whose compression is nearest to `factor`.

    Nearest by |log(compression / factor)|; ties broken by fewer multiply-adds per token, then by A holding more
    parameters than B, then by (m1, n1, m2, n2) ascending. Used by `factor:` rules and the `uniform:` preset.
    """
    if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor >= 1):
        raise PlanError(f"factor must be a finite number >= 1, got {factor!r}")
    shapes = factor_shapes(m, n, rank=rank)
    if not shapes:
        raise ShapeError(f"a {m}x{n} weight has no non-trivial Kronecker split at rank {rank}")

    def key(s: FactorShape):
        a_smaller = 0 if s.m1 * s.n1 > s.m2 * s.n2 else 1
        return (round(abs(math.log(s.compression / factor)), 12), s.macs_per_token, a_smaller, s.shape)

    return min(shapes, key=key)


def _valid_shapes_hint(m: int, n: int, rank: int, target_params: int | None, count: int = 10) -> str:
    shapes = factor_shapes(m, n, rank=rank)
    if not shapes:
        return f"a {m}x{n} weight has no non-trivial split at rank {rank}"
    if target_params is not None:
        shapes = sorted(shapes, key=lambda s: (abs(s.params - target_params), s.shape))[:count]
        shapes.sort(key=lambda s: (-s.params, s.shape))
        head = f"the {len(shapes)} valid shapes [m1, n1, m2, n2] nearest in parameter count"
    else:
        shapes = shapes[:count]
        head = "valid shapes [m1, n1, m2, n2] include"
    listed = "; ".join(f"{list(s.shape)} ({s.params:,} params, {s.compression:.1f}x)" for s in shapes)
    return f"{head}: {listed}"


# ----------------------------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class ModuleSpec:
    """How one module is factored.

    shape: (m1, n1, m2, n2) of A (m1 x n1) and B (m2 x n2) for the (out x in) weight; for a fused projection
        (blocks > 1) the shape of each block, whose weight is (out/blocks x in).
    rank: number of summed Kronecker products Σ_k A_k ⊗ B_k.
    blocks: 1, or the number of equal output blocks of a fused projection (GPT-2's c_attn = [Q; K; V]: 3).
    embedding_factor: for nn.Embedding (v x d) only: A (v x d/f) ⊗ B (1 x f); `shape` must then be None.
    lowrank_rank: the low-rank baseline instead of Kronecker factors: W ≈ U (m x r) · V (r x n) (per block with
        blocks > 1); `shape` and `embedding_factor` must then be None and `rank` 1.
    """

    shape: tuple[int, int, int, int] | None = None
    rank: int = 1
    blocks: int = 1
    embedding_factor: int | None = None
    lowrank_rank: int | None = None

    def __post_init__(self):
        given = [k for k in ("shape", "embedding_factor", "lowrank_rank") if getattr(self, k) is not None]
        if len(given) != 1:
            raise PlanError("a ModuleSpec needs exactly one of shape (Kronecker factors of a linear layer), "
                            "embedding_factor (embeddings) or lowrank_rank (low-rank U·V of a linear layer); got "
                            f"{', '.join(given) if given else 'none'}")
        if self.lowrank_rank is not None:
            _positive_int(self.lowrank_rank, "lowrank_rank")
            if self.rank != 1:
                raise PlanError(f"a low-rank spec takes lowrank_rank (the rank of U·V), not rank={self.rank} (the "
                                "number of summed Kronecker products)")
        elif self.shape is not None:
            object.__setattr__(self, "shape", _as_shape(self.shape, "shape"))
        else:
            _positive_int(self.embedding_factor, "embedding_factor")
            if self.rank != 1 or self.blocks != 1:
                raise PlanError(f"an embedding spec takes neither rank nor blocks (got rank={self.rank}, "
                                f"blocks={self.blocks}): A (v x d/f) ⊗ B (1 x f) is a single product")
        _positive_int(self.rank, "rank")
        _positive_int(self.blocks, "blocks")

    @property
    def kind(self) -> str:
        """"embedding", "lowrank" (U·V, any number of blocks), "fused" (Kronecker, blocks > 1) or "linear"."""
        if self.embedding_factor is not None:
            return "embedding"
        if self.lowrank_rank is not None:
            return "lowrank"
        return "fused" if self.blocks > 1 else "linear"

    def params(self, m: int, n: int) -> int:
        """Parameters of the factors (no bias) for an m x n weight."""
        if self.embedding_factor is not None:
            return m * (n // self.embedding_factor) + self.embedding_factor
        if self.lowrank_rank is not None:
            return self.blocks * lowrank_params(m // self.blocks, n, self.lowrank_rank)
        return self.blocks * kron_params(*self.shape, self.rank)

    def describe(self, m: int | None = None, n: int | None = None) -> str:
        """"A 384x768 ⊗ B 2x1" (with "3 blocks of", ", rank r"); "U 768x192 · V 192x768" for low rank;
        embeddings and low-rank specs need the weight size (m, n) to be concrete."""
        if self.lowrank_rank is not None:
            r = self.lowrank_rank
            if m is not None and n is not None:
                text = f"U {m // self.blocks}x{r} · V {r}x{n}"
            else:
                text = f"U·V of rank {r}"
            return f"{self.blocks} blocks of {text}" if self.blocks > 1 else text
        if self.embedding_factor is not None:
            f = self.embedding_factor
            if m is not None and n is not None:
                return f"A {m}x{n // f} ⊗ B 1x{f}"
            return f"A v x d/{f} ⊗ B 1x{f}"
        m1, n1, m2, n2 = self.shape
        text = f"A {m1}x{n1} ⊗ B {m2}x{n2}"
        if self.rank > 1:
            text += f", rank {self.rank}"
        if self.blocks > 1:
            text = f"{self.blocks} blocks of {text}"
        return text

    def to_dict(self) -> dict:
        if self.embedding_factor is not None:
            return {"embedding_factor": self.embedding_factor}
        if self.lowrank_rank is not None:
            out: dict[str, Any] = {"lowrank_rank": self.lowrank_rank}
            if self.blocks != 1:
                out["blocks"] = self.blocks
            return out
        out = {"shape": list(self.shape), "rank": self.rank}
        if self.blocks != 1:
            out["blocks"] = self.blocks
        return out

    @classmethod
    def from_dict(cls, d: Mapping) -> "ModuleSpec":
        valid = ("shape", "rank", "blocks", "embedding_factor", "lowrank_rank")
        _check_keys(d, valid, "module spec")
        return cls(shape=d.get("shape"), rank=d.get("rank", 1), blocks=d.get("blocks", 1),
                   embedding_factor=d.get("embedding_factor"), lowrank_rank=d.get("lowrank_rank"))


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PlanError(f"{what} must be a positive integer, got {value!r}")
    return value


def _as_shape(value, what: str) -> tuple[int, int, int, int]:
    if (isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 4
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value)):
        raise PlanError(f"{what} must be four positive integers [m1, n1, m2, n2] "
                        f"(A m1 x n1, B m2 x n2), got {value!r}")
    return tuple(int(v) for v in value)


def _check_keys(d: Mapping, valid: Sequence[str], where: str) -> None:
    if not isinstance(d, Mapping):
        raise PlanError(f"{where} must be a mapping with keys {', '.join(valid)}; got {type(d).__name__} {d!r}")
    for key in d:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise PlanError(f"{where}: unknown key {key!r}{hint}; valid keys: {', '.join(valid)}")


# ----------------------------------------------------------------------------------------------- rules


def _parse_layers(value, where: str):
    """None | "all" | "odd" | "even" | tuple of ints (from an int, "3-5", "1,3" or a list of those)."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() in ("all", "odd", "even"):
        return value.strip().lower()
    items = value if isinstance(value, (list, tuple)) else [value]
    out: set[int] = set()
    bad = (f"{where}: layers must be 'all', 'odd', 'even', a layer index, a range 'a-b' or a list of those, "
           f"got {value!r}")
    for item in items:
        if isinstance(item, bool):
            raise PlanError(bad)
        if isinstance(item, int):
            if item < 0:
                raise PlanError(bad)
            out.add(item)
            continue
        if not isinstance(item, str):
            raise PlanError(bad)
        for part in item.split(","):
            m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
            if m is None:
                raise PlanError(bad)
            lo, hi = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
            if hi < lo:
                raise PlanError(f"{where}: layer range {part.strip()!r} is empty (write low-high)")
            out.update(range(lo, hi + 1))
    if not out:
        raise PlanError(bad)
    return tuple(sorted(out))


def _layers_match(layers, index: int | None) -> bool:
    if layers is None:
        return True
    if index is None:
        return False
    if layers == "all":
        return True
    if layers == "odd":
        return index % 2 == 1
    if layers == "even":
        return index % 2 == 0
    return index in layers


@dataclass(frozen=True)
class Rule:
    """One plan rule: the modules it selects and what they become.

    select: one selector or a list (see the module docstring); each must match at least one module.
    layers: None (no filter), "all", "odd", "even", or layer indices (ints / "a-b" ranges).
    Exactly one of: shape (m1, n1, m2, n2) | factor (target compression, nearest valid shape per module) |
    embedding_factor (nn.Embedding only) | lowrank_rank (low-rank U·V of that rank) | lowrank_ratio (low-rank U·V
    at this parameter reduction: r = max(1, floor(m·n / (ratio·(m + n)))) per module) | keep=True (stay dense,
    overriding earlier rules).
    rank: number of summed Kronecker products (with shape or factor only).
    blocks: as in ModuleSpec (with shape, factor, lowrank_rank or lowrank_ratio).
    """

    select: tuple[str, ...]
    layers: Any = None
    shape: tuple[int, int, int, int] | None = None
    factor: float | None = None
    rank: int = 1
    blocks: int = 1
    embedding_factor: int | None = None
    keep: bool = False
    lowrank_rank: int | None = None
    lowrank_ratio: float | None = None
    where: str = field(default="rule", compare=False, repr=False)

    def __post_init__(self):
        w = self.where
        sel = self.select
        if isinstance(sel, str):
            sel = (sel,)
        if (not isinstance(sel, (list, tuple)) or not sel
                or any(not isinstance(s, str) or not s.strip() for s in sel)):
            raise PlanError(f"{w}: select must be a non-empty module selector or a list of them, got {self.select!r}")
        for s in sel:
            if s.startswith("re:"):
                try:
                    re.compile(s[3:])
                except re.error as exc:
                    raise PlanError(f"{w}: select {s!r} is not a valid regular expression ({exc})") from None
        object.__setattr__(self, "select", tuple(sel))
        object.__setattr__(self, "layers", _parse_layers(self.layers, w))
        if not isinstance(self.keep, bool):
            raise PlanError(f"{w}: keep must be true or false, got {self.keep!r}")
        given = [k for k in ("shape", "factor", "embedding_factor", "lowrank_rank", "lowrank_ratio")
                 if getattr(self, k) is not None]
        if self.keep:
            extra = given + [k for k in ("rank", "blocks") if getattr(self, k) != 1]
            if extra:
                raise PlanError(f"{w}: keep: true cannot be combined with {', '.join(extra)}")
            return
        if len(given) != 1:
            raise PlanError(f"{w}: give exactly one of shape, factor, embedding_factor or keep: true "
                            f"(got {', '.join(given) if given else 'none'}); or, for a low-rank U·V instead of "
                            "Kronecker factors, one of lowrank_rank or lowrank_ratio")
        _positive_int(self.rank, f"{w}: rank")
        _positive_int(self.blocks, f"{w}: blocks")
        if self.shape is not None:
            object.__setattr__(self, "shape", _as_shape(self.shape, f"{w}: shape"))
        if self.factor is not None:
            f = self.factor
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or f < 1:
                raise PlanError(f"{w}: factor must be a compression factor >= 1 (e.g. 4), got {f!r}")
            object.__setattr__(self, "factor", float(f))
        if self.embedding_factor is not None:
            _positive_int(self.embedding_factor, f"{w}: embedding_factor")
            if self.rank != 1 or self.blocks != 1:
                raise PlanError(f"{w}: embedding_factor cannot be combined with rank or blocks")
        if self.lowrank_rank is not None:
            _positive_int(self.lowrank_rank, f"{w}: lowrank_rank")
        if self.lowrank_ratio is not None:
            f = self.lowrank_ratio
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or f <= 1:
                raise PlanError(f"{w}: lowrank_ratio must be a parameter reduction > 1 (e.g. 2: U·V holds half the "
                                f"weight's parameters), got {f!r}")
            object.__setattr__(self, "lowrank_ratio", float(f))
        if (self.lowrank_rank is not None or self.lowrank_ratio is not None) and self.rank != 1:
            raise PlanError(f"{w}: rank is the number of summed Kronecker products and does not apply to a low-rank "
                            f"U·V (got rank={self.rank}); give its rank as lowrank_rank")

    def matches(self, name: str) -> bool:
        return _layers_match(self.layers, layer_index(name)) and any(selector_matches(s, name) for s in self.select)

    def spec_for(self, name: str, module: nn.Module) -> ModuleSpec:
        """The concrete spec of this rule for one module, validated against its size."""
        kind = module_type(module)
        if kind is None:
            raise PlanError(f"{self.where}: {_unsupported_message(name, module)}")
        m, n = dense_dims(module)
        tname = type(module).__name__
        if self.embedding_factor is not None:
            if kind != "embedding":
                raise PlanError(f"{self.where}: embedding_factor applies to nn.Embedding only, but {name} is a "
                                f"{tname} ({m} x {n}); give shape or factor for linear layers")
            f = self.embedding_factor
            if n % f or f == 1:
                valid = [d for d in range(2, n + 1) if n % d == 0]
                raise PlanError(f"{self.where}: module {name} (Embedding {m} x {n}) cannot take embedding_factor {f}: "
                                f"f must divide the embedding size {n} and be > 1; valid: {valid}")
            return ModuleSpec(embedding_factor=f)
        if kind == "embedding":
            what = "lowrank_rank or lowrank_ratio" if self.lowrank_rank or self.lowrank_ratio else "shape or factor"
            raise PlanError(f"{self.where}: module {name} is an nn.Embedding ({m} x {n}): use embedding_factor "
                            f"(A v x d/f ⊗ B 1 x f), not {what}")
        dims = f"{tname}, weight {m} x {n} (out x in)"
        if m % self.blocks:
            raise PlanError(f"{self.where}: module {name} ({dims}) cannot be split into {self.blocks} equal "
                            f"output blocks ({m} is not a multiple of {self.blocks})")
        rows = m // self.blocks
        if self.blocks > 1:
            dims += f", {self.blocks} blocks of {rows} x {n}"
        if self.lowrank_rank is not None or self.lowrank_ratio is not None:
            return self._lowrank_spec(name, dims, rows, n)
        if self.factor is not None:
            try:
                shape = nearest_shape(rows, n, self.factor, self.rank).shape
            except ShapeError as exc:
                raise PlanError(f"{self.where}: module {name} ({dims}): {exc}") from None
            return ModuleSpec(shape=shape, rank=self.rank, blocks=self.blocks)
        try:
            validate_shape(rows, n, self.shape, self.rank, what="")
        except ShapeError as exc:
            reason = str(exc).lstrip(": ")
            hint = _valid_shapes_hint(rows, n, self.rank, kron_params(*self.shape, self.rank))
            raise PlanError(f"{self.where}: module {name} ({dims}) cannot take shape {list(self.shape)} at rank "
                            f"{self.rank}: {reason}. {hint}") from None
        m1, n1, m2, n2 = self.shape
        if m1 * n1 == 1 or m2 * n2 == 1:
            raise PlanError(f"{self.where}: module {name} ({dims}): shape {list(self.shape)} has a 1x1 factor, "
                            f"which only rescales the weight (no compression). "
                            f"{_valid_shapes_hint(rows, n, self.rank, rows * n // 2)}")
        return ModuleSpec(shape=self.shape, rank=self.rank, blocks=self.blocks)

    def _lowrank_spec(self, name: str, dims: str, rows: int, n: int) -> ModuleSpec:
        if self.lowrank_ratio is not None:
            r = lowrank_rank_for_ratio(rows, n, self.lowrank_ratio)
            asked = f"lowrank_ratio {_num(self.lowrank_ratio)} (rank {r})"
        else:
            r = self.lowrank_rank
            asked = f"lowrank_rank {r}"
        best = (rows * n - 1) // (rows + n)  # the largest rank with r·(m + n) < m·n
        hint = (f"ranks 1-{best} compress it" if best >= 1
                else "no rank compresses a matrix this thin; keep it dense")
        per = f"each {rows} x {n} block" if self.blocks > 1 else f"a {rows} x {n} weight"
        if r >= min(rows, n):
            raise PlanError(f"{self.where}: module {name} ({dims}): {asked} is >= min(m, n) = {min(rows, n)}, so U·V "
                            f"can hold any {rows} x {n} matrix with {lowrank_params(rows, n, r):,} parameters against "
                            f"{rows * n:,} dense: no compression; {hint}")
        if lowrank_params(rows, n, r) >= rows * n:
            raise PlanError(f"{self.where}: module {name} ({dims}): {asked} gives U·V {lowrank_params(rows, n, r):,} "
                            f"parameters for {per} of {rows * n:,}: no compression; {hint}")
        return ModuleSpec(lowrank_rank=r, blocks=self.blocks)

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"select": self.select[0] if len(self.select) == 1 else list(self.select)}
        if self.layers is not None:
            out["layers"] = self.layers if isinstance(self.layers, str) else list(self.layers)
        if self.keep:
            out["keep"] = True
            return out
        if self.shape is not None:
            out["shape"] = list(self.shape)
        if self.factor is not None:
            out["factor"] = int(self.factor) if float(self.factor).is_integer() else self.factor
        if self.embedding_factor is not None:
            out["embedding_factor"] = self.embedding_factor
        if self.lowrank_rank is not None:
            out["lowrank_rank"] = self.lowrank_rank
        if self.lowrank_ratio is not None:
            out["lowrank_ratio"] = _num(self.lowrank_ratio)
        if self.rank != 1:
            out["rank"] = self.rank
        if self.blocks != 1:
            out["blocks"] = self.blocks
        return out

    @classmethod
    def from_dict(cls, d: Mapping, where: str = "rule") -> "Rule":
        _check_keys(d, _RULE_KEYS, where)
        if "select" not in d:
            raise PlanError(f"{where}: missing key 'select' (the modules the rule applies to)")
        return cls(where=where, **{k: d[k] for k in d})


# ----------------------------------------------------------------------------------------------- plan


class CompressionPlan:
    """An ordered list of `Rule`s over a default of "keep"; later rules override earlier ones.

    Build one with `CompressionPlan([...rules...])`, `.add(select, ...)`, `from_dict`, `from_yaml`, `load`, or
    `kron.presets.preset_plan`. `resolve(model)` checks it against a model.
    """

    def __init__(self, rules: Iterable[Rule | Mapping] = (), *, default: str = KEEP, name: str | None = None,
                 description: str | None = None):
        if default != KEEP:
            raise PlanError(f"plan: default must be 'keep' (modules no rule selects stay dense), got {default!r}")
        for key, value in (("name", name), ("description", description)):
            if value is not None and not isinstance(value, str):
                raise PlanError(f"plan: {key} must be a string, got {value!r}")
        self.default = default
        self.name = name
        self.description = description
        self.rules: list[Rule] = []
        for r in rules:
            self._append(r)

    def _append(self, rule: Rule | Mapping) -> None:
        where = f"rule {len(self.rules) + 1}"
        if isinstance(rule, Rule):
            rule = Rule(**{**rule.__dict__, "where": where})
        else:
            rule = Rule.from_dict(rule, where)
        self.rules.append(rule)

    def add(self, select: str | Sequence[str], **kwargs) -> "CompressionPlan":
        """Append a rule (keyword arguments as in `Rule`); returns the plan for chaining."""
        self._append({"select": select, **kwargs})
        return self

    def __eq__(self, other) -> bool:
        return isinstance(other, CompressionPlan) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"CompressionPlan(name={self.name!r}, rules={len(self.rules)})"

    # --------------------------------------------------------------------------------- serialisation

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"version": PLAN_VERSION}
        if self.name is not None:
            out["name"] = self.name
        if self.description is not None:
            out["description"] = self.description
        out["default"] = self.default
        out["rules"] = [r.to_dict() for r in self.rules]
        return out

    @classmethod
    def from_dict(cls, d: Mapping) -> "CompressionPlan":
        _check_keys(d, _PLAN_KEYS, "plan")
        version = d.get("version", PLAN_VERSION)
        if version != PLAN_VERSION:
            raise PlanError(f"plan: version {version!r} is not supported (this kronsearch reads version "
                            f"{PLAN_VERSION})")
        rules = d.get("rules")
        if rules is None:
            rules = []
        if not isinstance(rules, list):
            raise PlanError(f"plan: rules must be a list of rules, got {type(rules).__name__}")
        return cls(rules, default=d.get("default", KEEP), name=d.get("name"), description=d.get("description"))

    def to_yaml(self) -> str:
        return dump_yaml(self.to_dict())

    @classmethod
    def from_yaml(cls, text: str, *, source: str = "plan") -> "CompressionPlan":
        """Parse YAML (or JSON, a subset of YAML) with yaml.safe_load."""
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise PlanError(f"{source}: not valid YAML/JSON ({' '.join(str(exc).split())})") from None
        if not isinstance(data, Mapping):
            raise PlanError(f"{source}: a plan is a mapping with keys {', '.join(_PLAN_KEYS)}; "
                            f"got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except PlanError as exc:
            raise PlanError(f"{source}: {exc}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "CompressionPlan":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(f"plan: not valid JSON ({exc})") from None
        return cls.from_dict(data)

    def save(self, path: str | Path) -> Path:
        """Write the plan atomically: JSON if the name ends in .json, else YAML."""
        from .fsutil import atomic_write_text

        path = Path(path)
        text = self.to_json() + "\n" if path.suffix.lower() == ".json" else self.to_yaml()
        return atomic_write_text(path, text)

    @classmethod
    def load(cls, path: str | Path) -> "CompressionPlan":
        """Read a plan from a .yaml/.yml/.json file."""
        path = Path(path)
        if not path.is_file():
            raise PlanError(f"plan file {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise PlanError(f"{path}: not a text plan file (YAML/JSON expected; {exc.reason} at byte {exc.start})") \
                from None
        return cls.from_yaml(text, source=str(path))

    # --------------------------------------------------------------------------------- resolution

    def assign(self, model: nn.Module) -> dict[str, int]:
        """Module name -> index of the last rule selecting it (rules applied in order), after checking that every
        selector matches something and every layer filter keeps something."""
        names = [n for n, _ in model.named_modules() if n]
        modules = dict(model.named_modules())
        layer_ids = sorted({i for i in map(layer_index, names) if i is not None})
        owner: dict[str, int] = {}
        for i, rule in enumerate(self.rules):
            hits: list[str] = []
            for sel in rule.select:
                found = [n for n in names if selector_matches(sel, n)]
                if not found:
                    raise PlanError(_no_match_message(rule, sel, names, modules))
                hits.extend(found)
            if rule.layers is not None:
                if isinstance(rule.layers, tuple):
                    missing = [k for k in rule.layers if k not in layer_ids]
                    if missing:
                        raise PlanError(f"{rule.where}: layers {missing} do not exist; the model has layers "
                                        f"{_ranges(layer_ids) if layer_ids else '(none)'}")
                kept = [n for n in hits if _layers_match(rule.layers, layer_index(n))]
                if not kept:
                    have = sorted({layer_index(n) for n in hits} - {None})
                    raise PlanError(f"{rule.where}: select {_fmt_select(rule)} matched {len(set(hits))} modules but "
                                    f"none in layers {_fmt_layers(rule.layers)} (their layers: "
                                    f"{_ranges(have) if have else 'none: they are outside the numbered layers'})")
                hits = kept
            for n in hits:
                owner[n] = i
        return owner

    def resolve(self, model: nn.Module) -> dict[str, ModuleSpec | str]:
        """Name -> ModuleSpec | "keep", in model order, for every supported module (nn.Linear, Conv1D, nn.Embedding)
        and every module a rule selects. Raises PlanError when the plan does not fit the model."""
        owner = self.assign(model)
        out: dict[str, ModuleSpec | str] = {}
        for name, module in model.named_modules():
            if not name:
                continue
            i = owner.get(name)
            rule = self.rules[i] if i is not None else None
            if rule is None or rule.keep:
                if module_type(module) is not None:
                    out[name] = KEEP
                continue
            out[name] = rule.spec_for(name, module)
        return out

    @classmethod
    def from_resolved(cls, resolved: Mapping[str, ModuleSpec | str | Mapping], **kwargs) -> "CompressionPlan":
        """A plan of exact-name rules (anchored regexes) reproducing a resolved mapping."""
        rules = []
        for name, spec in resolved.items():
            if spec == KEEP:
                continue
            spec = spec if isinstance(spec, ModuleSpec) else ModuleSpec.from_dict(spec)
            rules.append(Rule(select=("re:" + re.escape(name),), shape=spec.shape, rank=spec.rank,
                              blocks=spec.blocks, embedding_factor=spec.embedding_factor,
                              lowrank_rank=spec.lowrank_rank))
        return cls(rules, **kwargs)


def _num(x: float) -> int | float:
    """2.0 -> 2 for display and YAML; other floats unchanged."""
    return int(x) if float(x).is_integer() else x


def _fmt_select(rule: Rule) -> str:
    return repr(rule.select[0]) if len(rule.select) == 1 else repr(list(rule.select))


def _fmt_layers(layers) -> str:
    return layers if isinstance(layers, str) else _ranges(list(layers))


def _ranges(ids: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    ids = sorted(ids)
    parts, start = [], None
    for k, v in enumerate(ids):
        if start is None:
            start = v
        if k + 1 == len(ids) or ids[k + 1] != v + 1:
            parts.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ", ".join(parts)


def _no_match_message(rule: Rule, selector: str, names: list[str], modules: Mapping[str, nn.Module]) -> str:
    examples = _example_names(names, modules)
    ids = sorted({i for i in map(layer_index, names) if i is not None})
    layers = f" (layers {_ranges(ids)})" if ids else ""
    return (f"{rule.where}: selector {selector!r} matches no module of this model (patterns of the rule: "
            f"{', '.join(repr(s) for s in rule.select)}). A plain selector must equal a module name or a "
            f"dotted suffix of it, a glob uses * ? [ ], a regex starts with 're:'. Module names look like: "
            f"{', '.join(examples)}{layers}")


def _example_names(names: list[str], modules: Mapping[str, nn.Module], count: int = 10) -> list[str]:
    """Supported modules outside the numbered layers or in the first one: a representative sample."""
    first = min((i for i in map(layer_index, names) if i is not None), default=None)
    picked = [n for n in names if module_type(modules[n]) is not None and layer_index(n) in (None, first)]
    return (picked or names)[:count]
