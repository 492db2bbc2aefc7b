"""Size budgets: the one Budget type of kronsearch, used by the search space (`space.budget`), the automatic plans
(`plan --auto --budget`, the search's automatic seeds) and their checks. Torch-free.

A Budget is one or more limits, each on a size axis of `kron.vocab.AXES` (parameters, parameters excluding the
output embedding, multiply-adds per token, bytes of weight storage), or a compression ratio (`ratio=R`: at most
the teacher's parameters excluding the output embedding / R). Spelled

    params=3.5M   macs=2.1G   bytes=1.2M   params_excl=2M   ratio=2        (CLI; suffixes k, M, G/B, T)
    {max_params: 3.5e6, max_bytes: 1.2e6}                                   (a search's space.budget)

Costs are dicts keyed by axis name (`{"params": ..., "macs_per_token": ..., ...}`), and so are the teacher's sizes
that a ratio is relative to.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping

from .errors import ConfigError
from .vocab import AXES, RATIO, RATIO_AXIS, size_axis

__all__ = ["Budget", "Limit", "budget_spellings", "parse_budget", "parse_number"]

_SUFFIX = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9, "t": 1e12}


def parse_number(text: str) -> float | None:
    """'3.5M', '250k', '2.1G', '1e6' (suffixes k, M, G/B, T; case-insensitive) as a number; None when `text` is not
    one."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?\d+)?)\s*([kmgbt]?)\s*", str(text).strip().lower())
    return None if m is None else float(m.group(1)) * _SUFFIX[m.group(2)]


def budget_spellings() -> tuple[str, ...]:
    """Every AXIS a budget `AXIS=VALUE` may name: each axis's spellings, then ratio."""
    return tuple(s for a in AXES.values() for s in a.spellings) + (RATIO,)


@dataclass(frozen=True)
class Limit:
    """At most `value` on axis `axis` — or, with `ratio`, a compression of at least `value` (the axis is then the
    parameters excluding the output embedding, bounded by the teacher's / value). text: how it was written."""

    axis: str
    value: float
    ratio: bool = False
    text: str = ""

    def bound(self, teacher: Mapping[str, float] | None = None) -> float:
        """The largest size allowed on the axis (a ratio needs the teacher's sizes)."""
        if not self.ratio:
            return self.value
        if teacher is None or RATIO_AXIS not in teacher:
            raise ValueError(f"{self}: a compression ratio needs the teacher's {RATIO_AXIS}")
        return teacher[RATIO_AXIS] / self.value

    def __str__(self) -> str:
        if self.text:
            return self.text
        return f"{RATIO}={self.value:g}" if self.ratio else f"{AXES[self.axis].spellings[0]}={self.value:g}"


