"""Batched randomized SVD on the GPU: the ``triton`` backend of ``rsvd``.

Implements the backend interface documented in :mod:`sorsa_kernels.reference.rsvd`. The
algorithm is the reference's range finder (Gaussian sketch, ``niter`` re-orthonormalized
power iterations, Rayleigh–Ritz) with four changes that make it fast for many same-shape
weights at once; the measurements behind them are in ``sorsa_kernels/benchmark/init.py``.

- **Shifted iterations.** Each power iteration applies ``A − μI`` to the basis instead of
  ``A = XXᵀ`` (X the weight, transposed when that makes the basis shorter), with μ half an
  estimate of ``λ_k``, the smallest eigenvalue of A the k-column basis can hold. Power
  iteration converges for ``λ_i`` (i ≤ r) at the ratio ``max(μ, λ_{k+1} − μ)/(λ_i − μ)``
  instead of ``λ_{k+1}/λ_i``. On power-law spectra (trained weights) the singular values next
  to the cut, which converge last, need two iterations fewer for the same accuracy (bfloat16
  4096×4096, α = 0.3, r = 128, k = 256, emulated on a CPU: worst relative error of the top r
  4.7e-4 after 7 plain iterations, 6.7e-4 after 5 and 1.9e-4 after 6 shifted ones). The
  estimate comes for free from the orthonormalization: with ``Y = (A − μI)Q = Q'R``,
  ``σ_min(R) + μ`` lies between the smallest Ritz value of the current basis and ``λ_k``
  (Courant–Fischer), and a lower bound of ``σ_min(R)`` follows from traces of powers of
  ``R⁻¹R⁻ᵀ`` (:func:`_smallest_singular_value_bound`, which also allows for the rounding of the
  Gram matrix). So ``μ ≤ λ_k/2 ≤ λ_r/2``, which keeps every ratio below 1: the shift can slow no
  singular value down, whatever the spectrum.
- **Products with the weights** run in one Triton kernel, :func:`_product_kernel`, over the
  whole group, reading each weight in place through a table of element offsets (no stacked
  copy). The other operand is rounded to bfloat16 (bfloat16 weights) or tf32 (float32 and
  float16 weights) in every power iteration; only the final projection ``Xᵀ Q``, where
  rounding would stay in the result, splits it into two bfloat16 parts (about 16 significant
  bits against the exactly represented weight) or uses tf32x3. The shift ``−μQ`` is fused into
  the product's epilogue, and the intermediate ``XᵀQ`` is written directly in the dtype the
  next product reads. cuBLAS (``torch.bmm``) would need a stacked copy of each chunk: 32 MiB
  per 4096×4096 bfloat16 weight, about what the rest of its working memory takes, so half the
  chunk size under ``sorsa_init_``'s memory bound and twice the chunks' fixed costs; the
  benchmark times both on one chunk (its ``products:`` rows).
- **Orthonormalization** is shifted CholeskyQR (Fukaya et al. 2020): Gram matrix
  float32-accurate, Cholesky factor in float64 with a small diagonal shift that keeps it
  defined for rank-deficient blocks, product with the inverse factor. The power iterations only
  need a well-conditioned basis of the right span, so they take one pass; the final basis takes
  three (shifted CholeskyQR3: orthonormal to float32 precision), is checked, and a matrix where
  that check fails (a numerically rank-deficient weight) is recomputed by the reference
  implementation.
- **The small SVD** is the eigendecomposition of the ``[k, k]`` Gram matrix of the projection,
  formed in float64. cuSOLVER's batched eigensolvers are not reachable through torch < 2.12
  for k > 32 (torch then loops one matrix at a time), so the batch goes to the host, split over
  CPU threads, in float32 (about 2.5× faster than float64 there); two Ogita–Aishima refinement
  steps on the GPU (float64 matrix products only) then make the eigenvectors as accurate as a
  float64 solver's. The host work runs in the background: :func:`rsvd_grouped_start` returns
  as soon as everything is queued, so a caller can start the next chunk of weights on the GPU
  before it asks for this one's :meth:`_PendingRSVD.result` (what ``sorsa_init_`` does).

float64 weights run every product in float64 and solve the small eigenproblem in float64.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading

import torch
import triton
import triton.language as tl

from sorsa_kernels.profiling import recording, stage
from sorsa_kernels.reference import rsvd as reference
from sorsa_kernels.triton.common import element_offsets, matrix_start, on_device


@triton.jit
def _product_kernel(
    a_offsets, a_first, x_ptr, x_lo_ptr, y_ptr, z_ptr, z_scale_ptr,
    M, N, K,
    stride_ab, stride_am, stride_ak,
    stride_xb, stride_xk, stride_xn,
    stride_yb, stride_ym, stride_yn,
    stride_zb, stride_zm, stride_zn,
    INDIRECT: tl.constexpr, ALIGNED: tl.constexpr, SPLIT: tl.constexpr, SUBTRACT: tl.constexpr,
    FLOAT64: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``Y[b] = op(A[b]) @ X[b]`` (``@ (X + X_lo)`` when SPLIT; ``− c[b]·Z[b]`` when SUBTRACT),
    accumulated in float32 (float64 with FLOAT64, which also promotes both operands), stored in
    Y's dtype. ``A[b]`` starts ``a_offsets[b]`` elements (INDIRECT, see
    :func:`sorsa_kernels.triton.common.element_offsets`) or ``b·stride_ab`` elements after
    ``a_first``; all share one dtype and strides."""
    ACC: tl.constexpr = tl.float64 if FLOAT64 else tl.float32
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    tiles_n = tl.cdiv(N, BLOCK_N)
    # Consecutive programs share a row block of A, so its tiles are reused from L2.
    pid_m = pid // tiles_n
    pid_n = pid % tiles_n
    a_base = a_first + matrix_start(b, a_offsets, stride_ab, INDIRECT, ALIGNED)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_tile = a_base + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    x_offsets = b * stride_xb + offs_k[:, None] * stride_xk + offs_n[None, :] * stride_xn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        x = tl.load(x_ptr + x_offsets, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        a = tl.load(a_tile, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if FLOAT64:
            x = x.to(tl.float64)
            a = a.to(tl.float64)
        else:
            a = a.to(x.dtype)
        acc = tl.dot(a, x, acc, input_precision=PRECISION, out_dtype=ACC)
        if SPLIT:
            x_lo = tl.load(x_lo_ptr + x_offsets, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc = tl.dot(a, x_lo, acc, input_precision=PRECISION, out_dtype=ACC)
        a_tile += BLOCK_K * stride_ak
        x_offsets += BLOCK_K * stride_xk
    mask = mask_m[:, None] & mask_n[None, :]
    if SUBTRACT:
        z = tl.load(z_ptr + b * stride_zb + offs_m[:, None] * stride_zm + offs_n[None, :] * stride_zn, mask=mask, other=0.0)
        acc -= tl.load(z_scale_ptr + b).to(ACC) * z.to(ACC)
    y = y_ptr + b * stride_yb + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask)


# Largest |QᵀQ − I| entry accepted from CholeskyQR for a final basis.
ORTHONORMALITY_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-12}
# Ogita–Aishima steps applied to the host eigensolver's vectors (each about squares their error).
REFINEMENT_STEPS = 2
# Squarings in the bound of the smallest singular value: tight to a factor k^(1/2^(j+1)) ≈ 1.04.
SHIFT_BOUND_SQUARINGS = 6


class _Operand:
    """A batch of same-shape, same-strides matrices ``A[b]`` seen by :func:`_product_kernel`: the
    weights of a group (separate tensors, addressed by an offset table) or one ``[B, m, n]``
    tensor (a batch stride)."""

    def __init__(self, first, shape, strides, *, offsets=None, batch_stride=0, aligned=True):
        self.first = first
        self.shape = tuple(shape)
        self.strides = tuple(strides)
        self.offsets = offsets
        self.batch_stride = batch_stride
        self.aligned = aligned

    @classmethod
    def of_matrices(cls, matrices: list[torch.Tensor]) -> "_Operand":
        offsets, aligned = element_offsets(matrices)
        first = matrices[0]
        return cls(first, first.shape, first.stride(), offsets=offsets, aligned=aligned)

    @classmethod
    def of_batch(cls, A: torch.Tensor) -> "_Operand":
        return cls(A, A.shape[1:], A.stride()[1:], batch_stride=A.stride(0))

    @property
    def dtype(self) -> torch.dtype:
        return self.first.dtype

    @property
    def T(self) -> "_Operand":
        """The transposed matrices (no copy)."""
        return _Operand(self.first, self.shape[::-1], self.strides[::-1], offsets=self.offsets,
                        batch_stride=self.batch_stride, aligned=self.aligned)


def _product(A: _Operand, X: torch.Tensor, *, transpose: bool, precision: str, out_dtype=None, subtract=None, blocks=None) -> torch.Tensor:
    """``op(A[b]) @ X[b]`` for the whole batch (``op(A) = Aᵀ`` when ``transpose``).

    ``X [B, K, N]`` is float32 or float64 (bfloat16 too in the "fast" precision with bfloat16
    A). ``precision``: "fast" rounds X to bfloat16 (bfloat16 A) or tf32 (other A); "accurate"
    is float32-accurate (X split in two bfloat16 parts against bfloat16 A, tf32x3 otherwise);
    "float64" promotes both operands to float64. float64 operands always compute in float64.
    ``subtract=(c, Z)`` returns ``op(A) @ X − c[b]·Z[b]``. The result is float32 (float64 when
    computed in float64) unless ``out_dtype`` says otherwise. ``blocks=(BLOCK_M, BLOCK_N,
    BLOCK_K, num_warps, num_stages)`` overrides the tiling (the benchmark compares a few)."""
    rows, cols = A.shape
    stride_r, stride_c = A.strides
    M, K = (cols, rows) if transpose else (rows, cols)
    stride_am, stride_ak = (stride_c, stride_r) if transpose else (stride_r, stride_c)
    B, _, N = X.shape
    float64 = precision == "float64" or X.dtype == torch.float64 or A.dtype == torch.float64
    lo = None
    if float64:
        operand, kind = X, "ieee"
    elif A.dtype == torch.bfloat16:
        # The weight is exact in bfloat16: only X needs splitting for float32-like accuracy.
        operand, kind = X.to(torch.bfloat16), "ieee"
        if precision == "accurate":
            lo = (X - operand.to(X.dtype)).to(torch.bfloat16)
    else:
        operand, kind = X.float(), ("tf32x3" if precision == "accurate" else "tf32")
    Y = X.new_empty(B, M, N, dtype=out_dtype or (torch.float64 if float64 else torch.float32))
    scale, Z = subtract if subtract is not None else (Y, Y)
    # float64 tiles are kept at 64×64: a 128×128 float64 accumulator does not fit in registers.
    wide = 64 if float64 else 128
    block_n = wide if N > 64 else max(16, triton.next_power_of_2(N))
    block_m = wide if M > 64 else 64
    block_k = 64 if operand.element_size() == 2 else 32
    warps = 8 if block_m * block_n >= 128 * 128 else 4
    stages = 2 if float64 else 3
    if blocks is not None:
        block_m, block_n, block_k, warps, stages = blocks
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n), B)
    _product_kernel[grid](
        A.first if A.offsets is None else A.offsets, A.first, operand, operand if lo is None else lo, Y, Z, scale,
        M, N, K,
        A.batch_stride, stride_am, stride_ak,
        *operand.stride(), *Y.stride(), *Z.stride(),
        INDIRECT=A.offsets is not None, ALIGNED=A.aligned, SPLIT=lo is not None, SUBTRACT=subtract is not None,
        FLOAT64=float64, PRECISION=kind,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=warps,
        num_stages=stages,
    )
    return Y


