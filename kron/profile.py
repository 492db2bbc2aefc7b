"""Sensitivity profile: the damage of compressing each matrix alone, for every candidate, with data-aware init.

For every compressible linear matrix of a model (the attention and FFN groups of its `kron.vocab` family; GPT-2's
fused `c_attn` as its 3 blocks, which share one S) and every candidate — each registered method's
`candidates(m, n, constraints)` for the methods asked for (default kronecker and lowrank), plus keep — the matrix
is built with its method's data-aware init (`method.build(module, spec, "data", stats)`, `kron.datainit`) and its
damage is the relative output error

    damage = tr((W − Ŵ) S (W − Ŵ)ᵀ) / tr(W S Wᵀ)        (S = E[x xᵀ] on the calibration inputs)

with the candidate's parameters and multiply-adds per token (`spec.params` / `spec.macs`). For a subset of the
candidates (`kl_subset` per matrix, spread over its candidates) the matrix is also swapped into the model alone and
a model-level measure is taken on held-out batches: KL(teacher ‖ student) of the next-token distribution (or of a
classifier's outputs; a base model without logits: the relative squared error of its last hidden state). The rank
correlation (Spearman) between the proxy and that measure says how far the cheap proxy can be trusted.

The profile is a JSON dict (`profile_model` writes it atomically after each matrix when given a path, and resumes
from it): a header naming the model (source, config hash), the calibration data (key digest), the constraints and
the methods — a profile for anything else is refused with a message naming the mismatch (`check_header`) — then
per matrix its candidates. `kron.autoplan` turns a profile and a budget into a plan.

Pure torch: no data loading (the CLI gets calibration batches and statistics from `trials.calibration`).
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .autoplan import DEFAULT_METHODS, Constraints
from .errors import DataError, PlanError
from .modules import LINEAR_GROUPS, Matrix, input_embedding_matrix, matrices

__all__ = ["DEFAULT_METHODS", "FORMAT", "Constraints", "Matrix", "candidates_for", "check_header",
           "compressible_matrices", "embedding_matrices", "load_profile", "model_identity", "profile_header",
           "profile_model", "spearman"]

FORMAT = "kronsearch.profile/1"
HEADER_KEYS = ("model", "calibration", "constraints", "methods", "ridge")  # what must match to reuse a profile


def compressible_matrices(model: nn.Module, groups: Sequence[str] = LINEAR_GROUPS) -> list[Matrix]:
    """The model's attention and FFN matrices (`kron.modules.matrices`), in model order; for a model of no known
    family, every nn.Linear / Conv1D except the output embedding. PlanError when there is none."""
    out = matrices(model, groups, any_linear=True)
    if not out:
        raise PlanError("the model has no compressible attention or FFN matrix")
    return out


def embedding_matrices(model: nn.Module) -> list[Matrix]:
    """The model's word embedding (`kron.modules.input_embedding_matrix`) as a one-element list; [] when it has
    none."""
    emb = input_embedding_matrix(model)
    return [] if emb is None else [emb]


def candidates_for(mx: Matrix, methods: Sequence[str], constraints) -> list:
    """Each method's `candidates(m, n, constraints)` for one block of the matrix (fused: `blocks` set), all of them
    (max_shapes lifted), then thinned per method to `max_shapes` compression levels spread evenly over
    log-compression with at most `shapes_per_level` candidates per level (fewest B rows, then fewest MACs)."""
    from types import SimpleNamespace

    from .methods import get_method

    rows, n = mx.m // mx.blocks, mx.n
    every = SimpleNamespace(**{**constraints.to_dict(), "max_shapes": None})
    out = []
    for name in methods:
        specs = get_method(name).candidates(rows, n, every)
        levels: dict[float, list] = {}
        for spec in specs:
            levels.setdefault(round(math.log(spec.compression(rows, n)), 6), []).append(spec)
        keys = sorted(levels)
        k = constraints.max_shapes
        if k is not None and len(keys) > k:
            picked: list[int] = []
            for i in range(k):
                target = keys[0] + (keys[-1] - keys[0]) * i / max(k - 1, 1)
                j = min((j for j in range(len(keys)) if j not in picked), key=lambda j: (abs(keys[j] - target), j))
                picked.append(j)
            keys = [keys[j] for j in sorted(picked)]
        per = getattr(constraints, "shapes_per_level", 1)
        for key in keys:
            group = sorted(levels[key], key=lambda s: (getattr(s, "shape", (0, 0, 0, 0))[2], s.macs(rows, n),
                                                       s.label()))
            for spec in group[:per]:
                out.append(replace(spec, blocks=mx.blocks) if mx.blocks > 1 else spec)
    return out


# ----------------------------------------------------------------------------------------------- identity


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_identity(model: nn.Module, source: str | None = None) -> dict:
    """What names a model in a profile: its source, model type and a hash of its config."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        d = {k: v for k, v in config.to_dict().items()
             if k not in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures")}
        h = _digest(d)
    else:
        h = _digest([(n, tuple(p.shape)) for n, p in model.named_parameters()])
    fingerprint = None
    params = list(model.parameters())
    if params and all(p.device.type != "meta" for p in params[:2] + params[-2:]):
        hw = hashlib.sha256()
        for p in params[:2] + params[-2:]:
            hw.update(p.detach().float().cpu().flatten()[:4096].numpy().tobytes())
        fingerprint = hw.hexdigest()[:16]
    return {"source": str(source) if source is not None else None,
            "model_type": getattr(config, "model_type", None), "config_hash": h, "fingerprint": fingerprint}


