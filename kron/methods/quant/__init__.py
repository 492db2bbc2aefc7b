"""8-bit weights (`int8`): a *modifier* over any linear structure, not a structure of its own. Each weight tensor of
the layer — the dense matrix, U and V of a low-rank layer, A and B of Kronecker factors — is stored as int8 with one
float32 scale per output channel (per row; for A (rank, m1, n1) one per (k, i) row), symmetric: q = round(w / s),
s = max|row| / 127, q in [-127, 127]. So "Kronecker + int8" is one plan rule:

    - select: mlp.c_fc
      shape: [128, 16, 2, 4]
      quantize: int8          # beside shape/factor, lowrank_rank/lowrank_ratio, or alone (the dense matrix in int8)

It goes beside `prune:` too ("pruning + int8": the kept rows/columns of each pruned matrix stored as int8; the
pruning's block-wide steps see the inner PruneSpecs and PrunedLinear layers, `kron.methods.base.structure_of`).
Spec dicts (plan files, kronsearch.json, trial summaries) are the inner spec's dict plus `quantize: int8`; labels
add " int8" ("dense int8" alone), search options "+int8". Embeddings are not supported (a PlanError names the
module). The layer (`layer.QuantizedLinear`) dequantises on the fly (see its docstring for why not an int8 kernel).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import ClassVar, Mapping

from ...errors import PlanError
from ..base import LINEAR_KINDS, Method, ModuleSpec, Slot, get_method, method_of_module, parse_label, parse_option
from ..base import register, spec_from_dict

__all__ = ["BITS", "QUANTIZE", "Int8Method", "QuantizedSpec", "SCALE_BYTES", "quantized_bytes"]

QUANTIZE = "int8"  # the one value of the `quantize` rule key
BITS = 8
SCALE_BYTES = 4  # scales are float32 whatever the model's dtype


def quantized_bytes(shapes) -> int:
    """Bytes of int8 tensors of these shapes with one float32 scale per row (every axis but the last)."""
    total = 0
    for shape in shapes:
        numel = math.prod(shape)
        total += numel + SCALE_BYTES * (numel // shape[-1])
    return total


@dataclass(frozen=True)
class QuantizedSpec(ModuleSpec):
    """inner: the structure's spec (Kronecker, low-rank, ...), or None for the dense matrix; bits: 8."""

    inner: ModuleSpec | None = None
    bits: int = BITS
    # the inner spec's output blocks (1 for the dense matrix, whose rows are quantised one by one either way); given
    # != 1 it is passed on to the inner spec, so `dataclasses.replace(spec, blocks=3)` works as for the structures
    blocks: int = 1
    method: ClassVar[str] = "int8"

    def __post_init__(self):
        from dataclasses import fields, replace

        if self.inner is not None and self.blocks != 1 and "blocks" in {f.name for f in fields(self.inner)}:
            object.__setattr__(self, "inner", replace(self.inner, blocks=self.blocks))
        object.__setattr__(self, "blocks", getattr(self.inner, "blocks", 1))
        if self.bits != BITS:
            raise PlanError(f"only 8-bit quantisation is supported, got bits={self.bits!r}")
        if isinstance(self.inner, QuantizedSpec):
            raise PlanError("a quantised spec cannot wrap another quantised spec")
        if self.inner is not None and not isinstance(self.inner, ModuleSpec):
            raise PlanError(f"inner must be a module spec or None, got {self.inner!r}")

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
        """int8 elements (1 byte) plus a float32 scale per row of each weight tensor, and what the structure stores
        beside its weights (a pruned matrix's kept-unit indices); `width` is not used."""
        return quantized_bytes(self.weight_shapes(m, n)) + self.aux_bytes(m, n)

    def aux_bytes(self, m: int, n: int) -> int:
        return 0 if self.inner is None else self.inner.aux_bytes(m, n)

    def describe(self, m: int | None = None, n: int | None = None) -> str:
        if self.inner is None:
            return f"dense {m}x{n} int8" if m is not None and n is not None else "dense int8"
        return f"{self.inner.describe(m, n)}, int8"

    def label(self) -> str:
        return "dense int8" if self.inner is None else f"{self.inner.label()} int8"

    def option(self) -> str:
        return QUANTIZE if self.inner is None else f"{self.inner.option()}+{QUANTIZE}"

    def compression(self, m: int | None = None, n: int | None = None) -> float:
        return 1.0 if self.inner is None else self.inner.compression(m, n)

    def to_dict(self) -> dict:
        return {**({} if self.inner is None else self.inner.to_dict()), "quantize": QUANTIZE}

    def to_rule(self) -> dict:
        return {**({} if self.inner is None else self.inner.to_rule()), "quantize": QUANTIZE}

    def check(self, slot: Slot) -> None:
        _check_slot(slot, self.inner)
        if self.inner is not None:
            self.inner.check(slot)

    @classmethod
    def _from_dict(cls, d: Mapping) -> "QuantizedSpec":
        q = d.get("quantize")
        if q != QUANTIZE:
            raise PlanError(f"module spec: quantize must be {QUANTIZE!r}, got {q!r}")
        rest = {k: v for k, v in d.items() if k != "quantize"}
        if set(rest) <= {"blocks"}:  # the dense matrix (a fused projection's blocks change nothing for it)
            return cls(inner=None)
        return cls(inner=spec_from_dict(rest))


