"""Batched randomized SVD on the GPU: the ``triton`` backend of ``rsvd``.

Implements the backend interface documented in :mod:`sorsa_kernels.reference.rsvd` with the same
algorithm (a Gaussian sketch, ``niter`` re-orthonormalized power iterations, Rayleigh–Ritz), made
fast for many same-shape weights at once:

- **Products with the weights** (the ``2·niter + 2`` passes over them that dominate the cost) run
  in one Triton kernel, :func:`_product_kernel`, over the whole group, reading each weight in
  place through a table of element offsets from the first (no stacked copy of the weights). The other operand
  is float32; how it meets the weight is the precision schedule below.
- **Re-orthonormalization** is shifted CholeskyQR: the ``[k, k]`` Gram matrix (float32-accurate),
  its Cholesky factor in float64 with a tiny diagonal shift (so that a rank-deficient block
  cannot break it) and a product with the inverse factor, all batched. Two passes keep the
  basis well conditioned in the fast iterations; the last iteration's bases get three
  (shifted CholeskyQR3), orthonormal to float32 precision, checked, with Householder QR for any
  matrix where that fails (a numerically rank-deficient sketch).
- **The small SVD** is the eigendecomposition of the projected matrix's ``[k, k]`` Gram matrix in
  float64 (exact to float64 precision for every singular value that matters). cuSOLVER has no
  batched eigensolver that torch uses above 32×32 (torch loops one matrix at a time), so the
  batch goes to the host and is split over CPU threads.

Precision schedule (measured on CPU, with bfloat16/tf32 rounding emulated, on the real
weights of all-MiniLM-L6-v2 and on power-law spectra; ``sorsa_kernels/benchmark/init.py``
re-measures it on the GPU): rounding the basis to bfloat16 (bfloat16 weights) or tf32 (float32
and float16 weights) in every power iteration but the last changes neither the excess residual
error nor the singular values measurably, because the next iteration damps what the rounding
adds outside the dominant subspace. The last iteration and the final projection are where the
rounding would stay, so there the basis is split into a high and a low part (two bfloat16
products: about 16 significant bits, with the exactly represented bfloat16 weight) or uses
tf32x3 (float32 accuracy). Gram matrices are always tf32x3; the products with the inverse
Cholesky factors follow the iteration's precision; those with the Ritz vectors are tf32x3.
float64 weights run in float64.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os

import torch
import triton
import triton.language as tl


@triton.jit
def _product_kernel(
    a_offsets, a_first, x_ptr, x_lo_ptr, y_ptr,
    M, N, K,
    stride_am, stride_ak,
    stride_xb, stride_xk, stride_xn,
    stride_yb, stride_ym, stride_yn,
    SPLIT: tl.constexpr, PRECISION: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``Y[b] = op(A[b]) @ X[b]`` (``@ (X + X_lo)`` when SPLIT), with ``A[b]`` at
    ``a_first + a_offsets[b]`` elements (all of one dtype and strides), accumulated in Y's dtype.

    Addressing the matrices by element offsets from one pointer argument (rather than by raw
    pointers) keeps the compiler's knowledge of its 16-byte alignment: with ALIGNED (every offset
    a multiple of 16 elements) the tiles of A load as wide vectors."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    tiles_n = tl.cdiv(N, BLOCK_N)
    # Consecutive programs share a row block of A, so its tiles are reused from L2.
    pid_m = pid // tiles_n
    pid_n = pid % tiles_n
    offset = tl.load(a_offsets + b)
    if ALIGNED:
        offset = tl.multiple_of(offset, 16)
    a_base = a_first + offset
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_tile = a_base + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    x_offsets = b * stride_xb + offs_k[:, None] * stride_xk + offs_n[None, :] * stride_xn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=y_ptr.dtype.element_ty)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        x = tl.load(x_ptr + x_offsets, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        a = tl.load(a_tile, mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(x.dtype)
        acc = tl.dot(a, x, acc, input_precision=PRECISION, out_dtype=acc.dtype)
        if SPLIT:
            x_lo = tl.load(x_lo_ptr + x_offsets, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc = tl.dot(a, x_lo, acc, input_precision=PRECISION, out_dtype=acc.dtype)
        a_tile += BLOCK_K * stride_ak
        x_offsets += BLOCK_K * stride_xk
    y = y_ptr + b * stride_yb + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y, acc, mask=mask_m[:, None] & mask_n[None, :])


# Largest |QᵀQ − I| entry accepted from CholeskyQR for a final basis.
ORTHONORMALITY_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-12}


class _Operand:
    """A batch of same-shape, same-strides matrices ``A[b]`` seen by :func:`_product_kernel`."""

    def __init__(self, matrices: list[torch.Tensor]):
        first = matrices[0]
        self.first = first
        self.shape = tuple(first.shape)
        self.strides = first.stride()
        size = first.element_size()
        offsets = [(a.data_ptr() - first.data_ptr()) // size for a in matrices]
        if any((a.data_ptr() - first.data_ptr()) % size for a in matrices):
            raise ValueError("the matrices must be aligned to their element size")
        self.aligned = all(offset % 16 == 0 for offset in offsets)
        self.offsets = torch.tensor(offsets, dtype=torch.int64, device=first.device)

    @classmethod
    def of_batch(cls, A: torch.Tensor) -> "_Operand":
        """The matrices of a ``[B, m, n]`` tensor (kept alive by the caller)."""
        return cls(list(A.unbind(0)))


def _product(A: _Operand, X: torch.Tensor, *, transpose: bool, accurate: bool) -> torch.Tensor:
    """``op(A[b]) @ X[b]`` for the whole batch, ``X [B, K, N]`` in float32 (float64 for float64 A),
    returned in X's dtype. ``accurate`` picks float32-accurate arithmetic; otherwise the X side
    is rounded to bfloat16 (bfloat16 A) or tf32 (other A)."""
    rows, cols = A.shape
    stride_r, stride_c = A.strides
    M, K = (cols, rows) if transpose else (rows, cols)
    stride_am, stride_ak = (stride_c, stride_r) if transpose else (stride_r, stride_c)
    B, _, N = X.shape
    Y = X.new_empty(B, M, N)
    lo = None
    if A.first.dtype == torch.bfloat16:
        # The weight is exact in bfloat16: only X needs splitting for float32-like accuracy.
        operand = X.to(torch.bfloat16)
        if accurate:
            lo = (X - operand.to(X.dtype)).to(torch.bfloat16)
        precision = "ieee"
    elif X.dtype == torch.float64:
        operand, precision = X, "ieee"
    else:
        operand, precision = X, ("tf32x3" if accurate else "tf32")
    # float64 tiles are kept at 64×64: a 128×128 float64 accumulator does not fit in registers.
    wide = 64 if operand.dtype == torch.float64 else 128
    block_n = wide if N > 64 else max(16, triton.next_power_of_2(N))
    block_m = wide if M > 64 else 64
    block_k = 64 if operand.element_size() == 2 else 32
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n), B)
    _product_kernel[grid](
        A.offsets, A.first, operand, operand if lo is None else lo, Y,
        M, N, K,
        stride_am, stride_ak,
        *operand.stride(), *Y.stride(),
        SPLIT=lo is not None, PRECISION=precision, ALIGNED=A.aligned,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=8 if block_m * block_n >= 128 * 128 else 4,
        num_stages=3 if operand.element_size() < 8 else 2,
    )
    return Y


def _cholesky_qr(Y: torch.Tensor, *, accurate: bool, shift: float) -> torch.Tensor:
    """One pass of shifted CholeskyQR of every ``Y[b]``: ``Y R⁻¹`` with ``RᵀR = YᵀY + s·I``,
    ``s = shift · u · ‖Y‖²_F`` (u: the unit roundoff of Y's dtype).

    The Gram matrix is always float32-accurate (tf32x3): a tf32 Gram matrix loses every
    direction of Y below 2⁻¹¹ of its norm, and spectra that decay across the sketch (σ₁/σ_k of
    a few hundred) then leave a basis that is not even well conditioned. The small shift
    ``s`` (Fukaya et al. 2020) keeps the factorization defined when Y is numerically rank
    deficient; it also leaves ``QᵀQ ≈ I − s·R⁻ᵀR⁻¹``, so a last pass that must be orthonormal
    to working precision is unshifted. Only the product with ``R⁻¹`` follows ``accurate``.
    """
    Ys = _Operand.of_batch(Y)
    gram = _product(Ys, Y, transpose=True, accurate=True).to(torch.float64)
    unit = 2.0**-52 if Y.dtype == torch.float64 else 2.0**-24
    if shift:
        # The floor keeps R⁻¹ finite in Y's dtype when Y is all zeros.
        size = shift * unit * gram.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(torch.finfo(Y.dtype).tiny)
        gram.diagonal(dim1=-2, dim2=-1).add_(size.unsqueeze(-1))
    L, _ = torch.linalg.cholesky_ex(gram)
    identity = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device).expand_as(L)
    inverse = torch.linalg.solve_triangular(L.mT, identity, upper=True).to(Y.dtype)
    return _product(Ys, inverse, transpose=False, accurate=accurate)


def _orthonormalize(Y: torch.Tensor, *, accurate: bool) -> torch.Tensor:
    """A basis of the columns of every ``Y[b]``: well conditioned (two CholeskyQR passes) in the
    fast iterations; orthonormal to float32 precision (three passes, Fukaya et al.'s
    shifted CholeskyQR3) when ``accurate``, with Householder QR for any matrix where that
    still fails (numerically rank-deficient Y)."""
    Q = _cholesky_qr(_cholesky_qr(Y, accurate=accurate, shift=8), accurate=accurate, shift=1)
    if not accurate:
        return Q
    Q = _cholesky_qr(Q, accurate=True, shift=0)
    eye = torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device)
    loss = (_product(_Operand.of_batch(Q), Q, transpose=True, accurate=True) - eye).abs().amax(dim=(-2, -1))
    failed = (~(loss <= ORTHONORMALITY_TOLERANCE[Q.dtype])).nonzero().flatten().tolist()  # NaN fails too
    if failed:
        Q[failed] = torch.linalg.qr(Y[failed]).Q
    return Q


@contextlib.contextmanager
def _single_threaded_torch():
    """Each host worker runs one LAPACK call at a time: nested threading only thrashes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _eigh_descending(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending) and eigenvectors of the symmetric ``G [B, k, k]``, on G's device."""
    if G.device.type == "cpu":
        values, vectors = torch.linalg.eigh(G)
    else:
        host = G.cpu()
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        workers = max(1, min(len(host), cores))
        pieces = host.chunk(workers)
        with _single_threaded_torch(), concurrent.futures.ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(torch.linalg.eigh, pieces))
        values = torch.cat([v for v, _ in results]).to(G.device, non_blocking=True)
        vectors = torch.cat([v for _, v in results]).to(G.device, non_blocking=True)
    return values.flip(-1), vectors.flip(-1)


