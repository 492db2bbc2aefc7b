"""The pruned linear layer: a plain dense matmul on the rows (or columns) that remain, and the indices of those
rows/columns in the teacher's weight (buffers, so a saved model records which heads and neurons it kept)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import PlanError
from ..layers import linear_weight
from .spec import PruneSpec

__all__ = ["PrunedLinear", "unit_indices"]


def unit_indices(size: int, blocks: int, units: int, keep: Sequence[int], device=None) -> torch.Tensor:
    """Indices, along a side of `size` rows or columns made of `blocks` equal blocks of `units` equal units each, of
    the units in `keep` (in every block: GPT-2's fused c_attn keeps the same heads of Q, K and V)."""
    width = size // (blocks * units)
    per_block = size // blocks
    keep_t = torch.as_tensor(list(keep), dtype=torch.long, device=device)
    inner = (keep_t[:, None] * width + torch.arange(width, device=device)[None, :]).reshape(-1)
    return (torch.arange(blocks, device=device)[:, None] * per_block + inner[None, :]).reshape(-1)


class PrunedLinear(nn.Module):
    """y = x · Wᵀ + b on the kept rows/columns of a dense (out x in) weight: `weight` is (kept rows x kept columns),
    `kept_ids` (a buffer, saved) are the kept units, `kept_rows` / `kept_cols` their rows/columns in the
    dense weight. The pruned side is part of the spec (`side`); the
    other side keeps everything."""

    def __init__(self, dense_in: int, dense_out: int, spec: PruneSpec, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.part, self.side, self.units, self.kept = spec.part, spec.side, spec.units, spec.kept
        self.blocks, self.scope = spec.blocks, spec.scope
        self.dense_in, self.dense_out = dense_in, dense_out
        rows, cols = spec.pruned_dims(dense_out, dense_in)
        self.in_features, self.out_features = cols, rows
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(rows, cols, **kw))
        self.bias = nn.Parameter(torch.zeros(rows, **kw)) if bias else None
        if self.weight.device.type != "meta":  # nn.Linear's init: a structure-only build is still a usable layer
            nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)
        # the kept units among the teacher's, saved with the weights (int32: what `PruneSpec.bytes` counts)
        self.register_buffer("kept_ids", torch.arange(spec.kept, dtype=torch.int32, device=device))
        self.init_error: float | None = None
        self.init_source: str | None = None

    @classmethod
    def from_module(cls, module: nn.Module, spec: PruneSpec, keep: Sequence[int] | None = None, *,
                    source: str | None = None) -> "PrunedLinear":
        """The kept units `keep` (indices among spec.units; default the first spec.kept) of an nn.Linear or GPT-2
        Conv1D, on its device and dtype. source: how `keep` was chosen ("data", "svd" = weight magnitude), for the
        report; None builds the structure only (weights to be loaded), leaving the weights uninitialised."""
        weight, bias = linear_weight(module)
        out_f, in_f = weight.shape
        keep = list(range(spec.kept)) if keep is None else sorted(keep)
        if len(keep) != spec.kept or len(set(keep)) != len(keep) or not all(0 <= k < spec.units for k in keep):
            raise PlanError(f"prune: {len(keep)} kept units {keep} do not fit a spec keeping {spec.kept} of "
                            f"{spec.units}")
        layer = cls(in_f, out_f, spec, bias=bias is not None, device=weight.device, dtype=weight.dtype)
        size = out_f if spec.side == "out" else in_f
        idx = unit_indices(size, spec.blocks, spec.units, keep, device=weight.device)
        with torch.no_grad():
            layer.kept_ids.copy_(torch.as_tensor(keep, dtype=torch.int32))
            if source is None or weight.device.type == "meta":
                return layer
            kept_w = weight.index_select(0, idx) if spec.side == "out" else weight.index_select(1, idx)
            layer.weight.copy_(kept_w)
            if bias is not None:
                layer.bias.copy_(bias.index_select(0, idx) if spec.side == "out" else bias)
            total = weight.float().pow(2).sum()
            layer.init_error = float(((total - kept_w.float().pow(2).sum()).clamp_min(0) / total.clamp_min(1e-30))
                                     .sqrt())
        layer.init_source = source
        return layer

    def spec(self) -> PruneSpec:
        return PruneSpec(part=self.part, side=self.side, units=self.units, kept=self.kept, blocks=self.blocks,
                         scope=self.scope)

    @property
    def macs_per_token(self) -> int:
        # from the kept sizes, not the weight tensor, which a 4-bit modifier stores packed at half its width
        return self.out_features * self.in_features

    @property
    def factor_params(self) -> int:
        return self.out_features * self.in_features

    def kept_units(self) -> list[int]:
        """The kept units (heads / KV groups, or neurons) among the teacher's, increasing."""
        return [int(i) for i in self.kept_ids]

    def _kept(self, side: str) -> torch.Tensor:
        size = self.dense_out if side == "out" else self.dense_in
        if side != self.side:
            return torch.arange(size, device=self.weight.device)
        return unit_indices(size, self.blocks, self.units, self.kept_units(), device=self.weight.device)

    @property
    def kept_rows(self) -> torch.Tensor:
        """Indices of this layer's rows in the teacher's (out, in) weight."""
        return self._kept("out")

    @property
    def kept_cols(self) -> torch.Tensor:
        """Indices of this layer's columns in the teacher's (out, in) weight."""
        return self._kept("in")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def to_dense(self) -> torch.Tensor:
        """The (smaller) dense weight this layer is, (out, in) like nn.Linear.weight."""
        return self.weight

    def to_full(self) -> torch.Tensor:
        """The weight at the teacher's size, zeros in the removed rows/columns (to compare with the dense one)."""
        full = self.weight.new_zeros(self.dense_out, self.dense_in)
        full[self.kept_rows[:, None], self.kept_cols[None, :]] = self.weight
        return full

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, {self.part} {self.kept}/{self.units} kept "
                f"({self.side}), bias={self.bias is not None}")
