"""Pure contraction functions of the factorised layers (no modules, no state): the Kronecker product applied
to a batch of tokens without forming the dense weight, its dense form, and the low-rank product.

Layers in `kron.methods` call these; keeping the maths here (tensorly-torch's `functional` split) lets it be tested
and tuned on its own.

Speed notes (CPU, default glibc allocator). glibc serves large blocks with mmap and unmaps them on free, so every
fresh activation-sized tensor page-faults again: on the development VM a fresh 48 MB tensor cost ~60 ms to touch
against ~5 ms for a reused one, more than all the small matmuls of a 20x Kronecker layer. `kron_linear` therefore
takes its output and scratch tensors from a small per-size pool (`_BufferPool`) that hands a buffer out again only
when nothing else references its storage any more (the storage's use count is back to the pool's own reference),
so a result the caller keeps, or a tensor autograd saved for backward, is never overwritten. The gradient goes
through `_KronLinearFn`, whose backward uses the same cheap contraction orders as the forward instead of autograd's
replay of the forward's reshapes and copies. Without gradients, memory-bound layers run large CPU batches in token
chunks whose intermediates stay in cache (`_chunk_tokens`).
"""
from __future__ import annotations

import threading

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .shapes import kron_macs, order_macs

__all__ = ["clear_buffer_pool", "dense_weight", "kron_linear", "lowrank_linear", "set_buffer_pool_limit"]


# per-token columns from which a batched GEMM over tokens beats transposing copies + one large GEMM. Measured on
# 4,096 tokens, 1 thread, default allocator: A X[t] with n2 = 3 took 102 ms batched against 17 ms transposed, n2 = 6
# 9.4 against 10.6 ms, n2 = 16 5.4 against 13.6 ms; A Z[t] with m2 = 16 (48x64 ⊗ 16x48) 15 against 44 ms.
_BATCHED_MIN = 8


# ----------------------------------------------------------------------------------------------------------------
# buffer pool


