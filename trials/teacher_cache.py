"""The teacher's distillation outputs, computed once per batch and reused by later trials in the same process.

Every trial of a search distils from the same frozen teacher on the same batches (same data, same seed, same
batch order), so a reused Ray worker would otherwise recompute the teacher's forward pass — hidden states,
attention maps and, for logits KD, the logits — for batches its previous trial already saw. `TeacherCache` keeps
those outputs keyed by

* the teacher's identity: its process-cache key (source, task, device, dtype), the model object, and the version
  counters of its parameters (an in-place change to a weight changes the key);
* the batch's content: a hash of the input ids and attention mask, their shapes (so the sequence length) and
  dtypes;
* whether the logits were kept.

A cached entry therefore never serves another teacher, other data or another sequence length.

**Bounds.** Entries are held in memory (CPU, in the teacher's own dtype: a hit returns exactly what the forward
pass returned, so a trial's losses are identical with and without reuse) up to `memory_mb`. Beyond that they can
go to disk in float16 up to `disk_mb` (off by default: reading them back rounds every value to half precision,
so losses then differ slightly); whatever fits in neither is recomputed every time. When
full, entries of other teachers or data (the least recently used first) are dropped, but entries of the current
one are never evicted for each other: trials walk the same batches in the same order, and least-recently-used
eviction of a cyclic walk longer than the cache would miss on every batch, while keeping the first batches hits on
them in every trial — and those are the batches every trial trains on, including the ones ASHA stops early.
"""
from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

__all__ = ["TeacherOutputs", "TeacherCache", "teacher_cache", "teacher_identity", "batch_digest"]

MB = 1 << 20


@dataclass
class TeacherOutputs:
    """What ILKD reads from the teacher: hidden states (embeddings first), attention maps, logits (or None)."""

    hidden_states: tuple[torch.Tensor, ...]
    attentions: tuple[torch.Tensor, ...]
    logits: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor]:
        return [*self.hidden_states, *self.attentions, *([self.logits] if self.logits is not None else [])]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def to(self, device=None, dtype=None) -> "TeacherOutputs":
        def move(t):
            return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None)

        return TeacherOutputs(tuple(move(t) for t in self.hidden_states), tuple(move(t) for t in self.attentions),
                              move(self.logits) if self.logits is not None else None)

    @classmethod
    def from_model_output(cls, out, keep_logits: bool) -> "TeacherOutputs":
        return cls(tuple(t.detach() for t in out.hidden_states), tuple(t.detach() for t in out.attentions),
                   out.logits.detach() if keep_logits and getattr(out, "logits", None) is not None else None)


def teacher_identity(cache_key: tuple, model: torch.nn.Module) -> tuple:
    """What identifies a teacher's outputs in this process: its loader's cache key, the object, and its parameters'
    in-place version counters."""
    versions = tuple(p._version for p in model.parameters())
    return (cache_key, id(model), hash(versions))


