"""The data-aware init of Kronecker factors: Σ_k A_k ⊗ B_k minimising the calibration output error
tr((W − Ŵ)(S + λI)(W − Ŵ)ᵀ) (`kron.datainit` has the objective and the pieces every method shares).

- n2 == 1 (B is m2 x 1) or n1 == 1 (A is m1 x 1): one side of the input is not split, so (A ⊗ b)·L = (A·L) ⊗ b
  (resp. a ⊗ (B·L)): the nearest Kronecker product of W·L, un-whitened on the factor that touches the input, is the
  exact minimiser.
- otherwise: f is quadratic in the A_k given the B_k (and vice versa), so A has a closed form given B. B's direction
  is searched (a grid when B has few entries, the SVD init's B and random directions otherwise), then refined by
  alternating least squares (which never increases f). The result is always the better of this and the SVD init
  on the calibration objective.

`KronLS`, `s_blocks` and `search_and_refine` are public because the profile's closed-form damages
(`kron.methods.kronecker.damage`) reuse them with pieces cached across a matrix's candidate shapes.
"""
from __future__ import annotations

import math

import torch

from ...datainit import DEFAULT_RIDGE, checked_inputs, output_error, ridged, weight_error, whitener
from ...factor import KroneckerFactors, nearest_kronecker
from ...shapes import validate_shape

__all__ = ["KronLS", "balance", "data_aware_kronecker", "kron_dense", "s_blocks", "search_and_refine"]


