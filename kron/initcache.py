"""A process-wide cache of initialised layers: the data-aware init of one matrix under one spec, computed once.

Every trial of a search compresses the same teacher with plans drawn from the same options, so a reused worker
rebuilds the same (matrix, spec) layer again and again — and the data-aware init (`kron.datainit`: a whitened SVD,
or alternating least squares for a Kronecker sum) is most of a trial's set-up: 0.25–0.35 s per matrix of the demo
teacher on one core, against 0.04 s for the SVD init. `InitCache` keeps each built layer's state (its
`state_dict`, copied to the CPU) with its init error, init source and output error, keyed by

* a scope the caller names: the weights and the calibration statistics the layer was built from (the trial uses
  the teacher's fingerprint, device and dtype, and the statistics' key);
* the module's name, the spec (its dict), the init ("svd" or "data") and the ridge.

A hit builds the layer's structure only (`method.build(..., "none")`) and loads the saved state: the same values
the init computed, so a trial gives the same result with and without the cache. Entries are dropped least recently
used first beyond `max_mb`. Pure torch.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["InitCache", "process_init_cache"]

MB = 1 << 20


_ATTRS = ("init_error", "init_source")  # what an init records on a layer (or on each block of a fused one)


@dataclass
class _Entry:
    state: dict[str, torch.Tensor]
    attrs: dict[str, dict[str, Any]]  # submodule name -> its own init_error / init_source
    output_error: float | None
    nbytes: int


class InitCache:
    """Initialised layers by (scope, module name, spec, init, ridge); least recently used dropped beyond max_mb."""

    def __init__(self, max_mb: float = 512):
        self.max_bytes = int(max_mb * MB)
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(scope: str, name: str, spec, init: str, ridge: float | None) -> tuple:
        return (scope, name, json.dumps(spec.to_dict(), sort_keys=True, default=str), init,
                None if ridge is None else float(ridge))

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def put(self, key: tuple, layer: nn.Module, output_error: float | None) -> None:
        state = {k: v.detach().to("cpu", copy=True) for k, v in layer.state_dict().items()}
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        if nbytes > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.nbytes -= old.nbytes
        attrs = {n: {a: m.__dict__[a] for a in _ATTRS if a in m.__dict__} for n, m in layer.named_modules()}
        self._entries[key] = _Entry(state, {n: a for n, a in attrs.items() if a}, output_error, nbytes)
        self.nbytes += nbytes
        while self.nbytes > self.max_bytes and self._entries:
            _, dropped = self._entries.popitem(last=False)
            self.nbytes -= dropped.nbytes

    def restore(self, entry: _Entry, layer: nn.Module) -> nn.Module:
        """`layer` (built with init "none") holding the entry's state, init error and init source."""
        with torch.no_grad():
            layer.load_state_dict(entry.state)
        for name, attrs in entry.attrs.items():
            sub = layer.get_submodule(name) if name else layer
            for a, v in attrs.items():
                setattr(sub, a, v)
        return layer

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0

    def stats(self) -> dict[str, Any]:
        return {"entries": len(self._entries), "mb": round(self.nbytes / MB, 1), "hits": self.hits,
                "misses": self.misses}


_PROCESS: InitCache | None = None


def process_init_cache() -> InitCache:
    """This process's InitCache (a reused search worker keeps it from trial to trial)."""
    global _PROCESS
    if _PROCESS is None:
        _PROCESS = InitCache()
    return _PROCESS