def _cholesky_qr(Y: torch.Tensor, *, accurate: bool, shift: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass of shifted CholeskyQR of every ``Y[b]``: ``(Y R⁻¹, R⁻¹, s)`` with
    ``RᵀR = YᵀY + s·I``, ``s = shift · u · ‖Y‖²_F`` (u: the unit roundoff of Y's dtype), R⁻¹ in
    float64.

    The Gram matrix is always float32-accurate (tf32x3): a tf32 Gram matrix loses every
    direction of Y below 2⁻¹¹ of its norm. The small shift ``s`` keeps the factorization defined
    when Y is numerically rank deficient; it also leaves ``QᵀQ ≈ I − s·R⁻ᵀR⁻¹``, so a last pass
    that must be orthonormal to working precision is unshifted. Only the product with ``R⁻¹``
    follows ``accurate``."""
    Ys = _Operand.of_batch(Y)
    gram = _product(Ys, Y, transpose=True, precision="accurate").to(torch.float64)
    unit = 2.0**-52 if Y.dtype == torch.float64 else 2.0**-24
    # The floor keeps R⁻¹ finite in Y's dtype when Y is all zeros.
    size = shift * unit * gram.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(torch.finfo(Y.dtype).tiny)
    if shift:
        gram.diagonal(dim1=-2, dim2=-1).add_(size.unsqueeze(-1))
    L, _ = torch.linalg.cholesky_ex(gram)
    identity = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device).expand_as(L)
    inverse = torch.linalg.solve_triangular(L.mT, identity, upper=True)
    Q = _product(Ys, inverse.to(Y.dtype), transpose=False, precision="accurate" if accurate else "fast")
    return Q, inverse, size if shift else torch.zeros_like(size)


def _smallest_singular_value_bound(inverse: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """A lower bound of ``σ_min(Y)`` from the CholeskyQR factor ``RᵀR = YᵀY + s·I`` (R⁻¹ given).

    With ``H = R⁻¹R⁻ᵀ``, ``λ_max(H) = 1/σ_min(R)²`` and ``λ_max(H)^p ≤ tr(H^p)``; ``p = 2^j``
    comes from j squarings (normalized by the trace as they go, so nothing overflows), and
    ``σ_min(Y)² = σ_min(R)² − s``. The float32-accurate Gram matrix is itself off by about
    ``s/2`` in norm, so ``1.5·s`` is taken off to stay below. Anything not finite (a zero
    block) gives 0: no shift."""
    H = inverse @ inverse.mT
    trace = H.diagonal(dim1=-2, dim2=-1).sum(-1)
    log_trace = trace.log()
    H = H / trace[:, None, None]
    for _ in range(SHIFT_BOUND_SQUARINGS):
        H = H @ H
        trace = H.diagonal(dim1=-2, dim2=-1).sum(-1)
        log_trace = 2 * log_trace + trace.log()
        H = H / trace[:, None, None]
    smallest_squared = torch.exp(-log_trace / 2**SHIFT_BOUND_SQUARINGS) - 1.5 * shift
    return torch.nan_to_num(smallest_squared.clamp_min(0).sqrt(), nan=0.0, posinf=0.0)


def _orthonormal_basis(Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shifted CholeskyQR3 of every ``Y[b]`` (orthonormal to float32 precision) and, per matrix,
    whether the result passed the orthonormality check."""
    Q, _, _ = _cholesky_qr(Y, accurate=True, shift=8)
    Q, _, _ = _cholesky_qr(Q, accurate=True, shift=1)
    Q, _, _ = _cholesky_qr(Q, accurate=True, shift=0)
    eye = torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device)
    loss = (_product(_Operand.of_batch(Q), Q, transpose=True, precision="accurate") - eye).abs().amax(dim=(-2, -1))
    return Q, loss <= ORTHONORMALITY_TOLERANCE[Q.dtype]  # NaN fails too


def _refine_eigenvectors(G: torch.Tensor, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues and eigenvectors of the symmetric ``G [B, k, k]`` (float64) from approximate
    eigenvectors X: Ogita & Aishima's refinement (SIAM J. Sci. Comput. 2018), float64 products.

    Each step takes ``R = I − XᵀX``, ``S = XᵀGX``, ``λ_i = S_ii/(1 − R_ii)`` and corrects
    ``X ← X(I + E)`` with ``E_ij = (S_ij + λ_j R_ij)/(λ_j − λ_i)``: about squaring the error.
    Pairs too close for that first-order formula (the correction would not be small against
    their gap) get ``E_ij = R_ij/2``, which only restores orthonormality: their common subspace is
    refined, the split inside it (irrelevant to the truncated SVD) is not."""
    eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
    for _ in range(REFINEMENT_STEPS):
        R = eye - X.mT @ X
        S = X.mT @ (G @ X)
        values = S.diagonal(dim1=-2, dim2=-1) / (1 - R.diagonal(dim1=-2, dim2=-1))
        gap = values.unsqueeze(-2) - values.unsqueeze(-1)  # [i, j] = λ_j − λ_i
        coupling = S + values.unsqueeze(-2) * R
        separated = coupling.abs() < 0.1 * gap.abs()
        X = X + X @ torch.where(separated, coupling / torch.where(separated, gap, 1.0), R / 2)
    # The last step's correction leaves X orthonormal only to first order in it: one more
    # X(I + R/2) squares what is left.
    X = X + X @ ((eye - X.mT @ X) / 2)
    R = eye - X.mT @ X
    values = (X.mT @ (G @ X)).diagonal(dim1=-2, dim2=-1) / (1 - R.diagonal(dim1=-2, dim2=-1))
    return values, X


_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _host_pool() -> tuple[concurrent.futures.ThreadPoolExecutor, int]:
    """The worker threads of the host eigensolver, each running LAPACK single-threaded (nested
    threading only thrashes): one per core this process may use but one, left to the thread
    that keeps the GPU fed while they work."""
    global _pool
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = max(1, cores - 1)
    with _pool_lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(
                workers, thread_name_prefix="sorsa-eigh", initializer=torch.set_num_threads, initargs=(1,)
            )
    return _pool, workers


def _eigenvectors_into(destination: torch.Tensor, gram: torch.Tensor, ready) -> None:
    """Worker task: ``destination ← eigenvectors of gram`` (ascending order), once ``ready`` (a
    CUDA event marking the copy of ``gram`` to the host, or None) has completed."""
    if ready is not None:
        ready.synchronize()
    destination.copy_(torch.linalg.eigh(gram).eigenvectors)


class _HostEigenvectors:
    """Host buffers of :func:`start_host_eigenvectors`: ``values`` (the eigenvectors, filled by
    the workers) and ``failed`` (the flags copied along with the matrices)."""

    def __init__(self, values, failed):
        self.values, self.failed = values, failed


def start_host_eigenvectors(gram: torch.Tensor, dtype: torch.dtype, flags: torch.Tensor):
    """Copy the symmetric ``gram [B, k, k]`` to the host in ``dtype`` and solve the eigenproblems
    there on the worker threads, without waiting: returns the host buffers and the futures (the
    eigenvectors, in ascending order of eigenvalue, are in ``buffers.values`` once they are all
    done). ``flags [B]`` travel to the host with the matrices (``buffers.failed``)."""
    pinned = gram.device.type == "cuda"
    host_gram = torch.empty(gram.shape, dtype=dtype, pin_memory=pinned)
    host_gram.copy_(gram, non_blocking=pinned)
    failed = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=pinned)
    failed.copy_(flags, non_blocking=pinned)
    ready = None
    if pinned:
        ready = torch.cuda.Event()
        ready.record()
    vectors = torch.empty(gram.shape, dtype=dtype, pin_memory=pinned)
    pool, workers = _host_pool()
    futures = [
        pool.submit(_eigenvectors_into, part, piece, ready)
        for part, piece in zip(vectors.chunk(workers), host_gram.chunk(workers))
    ]
    return _HostEigenvectors(vectors, failed), futures


def working_bytes(m: int, n: int, rank: int, oversample: int, dtype: torch.dtype) -> int:
    """Upper bound of the GPU memory one matrix needs beyond its weight while its chunk runs
    :func:`rsvd_grouped_start` and the previous chunk's :meth:`_PendingRSVD.result` is pending
    (the pipelining ``sorsa_init_`` does)."""
    small, large = min(m, n), max(m, n)
    k = min(rank + oversample, small)
    element = 8 if dtype == torch.float64 else 4
    fast = 2 if dtype == torch.bfloat16 else element
    matrices = 8 * 8 * k * k  # float64 [k, k] Gram matrices, factors, inverses, refinement
    # Kept from start to result, by both chunks: the basis, the projection, its Gram matrix.
    held = element * k * (small + large) + 8 * k * k
    # Live at once at worst while a chunk starts: the sketch or the intermediate product (large
    # side, fast dtype) and three basis-sized blocks (product, CholeskyQR passes, split operands).
    running = fast * k * large + 3 * element * k * small + matrices
    # While the previous chunk finishes: the Ritz vectors and the outputs.
    finishing = 2 * element * rank * (small + large) + matrices
    return 2 * held + max(running, finishing)


class _PendingRSVD:
    """What :func:`rsvd_grouped_start` leaves running: call :meth:`result` for ``(U, S, Vt)``."""

    def __init__(self, weights, rank, niter, oversample, generator, transposed, Q, Bt, gram, host, futures):
        self._args = (weights, rank, niter, oversample, generator)
        self._transposed = transposed
        self._Q, self._Bt, self._gram = Q, Bt, gram
        self._host, self._futures = host, futures

    def result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with on_device(self._Q.device):
            return self._finish()

    def _finish(self):
        weights, rank, niter, oversample, generator = self._args
        device = self._Q.device
        with stage("small eigh (host, incl. transfers)", device):
            for future in self._futures:
                future.result()
            # The workers' torch.set_num_threads(1) also set the default of threads yet to
            # start; this thread's own count puts it back.
            torch.set_num_threads(torch.get_num_threads())
            vectors = self._host.values.to(device, non_blocking=True)
        with stage("eigenvector refinement", device):
            values, vectors = _refine_eigenvectors(self._gram, vectors.to(torch.float64).flip(-1))
            values, order = values.sort(dim=-1, descending=True)
            order = order[:, :rank]
            ritz = vectors.gather(-1, order.unsqueeze(-2).expand(-1, vectors.shape[-2], -1))
            acc = self._Q.dtype
            S = values[:, :rank].clamp_min(0).sqrt().to(acc)
        with stage("Ritz vectors", device):
            ritz = ritz.to(acc)
            left = _product(_Operand.of_batch(self._Q), ritz, transpose=False, precision="accurate")
            right = _product(_Operand.of_batch(self._Bt), ritz, transpose=False, precision="accurate")  # Bt·E = V·diag(S)
            right /= S.clamp_min(torch.finfo(acc).tiny).unsqueeze(-2)
            U, Vt = (right, left.mT.contiguous()) if self._transposed else (left, right.mT.contiguous())
        failed = self._host.failed.nonzero().flatten().tolist()
        if failed:
            with stage("rank-deficient fallback", device):
                U[failed], S[failed], Vt[failed] = reference.rsvd_grouped(
                    [weights[i] for i in failed], rank, niter, oversample, generator
                )
        return U, S, Vt


@torch.no_grad()
def rsvd_grouped_start(weights, rank, niter, oversample, generator) -> _PendingRSVD:
    weights = list(weights)
    with on_device(weights[0].device):
        return _start(weights, rank, niter, oversample, generator)


def _start(weights, rank, niter, oversample, generator) -> _PendingRSVD:
    W = _Operand.of_matrices(weights)
    m, n = W.shape
    # Iterate on the shorter side: X = W or Wᵀ, [small, large].
    transposed = m > n
    X = W.T if transposed else W
    small, large = X.shape
    device = W.first.device
    acc = torch.float64 if W.dtype == torch.float64 else torch.float32
    fast_dtype = torch.bfloat16 if W.dtype == torch.bfloat16 else acc
    k = min(rank + oversample, small)
    count = len(weights)
    with stage("sketch", device):
        # Rounding a Gaussian sketch only draws another one: it is drawn in the fast dtype.
        sketch = torch.randn(count, large, k, generator=generator, device=device, dtype=fast_dtype)
    with stage("products with the weights", device):
        Y = _product(X, sketch, transpose=False, precision="fast")
    del sketch
    shift = torch.zeros(count, dtype=acc, device=device)
    for i in range(niter):
        with stage("orthonormalization", device):
            Q, inverse, cholesky_shift = _cholesky_qr(Y, accurate=False, shift=8)
        if i:  # Y = (A − μI)Q of the previous basis: σ_min(Y) + μ ≤ λ_k
            with stage("shift estimate", device):
                shift = (_smallest_singular_value_bound(inverse, cholesky_shift).to(acc) + shift) / 2
        del Y, inverse
        with stage("products with the weights", device):
            P = _product(X, Q, transpose=True, precision="fast", out_dtype=fast_dtype)
            Y = _product(X, P, transpose=False, precision="fast", subtract=(shift, Q))
        del P, Q
    with stage("orthonormalization", device):
        Q, orthonormal = _orthonormal_basis(Y)
    del Y
    with stage("projection and its Gram matrix", device):
        Bt = _product(X, Q, transpose=True, precision="accurate")  # (Qᵀ X)ᵀ, [B, large, k]
        gram = _product(_Operand.of_batch(Bt), Bt, transpose=True, precision="float64")
    with stage("small eigh (host, incl. transfers)", device):
        host, futures = start_host_eigenvectors(gram, acc, ~orthonormal)
        if recording():  # a stage timing run measures the host work alone, not overlapped
            for future in futures:
                future.result()
    return _PendingRSVD(weights, rank, niter, oversample, generator, transposed, Q, Bt, gram, host, futures)


def rsvd_grouped(weights, rank, niter, oversample, generator):
    return rsvd_grouped_start(weights, rank, niter, oversample, generator).result()


def rsvd(W, rank, niter, oversample, generator):
    *batch, m, n = W.shape
    flat = W.reshape(-1, m, n)
    U, S, Vt = rsvd_grouped(list(flat.unbind(0)), rank, niter, oversample, generator)
    return U.reshape(*batch, m, rank), S.reshape(*batch, rank), Vt.reshape(*batch, rank, n)