def balance(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale each pair (A_k, B_k) to equal Frobenius norms (the product is unchanged)."""
    na = torch.linalg.norm(A.flatten(1), dim=1)
    nb = torch.linalg.norm(B.flatten(1), dim=1)
    s = torch.where((na > 0) & (nb > 0), (na / nb.clamp_min(1e-300)).sqrt(), torch.ones_like(na))
    return A / s[:, None, None], B * s[:, None, None]


def kron_dense(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    r, m1, n1 = A.shape
    _, m2, n2 = B.shape
    return torch.einsum("kac,kbd->abcd", A, B).reshape(m1 * m2, n1 * n2)


def s_blocks(S: torch.Tensor, n1: int, n2: int) -> torch.Tensor:
    """The n2² blocks S_pq = S[a·n2+p, b·n2+q] (each n1 x n1, flattened) as the rows of an (n2², n1²) matrix."""
    return S.reshape(n1, n2, n1, n2).permute(1, 3, 0, 2).reshape(n2 * n2, n1 * n1).contiguous()


def _add_identity_blocks(G: torch.Tensor, t: torch.Tensor, n: int) -> None:
    """G += kron(t, I_n) in place (G is (r·n) x (r·n), t is r x r)."""
    r = t.shape[0]
    G.view(r, n, r, n).diagonal(dim1=1, dim2=3).add_(t[:, :, None])


class KronLS:
    """Least-squares pieces of f(A, B) = tr((W − Σ A_k⊗B_k) Sr (W − Σ A_k⊗B_k)ᵀ) for one weight and shape, with
    Sr = S + lam·I.

    Laid out once per shape so that every solve is a few matrix products (no einsum over the 4-index views, which
    dominated the cost on large matrices): the n2² blocks S_pq = S[a·n2+p, b·n2+q] (each n1 x n1) as the rows of
    one (n2², n1²) matrix, and W·Sr with rows (x, a) and columns (i, p). The ridge is added where it lands (λ on the
    diagonal of the Gram matrices) instead of being stored in S, so a caller holding S and W·S (`kron.profile`) does
    not copy them per shape."""

    def __init__(self, W: torch.Tensor, S: torch.Tensor, shape, rank: int, *, WS: torch.Tensor | None = None,
                 lam: float = 0.0, base: float | None = None, Sblk: torch.Tensor | None = None,
                 Mblk: torch.Tensor | None = None):
        m1, n1, m2, n2 = shape
        self.m1, self.n1, self.m2, self.n2 = shape
        self.rank = rank
        self.lam = float(lam)
        # M = (W·Sr)ᵀ(W·Sr) in blocks (`s_blocks`): with B one row (m2 = 1), HᵀH = Σ_pq C_pq M_pq, so a start's
        # objective costs O(n1³) instead of O(m1·n1²) (used when m1 > n1; see f_A)
        self.Mblk = Mblk if m2 == 1 else None
        WS = W @ S if WS is None else WS  # W·S (without the ridge)
        self.Sblk = s_blocks(S, n1, n2) if Sblk is None else Sblk
        WSr = WS + self.lam * W if self.lam else WS
        self.WSp = WSr.reshape(m1, m2, n1, n2).permute(0, 2, 1, 3).reshape(m1 * n1, m2 * n2).contiguous()
        if base is None:
            base = float((WS * W).sum().item()) + self.lam * float((W * W).sum().item())
        self.base = base  # f(0) on Sr

    @staticmethod
    def _solve(G: torch.Tensor, H: torch.Tensor, want_X: bool = True):
        """(X, gain, finish): X = H G⁻¹ (G symmetric PSD; None unless want_X) and gain = tr(H G⁻¹ Hᵀ), with a tiny
        jitter if G is singular; finish() gives X later (one more triangular solve) when it was not asked for."""
        jitter = 0.0
        scale = float(torch.diagonal(G).abs().mean().item()) or 1.0
        for _ in range(6):
            Gj = G
            if jitter:
                Gj = G.clone()
                Gj.diagonal().add_(jitter)
            L, info = torch.linalg.cholesky_ex(Gj)
            if int(info.item()) == 0:
                Z = torch.linalg.solve_triangular(L, H.T, upper=False)  # L Z = Hᵀ

                def finish(L=L, Z=Z):
                    return torch.linalg.solve_triangular(L.T, Z, upper=True).T

                return (finish() if want_X else None), float((Z * Z).sum().item()), finish
            jitter = scale * (1e-12 if jitter == 0 else jitter / scale * 100)
        X = torch.linalg.lstsq(G, H.T).solution.T
        return X, float((X * H).sum().item()), (lambda X=X: X)

    def gram_A(self, B: torch.Tensor) -> torch.Tensor:
        """G[(k,a),(l,b)] = Σ_pq C[k,p,l,q] Sr[a·n2+p, b·n2+q], C = Σ_i B[k,i,·] B[l,i,·]."""
        r, n1, n2 = self.rank, self.n1, self.n2
        C = torch.einsum("kip,liq->klpq", B, B).reshape(r * r, n2 * n2)
        G = (C @ self.Sblk).reshape(r, r, n1, n1).permute(0, 2, 1, 3).reshape(r * n1, r * n1)
        if self.lam:
            tr = torch.diagonal(C.reshape(r, r, n2, n2), dim1=2, dim2=3).sum(-1)  # Σ_p C[k,p,l,p]
            _add_identity_blocks(G, self.lam * tr, n1)
        return G

    def _rhs_A(self, B: torch.Tensor) -> torch.Tensor:
        r, n1 = self.rank, self.n1
        H = self.WSp @ B.reshape(r, -1).T  # (m1·n1, r): rows (x, a)
        return H.reshape(self.m1, n1, r).permute(0, 2, 1).reshape(self.m1, r * n1)

    def implicit_A(self, B: torch.Tensor):
        """With `Mblk` (B one row): (f at the best A given B, state) without forming A = H G⁻¹: f = base −
        <G⁻¹, HᵀH>, HᵀH = Σ_pq C_pq M_pq; state = (B, G⁻¹, HᵀH) for `solve_B_implicit`. None when G is not
        numerically positive definite (the explicit path then handles it)."""
        G = self.gram_A(B)
        L, info = torch.linalg.cholesky_ex(G)
        if int(info.item()) != 0:
            return None
        r, n1, n2 = self.rank, self.n1, self.n2
        C = torch.einsum("kip,liq->klpq", B, B).reshape(r * r, n2 * n2)
        K = (C @ self.Mblk).reshape(r, r, n1, n1).permute(0, 2, 1, 3).reshape(r * n1, r * n1)
        Ginv = torch.cholesky_inverse(L)
        return max(self.base - float((Ginv * K).sum().item()), 0.0), (B, Ginv, K)

    def solve_B_implicit(self, state) -> torch.Tensor:
        """`solve_B(A)` for the A = H G⁻¹ of `implicit_A`'s state: AᵀA = G⁻¹ HᵀH G⁻¹ and the right-hand side
        Σ_x,a (W·Sr)[x,(a,p)] A[k,x,a] = Σ_l,q b_l[q] Σ_c,a G⁻¹[(l,c),(k,a)] M[(c,q),(a,p)]: O(n1³ + r²·n²)."""
        B, Ginv, K = state
        r, n1, n2 = self.rank, self.n1, self.n2
        D = (Ginv @ K @ Ginv).reshape(r, n1, r, n1).permute(0, 2, 1, 3).reshape(r * r, n1 * n1)  # D[k,l,a,b]
        G = (D @ self.Sblk.T).reshape(r, r, n2, n2).permute(0, 2, 1, 3).reshape(r * n2, r * n2)
        if self.lam:
            tr = torch.diagonal(D.reshape(r, r, n1, n1), dim1=2, dim2=3).sum(-1)
            _add_identity_blocks(G, self.lam * tr, n2)
        Gi = Ginv.reshape(r, n1, r, n1).permute(0, 2, 1, 3).reshape(r * r, n1 * n1)  # [l,k | c,a]
        T = (Gi @ self.Mblk.T).reshape(r, r, n2, n2)  # T[l,k,q,p] = Σ_c,a G⁻¹[(l,c),(k,a)] M[(c,q),(a,p)]
        H = torch.einsum("lq,lkqp->kp", B.reshape(r, n2), T).reshape(1, r * n2)
        X, _, _ = self._solve(G, H)
        return X.reshape(1, r, n2).permute(1, 0, 2).contiguous()

    def f_A(self, B: torch.Tensor):
        """(f at the best A given B, finish): finish() returns that A (the search compares many B first)."""
        _, gain, finish = self._solve(self.gram_A(B), self._rhs_A(B), want_X=False)
        r, n1 = self.rank, self.n1

        def A():
            return finish().reshape(self.m1, r, n1).permute(1, 0, 2).contiguous()

        return max(self.base - gain, 0.0), A

    def solve_A(self, B: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The best A given B, and f at (A, B)."""
        _, gain, finish = self._solve(self.gram_A(B), self._rhs_A(B), want_X=False)
        r, n1 = self.rank, self.n1
        return finish().reshape(self.m1, r, n1).permute(1, 0, 2).contiguous(), max(self.base - gain, 0.0)

    def solve_B(self, A: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The best B given A, and f at (A, B)."""
        r, m1, n1, m2, n2 = self.rank, self.m1, self.n1, self.m2, self.n2
        Af = A.permute(1, 0, 2).reshape(m1, r * n1)
        D = (Af.T @ Af).reshape(r, n1, r, n1).permute(0, 2, 1, 3).reshape(r * r, n1 * n1)  # D[k,l,a,b]
        G = (D @ self.Sblk.T).reshape(r, r, n2, n2).permute(0, 2, 1, 3).reshape(r * n2, r * n2)
        if self.lam:
            tr = torch.diagonal(D.reshape(r, r, n1, n1), dim1=2, dim2=3).sum(-1)  # tr(D_kl)
            _add_identity_blocks(G, self.lam * tr, n2)
        H = self.WSp.T @ A.permute(1, 2, 0).reshape(m1 * n1, r)  # (m2·n2, r): rows (i, p)
        H = H.reshape(m2, n2, r).permute(0, 2, 1).reshape(m2, r * n2)
        X, gain, _ = self._solve(G, H)
        B = X.reshape(m2, r, n2).permute(1, 0, 2).contiguous()
        return B, max(self.base - gain, 0.0)


def _b_candidates(B0: torch.Tensor, grid: int, seed: int) -> list[torch.Tensor]:
    """Directions of B to try: the SVD init's, an even grid over the half circle when B (rank 1) has 2 entries,
    and `grid` random directions otherwise."""
    r, m2, n2 = B0.shape
    out = [B0]
    if grid <= 0:
        return out
    if r == 1 and m2 * n2 == 2:
        for i in range(grid):
            t = math.pi * i / grid
            out.append(torch.tensor([math.cos(t), math.sin(t)], dtype=B0.dtype, device=B0.device).reshape(1, m2, n2))
        return out
    gen = torch.Generator().manual_seed(seed)
    for _ in range(grid):
        out.append(torch.randn(B0.shape, generator=gen, dtype=B0.dtype).to(B0.device))
    return out


def search_and_refine(ls: "KronLS", B_svd: torch.Tensor, grid: int, seed: int, iters: int, tol: float):
    """The general case: the best of B's candidate directions (A solved in closed form for each), then alternating
    least squares until the objective stops falling by more than `tol`; returns (A, B, objective)."""
    starts = _b_candidates(B_svd, grid, seed)
    if getattr(ls, "Mblk", None) is not None:
        got = _search_and_refine_implicit(ls, starts, iters, tol)
        if got is not None:
            return got
    best_f, best = math.inf, None
    for B0 in starts:
        f0, A0 = ls.f_A(B0)  # A itself only for the best start
        if f0 < best_f:
            best_f, best = f0, (A0, B0)
    A, B = best[0](), best[1]
    f = best_f
    for _ in range(iters):
        B, _ = ls.solve_B(A)
        A, f_new = ls.solve_A(B)
        done = f - f_new <= tol * max(f, 1e-300)
        f = min(f, f_new)
        if done:
            break
    return A, B, f


def _search_and_refine_implicit(ls: "KronLS", starts, iters: int, tol: float):
    """`search_and_refine` with A kept implicit (`KronLS.implicit_A`, B one row and A taller than wide): the same
    starts, steps and stopping rule in O(n1³ + n²) per step instead of O(m1·n1²); A is formed once at the end.
    None when some Gram matrix needs the explicit path's jitter."""
    best_f, best = math.inf, None
    for B0 in starts:
        got = ls.implicit_A(B0)
        if got is None:
            return None
        if got[0] < best_f:
            best_f, best = got
    f, state = best_f, best
    for _ in range(iters):
        got = ls.implicit_A(ls.solve_B_implicit(state))
        if got is None:
            return None
        f_new, state = got
        done = f - f_new <= tol * max(f, 1e-300)
        f = min(f, f_new)
        if done:
            break
    B = state[0]
    A, _ = ls.solve_A(B)
    return A, B, f


def data_aware_kronecker(W: torch.Tensor, S: torch.Tensor, shape, rank: int = 1, ridge: float = DEFAULT_RIDGE, *,
                         grid: int = 12, iters: int = 10, tol: float = 1e-6, seed: int = 0) -> KroneckerFactors:
    """Σ_{k<rank} A_k ⊗ B_k minimising the calibration output error tr((W − Ŵ)(S + λI)(W − Ŵ)ᵀ), in float64.

    Args:
        W: (m, n) weight (out x in). S: (n, n) input second moment E[x xᵀ] of the layer.
        shape: (m1, n1, m2, n2). rank: summed products. ridge: λ = ridge · mean(diag S).
        grid: B directions tried in the general case (an even grid over the half circle when B has 2 entries,
            random directions otherwise; the SVD init's B is always tried). iters: alternating least-squares
            refinements of the best start (stopping early when f improves by less than `tol`, relatively).
    Returns KroneckerFactors: A (rank, m1, n1), B (rank, m2, n2) in float64, rel_error = weight error, output_error
    on S, init = "data" (or "svd" when the SVD init was better on the calibration objective, which the exact
    n1 == 1 / n2 == 1 solutions never are).
    """
    W64, S64 = checked_inputs(W, S, "data_aware_kronecker")
    m, n = W64.shape
    m1, n1, m2, n2 = validate_shape(m, n, shape, rank)
    with torch.no_grad():
        svd = nearest_kronecker(W64, (m1, n1, m2, n2), rank)
        svd_dense = svd.to_dense()
        svd.output_error, svd.init = output_error(W64, S64, svd_dense), "svd"
        Sr = ridged(S64, ridge)
        if n1 == 1 or n2 == 1:
            L, Linv = whitener(Sr)
            white = nearest_kronecker(W64 @ L, (m1, n1, m2, n2), rank)
            A, B = white.A, white.B
            if n2 == 1:
                A = A @ Linv  # (A ⊗ b)·L = (A·L) ⊗ b
            else:
                B = B @ Linv  # (a ⊗ B)·L = a ⊗ (B·L)
            sv = white.singular_values
        else:
            ls = KronLS(W64, Sr, (m1, n1, m2, n2), rank)
            A, B, f = search_and_refine(ls, svd.B, grid, seed, iters, tol)
            sv = torch.zeros(0, dtype=W64.dtype)
        A, B = balance(A, B)
        W_hat = kron_dense(A, B)
        out = KroneckerFactors(A.contiguous(), B.contiguous(), weight_error(W64, W_hat), sv,
                               output_error=output_error(W64, S64, W_hat), init="data")
    if svd.output_error < out.output_error:
        return svd
    return out
