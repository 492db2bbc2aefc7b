"""The damage of one compressed matrix on calibration data: its relative output error

    damage = tr((W − Ŵ) S (W − Ŵ)ᵀ) / tr(W S Wᵀ)        (S = E[x xᵀ] on the calibration inputs)

with each method's data-aware init — computed in closed form where the method has one (`Method.block_damage`:
Kronecker and low-rank, from pieces cached once per matrix, `MatrixBlock`), else by building the layer and
measuring it (`Proxy`). A modifier's candidate (int8, int4 on a structure) is its structure's damage plus the
modification's own on the dense matrix (`Method.modifier_damage`, an estimate: the two errors are added as if
orthogonal, and the structure's factors, not W, are what is quantised — a term orders of magnitude below the
structure's own damage).

The sensitivity profile (`kron.profile`) and the search's prior and automatic seeds (`search.prior`, through
`option_damages`) measure every candidate this way.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from .datainit import DEFAULT_RIDGE, ridged, whitener
from .errors import DataError, PlanError

__all__ = ["MatrixBlock", "Proxy", "candidate_damage", "matrix_blocks", "option_damages", "weight_of"]


def weight_of(module: nn.Module) -> torch.Tensor:
    """The module's dense weight, (out, in), detached."""
    from .methods.layers import linear_weight

    return linear_weight(module)[0].detach()


class Proxy:
    """tr(ΔSΔᵀ) / tr(WSWᵀ) for one matrix: S in float32 (Δ is formed in float64 first, so the relative precision
    is that of the error itself)."""

    def __init__(self, W: torch.Tensor, S: torch.Tensor):
        self.W = W.double().cpu()
        S = S.double().cpu()
        self.S = ((S + S.T) / 2).float()
        self.base = float(((self.W.float() @ self.S) * self.W.float()).sum().item())

    def __call__(self, W_hat: torch.Tensor) -> float:
        if not self.base > 0:
            return 0.0
        D = (self.W - W_hat.detach().double().cpu()).float()
        return max(float(((D @ self.S) * D).sum().item()), 0.0) / self.base


class MatrixBlock:
    """The candidate-independent pieces of one (output block of a) matrix in float64, computed once so that every
    candidate of the profile costs O(m·n + n²) on top of its own factorisation instead of several m·n² products:
    W, S (symmetrised), W·S, f(0) = tr(W S Wᵀ), the ridged S + λI and its whitener. `cache` holds what a method's
    closed form shares across its candidates (`Method.block_damage`), keyed by the method."""

    def __init__(self, W: torch.Tensor, S: torch.Tensor, ridge: float):
        self.W = W.double().cpu()
        S = S.double().cpu()
        self.S = (S + S.T) / 2
        self.WS = self.W @ self.S
        self.base = float((self.WS * self.W).sum().item())  # f(0) = tr(W S Wᵀ)
        self.Sr = ridged(self.S, ridge)
        self.lam = float((torch.diagonal(self.Sr) - torch.diagonal(self.S)).mean().item()) if self.S.numel() else 0.0
        self.cache: dict = {}
        self._white = None

    def whitener(self):
        """(L, L⁻¹ or None, W·L) with S + λI = L·Lᵀ: a Cholesky factor (L⁻¹ None: applied by triangular solves, see
        `unwhiten`, instead of an n³ inverse) or, where Cholesky fails, `kron.datainit.whitener`'s square root."""
        if self._white is None:
            L, info = torch.linalg.cholesky_ex(self.Sr)
            Linv = None
            if int(info.item()) != 0:
                L, Linv = whitener(self.Sr)
            self._white = (L, Linv, self.W @ L)
        return self._white

    def unwhiten(self, X: torch.Tensor) -> torch.Tensor:
        """X·L⁻¹ (X: rows of length n)."""
        L, Linv, _ = self.whitener()
        if Linv is not None:
            return X @ Linv
        return torch.linalg.solve_triangular(L, X, upper=False, left=False)

    def f(self, W_hat: torch.Tensor) -> float:
        """tr((W − Ŵ) S (W − Ŵ)ᵀ) of any approximation of this block."""
        D = self.W - W_hat.double()
        return max(float(((D @ self.S) * D).sum().item()), 0.0)


