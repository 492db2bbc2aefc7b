"""Calibration statistics for data-aware initialisation: each linear layer's input second moment S = E[x xᵀ].

`collect_input_stats(model, batches, heldout=...)` runs the model over calibration batches with forward pre-hooks on
its nn.Linear / transformers Conv1D layers (x is the input of the (out x in) weight in both orientations, so S is
in x in; a fused projection such as GPT-2's c_attn has one S, shared by its blocks). Products are taken per batch
in float32 (float64 for a float64 model) and accumulated across batches in float64. Padding positions (an
`attention_mask` of 0 in a dict batch) are left out. A second set of batches (`heldout`) gives a separate S for
each matrix, on which `kron.surgery` reports the relative output error of the compressed model.

Memory: S of a 3072-input matrix is 75 MB in float64. With a `cache_dir`, the matrices are collected in groups
whose S fit in `max_memory` bytes (one pass over the data per group), each S written to its own safetensors file
as soon as its group is done and loaded again only when asked for (`CalibStats.S(name)`). Without a cache_dir
everything stays in memory.

Pure torch: no data loading (that is `trials.calibration`, which turns a data source into token batches and
caches the result keyed by model, data and budget).
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

from .errors import DataError

__all__ = ["CalibStats", "ModuleStats", "collect_input_stats", "linear_modules"]

FORMAT = 1
META_NAME = "calib.json"
DEFAULT_MAX_MEMORY = 2 << 30  # bytes of float64 S held at once while collecting (two per matrix with a held-out set)


@dataclass
class ModuleStats:
    """One matrix's calibration statistics: S = E[x xᵀ] (in x in, float64) over `tokens` fit tokens, the mean
    input, and the held-out S (None without held-out data)."""

    S: torch.Tensor
    tokens: int
    mean: torch.Tensor | None = None
    S_heldout: torch.Tensor | None = None
    heldout_tokens: int = 0
    ridge: float | None = None  # the data-aware init's ridge for this matrix (None: kron.datainit.DEFAULT_RIDGE)


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> every nn.Linear and transformers Conv1D of a model (the modules S is collected for)."""
    from .modules import module_type

    return {n: m for n, m in model.named_modules() if n and module_type(m) in ("linear", "conv1d")}


def _in_features(module: nn.Module) -> int:
    from .modules import dense_dims

    return dense_dims(module)[1]


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) + ".safetensors"