def profile_header(model: nn.Module, stats, *, source: str | None, methods: Sequence[str], constraints: Constraints,
                   ridge: float) -> dict:
    key = dict(getattr(stats, "key", {}) or {})
    return {
        "format": FORMAT,
        "model": model_identity(model, source),
        "calibration": {"key": _digest(key), "tokens": int(getattr(stats, "tokens", 0)),
                        "source": key.get("source")},
        "constraints": constraints.to_dict(),
        "methods": list(methods),
        "ridge": float(ridge),
    }


def _mismatch(got, want, where: str) -> list[str]:
    if isinstance(got, Mapping) and isinstance(want, Mapping):
        out = []
        for k in sorted(set(got) | set(want)):
            if where == "calibration" and k in ("source", "tokens"):
                continue  # descriptive: the key digest decides
            if where == "model" and k in ("params", "params_excl_output_embedding", "macs", "bytes", "float_width"):
                continue  # derived from the config
            if where == "model" and k == "fingerprint" and (got.get(k) is None or want.get(k) is None):
                continue  # a model built without weights (meta device) has no fingerprint
            out += _mismatch(got.get(k), want.get(k), f"{where}.{k}")
        return out
    return [] if got == want else [f"{where}: the profile has {got!r}, this run {want!r}"]


def check_header(profile: Mapping, want: Mapping, *, path: str | Path = "profile") -> None:
    """DataError naming every difference between a saved profile's header and what this run asks for."""
    if profile.get("format") != FORMAT:
        raise DataError(f"{path} is not a kronsearch profile (format {profile.get('format')!r}, expected {FORMAT})")
    diffs = []
    for k in HEADER_KEYS:
        if k in want:
            diffs += _mismatch(profile.get(k), want[k], k)
    if diffs:
        model = profile.get("model", {})
        raise DataError(f"{path} was made for another setting (model {model.get('source')!r}, config hash "
                        f"{model.get('config_hash')}): {'; '.join(diffs)}. Give --profile a new file (or "
                        "--fresh to overwrite it), or run with the settings it was made for")


def load_profile(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"profile {path} does not exist (make one with `kronsearch profile`)") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"profile {path} is unreadable ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("matrices"), dict):
        raise DataError(f"{path} is not a kronsearch profile (expected format {FORMAT})")
    return data


# ----------------------------------------------------------------------------------------------- measures


def _weight(module: nn.Module) -> torch.Tensor:
    from .methods.layers import linear_weight

    return linear_weight(module)[0].detach()


class _Proxy:
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


