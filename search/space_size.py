"""The size of a search space — the exact number of distinct non-empty plans its choices encode, however large —
and its summary lines (`search.space.SearchSpace` inherits `SpaceSize`)."""
from __future__ import annotations

import math
from typing import Sequence

from kron.vocab import AXES

from .choices import KEEP, BlockChoice, Choice

__all__ = ["SpaceSize"]


class SpaceSize:
    """Counting a space's plans (reads `self.choices`, `self.blocks`, `self.layer_mode`, `self.fixed_layers`,
    `self.count`, `self.info`, `self.config`, `self.budget`)."""

    def size(self) -> int:
        """Number of distinct non-empty plans in the space (a Python int: exact, however large)."""
        return self._size_with_empty() - (1 if self._empty_possible() else 0)

    def _empty_possible(self) -> bool:
        non_layer = [c for c in self.choices if c.layer is None and not c.tied]
        layered = [c for c in self.choices if c not in non_layer]
        if not all(KEEP in c.options for c in non_layer):
            return False
        if self.layer_mode == "free" or (self.layer_mode == "count" and self.count == 0):
            return True
        return all(KEEP in c.options for c in layered)

    def _count(self, choices: list[Choice], blocks: Sequence[BlockChoice]) -> int:
        """Distinct assignments of a set of choices and the block choices among them: a pruned block is one
        assignment of its matrices whatever their own choices, an unpruned one leaves them to those choices."""
        members = {k for b in blocks for k in b.members}
        n = math.prod(len(c.options) for c in choices if c.key not in members)
        for b in blocks:
            n *= len(b.options) - 1 + math.prod(len(c.options) for c in choices if c.key in b.members)
        return n

    def _size_with_empty(self) -> int:
        allow_keep = {c.key: KEEP in c.options for c in self.choices}
        non_layer = [c for c in self.choices if c.layer is None and not c.tied]
        tied = [c for c in self.choices if c.tied]
        tied_blocks = [b for b in self.blocks if b.tied]
        base = self._count(non_layer, [])
        if self.layer_mode not in ("free", "count"):
            return base * self._count([c for c in self.choices if c not in non_layer], self.blocks)
        L = len(self.fixed_layers)
        if tied or tied_blocks:
            # which layers are on x one shared option per tied group; all-keep collapses onto "no layer on"
            P = self._count(tied, tied_blocks)
            P_eff = P - (1 if all(allow_keep[c.key] for c in tied) else 0)
            if self.layer_mode == "free":
                return base * ((2 ** L - 1) * P_eff + 1)
            if self.count == 0:
                return base
            return base * (math.comb(L, self.count) * P_eff + (P - P_eff))
        per_layer = []
        for i in self.fixed_layers:
            cs = [c for c in self.choices if c.layer == i]
            bs = [b for b in self.blocks if b.layer == i]
            P = self._count(cs, bs)
            per_layer.append(P - (1 if (cs or bs) and all(allow_keep[c.key] for c in cs) else 0))
        if self.layer_mode == "free":
            return base * math.prod(1 + p for p in per_layer)
        # exactly k layers on; layers whose options are all "keep" look like switched-off ones, so the distinct
        # plans are those with at most k effectively decomposed layers when keep is allowed everywhere
        keep_everywhere = all(allow_keep[c.key] for c in self.choices if c.layer is not None)
        if keep_everywhere:
            return base * sum(_elementary_symmetric(per_layer, j) for j in range(self.count + 1))
        return base * _elementary_symmetric(per_layer, self.count)

    def size_log10(self) -> float:
        n = self.size()
        return math.log10(n) if n > 0 else float("-inf")

    def summary(self) -> str:
        """A few lines describing the space: matrices, choices per group, layer mode, size."""
        info = self.info
        lines = [f"teacher: {info.model_type} ({info.family or 'custom'} family), {len(info.layers)} layers, "
                 f"{info.params:,} parameters ({info.params_excl_output_embedding:,} excluding the output "
                 f"embedding), {info.macs:,} multiply-adds per token"]
        groups: dict[str, list[Choice]] = {}
        for c in self.choices:
            groups.setdefault(c.group, []).append(c)
        for g, cs in groups.items():
            dims = sorted({c.dims for c in cs})
            n_mats = len({mx.name for c in cs for mx in c.matrices})
            opts = sorted({len(c.options) for c in cs})
            example = ", ".join(cs[0].options[:3]) + (", ..." if len(cs[0].options) > 3 else "")
            lines.append(f"  {g:<17} {n_mats:>3} matrices, block {' / '.join(f'{a}x{b}' for a, b in dims)}: "
                         f"{len(cs)} choice(s) of {'/'.join(map(str, opts))} options (e.g. {example})")
        from kron.methods import get_method

        for b in self.blocks:
            if b is not next(x for x in self.blocks if (x.method, x.part) == (b.method, b.part)):
                continue  # one line per method and part
            bs = [x for x in self.blocks if (x.method, x.part) == (b.method, b.part)]
            what = get_method(b.method).part_words(b.part)
            lines.append(f"  {b.method}_{b.part:<{16 - len(b.method)}} {len(bs):>3} block choice(s) ({what} removed; a "
                         f"pruned block's matrices take no other option): {' | '.join(bs[0].options)}")
        mode = {"fixed": f"fixed {self.fixed_layers}", "free": "free (one on/off per layer)",
                "count": f"exactly {self.count} of {len(self.fixed_layers)}"}.get(self.layer_mode, self.layer_mode)
        lines.append(f"  layers decomposed: {mode}; tie_layers: {self.config.tie_layers}")
        if self.budget is not None:
            lines.append("  budget: " + ", ".join(f"{AXES[lim.axis].budget_key} {lim.value:,}"
                                                  for lim in self.budget.limits))
        n = self.size()
        lines.append(f"  size: {n:,} distinct plans (10^{self.size_log10():.2f})" if n < 10 ** 15 else
                     f"  size: 10^{self.size_log10():.2f} distinct plans")
        return "\n".join(lines)


def _elementary_symmetric(values: Sequence[int], k: int) -> int:
    e = [1] + [0] * k
    for v in values:
        for j in range(k, 0, -1):
            e[j] += e[j - 1] * v
    return e[k]
