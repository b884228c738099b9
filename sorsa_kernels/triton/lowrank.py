"""Triton ``subtract_lowrank_``: one pass over W, each tile read and written once.

Implements the backend interface documented in :mod:`sorsa_kernels.reference.lowrank`. Each
program owns a ``[BLOCK_M, BLOCK_N]`` tile of one matrix: it accumulates ``(U·S)[tile rows] @
Vt[:, tile cols]`` over the rank in registers (float32 products of float32 operands use tf32x3,
float32-accurate on tensor cores; float64 runs in float64), then loads the tile of W, subtracts
and stores it rounded once to W's dtype. The grouped form reaches separate matrices through a
table of element offsets (one launch for a whole group of layers) and adds each tile's sum of
squares of the unrounded difference to its matrix's entry of the returned norms.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sorsa_kernels.triton.common import element_offsets, matrix_start, on_device

# (BLOCK_M, BLOCK_N, BLOCK_R, num_warps) by accumulation dtype: a float64 accumulator of
# 128×128 would not fit in registers.
BLOCKS = {torch.float32: (128, 128, 32, 8), torch.float64: (64, 64, 16, 4)}


@triton.jit
def _subtract_lowrank_kernel(
    w_offsets, w_ptr, u_ptr, s_ptr, vt_ptr, norms_ptr,
    M, N, R,
    stride_wb, stride_wm, stride_wn,
    stride_ub, stride_um, stride_ur,
    stride_sb, stride_sr,
    stride_vb, stride_vr, stride_vn,
    HAS_S: tl.constexpr, PRECISION: tl.constexpr, INDIRECT: tl.constexpr, ALIGNED: tl.constexpr, NORMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """``W[b] ← W[b] − U[b]·diag(S[b])·Vt[b]`` for one tile; ``W[b]`` starts at ``b·stride_wb``
    elements, or ``w_offsets[b]`` (INDIRECT, 16-element aligned with ALIGNED); with NORMS the
    tile's sum of squares of the unrounded difference is added to ``norms[b]``."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    w_start = matrix_start(b, w_offsets, stride_wb, INDIRECT, ALIGNED)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=u_ptr.dtype.element_ty)
    for r0 in range(0, R, BLOCK_R):
        mask_r = r0 + offs_r < R
        u = tl.load(
            u_ptr + b * stride_ub + offs_m[:, None] * stride_um + (r0 + offs_r)[None, :] * stride_ur,
            mask=mask_m[:, None] & mask_r[None, :], other=0.0,
        )
        if HAS_S:
            s = tl.load(s_ptr + b * stride_sb + (r0 + offs_r) * stride_sr, mask=mask_r, other=0.0)
            u = u * s[None, :]
        vt = tl.load(
            vt_ptr + b * stride_vb + (r0 + offs_r)[:, None] * stride_vr + offs_n[None, :] * stride_vn,
            mask=mask_r[:, None] & mask_n[None, :], other=0.0,
        )
        acc = tl.dot(u, vt, acc, input_precision=PRECISION, out_dtype=acc.dtype)
    w_ptrs = w_ptr + w_start + offs_m[:, None] * stride_wm + offs_n[None, :] * stride_wn
    mask = mask_m[:, None] & mask_n[None, :]
    w = tl.load(w_ptrs, mask=mask, other=0.0).to(acc.dtype)
    residual = w - acc
    if NORMS:
        tl.atomic_add(norms_ptr + b, tl.sum(tl.sum(residual * residual, axis=1), axis=0))
    tl.store(w_ptrs, residual.to(w_ptr.dtype.element_ty), mask=mask)


def subtract_lowrank_(W, U, S, Vt):
    if W.dim() > 3:
        try:
            W3 = W.view(-1, *W.shape[-2:])
        except RuntimeError:  # batch dimensions that cannot be flattened in place: one at a time
            for i in range(W.shape[0]):
                subtract_lowrank_(W[i], U[i], None if S is None else S[i], Vt[i])
            return
    else:
        W3 = W if W.dim() == 3 else W.unsqueeze(0)
    m, n = W.shape[-2:]
    r = U.shape[-1]
    _launch(W3, None, W3.stride(0), W3.stride()[1:], U.reshape(-1, m, r), None if S is None else S.reshape(-1, r), Vt.reshape(-1, r, n), None)


def subtract_lowrank_grouped_(weights, U, S, Vt):
    offsets, aligned = element_offsets(weights)
    norms = torch.zeros(len(weights), dtype=U.dtype, device=U.device)
    _launch(weights[0], offsets, 0, weights[0].stride(), U, S, Vt, norms, aligned=aligned)
    return norms


def _launch(W, offsets, batch_stride, strides, U3, S2, Vt3, norms, aligned=True):
    """One launch over the ``U3.shape[0]`` matrices: W's at ``batch_stride`` or ``offsets``."""
    batch, m, r = U3.shape
    n = Vt3.shape[-1]
    block_m, block_n, block_r, num_warps = BLOCKS[U3.dtype]
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), batch)
    with on_device(W.device):
        _subtract_lowrank_kernel[grid](
            W if offsets is None else offsets, W, U3, U3 if S2 is None else S2, Vt3, U3 if norms is None else norms,
            m, n, r,
            batch_stride, *strides, *U3.stride(), *((0, 0) if S2 is None else S2.stride()), *Vt3.stride(),
            HAS_S=S2 is not None,
            PRECISION="tf32x3" if U3.dtype == torch.float32 else "ieee",
            INDIRECT=offsets is not None, ALIGNED=aligned, NORMS=norms is not None,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r,
            num_warps=num_warps,
        )