class _FastBlock:
    """The candidate-independent pieces of one (block of a) matrix, computed once so that every Kronecker shape and
    every low-rank rank of the profile costs O(m·n + n²) on top of its own factorisation instead of several
    m·n² products (the same maths as `kron.datainit`, whose results these reproduce; see test_profile)."""

    def __init__(self, W: torch.Tensor, S: torch.Tensor, ridge: float):
        from .datainit import ridged

        self.W = W.double().cpu()
        S = S.double().cpu()
        self.S = (S + S.T) / 2
        self.WS = self.W @ self.S
        self.base = float((self.WS * self.W).sum().item())  # f(0) = tr(W S Wᵀ)
        self.Sr = ridged(self.S, ridge)
        self.lam = float((torch.diagonal(self.Sr) - torch.diagonal(self.S)).mean().item()) if self.S.numel() else 0.0
        self._white = None
        self._lowrank = None
        self._lowrank_factors = None
        self._kron_factors = None  # ((shape, rank), (A, B)) of the last `kronecker` call
        self._blocks: dict = {}

    def blocks(self, n1: int, n2: int, *, gram: bool = False) -> torch.Tensor:
        """S (or, gram: M = (W·Sr)ᵀ(W·Sr), Sr = S + λI) laid out as its n2² blocks of n1 x n1
        (`kron.datainit.s_blocks`), shared by the shapes with this split."""
        from .datainit import s_blocks

        key = (n1, n2, gram)
        if key not in self._blocks:
            if gram and "M" not in self._blocks:
                WSr = self.WS + self.lam * self.W
                self._blocks["M"] = WSr.T @ WSr
            self._blocks[key] = s_blocks(self._blocks["M"] if gram else self.S, n1, n2)
        return self._blocks[key]

    def whitener(self):
        """(L, L⁻¹ or None, W·L) with S + λI = L·Lᵀ: a Cholesky factor (L⁻¹ None: applied by triangular solves, see
        `unwhiten`, instead of an n³ inverse) or, where Cholesky fails, `kron.datainit._whitener`'s square root."""
        from .datainit import _whitener

        if self._white is None:
            L, info = torch.linalg.cholesky_ex(self.Sr)
            Linv = None
            if int(info.item()) != 0:
                L, Linv = _whitener(self.Sr)
            self._white = (L, Linv, self.W @ L)
        return self._white

    def unwhiten(self, X: torch.Tensor) -> torch.Tensor:
        """X·L⁻¹ (X: rows of length n)."""
        L, Linv, _ = self.whitener()
        if Linv is not None:
            return X @ Linv
        return torch.linalg.solve_triangular(L, X, upper=False, left=False)

    def f_kron(self, A: torch.Tensor, B: torch.Tensor) -> float:
        """tr((W − Σ A_k⊗B_k) S (W − Σ A_k⊗B_k)ᵀ) from the factors: O(m·n·r + m1·(r·n1)² + r²·n²)."""
        from .datainit import _kron_dense

        r, m1, n1 = A.shape
        _, m2, n2 = B.shape
        cross = float((_kron_dense(A, B) * self.WS).sum().item())  # <Ŵ, W·S>
        Ar = A.permute(1, 0, 2).reshape(m1, r * n1)
        D = (Ar.T @ Ar).reshape(r, n1, r, n1).permute(0, 2, 1, 3).reshape(r * r, n1 * n1)  # D[k,l,a,b]
        C = torch.einsum("kip,liq->klpq", B, B).reshape(r * r, n2 * n2)
        quad = float(((D @ self.blocks(n1, n2).T) * C).sum().item())  # Σ_kl Σ_pq C[k,l,p,q] <D_kl, S_pq>
        return max(self.base - 2 * cross + quad, 0.0)

    def layout(self, shape, rank: int):
        """The least-squares layout of one shape on S + λI (`kron.datainit._KronLS`), from the cached S blocks and
        W·S."""
        from .datainit import _KronLS

        m1, n1, m2, n2 = shape
        # A taller than wide with B one row: the search keeps A implicit (`kron.datainit._KronLS.implicit_A`); its
        # M = (W·Sr)ᵀ(W·Sr) costs m·n² once, so only where W is not wide
        implicit = m2 == 1 and m1 > n1 and self.W.shape[0] >= self.W.shape[1]
        Mblk = self.blocks(n1, n2, gram=True) if implicit else None
        return _KronLS(self.W, self.S, shape, rank, WS=self.WS, lam=self.lam, Sblk=self.blocks(n1, n2), Mblk=Mblk,
                       base=self.base + self.lam * float((self.W * self.W).sum().item()))

    def kronecker(self, shape, rank: int, *, grid: int = 12, iters: int = 10, tol: float = 1e-6,
                  seed: int = 0) -> tuple[float, str]:
        """(f, init) of `data_aware_kronecker(W, S, shape, rank)`: the better of the SVD init and the data-aware
        factors on S. The chosen factors (A, B) are kept for `factors` until the next call."""
        from .datainit import _balance, _kron_dense, _search_and_refine
        from .factor import nearest_kronecker

        m1, n1, m2, n2 = shape
        svd = nearest_kronecker(self.W, shape, rank)
        f_svd = self.f_kron(svd.A, svd.B)
        f_data = None
        if n1 == 1 or n2 == 1:
            _, Linv, WL = self.whitener()
            white = nearest_kronecker(WL, shape, rank)
            A, B = white.A, white.B
            if n2 == 1:
                A = self.unwhiten(A.reshape(rank * m1, n1)).reshape(rank, m1, n1)
            else:
                B = self.unwhiten(B.reshape(rank * m2, n2)).reshape(rank, m2, n2)
            if Linv is None:  # exact L·Lᵀ = S + λI: ‖(W − Ŵ)L‖² is the SVD's tail, then take the ridge's part out
                tail = float((white.singular_values[rank:].double() ** 2).sum().item())
                f_data = max(tail - self.lam * float(((self.W - _kron_dense(A, B)) ** 2).sum().item()), 0.0)
        else:
            A, B, _ = _search_and_refine(self.layout(shape, rank), svd.B, grid, seed, iters, tol)
        A, B = _balance(A, B)  # as data_aware_kronecker returns them
        if f_data is None:
            f_data = self.f_kron(A, B)
        best = (f_svd, "svd", (svd.A, svd.B)) if f_svd < f_data else (f_data, "data", (A, B))
        self._kron_factors = ((tuple(shape), rank), best[2])
        return best[0], best[1]

    def factors(self, spec) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The float64 factors behind the last damage computed for `spec` — Kronecker (A, B) as
        `data_aware_kronecker` gives them, low-rank (U, V) as `whitened_lowrank` — or None when they are not at hand
        (the caller then builds the layer itself)."""
        if spec.method == "kronecker":
            last = self._kron_factors
            return last[1] if last is not None and last[0] == (tuple(spec.shape), spec.rank) else None
        if spec.method == "lowrank" and self._lowrank_factors is not None:
            P, sig, Z = self._lowrank_factors
            root = sig[:spec.rank].sqrt()
            return P[:, :spec.rank] * root, root[:, None] * Z[:spec.rank]
        return None

    def lowrank(self, rank: int) -> tuple[float, str]:
        """(f, "data") of `whitened_lowrank(W, S, rank)`: with W·L = P Σ Qᵀ, W − Ŵ_r = P_t Σ_t Q_tᵀ L⁻¹, so
        f(r) = Σ_{i>r} σ_i² z_i S z_iᵀ with z_i = q_iᵀ L⁻¹: one SVD for every rank."""
        if self._lowrank is None:
            _, Linv, WL = self.whitener()
            if WL.shape[0] < WL.shape[1]:  # wide: LAPACK is ~3x faster on the tall transpose (same factors)
                U, sig, Ph = torch.linalg.svd(WL.T, full_matrices=False)
                P, Qh = Ph.T, U.T
            else:
                P, sig, Qh = torch.linalg.svd(WL, full_matrices=False)
            Z = self.unwhiten(Qh)
            self._lowrank_factors = (P, sig, Z)  # U = P_r Σ_r^½, V = Σ_r^½ Z_r (whitened_lowrank)
            if Linv is None:  # L·Lᵀ = S + λI, so z S zᵀ = q L⁻¹(L Lᵀ − λI)L⁻ᵀ qᵀ = 1 − λ‖z‖² (unit rows q)
                g = (1 - self.lam * (Z * Z).sum(1)).clamp_min(0)
            else:
                g = ((Z @ self.S) * Z).sum(1)
            tail = (sig ** 2 * g).flip(0).cumsum(0).flip(0)  # tail[i] = Σ_{j>=i}
            self._lowrank = torch.cat([tail, tail.new_zeros(1)])
        return max(float(self._lowrank[rank].item()), 0.0), "data"

    def int8(self) -> float:
        """f of the dense matrix in per-row int8 (`quant.layer.quantize_rows`)."""
        from .methods.quant.layer import dequantize_rows, quantize_rows

        D = self.W - dequantize_rows(*quantize_rows(self.W)).double()
        return max(float(((D @ self.S) * D).sum().item()), 0.0)


def _fast_damage(blocks: list, spec) -> tuple[float, str] | None:
    """(damage, init) of a kronecker / lowrank spec from the cached blocks; None for other methods."""
    if spec.method == "kronecker":
        res = [b.kronecker(spec.shape, spec.rank) for b in blocks]
    elif spec.method == "lowrank":
        res = [b.lowrank(spec.rank) for b in blocks]
    else:
        return None
    base = sum(b.base for b in blocks)
    if not base > 0:
        return 0.0, res[0][1]
    inits = {i for _, i in res}
    return sum(f for f, _ in res) / base, inits.pop() if len(inits) == 1 else "svd"


def _layer_from_factors(module: nn.Module, spec, factors: list) -> nn.Module | None:
    """The layer `method.build(module, spec, "data", stats)` would give, from the factors `_FastBlock.factors`
    found for it (one pair per output block), without solving again; None when some factors are missing."""
    from .methods import get_method
    from .methods.layers import linear_weight

    if not factors or any(f is None for f in factors) or spec.method not in ("kronecker", "lowrank"):
        return None
    names = ("A", "B") if spec.method == "kronecker" else ("U", "V")
    new = get_method(spec.method).build(module, spec, "none")
    parts = list(new.blocks) if spec.blocks > 1 else [new]
    if len(parts) != len(factors):
        return None
    bias = linear_weight(module)[1]
    with torch.no_grad():
        for part, pair in zip(parts, factors):
            for attr, t in zip(names, pair):
                getattr(part, attr).copy_(t)
        if bias is not None:
            new.bias.copy_(bias)
    return new


def _candidate_damage(name: str, module: nn.Module, spec, stats_one, blocks: list | None,
                      proxy: "_Proxy | None") -> tuple[float, str | None, nn.Module | None]:
    """(damage, init source, the layer built or None) of one candidate on one matrix: from the cached `blocks`
    (`_FastBlock`) where the method allows it, else by building the layer with the data-aware init on `stats_one`
    and measuring it with `proxy` (made here when None). DataError when the damage is not finite."""
    from .methods import get_method

    new, got = None, None
    with torch.no_grad():
        if blocks is not None:
            got = _fast_damage(blocks, spec)
        if got is None:
            new = get_method(spec.method).build(module, spec, "data", stats=stats_one)
            got = (proxy or _Proxy(_weight(module), stats_one.S))(new.to_dense()), getattr(new, "init_source", None)
    damage, init_src = got
    if not math.isfinite(damage):
        raise DataError(f"{name}: candidate {spec.label()} gave a non-finite output error (the calibration "
                        "statistics or the weight hold extreme values)")
    return float(damage), init_src, new


def option_damages(model: nn.Module, stats, wanted: Mapping[str, Sequence], *, ridge: float | None = None,
                   progress: Callable[[int, int, str], None] | None = None) -> dict[str, list[float]]:
    """The profile's damage (relative output error on the calibration statistics, data-aware init) of given specs:
    module name -> one damage per spec of `wanted[name]` (Kronecker / low-rank specs; fused matrices take the
    specs' `blocks`). The search's prior and automatic seeds (`search.prior`) use it on the space's own options."""
    from .calibration import ModuleStats
    from .datainit import DEFAULT_RIDGE

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
        W = _weight(modules[name])
        blocks = max((getattr(sp, "blocks", 1) for sp in specs), default=1)
        cached = [_FastBlock(w, S, ridge) for w in W.split(W.shape[0] // blocks, dim=0)]
        stats_one = ModuleStats(S=S, tokens=stats.stats(name).tokens)
        done: dict = {}  # spec -> damage: a structure's damage serves its +int8 option too

        def damage(spec):
            if spec not in done:
                if getattr(spec, "method", None) == "int8":
                    inner = 0.0 if spec.inner is None else damage(spec.inner)
                    done[spec] = _int8_estimate(cached, inner)
                else:
                    done[spec] = _candidate_damage(name, modules[name], spec, stats_one, cached, None)[0]
            return done[spec]

        out[name] = [damage(spec) for spec in specs]
        if progress is not None:
            progress(i + 1, len(wanted), name)
    return out


def _int8_estimate(blocks: list, inner_damage: float) -> float:
    """The damage of a structure + int8 (`quantize: int8`) for the search's prior, without building the layer: the
    structure's damage (`inner_damage`, 0 for the dense matrix) plus that of the dense matrix in int8. Exact for the
    dense matrix in int8; for a structure it is an estimate — its factors, not W, are quantised, and the two errors
    are added as if orthogonal — of a term orders of magnitude below the structure's own damage (building each
    Kronecker layer only to quantise it kept an all-families search in its prior for minutes)."""
    base = sum(b.base for b in blocks)
    return inner_damage + (sum(b.int8() for b in blocks) / base if base > 0 else 0.0)


def _model_inputs(batch, device, extra: Mapping | None = None):
    if isinstance(batch, torch.Tensor):
        kw, mask = {"input_ids": batch.to(device)}, None
    else:
        kw = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items() if k != "labels"}
        mask = kw.get("attention_mask")
    if extra:
        kw.update(extra)
    return kw, mask


def _first_rows(batch, tokens: int):
    """The batch cut to its first rows holding at most `tokens` tokens (padding not counted; at least one row), so
    that a token budget smaller than one batch is honoured."""
    ids = batch if isinstance(batch, torch.Tensor) else batch.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() < 2:
        return batch
    mask = None if isinstance(batch, torch.Tensor) else batch.get("attention_mask")
    per_row = (mask.reshape(mask.shape[0], -1).sum(1) if isinstance(mask, torch.Tensor)
               else torch.full((ids.shape[0],), ids[0].numel()))
    k = max(int((per_row.cumsum(0) <= tokens).sum().item()), 1)
    if k >= ids.shape[0]:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch[:k]
    n = ids.shape[0]
    return {key: v[:k] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v
            for key, v in batch.items()}


def _no_cache_kwargs(model: nn.Module) -> dict:
    """{"use_cache": False} when the model's forward takes it: no KV cache is built for a measurement pass (it
    costs memory, and a replayed layer prefix would leave it half filled)."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in params else {}


REPLAY_MAX_BYTES = 1 << 30  # layer outputs kept for prefix replay: at most this much (else every pass runs it all)


class _ModelMeasure:
    """KL(teacher ‖ student) on held-out batches: next-token distributions of a causal LM (each position, padding
    left out), or a classifier's outputs; a model without logits: relative squared error of the last hidden state.

    Prefix replay: the reference pass keeps every transformer layer's output (`kron.baselines.layer_list`; at most
    REPLAY_MAX_BYTES, else replay is off). A measurement told which modules differ from the reference
    (`changed`: dotted names) runs the model from the first layer holding one of them: the layers before it return
    their recorded outputs instead of computing them — the same numbers, since those layers are the reference's.
    A changed module outside the layers (embeddings, head) or `changed=None` runs everything.

    max_tokens: at most this many held-out tokens (the last batch used is cut to its first rows, at least one);
    whole_batches: the older rule — whole batches until the budget is reached (the search's seeds keep it).
    """

    def __init__(self, model: nn.Module, batches: Sequence, max_tokens: int | None = None, *, replay: bool = True,
                 whole_batches: bool = False):
        self.model = model
        dev = next(model.parameters()).device
        self.device = dev
        self.batches, self.ref = [], []
        self.kind = None
        self.extra = _no_cache_kwargs(model)
        self.layers_name, self.layers = self._layers() if replay else (None, None)
        self.recorded: list[list] = []  # per batch, per layer: the layer's output in the reference pass
        self.replays = 0  # measurements that skipped at least one layer
        recording: list = []
        hooks = [layer.register_forward_hook(lambda _m, _a, out: recording.append(out))
                 for layer in (self.layers or [])]
        seen, kept = 0, 0
        try:
            with torch.no_grad():
                for b in batches:
                    if max_tokens is not None and seen >= max_tokens:
                        break
                    if max_tokens is not None and not whole_batches:
                        b = _first_rows(b, max_tokens - seen)
                    kw, mask = _model_inputs(b, dev, self.extra)
                    recording.clear()
                    out = model(**kw)
                    logits = getattr(out, "logits", None)
                    if logits is not None:
                        self.kind = "kl"
                        ref = torch.log_softmax(logits.float(), dim=-1)
                    else:
                        self.kind = "hidden_rel_mse"
                        ref = out.last_hidden_state.float() if hasattr(out, "last_hidden_state") else out[0].float()
                    self.batches.append((kw, mask))
                    self.ref.append(ref)
                    if self.layers is not None:
                        kept += sum(_nbytes(o) for o in recording)
                        if len(recording) != len(self.layers) or kept > REPLAY_MAX_BYTES:
                            self.layers_name, self.layers, self.recorded = None, None, []  # replay off
                        else:
                            self.recorded.append(list(recording))
                    seen += int(mask.sum().item()) if mask is not None else int(kw["input_ids"].numel())
        finally:
            for h in hooks:
                h.remove()
        if not self.batches:
            raise DataError("no held-out batches for the model-level measure")
        self.tokens = seen

    def _layers(self):
        from .baselines import layer_list

        try:
            name, layers = layer_list(self.model)
        except PlanError:
            return None, None
        return name, list(layers)

    def start_layer(self, changed) -> int:
        """The first layer a measurement with these modules changed must run (0: all of them)."""
        if changed is None or self.layers is None:
            return 0
        prefix = self.layers_name + "."
        start = len(self.layers)
        for name in changed:
            if not name.startswith(prefix):
                return 0
            index = name[len(prefix):].split(".", 1)[0]
            if not index.isdigit():
                return 0
            start = min(start, int(index))
        return start

    def with_layers(self, layers: Mapping[str, nn.Module]) -> float:
        """The measure with each module named in `layers` swapped for its layer (the others as they are), replaying
        the unchanged prefix; the originals are put back afterwards, also on error."""
        swapped = []
        try:
            for name, layer in layers.items():
                swapped.append((name, _swap(self.model, name, layer)))
            return float(self(changed=list(layers)))
        finally:
            for name, old in reversed(swapped):
                _swap(self.model, name, old)

    def __call__(self, changed: Sequence[str] | None = None) -> float:
        """The measure of the model as it is now; `changed`: the modules that differ from the reference pass (None:
        unknown, run every layer)."""
        start = self.start_layer(changed)
        if start > 0:
            self.replays += 1
        num, den = 0.0, 0.0
        current: list = [None]
        stubbed = []
        try:
            for layer in self.layers[:start] if start else ():
                stubbed.append((layer, layer.__dict__.get("forward")))
                layer.forward = lambda *a, **k: current[0]
            with torch.no_grad():
                for i, ((kw, mask), ref) in enumerate(zip(self.batches, self.ref)):
                    if start:
                        current[0] = self.recorded[i][start - 1]
                    out = self.model(**kw)
                    if self.kind == "kl":
                        logq = torch.log_softmax(out.logits.float(), dim=-1)
                        # exp(ref)·(ref − logq) in one elementwise pass (no exp(ref) / difference temporaries of
                        # tokens x vocab floats); per position, or per sequence for a classifier
                        kl = F.kl_div(logq, ref, reduction="none", log_target=True).sum(-1)
                        if mask is not None and kl.dim() == 2 and tuple(kl.shape) == tuple(mask.shape):
                            w = mask.to(kl.dtype)
                            num += float((kl * w).sum().item())
                            den += float(w.sum().item())
                        else:
                            num += float(kl.sum().item())
                            den += kl.numel()
                    else:
                        h = out.last_hidden_state.float() if hasattr(out, "last_hidden_state") else out[0].float()
                        num += float(((h - ref) ** 2).sum().item())
                        den += float((ref ** 2).sum().item())
        finally:
            for layer, fwd in stubbed:
                if fwd is None:
                    del layer.forward
                else:
                    layer.forward = fwd
        return num / den if den > 0 else 0.0


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(_nbytes(o) for o in obj)
    if isinstance(obj, Mapping):
        return sum(_nbytes(o) for o in obj.values())
    return 0


def _swap(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Spearman rank correlation (scipy), None with fewer than 3 pairs or a constant side."""
    if len(xs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return None
    from scipy.stats import spearmanr

    r = spearmanr(xs, ys).statistic if hasattr(spearmanr(xs, ys), "statistic") else spearmanr(xs, ys)[0]
    return float(r) if math.isfinite(r) else None


def _kl_pick(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n), both ends included."""
    if k <= 0 or n == 0:
        return []
    if k >= n:
        return list(range(n))
    if k == 1:
        return [n // 2]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def correlation(profile: Mapping) -> dict:
    """Spearman correlation of proxy vs model-level damage over every measured candidate of the linear matrices
    (an embedding's proxy, its table's weight error, is another quantity), and its count."""
    xs, ys = [], []
    for mx in profile["matrices"].values():
        if mx.get("group") == "embedding":
            continue
        for c in mx["candidates"]:
            if c.get("model_damage") is not None and c["method"] != "keep":
                xs.append(c["damage"])
                ys.append(c["model_damage"])
    return {"spearman": spearman(xs, ys), "pairs": len(xs)}


# ----------------------------------------------------------------------------------------------- profiling


def _tied(model: nn.Module, emb: nn.Module) -> bool:
    """Whether the LM head shares the embedding's table (compressing the embedding then leaves the head a dense
    copy of it: trials and plans count that copy)."""
    from .surgery import output_embedding

    head = output_embedding(model)
    return head is not None and getattr(head, "weight", None) is emb.weight


def embedding_entry(model: nn.Module, mx: Matrix, factors: Sequence[int],
                    measure: "_ModelMeasure | None") -> dict:
    """The profile entry of a word embedding: keep and A (v x d/f) ⊗ B (1 x f) for each factor f of `factors` that
    divides the width, each built with its data-free SVD init (as trials build it; an embedding has no input
    activations). damage: the relative weight error ‖E − Ê‖²/‖E‖² of the table; model_damage: the model-level
    measure of every candidate (few of them, and no proxy to interpolate along) when `measure` is given.
    params: the model's parameter change (tied: plus the LM head's dense copy); params_excl_output_embedding: the
    factors alone."""
    from .methods import get_method
    from .methods.base import spec_from_dict

    t0 = time.time()
    module = model.get_submodule(mx.name)
    tied = _tied(model, module)
    from .surgery import float_width

    v, d = mx.m, mx.n
    dense = v * d
    width = float_width(model)
    E = module.weight.detach().double()
    base = float(E.pow(2).sum())
    cands = [{"method": "keep", "label": "keep", "spec": None, "params": dense,
              "params_excl_output_embedding": dense, "macs": 0, "bytes": dense * width, "compression": 1.0,
              "damage": 0.0, "model_damage": 0.0 if measure is not None else None, "seconds": 0.0}]
    method = get_method("kron_embedding")
    used = _dividing(factors, d)
    for f in used:
        ts = time.time()
        spec = spec_from_dict({"embedding_factor": f})
        with torch.no_grad():
            new = method.build(module, spec, "svd").eval()
            err = float((new.to_dense().double() - E).pow(2).sum()) / base if base > 0 else 0.0
        kl = measure.with_layers({mx.name: new}) if measure is not None else None
        p = spec.params(v, d)
        cands.append({"method": spec.method, "label": spec.label(), "spec": spec.to_dict(),
                      "params": p + (dense if tied else 0), "params_excl_output_embedding": p, "macs": 0,
                      "bytes": spec.bytes(v, d, width) + (dense * width if tied else 0), "compression": dense / p, "damage": err, "model_damage": kl, "init": "svd",
                      "seconds": round(time.time() - ts, 4)})
        del new
    return {"group": "embedding", "m": v, "n": d, "blocks": 1, "dense_params": dense,
            "dense_params_excl_output_embedding": dense, "dense_macs": 0, "tied": tied, "factors": used,
            "candidates": cands, "seconds": round(time.time() - t0, 3), "complete": True}


def profile_model(model: nn.Module, stats, *, methods: Sequence[str] = DEFAULT_METHODS,
                  constraints: Constraints | None = None, source: str | None = None,
                  heldout: Sequence | None = None, kl_subset: int = 2, kl_tokens: int | None = 1024,
                  path: str | Path | None = None, fresh: bool = False, ridge: float | None = None,
                  matrices: Sequence[Matrix] | None = None, fast: bool = True,
                  embedding_factors: Sequence[int] = (),
                  progress: Callable[[int, int, str], None] | None = None) -> dict:
    """The sensitivity profile of `model` on calibration statistics `stats` (`kron.calibration.CalibStats`).

    methods: registered method names whose candidates are profiled (each must have a data-aware init).
    constraints: the candidates' range (Constraints). heldout: batches for the model-level measure (None or
    kl_subset 0: no model-level measure). kl_tokens: at most this many held-out tokens for it.
    path: a JSON file written atomically after each matrix; an existing one with the same header is resumed
    (its matrices are not computed again), one with another header is refused (DataError naming the difference)
    unless `fresh`. embedding_factors: also profile the word embedding as A (v x d/f) ⊗ B (1 x f) for these f
    (`embedding_entry`: data-free init, every candidate measured at model level); not part of the header, so an
    older profile resumed with them gains the embedding entry. progress(done, total, name) is called after each
    matrix. fast: compute the Kronecker and
    low-rank damages from per-matrix cached pieces (the same results as building each layer, much faster on large
    matrices); other methods are always built.
    Returns the profile dict (see the module docstring).
    """
    from .datainit import DEFAULT_RIDGE
    from .fsutil import atomic_write_json
    from .methods import get_method
    from .methods.base import LINEAR_KINDS
    from .calibration import ModuleStats
    from .surgery import count_bytes, count_params, float_width, macs_per_token

    constraints = constraints or Constraints()
    ridge = DEFAULT_RIDGE if ridge is None else float(ridge)
    methods = list(dict.fromkeys(methods))
    if not methods:
        raise PlanError("give at least one compression method to profile (e.g. kronecker, lowrank)")
    for name in methods:
        m = get_method(name)
        if not set(m.module_kinds) & set(LINEAR_KINDS):
            raise PlanError(f"method {name} does not compress linear layers; the profile covers linear matrices "
                            "only")
        if not m.data_init:
            raise PlanError(f"method {name} has no data-aware init; the profile measures data-aware damage")
    mats = list(matrices) if matrices is not None else compressible_matrices(model)
    missing = [mx.name for mx in mats if mx.name not in stats]
    factors = sorted({int(f) for f in embedding_factors})
    if any(f < 2 for f in factors):
        raise PlanError(f"embedding factors must be integers > 1, got {list(embedding_factors)}")
    emb_mats = embedding_matrices(model) if factors else []
    for mx in emb_mats:
        if not _dividing(factors, mx.n):
            raise PlanError(f"no embedding factor of {factors} divides the width {mx.n} of {mx.name} "
                            f"({mx.m} x {mx.n}); valid factors divide {mx.n}, e.g. "
                            f"{[f for f in (2, 3, 4, 6, 8, 12, 16) if mx.n % f == 0]}")
    if missing:
        raise DataError(f"the calibration statistics have no entry for {', '.join(missing[:3])}"
                        f"{' ...' if len(missing) > 3 else ''}: they were collected for another model")
    header = profile_header(model, stats, source=source, methods=methods, constraints=constraints, ridge=ridge)
    done: dict = {}
    if path is not None and Path(path).is_file() and not fresh:
        old = load_profile(path)
        check_header(old, header, path=path)
        done = dict(old.get("matrices", {}))
    profile = dict(header)
    width = float_width(model)
    profile["model"] = dict(header["model"], params=count_params(model),
                            params_excl_output_embedding=count_params(model, exclude_output_embedding=True),
                            macs=macs_per_token(model), bytes=count_bytes(model), float_width=width)
    profile["matrices"] = {}
    profile["model_measure"] = None
    modules = dict(model.named_modules())
    measure = None
    was_training = model.training
    model.eval()
    t_start = time.time()
    mats = emb_mats + mats
    measuring = heldout is not None and kl_subset > 0

    def model_measure() -> _ModelMeasure:
        """The model-level measure, made on first use (the reference pass over the held-out batches)."""
        nonlocal measure
        if measure is None:
            measure = _ModelMeasure(model, heldout, kl_tokens)
            profile["model_measure"] = {"kind": measure.kind, "tokens": measure.tokens}
        return measure

    try:
        for i, mx in enumerate(mats):
            if _reusable(done.get(mx.name), mx, factors, measuring):
                profile["matrices"][mx.name] = done[mx.name]
                if progress is not None:
                    progress(i + 1, len(mats), mx.name)
                continue
            if mx.group == "embedding":
                profile["matrices"][mx.name] = embedding_entry(model, mx, factors, model_measure() if measuring
                                                               else None)
            else:
                t0 = time.time()
                module = modules[mx.name]
                st = stats.stats(mx.name)
                S = st.S
                if not torch.isfinite(S).all():
                    raise DataError(f"the calibration statistics of {mx.name} hold NaN or inf values")
                proxy = _Proxy(_weight(module), S) if not fast else None
                fast_blocks = ([_FastBlock(w, S, ridge) for w in _weight(module).split(mx.m // mx.blocks, dim=0)]
                               if fast else None)
                stats_one = ModuleStats(S=S, tokens=st.tokens)
                specs = candidates_for(mx, methods, constraints)
                dense = mx.m * mx.n
                cands = [{"method": "keep", "label": "keep", "spec": None, "params": dense, "macs": dense,
                          "bytes": dense * width, "compression": 1.0, "damage": 0.0, "model_damage": 0.0 if heldout else None, "seconds": 0.0}]
                kl_idx = set(_kl_pick(len(specs), kl_subset)) if measuring else set()
                for j, spec in enumerate(specs):
                    method = get_method(spec.method)
                    ts = time.time()
                    damage, init_src, new = _candidate_damage(mx.name, module, spec, stats_one, fast_blocks, proxy)
                    kl = None
                    if j in kl_idx:
                        if new is None and fast_blocks is not None:  # the factors just found, not a second solve
                            new = _layer_from_factors(module, spec, [b.factors(spec) for b in fast_blocks])
                        if new is None:
                            new = method.build(module, spec, "data", stats=stats_one)
                        kl = model_measure().with_layers({mx.name: new.eval()})
                    p = spec.params(mx.m, mx.n)
                    cands.append({"method": spec.method, "label": spec.label(), "spec": spec.to_dict(), "params": p,
                                  "macs": spec.macs(mx.m, mx.n), "bytes": spec.bytes(mx.m, mx.n, width),
                                  "compression": dense / p, "damage": damage,
                                  "model_damage": kl, "init": init_src,
                                  "seconds": round(time.time() - ts, 4)})
                    del new
                profile["matrices"][mx.name] = {"group": mx.group, "m": mx.m, "n": mx.n, "blocks": mx.blocks,
                                                "dense_params": dense, "dense_macs": dense, "candidates": cands,
                                                "seconds": round(time.time() - t0, 3), "complete": True}
            profile["correlation"] = correlation(profile)
            if path is not None:
                atomic_write_json(path, _with_pending(profile, mats))
            if progress is not None:
                progress(i + 1, len(mats), mx.name)
    finally:
        model.train(was_training)
    profile["correlation"] = correlation(profile)
    profile["seconds"] = round(time.time() - t_start, 3)
    if path is not None:
        atomic_write_json(path, profile)
    return profile


def _dividing(factors: Sequence[int], width: int) -> list[int]:
    """The embedding factors f > 1 of `factors` that divide `width`, sorted: the ones an embedding entry holds."""
    return sorted({int(f) for f in factors if int(f) > 1 and width % int(f) == 0})


def _reusable(entry: Mapping | None, mx: Matrix, factors: Sequence[int], measured: bool) -> bool:
    """Whether a resumed profile's entry serves this run: complete, and for an embedding made for the same factors
    (and measured at model level when this run measures)."""
    if not entry or not entry.get("complete"):
        return False
    if mx.group != "embedding":
        return True
    if entry.get("factors") != _dividing(factors, mx.n):
        return False
    return not measured or all(c.get("model_damage") is not None for c in entry["candidates"])


def _with_pending(profile: dict, mats: Sequence[Matrix]) -> dict:
    out = dict(profile)
    out["pending"] = [mx.name for mx in mats if mx.name not in profile["matrices"]]
    return out


# ----------------------------------------------------------------------------------------------- display


def matrix_table(entry: Mapping) -> tuple[tuple[str, ...], list[tuple]]:
    """(header, rows) of one matrix's candidates, cheapest damage first within each compression."""
    header = ("candidate", "params", "compression", "macs", "damage", "model")
    rows = []
    for c in sorted(entry["candidates"], key=lambda c: (c["compression"], c["damage"])):
        md = c.get("model_damage")
        rows.append((c["label"], f"{c['params']:,}", f"{c['compression']:.2f}x", f"{c['macs']:,}",
                     f"{c['damage']:.4g}", "-" if md is None else f"{md:.4g}"))
    return header, rows