def batch_digest(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> str:
    """A hash of a batch's content, shape and dtype (token ids and mask)."""
    h = hashlib.blake2b(digest_size=16)
    for t in (input_ids, attention_mask):
        if t is None:
            h.update(b"none")
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


class _Tier:
    """One storage tier: entries grouped by teacher context, contexts in least-recently-used order, a byte bound."""

    def __init__(self):
        self.limit = 0
        self.used = 0
        self.groups: OrderedDict[tuple, dict[str, tuple[object, int]]] = OrderedDict()

    def get(self, ctx, key):
        group = self.groups.get(ctx)
        if group is None or key not in group:
            return None
        self.groups.move_to_end(ctx)
        return group[key][0]

    def make_room(self, ctx, nbytes: int, drop: Callable[[object], None]) -> bool:
        """Free space for nbytes by dropping other contexts (least recently used first); False if it cannot fit."""
        if nbytes > self.limit:
            return False
        while self.used + nbytes > self.limit:
            victim = next((c for c in self.groups if c != ctx), None)
            if victim is None:
                return False
            for value, size in self.groups.pop(victim).values():
                drop(value)
                self.used -= size
        return True

    def put(self, ctx, key, value, nbytes: int) -> None:
        self.groups.setdefault(ctx, {})[key] = (value, nbytes)
        self.groups.move_to_end(ctx)
        self.used += nbytes

    def shrink(self, drop: Callable[[object], None]) -> None:
        """Drop whole contexts (least recently used first) until within the limit."""
        while self.used > self.limit and self.groups:
            for value, size in self.groups.popitem(last=False)[1].values():
                drop(value)
                self.used -= size

    def entries(self) -> int:
        return sum(len(g) for g in self.groups.values())


class TeacherCache:
    """Teacher outputs per (teacher, batch), in memory up to a bound, then on disk in float16 up to another."""

    def __init__(self):
        self.memory = _Tier()
        self.disk = _Tier()
        self.disk_dtype = torch.float16
        self._disk_dir: Path | None = None
        self._disk_root: str | None = None
        self.hits = self.disk_hits = self.misses = 0
        self._files = 0

    def configure(self, memory_mb: float, disk_mb: float = 0.0, disk_dir: str | None = None) -> None:
        """Set the bounds (MB; 0 turns a tier off); shrinking drops whole teacher contexts until within bounds."""
        self.memory.limit = int(memory_mb * MB)
        self.disk.limit = int(disk_mb * MB)
        self.memory.shrink(lambda v: None)
        self.disk.shrink(_unlink)
        if disk_dir != self._disk_root and self._disk_dir is not None:
            self._drop_disk()
        self._disk_root = disk_dir

    def clear(self) -> None:
        self.memory.groups.clear()
        self.memory.used = 0
        self._drop_disk()
        self.hits = self.disk_hits = self.misses = 0

    def stats(self) -> dict:
        return {"hits": self.hits, "disk_hits": self.disk_hits, "misses": self.misses,
                "memory_entries": self.memory.entries(), "memory_mb": round(self.memory.used / MB, 2),
                "disk_entries": self.disk.entries(), "disk_mb": round(self.disk.used / MB, 2)}

    def get_or_compute(self, ctx: tuple, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                       compute: Callable[[], TeacherOutputs], keep_logits: bool) -> TeacherOutputs:
        """The teacher's outputs for this batch: from memory, from disk, or computed by `compute()` and stored.

        ctx: `teacher_identity(...)` of the teacher, plus anything else its outputs depend on.
        """
        key = f"{batch_digest(input_ids, attention_mask)}|logits={int(keep_logits)}"
        device = input_ids.device
        hit = self.memory.get(ctx, key)
        if hit is not None:
            self.hits += 1
            return hit if device.type == "cpu" else hit.to(device)
        on_disk = self.disk.get(ctx, key)
        if on_disk is not None:
            path, dtype = on_disk
            try:
                out = TeacherOutputs(**torch.load(path, map_location="cpu", weights_only=True)).to(dtype=dtype)
            except (OSError, RuntimeError):  # a removed or damaged file: compute it again below
                out = None
            if out is not None:
                self.disk_hits += 1
                return out.to(device)
        self.misses += 1
        out = compute()
        self._store(ctx, key, out)
        return out

    def _store(self, ctx, key, out: TeacherOutputs) -> None:
        nbytes = out.nbytes()
        if self.memory.make_room(ctx, nbytes, lambda v: None):
            self.memory.put(ctx, key, out if out.hidden_states[0].device.type == "cpu" else out.to("cpu"), nbytes)
            return
        if self.disk.limit <= 0:
            return
        half = nbytes * self.disk_dtype.itemsize // max(out.hidden_states[0].element_size(), 1)
        if not self.disk.make_room(ctx, half, _unlink):
            return
        self._files += 1
        path = self._dir() / f"{self._files}.pt"
        small = out.to("cpu", dtype=self.disk_dtype)
        torch.save({"hidden_states": small.hidden_states, "attentions": small.attentions, "logits": small.logits},
                   path)
        self.disk.put(ctx, key, (path, out.hidden_states[0].dtype), half)

    def _dir(self) -> Path:
        if self._disk_dir is None:
            root = self._disk_root or tempfile.gettempdir()
            Path(root).mkdir(parents=True, exist_ok=True)
            self._disk_dir = Path(tempfile.mkdtemp(prefix=f"kron-teacher-{os.getpid()}-", dir=root))
            atexit.register(shutil.rmtree, self._disk_dir, True)
        return self._disk_dir

    def _drop_disk(self) -> None:
        self.disk.groups.clear()
        self.disk.used = 0
        if self._disk_dir is not None:
            shutil.rmtree(self._disk_dir, ignore_errors=True)
            self._disk_dir = None


def _unlink(value) -> None:
    path, _ = value
    try:
        os.unlink(path)
    except OSError:
        pass


_CACHE = TeacherCache()


def teacher_cache() -> TeacherCache:
    """This process's cache (a reused Ray worker keeps it from one trial to the next)."""
    return _CACHE