def working_bytes(m: int, n: int, rank: int, oversample: int, dtype: torch.dtype) -> int:
    """Upper bound of the GPU memory :func:`rsvd_grouped` allocates per matrix, beyond its inputs."""
    k = min(rank + oversample, m, n)
    element = 8 if dtype == torch.float64 else 4
    # Live at once at worst: basis, product, its split operands, inverse-factor product (each
    # [max(m, n), k]), the float64 Gram matrices, and the outputs.
    return element * k * (4 * max(m, n) + m + n) + 8 * 3 * k * k + element * rank * (m + n + 1)


@torch.no_grad()
def rsvd_grouped(weights, rank, niter, oversample, generator):
    A = _Operand(list(weights))
    m, n = A.shape
    acc = torch.float64 if A.first.dtype == torch.float64 else torch.float32
    device = A.first.device
    k = min(rank + oversample, m, n)
    sketch = torch.randn(len(weights), n, k, generator=generator, device=device, dtype=acc)
    Q = _orthonormalize(_product(A, sketch, transpose=False, accurate=False), accurate=niter == 0)
    del sketch
    for i in range(niter):
        last = i == niter - 1
        P = _orthonormalize(_product(A, Q, transpose=True, accurate=last), accurate=last)
        Q = _orthonormalize(_product(A, P, transpose=False, accurate=last), accurate=last)
        del P
    Bt = _product(A, Q, transpose=True, accurate=True)  # (Qᵀ W)ᵀ, [B, n, k]
    Bt64 = Bt.to(torch.float64)
    values, vectors = _eigh_descending(Bt64.mT @ Bt64)
    del Bt64
    ritz = vectors[..., :rank].to(acc).contiguous()
    S = values[..., :rank].clamp_min(0).sqrt().to(acc)
    V = _product(_Operand.of_batch(Bt), ritz, transpose=False, accurate=True)  # Bt·E = V·diag(S)
    U = _product(_Operand.of_batch(Q), ritz, transpose=False, accurate=True)
    Vt = (V / S.clamp_min(torch.finfo(acc).tiny).unsqueeze(-2)).mT.contiguous()
    return U, S, Vt


def rsvd(W, rank, niter, oversample, generator):
    *batch, m, n = W.shape
    flat = W.reshape(-1, m, n)
    U, S, Vt = rsvd_grouped(list(flat.unbind(0)), rank, niter, oversample, generator)
    return U.reshape(*batch, m, rank), S.reshape(*batch, rank), Vt.reshape(*batch, rank, n)
