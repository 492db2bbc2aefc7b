"""8- or 4-bit weights (`int8`, `int4`): a *modifier* over any linear structure, not a structure of its own. Each
weight tensor of the layer — the dense matrix, U and V of a low-rank layer, A and B of Kronecker factors — is stored
quantised, symmetric, with float32 scales:

* int8: one scale per output channel (per row; for A (rank, m1, n1) one per (k, i) row): q = round(w / s),
  s = max|row| / 127, q in [-127, 127];
* int4: one scale per group of `group_size` (default 128) consecutive elements of each row (the input side; the
  last group shorter, a shorter row one group): s = max|group| / 7, q in [-7, 7], two values per byte (`packing`).

So "Kronecker + int8" is one plan rule:

    - select: mlp.c_fc
      shape: [128, 16, 2, 4]
      quantize: int8          # beside shape/factor, lowrank_rank/lowrank_ratio, or alone (the dense matrix in int8)
    - select: mlp.c_proj
      quantize: int4          # the dense matrix in 4 bits
      group_size: 64          # int4 only; default 128

It goes beside `prune:` too ("pruning + int8": the kept rows/columns of each pruned matrix stored as int8; the
pruning's block-wide steps see the inner PruneSpecs and PrunedLinear layers, `kron.methods.base.structure_of`).
Spec dicts (plan files, kronsearch.json, trial summaries) are the inner spec's dict plus `quantize: int8` (or
`quantize: int4`, and `group_size` when not 128); labels add " int8" / " int4" (" int4 g64" for other group sizes;
"dense int8" alone), search options "+int8" / "+int4" ("+int4:g64"). Embeddings are not supported (a PlanError
names the module). The layer (`layer.QuantizedLinear`) dequantises on the fly (see its docstring for why not an
int8 kernel). One method (`QuantMethod`, name "quant") owns both widths: its specs' `method` is "int8" or "int4",
both aliases of it in the registry.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal, Mapping

from pydantic import Field, field_validator

from ...errors import PlanError
from ..base import LINEAR_KINDS, Method, MethodOptions, ModuleSpec, Slot, get_method, method_of_module, parse_label
from ..base import parse_option, positive_int, register, spec_from_dict

__all__ = ["BITS", "DEFAULT_GROUP_SIZE", "INT4", "Int8Method", "QUANTIZE", "QUANTIZE_VALUES", "QuantMethod",
           "QuantizedSpec", "SCALE_BYTES", "quantized_bytes"]

QUANTIZE = "int8"  # the first value of the `quantize` rule key (8-bit weights, one scale per row)
INT4 = "int4"  # its 4-bit value (one scale per group of `group_size` inputs)
QUANTIZE_VALUES = {QUANTIZE: 8, INT4: 4}  # rule value -> bits
BITS = 8  # the default width (a QuantizedSpec without bits)
DEFAULT_GROUP_SIZE = 128  # = packing.DEFAULT_GROUP_SIZE (not imported: this module stays torch-free)
SCALE_BYTES = 4  # scales are float32 whatever the model's dtype


def quantized_bytes(shapes, bits: int = BITS, group_size: int | None = None) -> int:
    """Bytes of quantised tensors of these shapes: ceil(n·bits / 8) bytes per row of n (the last axis; int8: n,
    int4: two values per byte) plus a float32 scale per row (group_size None) or per group of a row."""
    total = 0
    for shape in shapes:
        n = shape[-1]
        rows = math.prod(shape) // n if n else math.prod(shape[:-1])
        scales = 1 if group_size is None else max(-(-n // group_size), 1)
        total += rows * (-(-n * bits // 8) + SCALE_BYTES * scales)
    return total


class QuantOptions(MethodOptions):
    """What a search or a profile offers of quantisation: every structure (and the dense matrix) also in each of
    `bits` (8: per-row scales; 4: `group_size` elements per scale), and the float structures too unless
    `keep_float` is false."""

    bits: list[Literal[8, 4]] = Field(default_factory=lambda: [8], min_length=1,
                                      description="the widths offered: 8 (int8) and/or 4 (int4)")
    group_size: int = Field(DEFAULT_GROUP_SIZE, ge=1, description="int4: elements per float32 scale along a row")
    keep_float: bool = Field(True, description="also offer every structure unquantised (float weights)")

    @field_validator("bits")
    @classmethod
    def _unique(cls, v):
        return sorted(set(v), reverse=True)  # 8 before 4, as the options list them


def _name(bits: int) -> str:
    return QUANTIZE if bits == 8 else INT4


@dataclass(frozen=True)
class QuantizedSpec(ModuleSpec):
    """inner: the structure's spec (Kronecker, low-rank, ...), or None for the dense matrix; bits: 8 or 4;
    group_size: the elements per scale of a 4-bit row (None for 8 bits, whose scales are per row; 4 bits: None
    becomes 128). `method` is "int8" or "int4" (a property: the registry finds `QuantMethod` by either)."""

    inner: ModuleSpec | None = None
    bits: int = BITS
    # the inner spec's output blocks (1 for the dense matrix, whose rows are quantised one by one either way); given
    # != 1 it is passed on to the inner spec, so `dataclasses.replace(spec, blocks=3)` works as for the structures
    blocks: int = 1
    group_size: int | None = None

    def __post_init__(self):
        from dataclasses import fields, replace

        if self.inner is not None and self.blocks != 1 and "blocks" in {f.name for f in fields(self.inner)}:
            object.__setattr__(self, "inner", replace(self.inner, blocks=self.blocks))
        object.__setattr__(self, "blocks", getattr(self.inner, "blocks", 1))
        if isinstance(self.bits, bool) or self.bits not in (8, 4):
            raise PlanError(f"only 8- and 4-bit quantisation are supported, got bits={self.bits!r}")
        if self.bits == 8 and self.group_size is not None:
            raise PlanError(f"group_size applies to int4 only (int8 has one scale per row), got "
                            f"group_size={self.group_size!r}")
        if self.bits == 4:
            if self.group_size is None:
                object.__setattr__(self, "group_size", DEFAULT_GROUP_SIZE)
            positive_int(self.group_size, "int4 group_size")
        if isinstance(self.inner, QuantizedSpec):
            raise PlanError("a quantised spec cannot wrap another quantised spec")
        if self.inner is not None and not isinstance(self.inner, ModuleSpec):
            raise PlanError(f"inner must be a module spec or None, got {self.inner!r}")

    @property
    def method(self) -> str:
        return _name(self.bits)

    @property
    def kind(self) -> str:
        return self.inner.kind if self.inner is not None else "linear"

    def weight_shapes(self, m: int, n: int) -> list[tuple[int, ...]]:
        return [(m, n)] if self.inner is None else self.inner.weight_shapes(m, n)

    def params(self, m: int, n: int) -> int:
        return m * n if self.inner is None else self.inner.params(m, n)

    def macs(self, m: int, n: int) -> int:
        return m * n if self.inner is None else self.inner.macs(m, n)

    def bytes(self, m: int, n: int, width: int = 4) -> int:
        """The stored values (int8: 1 byte each; int4: ceil(n/2) bytes per row of n) plus their float32 scales (one
        per row; int4: per group of a row) of each weight tensor, and what the structure stores beside its weights
        (a pruned matrix's kept-unit indices); `width` is not used."""
        return quantized_bytes(self.weight_shapes(m, n), self.bits, self.group_size) + self.aux_bytes(m, n)

    def aux_bytes(self, m: int, n: int) -> int:
        return 0 if self.inner is None else self.inner.aux_bytes(m, n)

    def _suffix(self, sep: str) -> str:
        """ "int8", "int4", or "int4" + sep + "g64" for a group size other than the default."""
        if self.bits == 8 or self.group_size == DEFAULT_GROUP_SIZE:
            return self.method
        return f"{self.method}{sep}g{self.group_size}"

    def describe(self, m: int | None = None, n: int | None = None) -> str:
        what = self.method if self.bits == 8 else f"int4 (groups of {self.group_size})"
        if self.inner is None:
            return f"dense {m}x{n} {what}" if m is not None and n is not None else f"dense {what}"
        return f"{self.inner.describe(m, n)}, {what}"

    def label(self) -> str:
        return f"dense {self._suffix(' ')}" if self.inner is None else f"{self.inner.label()} {self._suffix(' ')}"

    def option(self) -> str:
        return self._suffix(":") if self.inner is None else f"{self.inner.option()}+{self._suffix(':')}"

    def compression(self, m: int | None = None, n: int | None = None) -> float:
        return 1.0 if self.inner is None else self.inner.compression(m, n)

    def _keys(self) -> dict:
        if self.bits == 8:
            return {"quantize": QUANTIZE}
        return {"quantize": INT4, **({"group_size": self.group_size} if self.group_size != DEFAULT_GROUP_SIZE else {})}

    def to_dict(self) -> dict:
        return {**({} if self.inner is None else self.inner.to_dict()), **self._keys()}

    def to_rule(self) -> dict:
        return {**({} if self.inner is None else self.inner.to_rule()), **self._keys()}

    def check(self, slot: Slot) -> None:
        _check_slot(slot, self.inner, self.method)
        if self.inner is not None:
            self.inner.check(slot)

    @classmethod
    def _from_dict(cls, d: Mapping) -> "QuantizedSpec":
        q = d.get("quantize")
        if q not in QUANTIZE_VALUES:
            raise PlanError(f"module spec: quantize must be {QUANTIZE!r} or {INT4!r}, got {q!r}")
        group = d.get("group_size")
        if group is not None and q != INT4:
            raise PlanError(f"module spec: group_size applies to quantize: {INT4} only, got it with quantize: {q}")
        if group is not None:
            positive_int(group, "module spec: group_size")
        rest = {k: v for k, v in d.items() if k not in ("quantize", "group_size")}
        kw = {"bits": QUANTIZE_VALUES[q], "group_size": group}
        if set(rest) <= {"blocks"}:  # the dense matrix (a fused projection's blocks change nothing for it)
            return cls(inner=None, **kw)
        return cls(inner=spec_from_dict(rest), **kw)


def _check_slot(slot: Slot, inner: ModuleSpec | None, what: str | None) -> None:
    """PlanError naming the module where quantisation does not apply: embeddings, or a structure without weight
    tensors. what: the rule's value ("int8", "int4"), None where the rule's options no longer hold it."""
    key = f"quantize: {what}" if what else "quantize"
    if slot.kind not in LINEAR_KINDS:
        raise PlanError(f"{slot.where}: module {slot.name} is an nn.{slot.type_name} ({slot.m} x {slot.n}): "
                        f"{key} supports linear layers (nn.Linear, Conv1D) and their Kronecker or "
                        "low-rank factors only, not embeddings")
    if inner is not None:
        try:
            inner.weight_shapes(slot.m, slot.n)
        except NotImplementedError:
            raise PlanError(f"{slot.where}: module {slot.name}: {key} does not support method "
                            f"{inner.method!r} (its spec does not list its weight tensors)") from None


class QuantMethod(Method):
    """The quantisation modifier, both widths: rule keys `quantize: int8 | int4` and (int4 only) `group_size: N`.

    `group_size` is a primary key rather than an option key so that it belongs to this method alone: option keys
    are shared by every structure (prune refuses any it sees), and a primary key given without `quantize` still
    reaches `validate_rule`, which names it (as does `keep: true` beside it)."""

    name = "quant"
    aliases = (QUANTIZE, INT4)  # the `method` of its specs
    spec_type = QuantizedSpec
    module_kinds = LINEAR_KINDS
    primary_keys = ("quantize", "group_size")
    option_keys: dict = {}
    alternative = "8- or 4-bit weights"
    modifier = True
    order = 1000
    dict_key = "quantize"
    rule_hint = f"quantize: {QUANTIZE} or {INT4}"
    data_init = True  # passes init="data" on to the inner structure (which falls back to SVD without one)

    def validate_rule(self, options: dict, where: str) -> dict:
        out = dict(options)
        q = out.get("quantize")
        if q is None and "group_size" in out:
            raise PlanError(f"{where}: group_size is the group of a 4-bit layer's scales and needs quantize: {INT4} "
                            "beside it")
        if q not in QUANTIZE_VALUES:
            raise PlanError(f"{where}: quantize must be {QUANTIZE!r} (8-bit weights, one scale per output channel) "
                            f"or {INT4!r} (4-bit weights, one scale per group of group_size inputs), got {q!r}")
        if "group_size" in out:
            if q != INT4:
                raise PlanError(f"{where}: group_size applies to quantize: {INT4} only ({q} has one scale per row), "
                                f"got group_size: {out['group_size']!r} with quantize: {q}")
            positive_int(out["group_size"], f"{where}: group_size")
            if out["group_size"] == DEFAULT_GROUP_SIZE:
                del out["group_size"]  # the default, left out as rule_to_dict would
        return out

    def rule_to_dict(self, options: Mapping) -> dict:
        q = options.get("quantize", QUANTIZE)
        out = {"quantize": q}
        if q == INT4 and options.get("group_size", DEFAULT_GROUP_SIZE) != DEFAULT_GROUP_SIZE:
            out["group_size"] = options["group_size"]
        return out

    def spec_for(self, options: Mapping, slot: Slot) -> QuantizedSpec:
        return self.modify(None, options, slot)

    # --- search and profile
    options_type = QuantOptions

    def alias_options(self, alias: str | None) -> dict:
        return {"bits": [QUANTIZE_VALUES[alias]]} if alias in QUANTIZE_VALUES else {}

    def variants(self, inner: ModuleSpec | None, options: QuantOptions) -> list[QuantizedSpec]:
        """`inner` (None: the dense matrix) in each of the options' widths; none for a structure that does not list
        its weight tensors (embeddings)."""
        if inner is not None:
            try:
                inner.weight_shapes(1, 1)
            except NotImplementedError:
                return []
        return [QuantizedSpec(inner=inner, bits=b, group_size=options.group_size if b == 4 else None)
                for b in options.bits]

    def keeps_unmodified(self, options: QuantOptions) -> bool:
        return options.keep_float

    def candidates(self, m: int, n: int, options: QuantOptions, span) -> list[QuantizedSpec]:
        """The dense matrix in each width (the variants of the structures come from `variants`)."""
        return self.variants(None, options)

    def modifier_damage(self, block, spec: QuantizedSpec) -> float:
        """f of the dense matrix stored in the spec's width (`kron.damage`: added to its structure's damage)."""
        from .layer import fake_quantize

        return block.f(fake_quantize(block.W, spec.bits, spec.group_size))

    def modify(self, inner: ModuleSpec | None, options: Mapping, slot: Slot) -> QuantizedSpec:
        q = options.get("quantize")
        _check_slot(slot, inner, q)
        return QuantizedSpec(inner=inner, bits=QUANTIZE_VALUES[q], group_size=options.get("group_size"))

    def build(self, module, spec: QuantizedSpec, init: str, stats=None, **extra):
        from .layer import QuantizedLinear, dense_linear

        if spec.inner is None:
            inner = dense_linear(module)
        else:
            method = get_method(spec.inner.method)
            if init == "data" and not method.data_init:
                init = "svd"
            kw = {"stats": stats} if init == "data" else {}
            inner = method.build(module, spec.inner, init, **kw, **extra)
        return QuantizedLinear.from_module(inner, quantize=init != "none", reference=module, bits=spec.bits,
                                           group_size=spec.group_size)

    def layer_types(self) -> tuple[type, ...]:
        from .layer import QuantizedLinear

        return (QuantizedLinear,)

    def recognise(self, module) -> QuantizedSpec | None:
        from torch import nn

        from .layer import QuantizedLinear

        if not isinstance(module, QuantizedLinear):
            return None
        kw = {"bits": module.bits, "group_size": module.group_size}
        if isinstance(module.inner, nn.Linear):
            return QuantizedSpec(inner=None, **kw)
        method = method_of_module(module.inner)
        if method is None:
            raise PlanError(f"a quantised {type(module.inner).__name__} is not a layer of any registered method")
        return QuantizedSpec(inner=method.recognise(module.inner), **kw)

    def parse_label(self, text: str) -> QuantizedSpec | None:
        m = re.fullmatch(r"(.+) (int8|int4(?: g(\d+))?)", text)
        if m is None:
            return None
        kw = _widths(m.group(2), m.group(3))
        if m.group(1) == "dense":
            return QuantizedSpec(inner=None, **kw)
        inner = parse_label(m.group(1))
        return None if inner is None else QuantizedSpec(inner=inner, **kw)

    def parse_option(self, text: str) -> QuantizedSpec | None:
        m = re.fullmatch(r"\s*(?:(.+)\+)?(int8|int4(?::g(\d+))?)\s*", text)
        if m is None:
            return None
        kw = _widths(m.group(2), m.group(3))
        if m.group(1) is None:
            return QuantizedSpec(inner=None, **kw)
        inner = parse_option(m.group(1))
        return None if inner is None else QuantizedSpec(inner=inner, **kw)


def _widths(value: str, group: str | None) -> dict:
    """QuantizedSpec keywords of a label's or option's "int8" / "int4" / "int4 g64"."""
    if value == QUANTIZE:
        return {"bits": 8}
    return {"bits": 4, "group_size": int(group) if group else None}


Int8Method = QuantMethod  # the name of the first release (int8 only), which other code may still import

register(QuantMethod())