def matrix_blocks(W: torch.Tensor, S: torch.Tensor, blocks: int, ridge: float) -> list[MatrixBlock]:
    """One MatrixBlock per equal output block of W (a fused projection's blocks share S)."""
    return [MatrixBlock(w, S, ridge) for w in W.split(W.shape[0] // blocks, dim=0)]


def _closed_form(blocks: Sequence[MatrixBlock], spec) -> tuple[float, str] | None:
    """(damage, init) of a structure's spec from its method's closed form on every block; None without one."""
    from .methods import get_method

    method = get_method(spec.method)
    res = [method.block_damage(b, spec) for b in blocks]
    if any(r is None for r in res):
        return None
    base = sum(b.base for b in blocks)
    if not base > 0:
        return 0.0, res[0][1]
    inits = {i for _, i in res}
    return sum(f for f, _ in res) / base, inits.pop() if len(inits) == 1 else "svd"


def candidate_damage(name: str, module: nn.Module, spec, stats_one, blocks: Sequence[MatrixBlock] | None,
                     proxy: Proxy | None = None) -> tuple[float, str | None, nn.Module | None]:
    """(damage, init source, the layer built or None) of one candidate on one matrix: a modifier's as its
    structure's plus its own (`Method.modifier_damage`); a structure's from its method's closed form on the cached
    `blocks` where it has one, else by building the layer with its data-aware init on `stats_one` (its data-free
    init for a method without one) and measuring it with `proxy` (made here when None). DataError when the damage
    is not finite."""
    from .methods import get_method

    method = get_method(spec.method)
    new, got = None, None
    with torch.no_grad():
        if method.modifier:
            inner = getattr(spec, "inner", None)
            d, init = (0.0, None) if inner is None else candidate_damage(name, module, inner, stats_one, blocks,
                                                                         proxy)[:2]
            blocks = blocks or matrix_blocks(weight_of(module), stats_one.S, getattr(spec, "blocks", 1),
                                             DEFAULT_RIDGE)
            base = sum(b.base for b in blocks)
            extra = sum(method.modifier_damage(b, spec) for b in blocks) / base if base > 0 else 0.0
            got = (d + extra, init)
        elif blocks is not None:
            got = _closed_form(blocks, spec)
        if got is None:
            kw = {"stats": stats_one} if method.data_init else {}
            new = method.build(module, spec, "data" if method.data_init else "svd", **kw)
            got = (proxy or Proxy(weight_of(module), stats_one.S))(new.to_dense()), getattr(new, "init_source", None)
    damage, init_src = got
    if not math.isfinite(damage):
        raise DataError(f"{name}: candidate {spec.label()} gave a non-finite output error (the calibration "
                        "statistics or the weight hold extreme values)")
    return float(damage), init_src, new


def option_damages(model: nn.Module, stats, wanted: Mapping[str, Sequence], *, ridge: float | None = None,
                   progress: Callable[[int, int, str], None] | None = None) -> dict[str, list[float]]:
    """The profile's damage (relative output error on the calibration statistics, data-aware init) of given specs:
    module name -> one damage per spec of `wanted[name]` (fused matrices take the specs' `blocks`). The search's
    prior and automatic seeds (`search.prior`) use it on the space's own options."""
    from .calibration import ModuleStats

    ridge = DEFAULT_RIDGE if ridge is None else float(ridge)
    modules = dict(model.named_modules())
    out: dict[str, list[float]] = {}
    for i, (name, specs) in enumerate(wanted.items()):
        if name not in modules:
            raise PlanError(f"option_damages: the model has no module {name!r}")
        if name not in stats:
            raise DataError(f"the calibration statistics have no entry for {name}: they were collected for another "
                            "model")
        S = stats.stats(name).S
        if not torch.isfinite(S).all():
            raise DataError(f"the calibration statistics of {name} hold NaN or inf values")
        blocks = max((getattr(sp, "blocks", 1) for sp in specs), default=1)
        cached = matrix_blocks(weight_of(modules[name]), S, blocks, ridge)
        stats_one = ModuleStats(S=S, tokens=stats.stats(name).tokens)
        done: dict = {}  # spec -> damage: a structure's damage serves its modified variants too

        def damage(spec):
            if spec not in done:
                done[spec] = candidate_damage(name, modules[name], spec, stats_one, cached, None)[0]
            return done[spec]

        out[name] = [damage(spec) for spec in specs]
        if progress is not None:
            progress(i + 1, len(wanted), name)
    return out
