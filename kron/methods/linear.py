"""Checks shared by the methods that replace linear layers (row blocks of fused projections, wrong module kinds)."""
from __future__ import annotations

from ..errors import PlanError
from .base import ModuleSpec, Slot, all_methods

__all__ = ["hints_for", "linear_rows", "rows_and_dims", "wrong_kind"]


def rows_and_dims(slot: Slot, blocks: int) -> tuple[int, str]:
    """Rows of each of `blocks` equal output blocks of the weight in `slot`, and a description of its size for
    error messages."""
    m, n = slot.m, slot.n
    dims = f"{slot.type_name}, weight {m} x {n} (out x in)"
    if m % blocks:
        raise PlanError(f"{slot.where}: module {slot.name} ({dims}) cannot be split into {blocks} equal "
                        f"output blocks ({m} is not a multiple of {blocks})")
    rows = m // blocks
    if blocks > 1:
        dims += f", {blocks} blocks of {rows} x {n}"
    return rows, dims


def linear_rows(spec: ModuleSpec, slot: Slot) -> int:
    """Rows of each block of a saved spec's module (reloading: the rule's own checks ran when it was made)."""
    if slot.m % spec.blocks:
        raise PlanError(f"module {slot.name} ({slot.m} x {slot.n}): {slot.m} output features do not split into "
                        f"{spec.blocks} blocks")
    return slot.m // spec.blocks


def hints_for(kind: str) -> str:
    """The rule keys of the main methods that apply to a module kind, e.g. "shape or factor"."""
    return " or ".join(m.rule_hint for m in all_methods() if kind in m.module_kinds and m.alternative is None
                      and not m.modifier)


def wrong_kind(slot: Slot, asked: str) -> str:
    """The message for a linear-layer method asked of an nn.Embedding."""
    return (f"{slot.where}: module {slot.name} is an nn.Embedding ({slot.m} x {slot.n}): use "
            f"{hints_for('embedding')}, not {asked}")
