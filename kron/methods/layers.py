"""What the factorised linear layers share (tensorly-torch's shape): reading a dense weight in the nn.Linear
orientation, building a layer from a dense module (`from_linear`, keeping device and dtype), and fused projections
split into equal output blocks, each its own factorised layer."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import PlanError

__all__ = ["FactoredLinear", "FusedLinear", "linear_weight", "set_factors"]


def linear_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (out, in) weight and bias of an nn.Linear or a transformers Conv1D (stored as (in, out))."""
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return module.weight.T, module.bias
    raise TypeError(
        f"cannot factor a {type(module).__name__}: supported types are torch.nn.Linear and "
        "transformers.pytorch_utils.Conv1D"
    )


def set_factors(new: nn.Module, module: nn.Module, factors, names: tuple[str, ...]) -> nn.Module | None:
    """`new` (a layer built with init "none": structure only) with its factor tensors set from `factors` — one
    tuple per output block (a fused layer's `blocks`, else one), in the order of `names` — and the bias of the
    dense `module`; None when the counts do not match."""
    parts = list(new.blocks) if len(factors) > 1 else [new]
    if len(parts) != len(factors):
        return None
    bias = linear_weight(module)[1]
    with torch.no_grad():
        for part, tensors in zip(parts, factors):
            for attr, t in zip(names, tensors):
                getattr(part, attr).copy_(t)
        if bias is not None:
            new.bias.copy_(bias)
    return new


class FactoredLinear(nn.Module):
    """Base of a linear layer stored as factors. Subclasses set `in_features`, `out_features`, `bias`,
    `init_error`, take `(in_features, out_features, *args, bias=, device=, dtype=)` and implement `forward`,
    `to_dense`, `macs_per_token`, `factor_params`, `_check(out, in, *args, what=...)` (raise on arguments that do
    not fit an out x in weight) and `_nearest(weight, *args)` (the
    data-free factors of a dense (out, in) weight); layers with a data-aware init also implement
    `_data_aware(weight, S, *args, ridge=)`, used by `from_linear(module, *args, S=...)`."""

    init_error: float | None
    init_source: str | None = None  # "svd" | "data" once initialised from a dense weight

    @classmethod
    def _check(cls, out_features: int, in_features: int, *args, what: str) -> None:
        raise NotImplementedError

    @classmethod
    def _nearest(cls, weight: torch.Tensor, *args) -> tuple[dict[str, torch.Tensor], float]:
        """The factors (parameter name -> tensor) that best approximate a dense (out, in) weight, and their
        relative Frobenius error."""
        raise NotImplementedError

    @classmethod
    def _data_aware(cls, weight: torch.Tensor, S: torch.Tensor, *args,
                    ridge: float | None = None) -> tuple[dict[str, torch.Tensor], float, str]:
        """The factors minimising the output error on inputs with second moment S (`kron.datainit`), their relative
        Frobenius (weight) error, and which init won ("data", or "svd" where it was better on S). Layers without a
        data-aware init leave this unimplemented."""
        raise NotImplementedError(f"{cls.__name__} has no data-aware initialisation")

    @classmethod
    def _from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, *args, S: torch.Tensor | None = None,
                     ridge: float | None = None):
        """A layer holding `_nearest(weight, *args)` (or, given the input second moment S, `_data_aware(weight, S,
        *args)`) and the bias, on the weight's device and dtype."""
        out_f, in_f = weight.shape
        layer = cls(in_f, out_f, *args, bias=bias is not None, device=weight.device, dtype=weight.dtype)
        if S is None:
            factors, rel_error = cls._nearest(weight, *args)
            source = "svd"
        else:
            factors, rel_error, source = cls._data_aware(weight, S, *args, ridge=ridge)
        layer.init_source = source
        with torch.no_grad():
            for name, value in factors.items():
                getattr(layer, name).copy_(value.to(weight.dtype))
            if bias is not None:
                layer.bias.copy_(bias)
        layer.init_error = rel_error
        return layer

    @classmethod
    def from_linear(cls, module: nn.Module, *args, **init_kw):
        """Factor an nn.Linear or GPT-2 Conv1D (see the subclass for the arguments), keeping device and dtype;
        keyword arguments (a data-aware init's `S=`, `ridge=`) go to the subclass's `_from_weight`."""
        weight, bias = linear_weight(module)
        out_f, in_f = weight.shape
        cls._check(out_f, in_f, *args, what=f"{type(module).__name__}({in_f} -> {out_f})")
        return cls._from_weight(weight, bias, *args, **init_kw)

    def to_dense(self) -> torch.Tensor:
        """The equivalent dense weight, (out, in) like nn.Linear.weight."""
        raise NotImplementedError


class FusedLinear(nn.Module):
    """Equal output blocks of a fused projection, each its own factored layer (no bias), plus the fused bias.

    Subclasses set `block_type` (a FactoredLinear); `from_linear(module, *args, blocks=3)` splits the rows of a
    dense weight into `blocks` equal parts and factors each with `*args`.
    """

    block_type: type = FactoredLinear

    def __init__(self, blocks: list[nn.Module], bias: torch.Tensor | None):
        super().__init__()
        if len({b.in_features for b in blocks}) != 1:
            raise ValueError(f"all blocks of a {type(self).__name__} need the same input size")
        self.blocks = nn.ModuleList(blocks)
        self.in_features = blocks[0].in_features
        self.out_features = sum(b.out_features for b in blocks)
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    @classmethod
    def from_linear(cls, module: nn.Module, *args, blocks: int = 3, **init_kw):
        """Split the rows into `blocks` equal parts and factor each; keyword arguments (a data-aware init's `S=`:
        the same input, so the same S, for every block) go to the block type's `_from_weight`."""
        weight, bias = linear_weight(module)
        out_f, in_f = weight.shape
        if blocks < 1 or out_f % blocks:
            raise PlanError(f"cannot split {out_f} output features into {blocks} equal blocks")
        rows = out_f // blocks
        cls.block_type._check(rows, in_f, *args, what=f"each of {blocks} blocks ({in_f} -> {rows})")
        parts = [cls.block_type._from_weight(w, None, *args, **init_kw) for w in weight.split(rows, dim=0)]
        return cls(parts, bias)

    @property
    def init_error(self) -> float | None:
        errs = [b.init_error for b in self.blocks]
        if any(e is None for e in errs):
            return None
        return math.sqrt(sum(e * e for e in errs) / len(errs))

    @property
    def init_source(self) -> str | None:
        """ "data" when every block took the data-aware init, else "svd" (None before any init)."""
        srcs = {getattr(b, "init_source", None) for b in self.blocks}
        return srcs.pop() if len(srcs) == 1 else "svd"

    @property
    def macs_per_token(self) -> int:
        return sum(b.macs_per_token for b in self.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([b(x) for b in self.blocks], dim=-1)
        return y + self.bias if self.bias is not None else y

    def to_dense(self) -> torch.Tensor:
        return torch.cat([b.to_dense() for b in self.blocks], dim=0)