@dataclass
class CalibStats:
    """Input second moments of a model's linear layers, in memory or in a folder (one safetensors file per matrix,
    loaded lazily). `S(name)`, `heldout(name)`, `stats(name)`, `names`, `tokens`, `heldout_tokens`, `key` (what
    the statistics were collected from, as given by the caller)."""

    names: list[str]
    tokens: int
    heldout_tokens: int = 0
    key: dict = field(default_factory=dict)
    seconds: float = 0.0
    directory: Path | None = None
    _memory: dict[str, ModuleStats] = field(default_factory=dict, repr=False)
    _dims: dict[str, int] = field(default_factory=dict, repr=False)
    from_cache: bool = False  # loaded from a folder written earlier (set by callers that cache)

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def stats(self, name: str) -> ModuleStats:
        if name not in self.names:
            raise KeyError(f"no calibration statistics for module {name!r}")
        if name in self._memory:
            return self._memory[name]
        from safetensors.torch import load_file

        path = self.directory / _file_name(name)
        try:
            t = load_file(str(path))
        except Exception as exc:
            raise DataError(f"calibration statistics of {name} in {path} are unreadable ({type(exc).__name__}: "
                            f"{exc}); delete {self.directory} to collect them again") from None
        return ModuleStats(S=t["S"], tokens=self.tokens, mean=t.get("mean"), S_heldout=t.get("S_heldout"),
                           heldout_tokens=self.heldout_tokens)

    def S(self, name: str) -> torch.Tensor:
        """E[x xᵀ] over the fit tokens (float64, in x in)."""
        return self.stats(name).S

    def heldout(self, name: str) -> torch.Tensor | None:
        """E[x xᵀ] over the held-out tokens, or None."""
        return self.stats(name).S_heldout

    def in_memory(self) -> "CalibStats":
        """A copy holding every matrix in memory."""
        mem = {n: self.stats(n) for n in self.names}
        return CalibStats(list(self.names), self.tokens, self.heldout_tokens, dict(self.key), self.seconds, None,
                          mem, dict(self._dims))

    # ------------------------------------------------------------------------------------------ disk

    def save(self, directory: str | os.PathLike) -> "CalibStats":
        """Write every matrix (one file each) and the index to `directory`; returns the on-disk stats."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name in self.names:
            if self.directory is not None and self.directory == directory:
                continue
            _write_module(directory, name, self.stats(name))
        _write_meta(directory, self)
        return CalibStats.load(directory)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "CalibStats":
        """Stats written by `save` (or by `collect_input_stats(..., cache_dir=...)`); DataError if incomplete."""
        directory = Path(directory)
        meta_path = directory / META_NAME
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DataError(f"no readable calibration statistics in {directory} ({type(exc).__name__}: {exc})") \
                from None
        if meta.get("format") != FORMAT:
            raise DataError(f"calibration statistics in {directory} have format {meta.get('format')!r}; this "
                            f"kronsearch reads format {FORMAT}: delete the folder to collect them again")
        missing = [n for n in meta["names"] if not (directory / _file_name(n)).is_file()]
        if missing:
            raise DataError(f"calibration statistics in {directory} are incomplete (missing {', '.join(missing[:3])}"
                            f"{' ...' if len(missing) > 3 else ''}); delete the folder to collect them again")
        return cls(list(meta["names"]), int(meta["tokens"]), int(meta.get("heldout_tokens", 0)),
                   dict(meta.get("key", {})), float(meta.get("seconds", 0.0)), directory, {},
                   {k: int(v) for k, v in meta.get("dims", {}).items()})


def _atomic_save(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_module(directory: Path, name: str, st: ModuleStats) -> None:
    tensors = {"S": st.S.double().cpu()}
    if st.mean is not None:
        tensors["mean"] = st.mean.double().cpu()
    if st.S_heldout is not None:
        tensors["S_heldout"] = st.S_heldout.double().cpu()
    _atomic_save(directory / _file_name(name), tensors)


def _write_meta(directory: Path, stats: CalibStats) -> None:
    from .fsutil import atomic_write_json

    atomic_write_json(directory / META_NAME, {
        "format": FORMAT, "names": stats.names, "tokens": stats.tokens, "heldout_tokens": stats.heldout_tokens,
        "key": stats.key, "seconds": stats.seconds, "dims": stats._dims})


# ----------------------------------------------------------------------------------------------- collecting


class _Accumulator:
    def __init__(self, n: int, device):
        self.S = torch.zeros(n, n, dtype=torch.float64, device=device)
        self.sum = torch.zeros(n, dtype=torch.float64, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        xc = x if x.dtype == torch.float64 else x.float()
        self.S += (xc.T @ xc).double()
        self.sum += xc.sum(0).double()
        self.count += x.shape[0]


def input_rows(args, kwargs, mask: torch.Tensor | None) -> torch.Tensor:
    """A linear layer's input (its forward pre-hook's first argument) as rows (tokens x width), the positions where
    `mask` (batch x positions) is 0 left out."""
    x = (args[0] if args else next(iter(kwargs.values()))).detach()
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        x = x[mask.to(torch.bool)]
    return x.reshape(-1, x.shape[-1])


def module_stats(name: str, fit: "_Accumulator", heldout: "_Accumulator | None" = None) -> ModuleStats:
    """One matrix's ModuleStats from its accumulated fit (and held-out) inputs; DataError when they are not
    finite."""
    count = max(fit.count, 1)
    st = ModuleStats(S=(fit.S / count).cpu(), tokens=fit.count, mean=(fit.sum / count).cpu())
    if heldout is not None:
        st.S_heldout = (heldout.S / max(heldout.count, 1)).cpu()
        st.heldout_tokens = heldout.count
    if not torch.isfinite(st.S).all():
        raise DataError(f"the model produced non-finite activations at {name} on the calibration data")
    return st


def _as_inputs(batch) -> tuple[dict, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):  # full blocks: an all-ones mask (no padding to leave out)
        return {"input_ids": batch, "attention_mask": torch.ones_like(batch)}, None
    if isinstance(batch, Mapping):
        kw = {k: v for k, v in batch.items() if k != "labels"}
        return kw, kw.get("attention_mask")
    raise TypeError(f"a calibration batch is a tensor of token ids or a dict of model inputs, got "
                    f"{type(batch).__name__}")


def _count_tokens(batch) -> int:
    kw, mask = _as_inputs(batch)
    if mask is not None:
        return int(mask.sum().item())
    return int(kw["input_ids"].numel())


def _groups(names: list[str], dims: dict[str, int], max_memory: int | None, copies: int) -> list[list[str]]:
    if max_memory is None:
        return [names]
    groups: list[list[str]] = [[]]
    used = 0
    for n in names:
        size = dims[n] * dims[n] * 8 * copies
        if groups[-1] and used + size > max_memory:
            groups.append([])
            used = 0
        groups[-1].append(n)
        used += size
    return groups


def collect_input_stats(model: nn.Module, batches: Iterable, names: Iterable[str] | None = None, *,
                        heldout: Iterable | None = None, max_tokens: int | None = None,
                        cache_dir: str | os.PathLike | None = None, max_memory: int | None = DEFAULT_MAX_MEMORY,
                        key: Mapping | None = None, device=None, progress=None) -> CalibStats:
    """S = E[x xᵀ] of the input of every nn.Linear / Conv1D (or those in `names`) over calibration batches.

    Args:
        model: any nn.Module whose forward takes `input_ids=` (a tensor batch) or the keys of a dict batch.
        batches: a list (it is iterated once per memory group) of LongTensor (batch, seq) token ids or dicts of model
            inputs; with an `attention_mask`, padding positions are left out.
        names: the modules to collect (default: every linear layer).
        heldout: further batches giving each matrix a held-out S (for the report's output error).
        max_tokens: stop after this many fit tokens (whole batches; the last batch may pass it).
        cache_dir: write each S to cache_dir/<name>.safetensors as soon as it is complete, and the index last;
            the returned stats load lazily from there. Without it everything is kept in memory.
        max_memory: with a cache_dir, collect at most this many bytes of float64 S per pass over the data.
        key: what the statistics come from (model, data, budget), stored in the index.
    Raises DataError when the batches hold no tokens.
    """
    modules = linear_modules(model)
    if names is None:
        names = list(modules)
    else:
        names = list(dict.fromkeys(names))
        unknown = [n for n in names if n not in modules]
        if unknown:
            raise DataError(f"cannot collect calibration statistics for {', '.join(unknown[:3])}: not an nn.Linear "
                            "or Conv1D of this model")
    batches = list(batches)
    heldout = list(heldout) if heldout is not None else []
    if max_tokens is not None:
        kept, total = [], 0
        for b in batches:
            if total >= max_tokens:
                break
            kept.append(b)
            total += _count_tokens(b)
        batches = kept
    fit_tokens = sum(_count_tokens(b) for b in batches)
    if fit_tokens == 0:
        raise DataError("the calibration batches hold no tokens")
    dims = {n: _in_features(modules[n]) for n in names}
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    directory = Path(cache_dir) if cache_dir is not None else None
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / META_NAME).unlink(missing_ok=True)  # the index is written last: a partial folder has none
    groups = _groups(names, dims, max_memory if directory is not None else None, 2 if heldout else 1)

    t0 = time.time()
    memory: dict[str, ModuleStats] = {}
    was_training = model.training
    model.eval()
    try:
        for group in groups:
            acc: dict[str, _Accumulator] = {}
            state = {"mask": None, "target": "fit"}

            def hook(module, args, kwargs, name):
                acc[(name, state["target"])].add(input_rows(args, kwargs, state["mask"]))

            handles = []
            for n in group:
                acc[(n, "fit")] = _Accumulator(dims[n], device)
                if heldout:
                    acc[(n, "heldout")] = _Accumulator(dims[n], device)
                handles.append(modules[n].register_forward_pre_hook(
                    lambda mod, args, kwargs, _n=n: hook(mod, args, kwargs, _n), with_kwargs=True))
            try:
                with torch.no_grad():
                    for target, source in (("fit", batches), ("heldout", heldout)):
                        state["target"] = target
                        for batch in source:
                            kw, mask = _as_inputs(batch)
                            kw = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
                            state["mask"] = mask.to(device) if mask is not None else None
                            model(**kw)
                            if progress is not None:
                                progress()
            finally:
                for h in handles:
                    h.remove()
            for n in group:
                st = module_stats(n, acc.pop((n, "fit")), acc.pop((n, "heldout")) if heldout else None)
                if directory is not None:
                    _write_module(directory, n, st)
                else:
                    memory[n] = st
    finally:
        model.train(was_training)
    heldout_tokens = sum(_count_tokens(b) for b in heldout)
    stats = CalibStats(names, fit_tokens, heldout_tokens, dict(key or {}), time.time() - t0, directory, memory, dims)
    if directory is not None:
        _write_meta(directory, stats)
    return stats


def relative_output_error(W: torch.Tensor, W_hat: torch.Tensor, S: torch.Tensor) -> float:
    """sqrt(tr(ΔSΔᵀ) / tr(WSWᵀ)) with Δ = W − Ŵ (0 when W·x is always 0)."""
    from .datainit import output_error

    return output_error(W, S, W_hat)