@dataclass(frozen=True)
class Budget:
    """One or more size limits a plan must meet together (see the module docstring)."""

    limits: tuple[Limit, ...]

    def __post_init__(self):
        if not self.limits:
            raise ConfigError("a budget needs at least one limit")

    # ----------------------------------------------------------------------------------- spellings

    @classmethod
    def parse(cls, text: str) -> "Budget":
        """'params=3.5M', 'macs=2.1G', 'bytes=1.2M', 'params_excl=2M' or 'ratio=2' -> a one-limit Budget;
        ConfigError naming the problem."""
        names = ", ".join(budget_spellings())
        if not isinstance(text, str) or "=" not in text:
            raise ConfigError(f"a budget is AXIS=VALUE with AXIS one of {names} (e.g. params=3.5M, macs=2.1G, "
                              f"bytes=1.2M, ratio=2), got {text!r}")
        name, _, value = text.partition("=")
        name = name.strip().lower()
        v = parse_number(value)
        if name == RATIO:
            if v is None:
                raise ConfigError(f"budget {text!r}: {value!r} is not a number (suffixes k, M, G allowed)")
            if not value.strip()[-1:].isdigit() or not v >= 1 or not math.isfinite(v):  # a suffix is no ratio
                raise ConfigError(f"budget {text!r}: a compression ratio is a number >= 1 (teacher / student "
                                  "parameters)")
            return cls((Limit(RATIO_AXIS, v, True, f"{RATIO}={value.strip()}"),))
        try:
            axis = size_axis(name)
        except KeyError:
            raise ConfigError(f"budget {text!r}: unknown axis {name!r}; use one of {names}") from None
        if name not in axis.spellings:
            raise ConfigError(f"budget {text!r}: unknown axis {name!r}; use one of {names}")
        if v is None:
            raise ConfigError(f"budget {text!r}: {value!r} is not a number (suffixes k, M, G allowed)")
        if v < 1 or not math.isfinite(v):
            raise ConfigError(f"budget {text!r}: must be a positive size")
        return cls((Limit(axis.name, v, False, f"{name}={value.strip()}"),))

    @classmethod
    def on(cls, axis: str, value: float, text: str = "") -> "Budget":
        """A one-limit budget: at most `value` on `axis` (an axis name or spelling), or with axis "ratio" a
        compression of at least `value`."""
        if axis == RATIO:
            return cls((Limit(RATIO_AXIS, float(value), True, text),))
        return cls((Limit(size_axis(axis).name, float(value), False, text),))

    @classmethod
    def from_config(cls, limits: Mapping[str, float | None]) -> "Budget":
        """The Budget of a `space.budget` mapping ({max_params: 3.5e6, ...}; None values left out)."""
        by_key = {a.budget_key: a.name for a in AXES.values()}
        return cls(tuple(Limit(by_key[k], v) for k, v in limits.items() if v is not None))

    def to_config(self) -> dict[str, float | None]:
        """{budget_key: value or None} of every axis (a ratio has no config spelling: ValueError)."""
        out: dict[str, float | None] = {a.budget_key: None for a in AXES.values()}
        for lim in self.limits:
            if lim.ratio:
                raise ValueError(f"{lim}: a compression ratio has no space.budget spelling")
            out[AXES[lim.axis].budget_key] = lim.value
        return out

    def __str__(self) -> str:
        return ", ".join(map(str, self.limits))

    # ----------------------------------------------------------------------------------- one limit

    @property
    def single(self) -> Limit:
        """The one limit of a one-limit budget (the knapsack plans on one axis); ConfigError otherwise."""
        if len(self.limits) != 1:
            raise ConfigError(f"budget {self}: an automatic plan takes one limit, got {len(self.limits)}")
        return self.limits[0]

    @property
    def axis(self) -> str:
        """The axis of a one-limit budget."""
        return self.single.axis

    @property
    def value(self) -> float:
        return self.single.value

    @property
    def text(self) -> str:
        return str(self)

    # ----------------------------------------------------------------------------------- checks

    def breaches(self, costs: Mapping[str, float], teacher: Mapping[str, float] | None = None) -> list[str]:
        """The limits a plan of these costs breaks, as readable strings (empty: within budget)."""
        out = []
        for lim in self.limits:
            bound, value = lim.bound(teacher), costs[lim.axis]
            if value > bound and lim.ratio:
                out.append(f"{lim.axis} {value:,} > {int(bound):,} ({RATIO} {lim.value:g})")
            elif value > bound:
                out.append(f"{lim.axis} {value:,} > {AXES[lim.axis].budget_key} {lim.value:,}")
        return out

    def excess(self, costs: Mapping[str, float], teacher: Mapping[str, float] | None = None) -> float:
        """Σ over the broken limits of (value − bound) / bound: 0 within budget, the repair's descent measure."""
        total = 0.0
        for lim in self.limits:
            bound, value = lim.bound(teacher), costs[lim.axis]
            if value > bound:
                total += (value - bound) / bound
        return total


def parse_budget(text: str) -> Budget:
    """`Budget.parse` (the CLI's spelling of a one-limit budget)."""
    return Budget.parse(text)