class _BufferPool:
    """Per-(size, dtype) CPU buffers that are reused once nothing outside the pool references them.

    A buffer is handed out as a new tensor over the pooled storage (not a view: autograd treats it like any fresh
    result, in-place ops on it are allowed). It is free again when its storage's use count is back to what it was
    when the pool made it, i.e. every tensor over it (results kept by the caller, views, tensors saved by autograd,
    `.grad` fields) is gone. At most `limit_bytes` are kept in all, and `per_key` buffers per size; beyond that
    tensors are allocated normally.
    """

    MIN_BYTES = 1 << 18  # below glibc's mmap threshold territory small blocks are reused by malloc anyway

    def __init__(self, limit_bytes: int = 512 << 20, per_key: int = 4):
        self.limit_bytes = limit_bytes
        self.per_key = per_key
        self._bufs: dict[tuple, list[tuple[torch.Tensor, int]]] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    @staticmethod
    def _uses(t: torch.Tensor) -> int:
        return torch._C._storage_Use_Count(t.untyped_storage()._cdata)

    def empty(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * like.element_size()
        if like.device.type != "cpu" or nbytes < self.MIN_BYTES or self.limit_bytes <= 0:
            return torch.empty(shape, dtype=like.dtype, device=like.device)
        key = (numel, like.dtype)
        with self._lock:
            bufs = self._bufs.setdefault(key, [])
            for buf, base in bufs:
                if self._uses(buf) <= base:
                    return self._alias(buf, shape)
            if len(bufs) < self.per_key and self._bytes + nbytes <= self.limit_bytes:
                buf = torch.empty(numel, dtype=like.dtype, device=like.device)
                bufs.append((buf, self._uses(buf)))
                self._bytes += nbytes
                return self._alias(buf, shape)
        return torch.empty(shape, dtype=like.dtype, device=like.device)

    @staticmethod
    def _alias(buf: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        stride, acc = [], 1
        for s in reversed(shape):
            stride.append(acc)
            acc *= s
        return torch.empty(0, dtype=buf.dtype, device=buf.device).set_(buf.untyped_storage(), 0, shape,
                                                                       tuple(reversed(stride)))

    def clear(self) -> None:
        with self._lock:
            self._bufs.clear()
            self._bytes = 0


_POOL = _BufferPool()


def set_buffer_pool_limit(limit_bytes: int, per_size: int = 4) -> None:
    """Cap the memory `kron_linear` keeps for reuse on CPU (default 512 MiB, 4 buffers per size; 0 disables)."""
    _POOL.clear()
    _POOL.limit_bytes, _POOL.per_key = int(limit_bytes), int(per_size)


def clear_buffer_pool() -> None:
    """Drop every pooled buffer (memory still referenced by live tensors is freed when they go)."""
    _POOL.clear()


def _empty(shape, like: torch.Tensor) -> torch.Tensor:
    return _POOL.empty(tuple(shape), like)


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    if t.is_contiguous():
        return t
    return _empty(t.shape, t).copy_(t)


# ----------------------------------------------------------------------------------------------------------------
# contractions
#
# X[t] (n1 x n2) is token t's input, Y[t] = Σ_k A_k X[t] B_kᵀ (m1 x m2) its output, G[t] the output's gradient.
#   a_first: U_k[t] = A_k X[t] (m1 x n2), Y[t] = Σ_k U_k[t] B_kᵀ;  cost m1·n2·(n1 + m2) per token and rank
#   b_first: Z_k[t] = X[t] B_kᵀ (n1 x m2), Y[t] = Σ_k A_k Z_k[t];  cost n1·m2·(n2 + m1)
# The backward of each order reuses its intermediate (saved by the forward; recomputing it would add a third of
# the layer's cost) and runs in the same order, so backward costs twice the forward like a dense layer's:
#   a_first: P_k[t] = G[t] B_k, dX[t] = Σ_k A_kᵀ P_k[t], dA_k = Σ_t P_k[t] X[t]ᵀ, dB_k = Σ_t G[t]ᵀ U_k[t]
#   b_first: Q_k[t] = A_kᵀ G[t], dX[t] = Σ_k Q_k[t] B_k, dB_k = Σ_t Q_k[t]ᵀ X[t], dA_k = Σ_t G[t] Z_k[t]ᵀ
# Per-token products go through one large GEMM when one side is a single row or column, through a batched GEMM
# over tokens when the per-token matrices are wide (>= _BATCHED_MIN columns), and otherwise through one transposed
# copy of a small intermediate plus a large GEMM.


def _tmm(L: torch.Tensor, R: torch.Tensor, out: torch.Tensor) -> None:
    """out (p, q) = Lᵀ R for L (K, p), R (K, q) with K the long (token) dimension.

    MKL is several times slower on these when the result has few columns (measured 185 ms against 26 ms for
    p = 64, q = 3, K = 196,608), so the GEMM is run with the wider side as its columns and transposed after.
    """
    if L.shape[1] > R.shape[1]:
        out.copy_((R.t() @ L).t())
    else:
        torch.mm(L.t(), R, out=out)


def _acc_mm(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    if first:
        torch.mm(a, b, out=out)
    else:
        out.addmm_(a, b)


def _acc_bmm(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    if first:
        torch.bmm(a, b, out=out)
    else:
        out.baddbmm_(a, b)


_PAIR_DTYPES = {torch.float32: torch.complex64, torch.float64: torch.complex128}


def _as_pairs(t: torch.Tensor) -> torch.Tensor | None:
    """t (..., 2) seen as complex numbers (...), one per pair of its last dimension; None where no such view exists
    (not CPU, a dtype without a complex twin, pairs not adjacent or not aligned)."""
    cdtype = _PAIR_DTYPES.get(t.dtype)
    if cdtype is None or t.device.type != "cpu" or t.dim() < 1 or t.shape[-1] != 2 or t.stride(-1) != 1:
        return None
    try:
        return t.view(cdtype).squeeze(-1)
    except RuntimeError:  # odd storage offset or stride
        return None


def _pairs_outer_acc(Yc: torch.Tensor, u: torch.Tensor, bc: torch.Tensor, first: bool, tmp: torch.Tensor | None,
                     biasc: torch.Tensor | None = None) -> None:
    """Yc (=, +=) u · bc (+ biasc): one term of Y[t, i, :] = Σ_k u_k[t, i] b_k (+ bias[i, :]) for pairs b_k, written
    through complex views — Yc of Y's pairs, bc = b0 + i·b1, biasc of the bias's pairs — so that the real factor u
    (T, m) is cast into complex numbers (u + 0i) and multiplied as one contiguous, vectorised pass. On CPU the plain
    elementwise form (Y (T, m, 2) = u[..., None] * b) runs a loop two wide over a broadcast operand, not vectorised:
    4,096 x 384 pairs, 1 thread, 4.3 ms that way, ~2 ms cast + complex multiply-add. tmp: a complex buffer like Yc
    (needed when not first)."""
    if first:
        Yc.copy_(u)
        if biasc is not None:
            torch.addcmul(biasc, Yc, bc, out=Yc)
        else:
            Yc.mul_(bc)
    else:
        tmp.copy_(u)
        Yc.addcmul_(tmp, bc)


def _complex_empty(shape, like: torch.Tensor) -> torch.Tensor:
    """A pooled complex buffer of `shape` (like's real dtype, twice the last dimension, seen as pairs)."""
    return _as_pairs(_empty((*shape, 2), like))


def _sum_tokens_outer(L: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """Σ_t L[t] R[t]ᵀ for L (T, p, c), R (T, q, c): the weight-gradient contraction over tokens and c."""
    T, p, c = L.shape
    q = R.shape[1]
    if p * q <= c * (p + q):
        # the (T, p, q) batch of products is no larger than permuted copies of both operands
        tmp = _empty((T, p, q), L)
        torch.bmm(L, R.transpose(1, 2), out=tmp)
        return tmp.sum(0)
    Lp = _empty((p, T, c), L).copy_(L.transpose(0, 1))
    Rp = _empty((T, c, q), R).copy_(R.transpose(1, 2))
    return Lp.view(p, T * c) @ Rp.view(T * c, q)


def _a_first_forward(X, A, B, bias, out=None):
    T, n1, n2 = X.shape
    r, m1, _ = A.shape
    m2 = B.shape[1]
    # returned as is: a view made inside a Function could not be modified in place
    Yout = _empty((T, m1 * m2), X) if out is None else out
    Y = Yout.view(T, m1, m2)
    Us = []
    if n2 == 1:
        U = _empty((T, r, m1), X)
        torch.mm(X.view(T, n1), A.reshape(r * m1, n1).t(), out=U.view(T, r * m1))
        Yc = _as_pairs(Y) if m2 == 2 else None
        Bc = _as_pairs(B[:, :, 0]) if Yc is not None else None
        biasc = _as_pairs(bias.reshape(m1, 2)) if Bc is not None and bias is not None else None
        if Bc is not None and (bias is None or biasc is not None):  # pairs (KnGPT2's B 2 x 1): complex products
            tmp = _complex_empty((T, m1), X) if r > 1 else None
            for k in range(r):
                _pairs_outer_acc(Yc, U[:, k], Bc[k], k == 0, tmp, biasc)
            return Yout, [U]
        for k in range(r):
            Bk = B[k, :, 0].view(1, 1, m2)
            if k == 0:
                if bias is not None:
                    torch.addcmul(bias.view(1, m1, m2), U[:, 0, :, None], Bk, out=Y)
                else:
                    torch.mul(U[:, 0, :, None], Bk, out=Y)
            else:
                Y.addcmul_(U[:, k, :, None], Bk)
        return Yout, [U]
    Y2 = Y.view(T * m1, m2)
    Xt = None
    if n2 < _BATCHED_MIN:
        Xt = _empty((T, n2, n1), X).copy_(X.transpose(1, 2))
    for k in range(r):
        U = _empty((T, m1, n2), X)
        if Xt is None:
            torch.bmm(A[k].expand(T, m1, n1), X, out=U)
        else:
            Ut = _empty((T, n2, m1), X)
            torch.mm(Xt.view(T * n2, n1), A[k].t(), out=Ut.view(T * n2, m1))
            U.copy_(Ut.transpose(1, 2))
            del Ut
        _acc_mm(Y2, U.view(T * m1, n2), B[k].t(), k == 0)
        Us.append(U)
    if bias is not None:
        Y.add_(bias.view(1, m1, m2))
    return Yout, Us


def _a_first_backward(X, A, B, Us, G, need):
    T, n1, n2 = X.shape
    r, m1, _ = A.shape
    m2 = B.shape[1]
    G2 = G.view(T * m1, m2)
    gX = gA = gB = None
    if need[2]:
        gB = torch.empty_like(B)
        if n2 == 1:
            U = Us[0]
            for k in range(r):
                Uk = U[:, k].reshape(T * m1)
                torch.mv(G2.t(), Uk, out=gB[k, :, 0])
        else:
            for k in range(r):
                _tmm(G2, Us[k].view(T * m1, n2), gB[k])
    if not (need[0] or need[1]):
        return gX, gA, gB
    gA = torch.empty_like(A) if need[1] else None
    if n2 == 1:
        P = _empty((T, m1), X)
        gX = _empty((T, n1), X) if need[0] else None
        for k in range(r):
            torch.mm(G2, B[k], out=P.view(T * m1, 1))
            if gX is not None:
                _acc_mm(gX, P, A[k], k == 0)
            if gA is not None:
                _tmm(P, X.view(T, n1), gA[k])
        return gX, gA, gB
    P = _empty((T, m1, n2), X)
    if n2 >= _BATCHED_MIN:
        gX = _empty((T, n1, n2), X) if need[0] else None
        for k in range(r):
            torch.mm(G2, B[k], out=P.view(T * m1, n2))
            if gX is not None:
                _acc_bmm(gX, A[k].t().expand(T, n1, m1), P, k == 0)
            if gA is not None:
                gA[k] = _sum_tokens_outer(P, X)
        return gX, gA, gB
    Xt = _empty((T, n2, n1), X).copy_(X.transpose(1, 2)) if gA is not None else None
    gXt = _empty((T, n2, n1), X) if need[0] else None
    Pt = _empty((T, n2, m1), X)
    for k in range(r):
        torch.mm(G2, B[k], out=P.view(T * m1, n2))
        Pt.copy_(P.transpose(1, 2))
        if gXt is not None:
            _acc_mm(gXt.view(T * n2, n1), Pt.view(T * n2, m1), A[k], k == 0)
        if gA is not None:
            _tmm(Pt.view(T * n2, m1), Xt.view(T * n2, n1), gA[k])
    if gXt is not None:
        gX = _empty((T, n1, n2), X).copy_(gXt.transpose(1, 2))
    return gX, gA, gB


def _b_first_forward(X, A, B, bias, out=None):
    T, n1, n2 = X.shape
    r, m1, _ = A.shape
    m2 = B.shape[1]
    # Z[t, j1, k, i2] = Σ_j2 X[t, j1, j2] B[k, i2, j2]: one GEMM for every rank
    Z = _empty((T, n1, r, m2), X)
    torch.mm(X.view(T * n1, n2), B.reshape(r * m2, n2).t(), out=Z.view(T * n1, r * m2))
    if m2 == 1:
        Am = A.permute(1, 2, 0).reshape(m1, n1 * r)  # [i1, (j1, k)]
        Y = _empty((T, m1), X) if out is None else out
        if bias is not None:
            torch.addmm(bias, Z.view(T, n1 * r), Am.t(), out=Y)
        else:
            torch.mm(Z.view(T, n1 * r), Am.t(), out=Y)
        return Y, [Z]
    Yout = _empty((T, m1 * m2), X) if out is None else out
    Y = Yout.view(T, m1, m2)
    if m2 >= _BATCHED_MIN:
        for k in range(r):
            _acc_bmm(Y, A[k].expand(T, m1, n1), Z[:, :, k], k == 0)
        if bias is not None:
            Y.add_(bias.view(1, m1, m2))
        return Yout, [Z]
    # narrow: Zt[j1, t, i2] (one copy of the small intermediate), Yt = A Zt as one GEMM, then Y[t] = Yt[:, t]
    Yt = _empty((m1, T, m2), X)
    Zt = _empty((n1, T, m2), X)
    for k in range(r):
        Zt.copy_(Z[:, :, k].transpose(0, 1))
        _acc_mm(Yt.view(m1, T * m2), A[k], Zt.view(n1, T * m2), k == 0)
    del Zt
    if bias is not None:
        torch.add(Yt.transpose(0, 1), bias.view(1, m1, m2), out=Y)
    else:
        Y.copy_(Yt.transpose(0, 1))
    return Yout, [Z]


def _b_first_backward(X, A, B, Zs, G, need):
    T, n1, n2 = X.shape
    r, m1, _ = A.shape
    m2 = B.shape[1]
    Z = Zs[0]
    G3 = G.view(T, m1, m2)
    gX = gA = gB = None
    if need[1]:
        gA = torch.empty_like(A)
        if m2 == 1:
            gAm = torch.empty(m1, n1 * r, dtype=A.dtype, device=A.device)
            _tmm(G.view(T, m1), Z.view(T, n1 * r), gAm)  # [i1, (j1, k)]
            gA.copy_(gAm.view(m1, n1, r).permute(2, 0, 1))
        else:
            for k in range(r):
                gA[k] = _sum_tokens_outer(G3, Z[:, :, k])
    if not (need[0] or need[2]):
        return gX, gA, gB
    gB = torch.empty_like(B) if need[2] else None
    gX = _empty((T, n1, n2), X) if need[0] else None
    Q = _empty((T, n1, m2), X)
    for k in range(r):
        if m2 == 1:
            torch.mm(G.view(T, m1), A[k], out=Q.view(T, n1))
        else:
            torch.bmm(A[k].t().expand(T, n1, m1), G3, out=Q)
        Q2 = Q.view(T * n1, m2)
        if gX is not None and m2 == 1:
            # an outer product per token: a K = 1 GEMM is several times slower than the elementwise product
            Bk = B[k].view(1, 1, n2)
            if k == 0:
                torch.mul(Q, Bk, out=gX)
            else:
                gX.addcmul_(Q, Bk)
        elif gX is not None:
            _acc_mm(gX.view(T * n1, n2), Q2, B[k], k == 0)
        if gB is not None:
            _tmm(Q2, X.view(T * n1, n2), gB[k])
    return gX, gA, gB


def _forward(X, A, B, bias, order, out=None):
    if order == "a_first":
        return _a_first_forward(X, A, B, bias, out)
    return _b_first_forward(X, A, B, bias, out)


# Token chunks (CPU, inference, several threads). A layer that saves many multiply-adds moves about as many bytes
# as the dense layer (its input and output are the same size) for far less arithmetic: it is memory-bound, and an
# intermediate written for the whole batch at once (4,096 tokens: tens of MB) goes out to memory and comes back.
# Without gradients the forward runs in chunks of _CHUNK_TOKENS tokens, each writing its rows of the one output, so
# that the intermediates stay in cache — only for layers doing fewer than _CHUNK_MAX_INTENSITY multiply-adds per
# element read or written, and only with at least _CHUNK_MIN_THREADS threads (which share the memory bandwidth).
# Measured by `python benchmarks/kron_layer.py --chunks --threads 1 2 --repeats 15` (4,096 tokens, interleaved):
# on 2 threads the six chunked shapes ran 0.98–1.31x as fast as the whole batch (4 of 6 faster: 48x256 ⊗ 64x3
# 1.31x, 6x128 ⊗ 512x6 1.12x), on 1 thread 0.89–1.12x (3 of 6 slower), hence no chunks on one thread. The three
# KnGPT2 shapes (about 150–220 multiply-adds per element), chunked anyway (`--chunk-every-layer --cases kngpt2`),
# ran 0.93–1.00x on 1 and 2 threads: their GEMMs lose more to fewer rows than the cache gives back. With gradients a
# chunked forward + backward measured no faster in development (the backward's per-chunk weight-gradient sums cost
# what the cache saves), so training runs the batch whole.
_CHUNK_TOKENS = 512
_CHUNK_MAX_INTENSITY = 100.0
_CHUNK_MIN_THREADS = 2


def _chunk_tokens(X: torch.Tensor, A: torch.Tensor, B: torch.Tensor, order: str) -> int:
    """Tokens per chunk of a forward without gradients (the whole batch where chunks do not pay)."""
    T, n1, n2 = X.shape
    if X.device.type != "cpu" or T < 2 * _CHUNK_TOKENS or torch.get_num_threads() < _CHUNK_MIN_THREADS:
        return T
    r, m1, _ = A.shape
    m2 = B.shape[1]
    inter = r * m1 * n2 if order == "a_first" else r * n1 * m2  # U = A X or Z = X Bᵀ, per token
    # multiply-adds per element read or written, per token
    intensity = order_macs(m1, n1, m2, n2, r)[order] / (n1 * n2 + m1 * m2 + inter)
    return _CHUNK_TOKENS if intensity < _CHUNK_MAX_INTENSITY else T


def _forward_inference(X, A, B, bias, order):
    """The forward without gradients: over token chunks where they pay, each writing its rows of one output."""
    T = X.shape[0]
    chunk = _chunk_tokens(X, A, B, order)
    if chunk >= T:
        return _forward(X, A, B, bias, order)[0]
    Yout = _empty((T, A.shape[1] * B.shape[1]), X)
    for s in range(0, T, chunk):
        _forward(X[s:s + chunk], A, B, bias, order, out=Yout[s:s + chunk])
    return Yout


class _KronLinearFn(torch.autograd.Function):
    """y = x · (Σ_k A_k ⊗ B_k)ᵀ + bias with a hand-written backward in the forward's contraction order.

    Saves x, A, B and the forward's intermediate (U_k = A_k X or Z_k = X B_kᵀ; without it the backward would cost
    three forwards instead of two). Double backward is not supported (`once_differentiable`): differentiating the
    gradient again raises an error.
    """

    @staticmethod
    def forward(ctx, X, A, B, bias, order):
        Y, inter = _forward(X, A, B, bias, order)
        ctx.order = order
        ctx.has_bias = bias is not None
        ctx.save_for_backward(X, A, B, *inter)
        return Y

    @staticmethod
    @once_differentiable
    def backward(ctx, gY):
        X, A, B, *inter = ctx.saved_tensors
        T = X.shape[0]
        m1, m2 = A.shape[1], B.shape[1]
        need = ctx.needs_input_grad[:3]
        G = _contiguous(gY).view(T, m1, m2)
        if ctx.order == "a_first":
            gX, gA, gB = _a_first_backward(X, A, B, inter, G, need)
        else:
            gX, gA, gB = _b_first_backward(X, A, B, inter, G, need)
        gbias = gY.sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
        if gX is not None:
            gX = gX.view(X.shape)
        return gX, gA, gB, gbias, None


def kron_linear(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None = None,
                order: str = "auto") -> torch.Tensor:
    """y = x · (Σ_k A_k ⊗ B_k)ᵀ + bias for x (..., n1·n2), A (r, m1, n1), B (r, m2, n2); returns (..., m1·m2).

    order: "a_first" (cost m1·n2·(n1+m2) per token), "b_first" (n1·m2·(n2+m1)) or "auto" (the cheaper).
    With gradients needed it runs through a custom autograd Function whose backward uses the same contraction
    order (once differentiable: no double backward); on CPU its large outputs and scratch tensors come from a
    reuse pool (see the module docstring, `set_buffer_pool_limit`).
    """
    if A.dim() != 3 or B.dim() != 3 or A.shape[0] != B.shape[0]:
        raise ValueError(f"A and B must be (rank, rows, cols) with the same rank, got {tuple(A.shape)} and "
                         f"{tuple(B.shape)}")
    r, m1, n1 = A.shape
    _, m2, n2 = B.shape
    if order == "auto":
        order = kron_macs(m1, n1, m2, n2, r)[1]
    elif order not in ("a_first", "b_first"):
        raise ValueError(f"order must be 'auto', 'a_first' or 'b_first', got {order!r}")
    if x.shape[-1] != n1 * n2:
        raise ValueError(f"input has {x.shape[-1]} features, the factors take n1·n2 = {n1 * n2}")
    lead = x.shape[:-1]
    X = x.reshape(-1, n1, n2)
    if not X.is_contiguous():
        X = X.contiguous()
    A = A.contiguous()
    B = B.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    if torch.is_grad_enabled() and (x.requires_grad or A.requires_grad or B.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        Y = _KronLinearFn.apply(X, A, B, bias, order)
    else:
        Y = _forward_inference(X, A, B, bias, order)
    return Y.view(*lead, m1 * m2)


def dense_weight(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Σ_k A_k ⊗ B_k as an (m1·m2, n1·n2) matrix."""
    r, m1, n1 = A.shape
    _, m2, n2 = B.shape
    # (k, i1, j1) x (k, i2, j2) -> (i1, i2, j1, j2), summed over k
    return torch.einsum("kab,kcd->acbd", A, B).reshape(m1 * m2, n1 * n2)


def lowrank_linear(x: torch.Tensor, U: torch.Tensor, V: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x · Vᵀ · Uᵀ + bias for x (..., n), U (m, r), V (r, n): r·(m + n) multiply-adds per token, never m·n."""
    return nn.functional.linear(nn.functional.linear(x, V), U, bias)