def _check_slot(slot: Slot, inner: ModuleSpec | None) -> None:
    """PlanError naming the module where int8 does not apply: embeddings, or a structure without weight tensors."""
    if slot.kind not in LINEAR_KINDS:
        raise PlanError(f"{slot.where}: module {slot.name} is an nn.{slot.type_name} ({slot.m} x {slot.n}): "
                        f"quantize: {QUANTIZE} supports linear layers (nn.Linear, Conv1D) and their Kronecker or "
                        "low-rank factors only, not embeddings")
    if inner is not None:
        try:
            inner.weight_shapes(slot.m, slot.n)
        except NotImplementedError:
            raise PlanError(f"{slot.where}: module {slot.name}: quantize: {QUANTIZE} does not support method "
                            f"{inner.method!r} (its spec does not list its weight tensors)") from None


class Int8Method(Method):
    name = "int8"
    spec_type = QuantizedSpec
    module_kinds = LINEAR_KINDS
    primary_keys = ("quantize",)
    option_keys: dict = {}
    alternative = "8-bit weights"
    modifier = True
    order = 1000
    dict_key = "quantize"
    rule_hint = f"quantize: {QUANTIZE}"
    data_init = True  # passes init="data" on to the inner structure (which falls back to SVD without one)

    def validate_rule(self, options: dict, where: str) -> dict:
        out = dict(options)
        q = out.get("quantize")
        if q != QUANTIZE:
            raise PlanError(f"{where}: quantize must be {QUANTIZE!r} (8-bit weights, one scale per output channel), "
                            f"got {q!r}")
        return out

    def rule_to_dict(self, options: Mapping) -> dict:
        return {"quantize": QUANTIZE}

    def spec_for(self, options: Mapping, slot: Slot) -> QuantizedSpec:
        return self.modify(None, options, slot)

    def modify(self, inner: ModuleSpec | None, options: Mapping, slot: Slot) -> QuantizedSpec:
        _check_slot(slot, inner)
        return QuantizedSpec(inner=inner)

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
        return QuantizedLinear.from_module(inner, quantize=init != "none", reference=module)

    def layer_types(self) -> tuple[type, ...]:
        from .layer import QuantizedLinear

        return (QuantizedLinear,)

    def recognise(self, module) -> QuantizedSpec | None:
        from torch import nn

        from .layer import QuantizedLinear

        if not isinstance(module, QuantizedLinear):
            return None
        if isinstance(module.inner, nn.Linear):
            return QuantizedSpec(inner=None)
        method = method_of_module(module.inner)
        if method is None:
            raise PlanError(f"a quantised {type(module.inner).__name__} is not a layer of any registered method")
        return QuantizedSpec(inner=method.recognise(module.inner))

    def parse_label(self, text: str) -> QuantizedSpec | None:
        if text == "dense int8":
            return QuantizedSpec(inner=None)
        m = re.fullmatch(r"(.+) int8", text)
        inner = parse_label(m.group(1)) if m else None
        return None if inner is None else QuantizedSpec(inner=inner)

    def parse_option(self, text: str) -> QuantizedSpec | None:
        text = text.strip()
        if text == QUANTIZE:
            return QuantizedSpec(inner=None)
        m = re.fullmatch(r"(.+)\+int8", text)
        inner = parse_option(m.group(1)) if m else None
        return None if inner is None else QuantizedSpec(inner=inner)


register(Int8Method())
