"""Triton backend of ``ortho_reg``: one persistent launch per dtype computes every Gram matrix,
every norm, the value and every gradient (or two, one for the Gram matrices and one for the
gradients, where the two kinds of work want different programs: see :func:`two_launch_step`).

Interface: :mod:`sorsa_kernels.reference.ortho`. Each factor is read as its tall matrix
``X [L, r]`` (``U`` as is, ``Vt`` through ``Vtᵀ``) through device-side tables of data pointers,
ranks and strides that :class:`Plan` builds once per factor set, so a launch covers any number of
adapters of any shapes; factors of different dtypes take one launch per dtype. The Gram launch
reads the tiles of aligned row- and column-major factors by TMA, through descriptors each work
item makes (Triton >= 3.4; see :func:`_gram_rows_tma`).

One launch, a queue of work items
    A grid of a few programs per SM takes work items in order from an atomic ticket counter
    until none is left. A Gram item sums ``X[rows]ᵀ X[rows]`` over one chunk of rows of one
    matrix (one block pair of it when ``r`` exceeds the Gram block, 128 by default), less
    ``(rows/L)·I``, and adds it into the zeroed ``[n, W, W]`` stack, which so sums to
    ``D = G − I`` (``W``: the widest rank rounded up to 16; relaxed
    16-byte atomics when the matrix has several items, a store otherwise); then it counts
    itself on the matrix's arrival counter. The item that arrives last completes the matrix:
    it makes the sum symmetric (see :func:`_complete_gram`), stores ``‖D‖_F``, and
    releases the matrix with one more increment. A gradient item takes one chunk of rows (and
    one block of columns): it waits until its matrix is released, computes the coefficient of
    the chosen form from the norm, and writes or adds ``coeff·X·D`` into the output. The
    program that leaves last sums the norms into the value, in a fixed order. Both kinds of
    item are separate (noinline) functions: nothing they compute is hoisted out of the queue
    loop to stay live across it. (The launch still has one register allocation per program,
    the larger of the two: a launch of one kind of item alone gets its own.)

Order of the queue (host side, :func:`_work_order`)
    A matrix's gradient items come after all of its Gram items and, for the re-read of ``X``
    to hit L2, not long after: they trail them by ``lag`` times the rows the programs hold at
    once (``lag = inf``: every Gram item first, then every gradient item).

    No wait can deadlock, whatever the lag: a gradient item waits only for Gram items of its
    own matrix, which sit earlier in the queue. Tickets are taken in increasing order and only
    by programs that are running, so when a program holds the gradient item every Gram item it
    waits for has already been taken by a running program; Gram items never wait, and a
    running program is never descheduled, so each of them finishes. (Programs not yet resident
    hold no ticket.) The Triton interpreter runs the programs one after another: the first
    takes every item in queue order and so finds each matrix released when it needs it, on
    the same code path.

Memory ordering
    Each item's atomic Gram updates (or stores) are followed by a CTA barrier and the
    arrival increment with release semantics (acquire too: the last arriver reads every other
    item's updates); the completing item's symmetric matrix and norm are published by a
    barrier and a release increment; a waiting item spins on an acquire load. Everything
    written in the launch is read back through L2 (``.cg``), never through a possibly stale L1.

Precision
    float32 factors run as float16 pairs unless torch allows TF32 matmuls
    (``torch.backends.cuda.matmul.allow_tf32``): each tile is scaled by a power of two that
    puts its largest magnitude at the top of float16's range and split into a float16 high part
    and the float16 remainder (:func:`_split_fp16`; a gradient tile takes the scale of its
    matrix's largest magnitude, which the Gram items record, see :func:`_gradient_rows`); the
    products ``hi·hi + hi·lo + lo·hi`` keep about 22 bits (relative error near 3e-7 on an H100,
    inside the 1e-5 contract) at float16's tensor-core rate, twice TF32's (3xTF32, the same split
    in TF32 parts, took 14 % longer per step at the same tiles on an H100, at 4–5e-7). For the
    Gram matrix the two cross terms are transposes of each other, so ``hiᵀhi + 2·hiᵀlo`` is
    accumulated and symmetrized once: two tensor-core products per tile instead of three. With
    TF32 allowed, one TF32 product per tile (relative error near 1e-3, like torch's TF32
    matmuls). 16-bit factors: the Gram matrix is a 16-bit product accumulated in float32; the
    gradient takes the float16 pairs of the factor (one part for most values) and of ``D``.
    float64: IEEE float64 products. In every precision each tile's product starts from zero (tensor cores
    round a chained float32 accumulation toward zero) and the diagonal of ``G − I`` comes from
    sums of ``x² − 1/L`` on CUDA cores, finished in float64, so ``D`` of near-orthonormal
    factors, where ``G − I`` cancels all but the last digits of ``G``, keeps the accuracy of its
    own size (see :func:`_gram_rows`).

Determinism
    Under ``torch.use_deterministic_algorithms(True)`` no matrix is cut into several Gram items
    (each sum is a plain store) and the queue runs every Gram item first, longest first, then
    the gradient items in the order their matrices should complete; all other results are
    written by exactly one program, and the value is summed in a fixed order.

Host side
    A :class:`Plan` holds the device tables; each group remembers, per variant, its compiled
    kernel and argument list, so that a repeated call fills in a few per-call arguments and
    launches the compiled kernel directly (no argument binding by the JIT). The output table of
    ``.grad`` tensors is rebuilt only when their data pointers change.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import typing
from collections import OrderedDict
from contextvars import ContextVar

import numpy
import torch
import triton
import triton.language as tl
from triton.runtime import OutOfResources

from sorsa_kernels.backends import _triton_interpreted
from sorsa_kernels.reference.ortho import factor_matrices, gram_dtype
from sorsa_kernels.triton.common import CompiledLaunch, on_device

try:  # Triton's allocator setting (a context variable), to hand back after our launches
    from triton.runtime._allocation import _allocator as _triton_allocator
except ImportError:  # triton < 3.4: kernels make no tensor descriptors
    _triton_allocator = None

# How a tall matrix lies in memory: along r (U), along L (Vtᵀ), or neither; SKIP: no output wanted.
ROW_MAJOR = tl.constexpr(0)
COL_MAJOR = tl.constexpr(1)
STRIDED = tl.constexpr(2)
SKIP = tl.constexpr(3)

# Columns of the matrix table (int64).
MAT_PTR = tl.constexpr(0)
MAT_STRIDE_L = tl.constexpr(1)
MAT_STRIDE_R = tl.constexpr(2)
MAT_RANK = tl.constexpr(3)
MAT_KIND = tl.constexpr(4)
MAT_INDEX = tl.constexpr(5)
MAT_LENGTH = tl.constexpr(6)
MAT_FIELDS = tl.constexpr(7)
# Columns of the output table (int64): byte offset from the launch's out_base (the whole address
# when out_base is 0), strides, and KIND (the matrix's kind if the output lies the same way,
# else STRIDED; SKIP for no output).
OUT_OFFSET = tl.constexpr(0)
OUT_STRIDE_L = tl.constexpr(1)
OUT_STRIDE_R = tl.constexpr(2)
OUT_KIND = tl.constexpr(3)
OUT_FIELDS = tl.constexpr(4)
# Columns of the work queue (int32): matrix (in the group), rows, phase, then the Gram block pair
# (Gram items) or the first column (gradient items), and the matrix's number of Gram items.
WORK_MATRIX = tl.constexpr(0)
WORK_ROW_START = tl.constexpr(1)
WORK_ROW_END = tl.constexpr(2)
WORK_PHASE = tl.constexpr(3)
WORK_BLOCK_A = tl.constexpr(4)
WORK_BLOCK_B = tl.constexpr(5)
WORK_COL_START = tl.constexpr(4)
WORK_GRAM_ITEMS = tl.constexpr(6)
WORK_FIELDS = tl.constexpr(8)
GRAM_STORE = tl.constexpr(0)
GRAM_ADD = tl.constexpr(1)
GRADIENT = tl.constexpr(2)
# Slots of a launch's queue counters (int32): the next ticket, programs finished.
TICKET = tl.constexpr(0)
FINISHED = tl.constexpr(1)
QUEUE_SLOTS = 2

# Precision plans (see the module docstring).
F64 = tl.constexpr(0)
F32_SPLIT16 = tl.constexpr(1)
F32_TF32 = tl.constexpr(2)
HALF = tl.constexpr(3)

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float64: tl.float64}

# How often a gradient item polls its matrix's arrival counter before it gives up (seconds).
MAX_POLLS = tl.constexpr(1 << 24)

# Tensor descriptors made in the kernel (triton >= 3.4), which a launch gives global scratch memory.
HAS_DEVICE_TMA = hasattr(tl, "make_tensor_descriptor")

# Gram blocks are at most this wide (a 128×128 float32 accumulator per program).
MAX_GRAM_BLOCK = 128


@triton.jit
def _fp16_scaling(largest):
    """``(scale, inverse)``: powers of two, ``scale`` putting ``largest`` in [2^14, 2^15), the top
    of float16's range, so that the parts of :func:`_split_fp16_scaled` stay normal for every
    element that matters and keep about 22 significant bits. (The shift is capped at ±62 so that
    both the scale and a product's ``inverse²`` are normal float32; only magnitudes beyond 2^76
    or below 2^-48 hit the cap.)"""
    exponent = (largest.to(tl.int32, bitcast=True) >> 23) & 0xFF
    shift = tl.minimum(tl.maximum(141 - exponent, -62), 62)
    return ((shift + 127) << 23).to(tl.float32, bitcast=True), ((127 - shift) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _split_fp16_scaled(x, scale):
    """``x·scale = hi + lo`` with ``hi``, ``lo`` float16."""
    scaled = x * scale
    hi = scaled.to(tl.float16)
    lo = (scaled - hi.to(tl.float32)).to(tl.float16)
    return hi, lo


@triton.jit
def _split_fp16(x):
    """``x = (hi + lo)·inverse``, scaled by the tile's largest magnitude (see :func:`_fp16_scaling`)."""
    # One reduction over the flattened tile: each thread's elements first, then one value per
    # thread across lanes and warps (axis by axis, every thread's row of partial maxima went
    # through the shuffles).
    scale, inverse = _fp16_scaling(tl.max(tl.abs(x)))
    hi, lo = _split_fp16_scaled(x, scale)
    return hi, lo, inverse


@triton.jit
def _tile_pointers(ptr, rows, cols, stride_l, stride_r, VECTOR: tl.constexpr):
    pointers = ptr + rows[:, None] * stride_l + cols[None, :] * stride_r
    if VECTOR:
        # The base came through an integer table, which hides its alignment from the compiler;
        # the host checked that every access group along the contiguous dimension starts on
        # 16 bytes (pointer, strides, lengths, ranks and chunk starts).
        pointers = tl.multiple_of(pointers, [16, 16])
    return pointers


@triton.jit
def _load_tile(ptr, rows, cols, stride_l, stride_r, row_end, rank, VECTOR: tl.constexpr):
    mask = (rows[:, None] < row_end) & (cols[None, :] < rank)
    return tl.load(_tile_pointers(ptr, rows, cols, stride_l, stride_r, VECTOR), mask=mask, other=0.0)


@triton.jit
def _gram_product(zero, xa, xb, PRECISION: tl.constexpr, SAME: tl.constexpr):
    """``(xaᵀ xb, inverse)``: the product, its tensor-core products chained from ``zero`` (with
    ``SAME``, xa is xb, the split products are right only once symmetrized), and for float32
    pairs the larger of the two tiles' split inverses (see :func:`_split_fp16`)."""
    inverse = 0.0
    if PRECISION == F32_SPLIT16:
        a_hi, a_lo, inverse = _split_fp16(xa)
        if SAME:
            product = tl.dot(tl.trans(a_hi), a_lo * 2.0, zero)
            product = tl.dot(tl.trans(a_hi), a_hi, product) * (inverse * inverse)
        else:
            b_hi, b_lo, b_inverse = _split_fp16(xb)
            product = tl.dot(tl.trans(a_lo), b_hi, zero)
            product = tl.dot(tl.trans(a_hi), b_lo, product)
            product = tl.dot(tl.trans(a_hi), b_hi, product) * (inverse * b_inverse)
            inverse = tl.maximum(inverse, b_inverse)
    elif PRECISION == F32_TF32:
        product = tl.dot(tl.trans(xa), xb, zero, input_precision="tf32")
    elif PRECISION == F64:
        product = tl.dot(tl.trans(xa), xb, zero, input_precision="ieee", out_dtype=tl.float64)
    else:
        product = tl.dot(tl.trans(xa), xb, zero)
    return product, inverse


@triton.jit
def _gram_rows(acc, squares, peaks, ptr, stride_l, stride_r, row_start, row_end, rank, cols_a, cols_b,
               inverse_length, BLOCK_L: tl.constexpr, PRECISION: tl.constexpr, SAME: tl.constexpr,
               VECTOR: tl.constexpr):
    """``acc += X[rows, cols_a]ᵀ X[rows, cols_b]`` and, with ``SAME``, ``squares += X[rows, cols_a]² −
    inverse_length`` elementwise (a tile of partial sums, reduced once by the caller), one tile of
    rows at a time; ``peaks`` keeps what :func:`_gram_sum` needs for the rows' largest magnitude
    (see :func:`_track_peaks`).

    Tensor cores round their float32 accumulation toward zero: chained over a long sum, that bias
    grows with every k step, and ``G − I`` of near-orthonormal factors cancels all but the last
    digits of G's diagonal (chained over 11008 rows, gradients came out up to 2.4e-3 off float64
    on an H100; error proportional to the rows summed per accumulator). So each tile's
    product starts from zero and is added in round-to-nearest, and the diagonal is recomputed on
    CUDA cores (see :func:`_gram_sum`): each element of ``squares`` adds one ``x² − 1/L`` per
    tile in round-to-nearest, and for a unit column those sums stay near zero (no cancellation
    when the item's share of I is settled). (Float64 squares reduced across the tile in every
    step took a quarter of the Gram launch's time on an H100.)"""
    fresh = _fresh_zero(acc, row_end)
    for start in range(row_start, row_end, BLOCK_L):
        rows = start + tl.arange(0, BLOCK_L)
        xa = _load_tile(ptr, rows, cols_a, stride_l, stride_r, row_end, rank, VECTOR)
        if SAME:
            xb = xa
        else:
            xb = _load_tile(ptr, rows, cols_b, stride_l, stride_r, row_end, rank, VECTOR)
        acc, squares, peaks = _gram_tile(acc, squares, peaks, fresh, xa, xb, inverse_length, PRECISION, SAME)
    return acc, squares, peaks


@triton.jit
def _gram_rows_tma(acc, squares, peaks, ptr, stride, row_start, row_end, rank, col_a, col_b, inverse_length,
                   BLOCK_L: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr, SAME: tl.constexpr,
                   TRANSPOSED: tl.constexpr):
    """:func:`_gram_rows` over a row-major ``X`` (``stride`` between rows) or, ``TRANSPOSED``, a
    row-major ``Xᵀ`` (``Vt``), its tiles read by TMA: their address arithmetic, masks and
    registers leave the loop (H100, Llama-2-7B set: the Gram launch 0.63–0.64 ms against
    0.68–0.69 ms through pointers)."""
    desc = _tall_descriptor(ptr, row_end, rank, stride, BLOCK_L, BLOCK, TRANSPOSED)
    fresh = _fresh_zero(acc, row_end)
    for start in range(row_start, row_end, BLOCK_L):
        xa = _tma_tile(desc, start, col_a, TRANSPOSED)
        if SAME:
            xb = xa
        else:
            xb = _tma_tile(desc, start, col_b, TRANSPOSED)
        acc, squares, peaks = _gram_tile(acc, squares, peaks, fresh, xa, xb, inverse_length, PRECISION, SAME)
    return acc, squares, peaks


@triton.jit
def _fresh_zero(acc, row_end):
    """A zero the compiler cannot prove zero: it would fold ``acc + dot(a, b, 0)`` into
    ``dot(a, b, acc)``, chaining the accumulation again."""
    return tl.full(acc.shape, row_end.to(tl.float32) * 0.0, acc.dtype)


@triton.jit
def _gram_tile(acc, squares, peaks, fresh, xa, xb, inverse_length, PRECISION: tl.constexpr, SAME: tl.constexpr):
    """One tile of rows into the sums of :func:`_gram_rows` (``xb`` is ``xa`` when ``SAME``)."""
    product, inverse = _gram_product(fresh, xa, xb, PRECISION, SAME)
    if SAME:
        xs = xa.to(squares.dtype)
        squares += xs * xs - inverse_length
    return acc + product, squares, _track_peaks(peaks, inverse, xa, PRECISION)


@triton.jit
def _tall_descriptor(ptr, rows, rank, stride, BLOCK_L: tl.constexpr, BLOCK: tl.constexpr, TRANSPOSED: tl.constexpr):
    """A TMA descriptor of the first ``rows`` rows of a tall matrix ``[L, rank]`` stored row-major
    (of ``Xᵀ`` when TRANSPOSED), in tiles of BLOCK_L rows and BLOCK columns: past ``rows`` and
    ``rank`` its loads read zeros, as the masked loads of the pointer loops do."""
    if TRANSPOSED:
        desc = tl.make_tensor_descriptor(ptr, shape=[rank, rows], strides=[stride, 1], block_shape=[BLOCK, BLOCK_L])
    else:
        desc = tl.make_tensor_descriptor(ptr, shape=[rows, rank], strides=[stride, 1], block_shape=[BLOCK_L, BLOCK])
    return desc


@triton.jit
def _tma_tile(desc, row, col, TRANSPOSED: tl.constexpr):
    """The ``[BLOCK_L, BLOCK]`` tile at ``(row, col)`` of a tall matrix, through its descriptor."""
    if TRANSPOSED:
        tile = tl.trans(desc.load([col, row]))
    else:
        tile = desc.load([row, col])
    return tile


@triton.jit
def _track_peaks(peaks, inverse, xa, PRECISION: tl.constexpr):
    """Float32 pairs: the largest split inverse so far (the tiles' own, free); 16-bit factors,
    which the Gram product takes as they are: the elementwise largest magnitudes, reduced once
    per item (a reduction across the block per tile costs more than a tile's products, see
    :func:`_product`)."""
    if PRECISION == F32_SPLIT16:
        peaks = tl.maximum(peaks, inverse)
    elif PRECISION == HALF:
        peaks = tl.maximum(peaks, tl.abs(xa.to(tl.float32)))
    return peaks


@triton.jit
def _gram_sum(entry, ptr, kind, row_start, row_end, rank, col_a, col_b, ACC_DTYPE: tl.constexpr,
              PRECISION: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK: tl.constexpr, SAME: tl.constexpr,
              ALIGNED: tl.constexpr, VEC: tl.constexpr, TMA: tl.constexpr):
    """``(share, inverse)``: the item's share of ``D = G − I``, ``X[rows, cols_a]ᵀ X[rows, cols_b]``
    over its rows (see :func:`_gram_product`), less ``(rows / L)·I`` on a diagonal block, so that
    the shares of a matrix sum to ``G − I`` and every partial sum stays as small as ``D`` (no
    cancellation); and where the gradient splits ``X`` into float16 pairs, the split inverse of
    the largest magnitude read (see :func:`_fp16_scaling`): the gradient items scale every tile
    of the matrix by the largest over its Gram items, with no reduction of their own. ``col_a``,
    ``col_b``: the first columns of the two blocks; TMA: aligned row- and column-major factors
    are read by TMA."""
    cols_a = col_a + tl.arange(0, BLOCK)
    cols_b = col_b + tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK, BLOCK), ACC_DTYPE)
    squares = tl.zeros((BLOCK_L, BLOCK), ACC_DTYPE)
    if PRECISION == HALF:
        peaks = tl.zeros((BLOCK_L, BLOCK), tl.float32)
    else:
        peaks = 0.0
    length = tl.load(entry + MAT_LENGTH)
    # 1/L cut to 12 significant bits: x² less that is exact for the dyadic entries of exactly
    # orthonormal factors (signed permutations, Hadamard blocks), whose D so comes out exactly 0.
    inverse_length = (1.0 / length.to(tl.float32)).to(tl.int32, bitcast=True) & -2048
    inverse_length = inverse_length.to(tl.float32, bitcast=True).to(ACC_DTYPE)
    # One loop per layout, so that the compiler knows the contiguous dimension (stride 1) and,
    # when aligned, the other stride's divisibility (loaded in its branch, so the hint stays true).
    if TMA and ALIGNED and kind == ROW_MAJOR:
        acc, squares, peaks = _gram_rows_tma(acc, squares, peaks, ptr, tl.load(entry + MAT_STRIDE_L), row_start,
                                             row_end, rank, col_a, col_b, inverse_length, BLOCK_L, BLOCK, PRECISION,
                                             SAME, False)
    elif TMA and ALIGNED and kind == COL_MAJOR:
        acc, squares, peaks = _gram_rows_tma(acc, squares, peaks, ptr, tl.load(entry + MAT_STRIDE_R), row_start,
                                             row_end, rank, col_a, col_b, inverse_length, BLOCK_L, BLOCK, PRECISION,
                                             SAME, True)
    elif kind == ROW_MAJOR:
        stride_l = tl.load(entry + MAT_STRIDE_L)
        if ALIGNED:
            stride_l = tl.multiple_of(stride_l, VEC)
        acc, squares, peaks = _gram_rows(acc, squares, peaks, ptr, stride_l, 1, row_start, row_end, rank, cols_a,
                                         cols_b, inverse_length, BLOCK_L, PRECISION, SAME, ALIGNED)
    elif kind == COL_MAJOR:
        stride_r = tl.load(entry + MAT_STRIDE_R)
        if ALIGNED:
            stride_r = tl.multiple_of(stride_r, VEC)
        acc, squares, peaks = _gram_rows(acc, squares, peaks, ptr, 1, stride_r, row_start, row_end, rank, cols_a,
                                         cols_b, inverse_length, BLOCK_L, PRECISION, SAME, ALIGNED)
    else:
        acc, squares, peaks = _gram_rows(acc, squares, peaks, ptr, tl.load(entry + MAT_STRIDE_L),
                                         tl.load(entry + MAT_STRIDE_R), row_start, row_end, rank, cols_a, cols_b,
                                         inverse_length, BLOCK_L, PRECISION, SAME, False)
    if SAME:
        # Every slot of every tile took ``inverse_length`` off, the masked rows' zeros too: that
        # is given back and the item's share of I, ``rows / L``, taken off in float64.
        rows = row_end - row_start
        taken = tl.cdiv(rows, BLOCK_L).to(tl.float64) * BLOCK_L * inverse_length.to(tl.float64)
        diagonal = tl.sum(squares.to(tl.float64), axis=0) + taken - rows.to(tl.float64) / length.to(tl.float64)
        diagonal = diagonal.to(ACC_DTYPE)
        acc = tl.where(cols_a[:, None] == cols_b[None, :], diagonal[None, :], acc)
    if PRECISION == HALF:
        peaks = _fp16_scaling(tl.max(peaks))[1]
    return acc, peaks


@triton.jit
def _complete_gram(gram, gram_width, rank, ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
                   NUM_K: tl.constexpr, ROWS: tl.constexpr):
    """Make the summed ``D = G − I`` symmetric and return ``‖D‖_F``.

    The items left the mean of ``G[i, j]`` and ``G[j, i]`` within a diagonal block pair (the
    split sum is exact only once symmetrized) and the sum elsewhere (the transpose of an
    off-diagonal block was left zero). Each pair ``{(i, j), (j, i)}`` is read and written by the
    slot ``i <= j`` alone, so no slot reads what another one wrote; ``ROWS`` rows at a time.
    """
    squares = tl.zeros((ROWS, BLOCK_K), ACC_DTYPE)
    for row_start in range(0, NUM_K * BLOCK_K, ROWS):
        rows = row_start + tl.arange(0, ROWS)
        for jb in tl.static_range(NUM_K):
            cols = jb * BLOCK_K + tl.arange(0, BLOCK_K)
            upper = (rows[:, None] <= cols[None, :]) & (cols[None, :] < rank)
            direct = gram + rows[:, None] * gram_width + cols[None, :]
            mirrored = gram + cols[None, :] * gram_width + rows[:, None]
            g = tl.load(direct, mask=upper, other=0.0, cache_modifier=".cg").to(ACC_DTYPE)
            g += tl.load(mirrored, mask=upper & (rows[:, None] < cols[None, :]), other=0.0,
                         cache_modifier=".cg").to(ACC_DTYPE)
            g = g * tl.where(rows[:, None] // BLOCK == cols[None, :] // BLOCK, 0.5, 1.0).to(ACC_DTYPE)
            diagonal = rows[:, None] == cols[None, :]
            g = tl.where(diagonal, g * 2.0, g)  # its two halves were the same element
            tl.store(direct, g.to(gram.dtype.element_ty), mask=upper)
            tl.store(mirrored, g.to(gram.dtype.element_ty), mask=upper & ~diagonal)
            squares += tl.where(upper, tl.where(diagonal, 1.0, 2.0).to(ACC_DTYPE) * g * g, 0.0)
    return tl.sqrt(tl.sum(squares))


@triton.jit(noinline=True)
def _gram_item(item, mats, deviations, norms, inverses, arrivals, gram_stride, gram_width,
               DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_L: tl.constexpr,
               BLOCK: tl.constexpr, NUM_BLOCKS: tl.constexpr, BLOCK_K: tl.constexpr, NUM_K: tl.constexpr,
               COMPLETE_ROWS: tl.constexpr, ALIGNED: tl.constexpr, VEC: tl.constexpr, TMA: tl.constexpr):
    # The stack's width is a multiple of 16 (Plan): 16-byte atomics.
    gram_width = tl.multiple_of(gram_width, 16)
    gram_stride = tl.multiple_of(gram_stride, 256)
    entry = mats + tl.load(item + WORK_MATRIX) * MAT_FIELDS
    row_start = tl.multiple_of(tl.load(item + WORK_ROW_START), BLOCK_L)
    row_end = tl.load(item + WORK_ROW_END)
    address = tl.load(entry + MAT_PTR)
    rank = tl.load(entry + MAT_RANK).to(tl.int32)
    kind = tl.load(entry + MAT_KIND)
    index = tl.load(entry + MAT_INDEX)
    if ALIGNED:  # _Group checked these for every matrix of the launch
        address = tl.multiple_of(address, 16)
        rank = tl.multiple_of(rank, VEC)
        row_end = tl.multiple_of(row_end, VEC)
    ptr = address.to(tl.pointer_type(DTYPE))
    if NUM_BLOCKS == 1:
        block_a = 0
        block_b = 0
    else:
        block_a = tl.load(item + WORK_BLOCK_A)
        block_b = tl.load(item + WORK_BLOCK_B)
    cols_a = block_a * BLOCK + tl.arange(0, BLOCK)
    cols_b = block_b * BLOCK + tl.arange(0, BLOCK)
    # A diagonal block pair sums xᵀx (two split products), any other pair xaᵀxb (three). With one
    # block the pair is diagonal at compile time.
    if block_a == block_b:
        acc, inverse = _gram_sum(entry, ptr, kind, row_start, row_end, rank, block_a * BLOCK, block_b * BLOCK,
                                 ACC_DTYPE, PRECISION, BLOCK_L, BLOCK, True, ALIGNED, VEC, TMA)
    else:
        acc, inverse = _gram_sum(entry, ptr, kind, row_start, row_end, rank, block_a * BLOCK, block_b * BLOCK,
                                 ACC_DTYPE, PRECISION, BLOCK_L, BLOCK, False, ALIGNED, VEC, TMA)
    # The block pair as summed (block_a <= block_b): the completing item symmetrizes.
    gram = deviations + index * gram_stride
    mask = (cols_a[:, None] < rank) & (cols_b[None, :] < rank)
    # Rows of the (allocator-aligned) stack start on 16 bytes: vector atomics.
    target = tl.multiple_of(gram + cols_a[:, None] * gram_width + cols_b[None, :], [16, 16])
    value = acc.to(deviations.dtype.element_ty)
    if tl.load(item + WORK_PHASE) == GRAM_ADD:
        tl.atomic_add(target, value, mask=mask, sem="relaxed")
    else:
        tl.store(target, value, mask=mask)
    if PRECISION == F32_SPLIT16 or PRECISION == HALF:
        # Positive float32 bits order as their integers.
        tl.atomic_max(inverses + index, inverse.to(tl.int32, bitcast=True), sem="relaxed")
    # Every thread's updates precede the release of the arrival below (CTA barrier first).
    tl.debug_barrier()
    arrived = tl.atomic_add(arrivals + index, 1, sem="acq_rel")
    if arrived == tl.load(item + WORK_GRAM_ITEMS) - 1:
        norm = _complete_gram(gram, gram_width, rank, ACC_DTYPE, BLOCK, BLOCK_K, NUM_K, COMPLETE_ROWS)
        tl.store(norms + index, norm.to(norms.dtype.element_ty))
        tl.debug_barrier()
        tl.atomic_add(arrivals + index, 1, sem="release")


@triton.jit
def _split_deviation(d, PRECISION: tl.constexpr):
    """``d`` as the operand parts :func:`_product` takes: ``(hi, lo, inverse)``."""
    if PRECISION == F32_SPLIT16 or PRECISION == HALF:
        hi, lo, inverse = _split_fp16(d)
    else:
        hi = d
        lo = d
        inverse = 1.0
    return hi, lo, inverse


@triton.jit
def _product(zero, x, x_scale, x_inverse, d_hi, d_lo, d_inverse, PRECISION: tl.constexpr):
    """``x·d``, its tensor-core products chained from ``zero``, where ``(d_hi, d_lo, d_inverse)``
    came from :func:`_split_deviation` and, for float16 pairs, ``x_scale`` and ``x_inverse`` from
    the largest magnitude of x's matrix (see :func:`_gram_sum`; the tile's own, one reduction
    across the block per tile, took a sixth of the gradient launch's time on an H100)."""
    if PRECISION == F32_SPLIT16 or PRECISION == HALF:
        x_hi, x_lo = _split_fp16_scaled(x.to(tl.float32), x_scale)
        product = tl.dot(x_lo, d_hi, zero)
        product = tl.dot(x_hi, d_lo, product)
        product = tl.dot(x_hi, d_hi, product) * (x_inverse * d_inverse)
    elif PRECISION == F32_TF32:
        product = tl.dot(x, d_hi, zero, input_precision="tf32")
    else:
        product = tl.dot(x, d_hi, zero, input_precision="ieee", out_dtype=tl.float64)
    return product


@triton.jit
def _deviation_block(gram, gram_width, rows, cols, rank, ACC_DTYPE: tl.constexpr):
    """``D[rows, cols]`` (the stack holds ``D = G − I``), zero outside ``rank``."""
    inside = (rows[:, None] < rank) & (cols[None, :] < rank)
    return tl.load(gram + rows[:, None] * gram_width + cols[None, :], mask=inside, other=0.0,
                   cache_modifier=".cg").to(ACC_DTYPE)


@triton.jit
def _gradient_rows(ptr, stride_l, stride_r, out, out_stride_l, out_stride_r, row_start, row_end, rank, cols,
                   gram, gram_width, x_inverse, d_hi, d_lo, d_inverse, coeff, ACC_DTYPE: tl.constexpr,
                   PRECISION: tl.constexpr, ACCUMULATE: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, NUM_K: tl.constexpr, VECTOR: tl.constexpr, OUTPUT_STAGES: tl.constexpr):
    """The item's rows of the gradient, ``x_inverse`` the split inverse of its matrix (see
    :func:`_gram_sum`). Float16 pairs scaled by a constant are split in the layout the tensor
    cores read them in; under a scale known only at run time the compiler splits each tile in
    the layout it was loaded in and sends both parts through shared memory (0.14 ms more per
    Llama-2-7B step on an H100). So a matrix whose largest magnitude lies in [2^-8, 2^5)
    (``x_inverse`` in [2^-22, 2^-10]; near-orthonormal factors have entries near ``1/√L``, none
    above 1) takes the constant scale 2^10: every element stays below 2^15, and every element
    down to 2^-13 keeps both parts normal (about 22 bits), the smaller ones an absolute error
    below 2^-34."""
    if PRECISION == F32_SPLIT16 or PRECISION == HALF:
        if (x_inverse >= 1.0 / (1 << 22)) & (x_inverse <= 1.0 / (1 << 10)):
            _gradient_loop(ptr, stride_l, stride_r, out, out_stride_l, out_stride_r, row_start, row_end, rank, cols,
                           gram, gram_width, 1024.0, 1.0 / 1024.0, d_hi, d_lo, d_inverse, coeff, ACC_DTYPE,
                           PRECISION, ACCUMULATE, BLOCK_L, BLOCK_N, BLOCK_K, NUM_K, VECTOR, OUTPUT_STAGES)
        else:
            # The scale is exact (the inverse of a power of two). This loop is not pipelined: its
            # tile buffers beside the other loop's would leave room for one program per SM.
            _gradient_loop(ptr, stride_l, stride_r, out, out_stride_l, out_stride_r, row_start, row_end, rank, cols,
                           gram, gram_width, 1.0 / x_inverse, x_inverse, d_hi, d_lo, d_inverse, coeff, ACC_DTYPE,
                           PRECISION, ACCUMULATE, BLOCK_L, BLOCK_N, BLOCK_K, NUM_K, VECTOR, 1)
    else:  # the factor enters its products as it is
        _gradient_loop(ptr, stride_l, stride_r, out, out_stride_l, out_stride_r, row_start, row_end, rank, cols,
                       gram, gram_width, 1.0, 1.0, d_hi, d_lo, d_inverse, coeff, ACC_DTYPE, PRECISION, ACCUMULATE,
                       BLOCK_L, BLOCK_N, BLOCK_K, NUM_K, VECTOR, OUTPUT_STAGES)


@triton.jit
def _gradient_loop(ptr, stride_l, stride_r, out, out_stride_l, out_stride_r, row_start, row_end, rank, cols,
                   gram, gram_width, x_scale, x_inverse, d_hi, d_lo, d_inverse, coeff, ACC_DTYPE: tl.constexpr,
                   PRECISION: tl.constexpr, ACCUMULATE: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, NUM_K: tl.constexpr, VECTOR: tl.constexpr, OUTPUT_STAGES: tl.constexpr):
    # With OUTPUT_STAGES the loop's stage count is explicit, which makes the pipeliner prefetch
    # every load in it, the .grad tiles that ACCUMULATE reads too (otherwise they are plain loads
    # waited for in each iteration: at r = 16 that latency bounds the loop).
    for start in tl.range(row_start, row_end, BLOCK_L, num_stages=OUTPUT_STAGES):
        rows = start + tl.arange(0, BLOCK_L)
        targets = _tile_pointers(out, rows, cols, out_stride_l, out_stride_r, VECTOR)
        mask = (rows[:, None] < row_end) & (cols[None, :] < rank)
        if ACCUMULATE:  # issued before the products, so that its latency hides behind them
            previous = tl.load(targets, mask=mask).to(ACC_DTYPE)
        zero = tl.zeros((BLOCK_L, BLOCK_N), ACC_DTYPE)
        if NUM_K == 1:
            x = _load_tile(ptr, rows, tl.arange(0, BLOCK_K), stride_l, stride_r, row_end, rank, VECTOR)
            acc = _product(zero, x, x_scale, x_inverse, d_hi, d_lo, d_inverse, PRECISION)
        else:  # ranks above 128: the deviation blocks come again from L2 for every tile
            acc = zero
            for kb in tl.static_range(NUM_K):
                ks = kb * BLOCK_K + tl.arange(0, BLOCK_K)
                x = _load_tile(ptr, rows, ks, stride_l, stride_r, row_end, rank, VECTOR)
                blk_hi, blk_lo, blk_inverse = _split_deviation(
                    _deviation_block(gram, gram_width, ks, cols, rank, ACC_DTYPE), PRECISION)
                acc += _product(zero, x, x_scale, x_inverse, blk_hi, blk_lo, blk_inverse, PRECISION)
        update = coeff * acc
        if ACCUMULATE:
            update += previous
        tl.store(targets, update.to(out.dtype.element_ty), mask=mask)


@triton.jit(noinline=True)
def _gradient_item(item, mats, outs, out_base, deviations, norms, inverses, arrivals, factor, gram_stride, gram_width,
                   count, official, DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                   WAIT: tl.constexpr, ACCUMULATE: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, NUM_K: tl.constexpr, ALIGNED: tl.constexpr, VEC: tl.constexpr,
                   OUTPUT_STAGES: tl.constexpr):
    gram_width = tl.multiple_of(gram_width, 16)
    gram_stride = tl.multiple_of(gram_stride, 256)
    local = tl.load(item + WORK_MATRIX)
    row_start = tl.multiple_of(tl.load(item + WORK_ROW_START), BLOCK_L)
    row_end = tl.load(item + WORK_ROW_END)
    col_start = tl.multiple_of(tl.load(item + WORK_COL_START), BLOCK_N)
    entry = mats + local * MAT_FIELDS
    rank = tl.load(entry + MAT_RANK).to(tl.int32)
    index = tl.load(entry + MAT_INDEX)
    if WAIT:  # until the completing Gram item has released the matrix (one past its item count)
        released = tl.load(item + WORK_GRAM_ITEMS) + 1
        # A safety valve, never reached by a correct queue (the awaited items take microseconds):
        # after seconds of polling the item goes on, so that a broken order shows up as wrong
        # results rather than as a GPU hung for good.
        polls = 0
        while (tl.atomic_add(arrivals + index, 0, sem="acquire") < released) & (polls < MAX_POLLS):
            polls += 1
    gram = deviations + index * gram_stride
    norm = tl.load(norms + index, cache_modifier=".cg").to(ACC_DTYPE)
    if official != 0:
        coeff = tl.where(norm > 0, 2.0 * factor / (count * tl.where(norm > 0, norm, 1.0)), 0.0)
    else:
        coeff = 4.0 * factor

    out_entry = outs + local * OUT_FIELDS
    kind = tl.load(out_entry + OUT_KIND)
    if kind != SKIP:
        address = tl.load(entry + MAT_PTR)
        out_address = out_base + tl.load(out_entry + OUT_OFFSET)
        if ALIGNED:  # _OutputTable checked these for every matrix of the launch
            address = tl.multiple_of(address, 16)
            out_address = tl.multiple_of(out_address, 16)
            rank = tl.multiple_of(rank, VEC)
            row_end = tl.multiple_of(row_end, VEC)
        ptr = address.to(tl.pointer_type(DTYPE))
        out = out_address.to(tl.pointer_type(DTYPE))
        cols = col_start + tl.arange(0, BLOCK_N)
        x_inverse = tl.load(inverses + index, cache_modifier=".cg").to(tl.float32, bitcast=True)
        if NUM_K == 1:
            deviation = _deviation_block(gram, gram_width, tl.arange(0, BLOCK_K), cols, rank, ACC_DTYPE)
            d_hi, d_lo, d_inverse = _split_deviation(deviation, PRECISION)
        else:
            d_hi = 0.0
            d_lo = 0.0
            d_inverse = 1.0
        if kind == ROW_MAJOR:
            stride_l = tl.load(entry + MAT_STRIDE_L)
            out_stride_l = tl.load(out_entry + OUT_STRIDE_L)
            if ALIGNED:
                stride_l = tl.multiple_of(stride_l, VEC)
                out_stride_l = tl.multiple_of(out_stride_l, VEC)
            _gradient_rows(ptr, stride_l, 1, out, out_stride_l, 1, row_start, row_end, rank, cols, gram, gram_width,
                           x_inverse, d_hi, d_lo, d_inverse, coeff, ACC_DTYPE, PRECISION, ACCUMULATE, BLOCK_L,
                           BLOCK_N, BLOCK_K, NUM_K, ALIGNED, OUTPUT_STAGES)
        elif kind == COL_MAJOR:
            stride_r = tl.load(entry + MAT_STRIDE_R)
            out_stride_r = tl.load(out_entry + OUT_STRIDE_R)
            if ALIGNED:
                stride_r = tl.multiple_of(stride_r, VEC)
                out_stride_r = tl.multiple_of(out_stride_r, VEC)
            _gradient_rows(ptr, 1, stride_r, out, 1, out_stride_r, row_start, row_end, rank, cols, gram, gram_width,
                           x_inverse, d_hi, d_lo, d_inverse, coeff, ACC_DTYPE, PRECISION, ACCUMULATE, BLOCK_L,
                           BLOCK_N, BLOCK_K, NUM_K, ALIGNED, OUTPUT_STAGES)
        else:
            _gradient_rows(ptr, tl.load(entry + MAT_STRIDE_L), tl.load(entry + MAT_STRIDE_R), out,
                           tl.load(out_entry + OUT_STRIDE_L), tl.load(out_entry + OUT_STRIDE_R), row_start, row_end,
                           rank, cols, gram, gram_width, x_inverse, d_hi, d_lo, d_inverse, coeff, ACC_DTYPE,
                           PRECISION, ACCUMULATE, BLOCK_L, BLOCK_N, BLOCK_K, NUM_K, False, OUTPUT_STAGES)


# Integers that vary between calls or factor sets are not specialized on (fewer compilations).
@triton.jit(do_not_specialize=["out_base", "num_items", "coeff_hi", "coeff_lo", "gram_stride", "gram_width", "count",
                               "official", "value_count"])
def _ortho_kernel(mats, outs, out_base, work, num_items, queue, arrivals, deviations, norms, inverses, value, scale,
                  coeff_hi, coeff_lo, gram_stride, gram_width, count, official, value_count,
                  DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr, GRAM: tl.constexpr,
                  GRADIENT_PHASE: tl.constexpr, VALUE: tl.constexpr, SCALED: tl.constexpr,
                  ACCUMULATE: tl.constexpr, GRAM_ROWS: tl.constexpr, GRADIENT_ROWS: tl.constexpr,
                  BLOCK: tl.constexpr, NUM_BLOCKS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  NUM_K: tl.constexpr, COMPLETE_ROWS: tl.constexpr, ALIGNED: tl.constexpr,
                  OUT_ALIGNED: tl.constexpr, VEC: tl.constexpr, VALUE_BLOCK: tl.constexpr,
                  OUTPUT_STAGES: tl.constexpr, GRAM_TMA: tl.constexpr):
    """The work queue of one dtype group; GRAM and GRADIENT_PHASE say which kinds of items it
    holds (both: gradient items wait for their matrix), VALUE that the last program to finish
    sums the norms of all ``value_count`` matrices into ``value``; GRAM_TMA that Gram items read
    aligned factors by TMA."""
    # The coefficient comes as a float32 pair (float arguments are float32): exact to 2^-48.
    factor = tl.cast(coeff_hi, ACC_DTYPE) + tl.cast(coeff_lo, ACC_DTYPE)
    if SCALED:
        factor = factor * tl.load(scale).to(ACC_DTYPE)
    ticket = tl.atomic_add(queue + TICKET, 1, sem="relaxed")
    while ticket < num_items:
        item = work + ticket * WORK_FIELDS
        if GRAM and GRADIENT_PHASE:
            if tl.load(item + WORK_PHASE) == GRADIENT:
                _gradient_item(item, mats, outs, out_base, deviations, norms, inverses, arrivals, factor, gram_stride,
                               gram_width, count, official, DTYPE, ACC_DTYPE, PRECISION, True, ACCUMULATE,
                               GRADIENT_ROWS, BLOCK_N, BLOCK_K, NUM_K, OUT_ALIGNED, VEC, OUTPUT_STAGES)
            else:
                _gram_item(item, mats, deviations, norms, inverses, arrivals, gram_stride, gram_width, DTYPE, ACC_DTYPE,
                           PRECISION, GRAM_ROWS, BLOCK, NUM_BLOCKS, BLOCK_K, NUM_K, COMPLETE_ROWS, ALIGNED, VEC,
                           GRAM_TMA)
        elif GRAM:
            _gram_item(item, mats, deviations, norms, inverses, arrivals, gram_stride, gram_width, DTYPE, ACC_DTYPE,
                       PRECISION, GRAM_ROWS, BLOCK, NUM_BLOCKS, BLOCK_K, NUM_K, COMPLETE_ROWS, ALIGNED, VEC,
                       GRAM_TMA)
        else:
            _gradient_item(item, mats, outs, out_base, deviations, norms, inverses, arrivals, factor, gram_stride,
                           gram_width, count, official, DTYPE, ACC_DTYPE, PRECISION, False, ACCUMULATE, GRADIENT_ROWS,
                           BLOCK_N, BLOCK_K, NUM_K, OUT_ALIGNED, VEC, OUTPUT_STAGES)
        ticket = tl.atomic_add(queue + TICKET, 1, sem="relaxed")
    if VALUE:
        tl.debug_barrier()
        if tl.atomic_add(queue + FINISHED, 1, sem="acq_rel") == tl.num_programs(0) - 1:
            total = tl.zeros((VALUE_BLOCK,), ACC_DTYPE)
            for start in range(0, value_count, VALUE_BLOCK):
                offsets = start + tl.arange(0, VALUE_BLOCK)
                norm = tl.load(norms + offsets, mask=offsets < value_count, other=0.0,
                               cache_modifier=".cg").to(ACC_DTYPE)
                total += tl.where(official != 0, norm, norm * norm)
            result = tl.sum(total)
            if official != 0:
                result = result / value_count
            tl.store(value, result.to(value.dtype.element_ty))


# ----------------------------------------------------------------------------------------------
# Host side: plans (tables built once per factor set), the work queue, configurations, launches.


@dataclasses.dataclass(frozen=True)
class Config:
    """Launch parameters of the persistent kernel.

    ``gram_rows``/``gradient_rows``: rows per tile of the Gram and gradient loops; ``block_n``:
    gradient columns per item; ``chunk_rows``: rows per work item (a multiple of both tile
    heights; fewer for a small set, see :func:`_balanced`); ``lag``: how far a matrix's gradient
    items trail its Gram items, in units of the rows that all programs hold at once
    (``programs × chunk_rows``; ``inf``: every Gram item first); ``programs_per_sm``: the grid is
    this many programs per SM; ``gram_block``: the widest Gram block one item sums (a rank above
    it is cut into block pairs, each its own item: smaller accumulators and fewer products, the
    rows read once per block pair);
    ``output_stages``: when set, the gradient loop is pipelined this deep over the ``.grad``
    tiles it reads as well as the factor tiles (shared memory for both); ``gram_tma``: the Gram
    items read aligned factors by TMA (where Triton has tensor descriptors).
    """

    gram_rows: int
    gradient_rows: int
    block_n: int
    chunk_rows: int
    lag: float = 1.0
    num_warps: int = 4
    num_stages: int = 2
    programs_per_sm: int = 1
    gram_block: int = MAX_GRAM_BLOCK
    output_stages: int | None = None
    gram_tma: bool = False

    def __post_init__(self):
        if self.chunk_rows % self.gram_rows or self.chunk_rows % self.gradient_rows:
            raise ValueError(f"chunk_rows ({self.chunk_rows}) must be a multiple of gram_rows ({self.gram_rows}) "
                             f"and gradient_rows ({self.gradient_rows})")


# Tuning hook: when set, every launch uses this Config instead of the defaults.
override: Config | None = None


class LaunchMode(typing.NamedTuple):
    """What the queue of a launch holds, and whether its gradients add into the output."""

    gram: bool
    gradient: bool
    accumulate: bool


LAUNCH_MODES = {
    "forward": LaunchMode(gram=True, gradient=False, accumulate=False),  # ortho_reg's value
    "backward": LaunchMode(gram=False, gradient=True, accumulate=False),  # its gradients, new tensors
    "step": LaunchMode(gram=True, gradient=True, accumulate=True),  # ortho_reg_grad_ in one launch
    "accumulate": LaunchMode(gram=False, gradient=True, accumulate=True),  # its gradient launch (two_launch_step)
}


def _candidates(precision: int, block_r: int, itemsize: int, mode: str) -> list[Config]:
    """Configurations to try in order: a later one is used when an earlier one runs out of
    registers or shared memory."""
    return [override] if override is not None else default_configs(precision, block_r, itemsize, mode)


def two_launch_step(precision: int, block_r: int) -> bool:
    """Whether ``step_`` runs as two launches (every Gram matrix, then every gradient) rather than
    one: where the two kinds of items want different programs. Float32 pairs at Gram width 128
    on an H100: the Gram items run fastest as one 8-warp program per SM, the gradient items as
    two 4-warp programs with narrower tiles, and a fused launch gives both the Gram items'
    shape (its one register allocation, 255 registers, serves both). Llama-2-7B set: 0.73–0.74 ms
    (Gram items of 1024 rows; 0.68 ms in the 4096-row items of default_configs) + 1.43 ms against
    3.19–3.43 ms fused (Llama-3-8B 0.78 + 1.51 against 3.32–3.58 ms); fused in the gradient items'
    programs with 64-wide Gram block pairs, 2.39–2.59 ms against 2.09–2.11 (the Gram items alone
    1.03–1.12 ms there; raw: bench/results/ortho-blocks-probe-*.txt). Nor did the two launches gain
    when run beside each other (the gradient launch a programmatic dependent of a Gram launch on
    part of the SMs): 2.13–2.88 ms against 2.18 (raw: bench/results/ortho-overlap-probe-*.txt). At
    r = 16 the fused launch was faster: 0.257–0.269 ms against 0.110–0.113 + 0.199–0.205 ms (in an
    earlier run, three of four measurements 0.273–0.285 ms, once 0.388 ms; raw:
    bench/results/ortho-split-probe-*.txt)."""
    return precision == F32_SPLIT16.value and block_r == MAX_GRAM_BLOCK


def default_configs(precision: int, block_r: int, itemsize: int, mode: str = "step") -> list[Config]:
    """The default configurations for a precision plan, Gram width, factor itemsize and launch
    mode (``"forward"``: Gram items alone; ``"backward"``, ``"accumulate"``: gradient items
    alone; ``"step"``: both), in order of preference."""
    if _triton_interpreted():
        # Small chunks: many Gram items per matrix and gradient items interleaved with them; the
        # Gram launch alone reads by TMA, the step's Gram items through pointers (both covered).
        return [Config(16, 16, min(block_r, 32), 32, lag=1.0, programs_per_sm=2, gram_tma=mode == "forward")]
    # Tiles of up to 16 KiB of factor rows (enough bytes in flight per program at small ranks).
    rows = max(16, min(128, (16 << 10) // (block_r * itemsize)))
    # Work items of about 512 KiB of factor rows: a Gram item's atomic update (r² floats) stays
    # small beside what it reads, and the rows all programs hold at once stay within L2
    # (H100, r = 128: 256 KiB items took 3.1 ms per Llama-2-7B step, 512 KiB 3.0 ms, 1 MiB 3.0 ms).
    chunk = max(256, min(4096, (512 << 10) // (block_r * itemsize)))
    if precision == F64.value:
        return [Config(16, 16, min(block_r, 32), chunk, 1.0, 4, 2), Config(16, 16, 16, chunk, 1.0, 4, 1)]
    if block_r > MAX_GRAM_BLOCK:  # block pairs and blocks of G − I: a correctness path, kept small
        return [Config(16, 16, 64, chunk, 1.0, 8, 2), Config(16, 16, 32, chunk, 1.0, 4, 1)]
    if block_r == MAX_GRAM_BLOCK:
        # The plans other than float32 pairs keep spill-free 32-row gradient tiles (the float32
        # TF32 operands of 128-row ones overflow shared memory; 16-bit factors were not timed
        # with them).
        fallbacks = [Config(rows, 32, block_r, chunk, 1.0, 8, 3), Config(rows, 32, block_r, chunk, 1.0, 8, 2),
                     Config(16, 16, 32, chunk, 1.0, 4, 1)]
        if precision != F32_SPLIT16.value:
            return fallbacks
        # Float32 pairs take the step as two launches (two_launch_step), each with its own
        # programs. H100, Llama-2-7B set: the Gram launch in 64-row tiles at one 8-warp program
        # per SM, 0.73 ms three stages deep in items of 1024 rows (0.84–0.85 ms in 32-row tiles
        # four or six deep, 1.75 ms at 16 warps), 0.67–0.68 ms four stages deep in items of
        # 4096 rows (Llama-3-8B 0.72–0.73 against 0.77 ms; three stages alike, within the
        # runs' spread): a program restarts its loop's pipeline and adds its sums once per item
        # (2048 rows: 0.70 ms; 8192: 0.79 ms, the items fewer and uneven; two runs,
        # bench/results/ortho-chunks-probe-*.txt); the gradients added into .grad
        # by two 4-warp programs per SM on 64×64 tiles, 1.43 ms, against 1.65 ms for 32×128
        # tiles, 1.82 ms for 32×64, 1.89 ms for 16×128, 1.81 ms for 128×128 tiles at one 8-warp
        # program, 2.34 ms for 64×128 at 8 warps, and 2.09–2.13 ms where a third stage or
        # prefetched .grad tiles leave room for one program per SM. The Gram launch's tiles read
        # by TMA: 0.63–0.64 ms against 0.68–0.69 (Llama-3-8B 0.67–0.68 against 0.72–0.74; three
        # stages alike; reading the gradient launch's tiles by TMA made ptxas spill 3 KB and took
        # 1.46 ms against 1.43; bench/results/ortho-tma-probe-*.txt).
        if mode == "forward":
            return [Config(64, 128, block_r, 4096, 1.0, 8, 4, gram_tma=True)] + fallbacks
        return [Config(64, 64, 64, chunk, 1.0, 4, 2, programs_per_sm=2)] + fallbacks
    # Tiles of 4096 elements and two 4-warp programs per SM (both resident; ptxas spills under
    # 200 bytes): on an H100 (Llama-2-7B set, float32) r = 64 took 1.09 ms against 1.89 ms for
    # 2048-element tiles and one program, r = 32 0.58–0.89 ms against 0.95 ms.
    tile_rows = 4096 // block_r
    if block_r == 16:
        # At r = 16 the gradient loop is bound by the latency of the .grad tiles it adds to,
        # unless it prefetches them too (output_stages), which 2048-element gradient tiles leave
        # room for at two programs per SM. H100, four interleaved runs per configuration (the
        # same configuration varies between runs by up to 2x, cause not found): Llama-2-7B
        # 0.297–0.45 ms, Llama-3-8B 0.319–0.377 ms, against 0.384–0.53 and 0.403–0.78 ms for
        # 256-row tiles at one program per SM without the prefetch. At r = 32, 64 the prefetch
        # takes the second program's room and was slower (0.71 against 0.58 ms, 1.40 against
        # 1.08 ms).
        first = Config(tile_rows, tile_rows // 2, block_r, chunk, 1.0, 4, 3, 2, output_stages=3)
    else:
        first = Config(tile_rows, tile_rows, block_r, chunk, 1.0, 4, 3, 2)
    return [first, Config(32, 32, block_r, chunk, 1.0, 4, 2), Config(16, 16, block_r, chunk, 1.0, 4, 1)]


def _precision(dtype: torch.dtype) -> int:
    if dtype == torch.float64:
        return F64.value
    if dtype == torch.float32:
        return F32_TF32.value if torch.backends.cuda.matmul.allow_tf32 else F32_SPLIT16.value
    return HALF.value


def _kind(rank: int, stride_l: int, stride_r: int) -> int:
    if stride_l == 1 and (stride_r != 1 or rank == 1):
        return COL_MAJOR.value
    if stride_r == 1:
        return ROW_MAJOR.value
    return STRIDED.value


def _vectorizable(ptr: int, length: int, rank: int, stride_l: int, stride_r: int, kind: int, vec: int) -> bool:
    """Whether 16-byte accesses along the contiguous dimension are valid (the hints of ALIGNED)."""
    if ptr % 16 or length % vec or rank % vec:
        return False
    if kind == ROW_MAJOR.value:
        return stride_l % vec == 0
    if kind == COL_MAJOR.value:
        return stride_r % vec == 0
    return True


# Work items shrink for a set too small to give each program ITEMS_PER_PROGRAM of the configured
# size, down to MIN_ITEM_ROWS rows. H100, r = 128, from CUDA graphs: one 4096×4096 adapter took
# 204 µs in the configured items (two 4096-row Gram items, one program each) and 60 µs so shrunk
# (bench/results/ortho-small-sets-probe-*.txt); per call on one adapter, items of 256 rows beat 512
# (bench/results/ortho-l2-probe-*.txt). Sets of a 7B model keep the configured items.
ITEMS_PER_PROGRAM = 2
MIN_ITEM_ROWS = 256


def _balanced(config: Config, shapes, programs: int) -> Config:
    """``config``, or with smaller work items where the matrices of ``shapes`` (``(length, rank)``
    each) hold fewer rows than ``programs × ITEMS_PER_PROGRAM`` items of ``config.chunk_rows``:
    then items of about that share, at least MIN_ITEM_ROWS rows, a multiple of both tile heights."""
    share = -(-sum(length for length, _ in shapes) // (programs * ITEMS_PER_PROGRAM))
    step = math.lcm(config.gram_rows, config.gradient_rows)
    rows = -(-max(share, MIN_ITEM_ROWS) // step) * step
    return dataclasses.replace(config, chunk_rows=rows) if rows < config.chunk_rows else config


def _chunks(length: int, rows: int) -> list[tuple[int, int]]:
    return [(start, min(start + rows, length)) for start in range(0, length, rows)]


def _work_order(shapes, mode: str, deterministic: bool, config: Config, programs: int, gram_block: int,
                block_n: int) -> list[list[int]]:
    """The work queue of one launch: rows of the work table for matrices of ``shapes``
    (``(length, rank)`` each). ``mode``: ``"forward"`` (Gram items), ``"backward"`` or
    ``"accumulate"`` (gradient items) or ``"step"`` (both, every matrix's Gram items before its
    gradient items)."""
    gram, gradient = [], []  # (sort key, row)
    position = 0
    finish = _estimated_gram_finish(shapes, programs, gram_block) if deterministic else None
    for m, (length, rank) in enumerate(shapes):
        blocks = -(-rank // gram_block)
        pairs = [(a, b) for a in range(blocks) for b in range(a, blocks)]
        gram_chunks = _chunks(length, length if deterministic else config.chunk_rows)
        phase = GRAM_ADD.value if len(gram_chunks) > 1 else GRAM_STORE.value
        count = len(gram_chunks) * len(pairs)
        for start, end in gram_chunks:
            # Deterministic: longest first, so that the short ones fill the tail.
            key = (-length * len(pairs), m) if deterministic else (position + start,)
            gram.extend((key, [m, start, end, phase, a, b, count, 0]) for a, b in pairs)
        for start, end in _chunks(length, config.chunk_rows):
            if deterministic:
                key = (finish[m], m, start)
            elif LAUNCH_MODES[mode].gram:
                lag = math.inf if math.isinf(config.lag) else config.lag * programs * config.chunk_rows
                key = (min(position + length + lag, math.inf), position + start)
            else:
                key = (position + start,)
            gradient.extend((key, [m, start, end, GRADIENT.value, col, 0, count, 0]) for col in range(0, rank, block_n))
        position += length
    if not LAUNCH_MODES[mode].gradient:
        items = gram
    elif not LAUNCH_MODES[mode].gram:
        items = gradient
    elif deterministic:
        items = sorted(gram, key=lambda item: item[0]) + sorted(gradient, key=lambda item: item[0])
        return [row for _, row in items]
    else:
        # Merge on the row position of the Gram stream, a Gram item first on a tie: a gradient item's
        # key is past every Gram item of its matrix.
        items = [((key[0], 0), row) for key, row in gram] + [((key[0], 1, *key[1:]), row) for key, row in gradient]
    return [row for _, row in sorted(items, key=lambda item: item[0])]


def _estimated_gram_finish(shapes, programs: int, gram_block: int) -> list[float]:
    """When each matrix's (single) Gram item would finish if ``programs`` programs took them
    longest first, in rows read: gradient items are queued in that order."""
    costs = [length * (-(-rank // gram_block)) * (-(-rank // gram_block) + 1) // 2 for length, rank in shapes]
    busy = [0.0] * programs
    finish = [0.0] * len(shapes)
    for m in sorted(range(len(shapes)), key=lambda m: (-costs[m], m)):
        start = heapq.heappop(busy)
        finish[m] = start + costs[m]
        heapq.heappush(busy, finish[m])
    return finish


def _device_table(rows: list[list[int]], width: int, dtype: torch.dtype, device) -> torch.Tensor:
    table = torch.tensor(rows, dtype=dtype).reshape(-1, width)
    if device.type == "cuda":
        return table.pin_memory().to(device, non_blocking=True)
    return table.to(device)


class _Group:
    """The factors of one dtype: one launch."""

    def __init__(self, dtype, members, plan):
        self.plan = plan
        self.dtype = dtype
        self.tl_dtype = _TL_DTYPES[dtype]
        self.itemsize = dtype.itemsize
        self.vec = 16 // dtype.itemsize
        # members: (index in the factor list, pointer, length, rank, stride_l, stride_r, kind)
        self.members = members
        self.indices = [m[0] for m in members]
        self.block_r = max(16, triton.next_power_of_2(max(m[3] for m in members)))
        self.block_k = min(self.block_r, MAX_GRAM_BLOCK)
        self.aligned = all(_vectorizable(p, L, r, sl, sr, kind, self.vec) for _, p, L, r, sl, sr, kind in members)
        self.mats = _device_table([[p, sl, sr, r, kind, i, L] for i, p, L, r, sl, sr, kind in members],
                                  MAT_FIELDS.value, torch.int64, plan.device)
        self._queues: dict[tuple, tuple[torch.Tensor, int]] = {}
        self.launches: dict[tuple, object] = {}
        # Backward outputs: {wanted factors: (device table, per member (offset, shape) or None,
        # elements of the buffer, aligned)}.
        self._flat_outputs: dict[tuple, tuple] = {}

    def queue(self, mode: str, deterministic: bool, config: Config, programs: int) -> tuple[torch.Tensor, int]:
        block_n = min(config.block_n, self.block_r)
        key = (mode, deterministic, config, programs, block_n)
        if key not in self._queues:
            shapes = [(L, r) for _, _, L, r, *_rest in self.members]
            rows = _work_order(shapes, mode, deterministic, _balanced(config, shapes, programs), programs,
                               self.gram_block(config), block_n)
            self._queues[key] = (_device_table(rows, WORK_FIELDS.value, torch.int32, self.plan.device), len(rows))
        return self._queues[key]

    def gram_block(self, config: Config) -> int:
        return min(self.block_r, config.gram_block)

    def output_layout(self, outs: list) -> tuple[torch.Tensor, bool]:
        """The output table of these outputs (shaped like their factors, any layout) without
        their addresses, on the host, and whether their layouts allow 16-byte accesses."""
        rows, aligned = [], self.aligned
        for i, p, L, r, sl, sr, kind in self.members:
            out = outs[i]
            is_vt = i >= self.plan.num_Us
            shape = (r, L) if is_vt else (L, r)
            if out.shape != shape or out.dtype != self.dtype or out.device != self.plan.device:
                raise ValueError(f"output {i} must be a {self.dtype} tensor shaped like its factor {list(shape)} on "
                                 f"{self.plan.device}, got {out.dtype} {tuple(out.shape)} on {out.device}")
            out_sl, out_sr = out.stride()[::-1] if is_vt else out.stride()
            joint = kind if _kind(r, out_sl, out_sr) == kind else STRIDED.value
            aligned = aligned and _vectorizable(0, L, r, out_sl, out_sr, joint, self.vec)
            rows.append([0, out_sl, out_sr, joint])
        return torch.tensor(rows, dtype=torch.int64).reshape(-1, OUT_FIELDS.value), aligned

    def output_table(self, layout: tuple[torch.Tensor, bool], pointers: list[int]) -> tuple[torch.Tensor, bool]:
        """The device table of outputs laid out as ``layout`` at these addresses (of every
        factor), and whether all accesses can be 16 bytes wide."""
        template, aligned = layout
        addresses = [pointers[i] for i in self.indices]
        table = template.clone()
        table[:, OUT_OFFSET.value] = torch.tensor(addresses, dtype=torch.int64)
        if self.plan.device.type == "cuda":
            table = table.pin_memory().to(self.plan.device, non_blocking=True)
        return table, aligned and all(address % 16 == 0 for address in addresses)

    def flat_outputs(self, wanted: tuple) -> tuple:
        """For gradients returned by the backward pass: one buffer holds them all, each laid
        out like a contiguous factor (``Vt [r, L]`` row-major is ``Vtᵀ`` column-major)."""
        if wanted not in self._flat_outputs:
            rows, views, offset = [], [], 0
            for i, _, L, r, _, _, kind in self.members:
                if not wanted[i]:
                    rows.append([0, 0, 0, SKIP.value])
                    views.append(None)
                    continue
                is_vt = i >= self.plan.num_Us
                rows.append([offset * self.itemsize, 1 if is_vt else r, L if is_vt else 1,
                             COL_MAJOR.value if is_vt else ROW_MAJOR.value])
                views.append((offset, (r, L) if is_vt else (L, r)))
                offset += -(-L * r // self.vec) * self.vec  # every output starts on 16 bytes
            # Joint kind: a factor laid out otherwise than its output goes the strided way.
            for row, (*_, kind) in zip(rows, self.members):
                if row[3] != SKIP.value and row[3] != kind:
                    row[3] = STRIDED.value
            aligned = self.aligned and all(row[3] != STRIDED.value for row in rows)
            table = _device_table(rows, OUT_FIELDS.value, torch.int64, self.plan.device)
            self._flat_outputs[wanted] = (table, views, offset, aligned)
        return self._flat_outputs[wanted]


class Plan:
    """Everything about a factor set that stays fixed while its parameters keep their storage."""

    _OUTPUT_TABLES_CACHED = 4

    def __init__(self, Us, Vts):
        mats = factor_matrices(Us, Vts)
        self.device = mats[0].device
        self.num_Us = len(Us)
        self.count = len(mats)
        # Gram matrices are zero-padded to a multiple of 16 columns: aligned rows.
        self.width = -(-max(m.shape[1] for m in mats) // 16) * 16
        self.gram_dtype = gram_dtype(mats)
        self.sms = torch.cuda.get_device_properties(self.device).multi_processor_count if self.device.type == "cuda" else 1
        by_dtype: dict[torch.dtype, list] = {}
        for i, m in enumerate(mats):
            L, r = m.shape
            sl, sr = m.stride()
            by_dtype.setdefault(m.dtype, []).append((i, m.data_ptr(), L, r, sl, sr, _kind(r, sl, sr)))
        self.groups = [_Group(dtype, members, self) for dtype, members in by_dtype.items()]
        # Stack of D, norms, then (int32) the matrices' split inverses (float32 bits), the queue
        # counters of every group and the matrices' arrival counters, in one zeroed workspace per call.
        gram_elements = self.count * self.width * self.width
        self._norms_at = gram_elements
        self._integers_at = gram_elements + self.count
        # Two queues per group (a two-launch step takes the second for its gradient launch).
        self._queue_ints = 2 * QUEUE_SLOTS * len(self.groups)
        integers = self.count + self._queue_ints + self.count
        ints_per_element = self.gram_dtype.itemsize // 4
        self._workspace_elements = self._integers_at + -(-integers // ints_per_element)
        # {data pointers of the outputs: per group (device table, aligned)}: .grad tensors are
        # often reallocated at the addresses they had.
        self._output_tables: OrderedDict[tuple, list] = OrderedDict()
        self._latest_outputs: tuple = (None, None)
        # Strides of the outputs whose layouts (per group: host table without addresses, aligned)
        # were checked last.
        self._output_strides: list | None = None
        self._output_layouts: list = []

    def workspace(self) -> tuple[tuple, torch.Tensor]:
        """``((deviations, norms, inverses), counters)``, zeroed (one allocation, one fill): the
        stack of ``D = G − I`` ``[n, W, W]``, the norms ``[n]`` and the split inverses ``[n]``
        (float32 bits, see :func:`_gram_sum`) that the Gram items write and the gradient items
        read, which is what ``backward`` takes back; and the counters of the launches."""
        workspace = torch.zeros(self._workspace_elements, dtype=self.gram_dtype, device=self.device)
        deviations = workspace[: self._norms_at].view(self.count, self.width, self.width)
        norms = workspace[self._norms_at : self._integers_at]
        integers = workspace[self._integers_at :].view(torch.int32)
        return (deviations, norms, integers[: self.count]), integers[self.count :]

    def counters(self) -> torch.Tensor:
        """Zeroed counters alone, for launches that reuse the Gram matrices of an earlier call."""
        return torch.zeros(self._queue_ints + self.count, dtype=torch.int32, device=self.device)

    def per_call(self, group, counters, saved, value, *, official, outs=None, out_base=0, out_aligned=False,
                 scale=None, coeff=1.0, second_launch=False) -> dict:
        """The kernel arguments of one call for ``group`` (``saved``: see :meth:`workspace`;
        ``second_launch``: the gradient launch of a two-launch step, which takes the group's
        second queue)."""
        deviations, norms, inverses = saved
        number = self.groups.index(group) + second_launch * len(self.groups)
        # Float arguments are float32: the coefficient goes as a pair (exact to 2^-48 when finite).
        coeff_hi = float(numpy.float32(coeff))
        coeff_lo = coeff - coeff_hi if math.isfinite(coeff_hi) else 0.0
        # Pointers the variant does not use still need a tensor: any will do.
        return dict(
            outs=group.mats if outs is None else outs, out_base=out_base, deviations=deviations, norms=norms,
            inverses=inverses, value=norms if value is None else value,
            queue=counters[QUEUE_SLOTS * number : QUEUE_SLOTS * (number + 1)], arrivals=counters[self._queue_ints :],
            scale=norms if scale is None else scale, coeff_hi=coeff_hi, coeff_lo=coeff_lo, official=official,
            variant=(value is not None, scale is not None, out_aligned),
        )

    def output_tables(self, outs: list) -> list:
        """Per group, the device table of these outputs (every factor's, shaped like it) and
        whether it is aligned, cached under their data pointers. New pointers with the strides
        of the latest outputs (``.grad`` tensors reallocated each step: autograd lays them out
        like their parameters) only refill the address column."""
        pointers = list(map(torch.Tensor.data_ptr, outs))
        if pointers == self._latest_outputs[0]:
            return self._latest_outputs[1]
        key = tuple(pointers)
        tables = self._output_tables.get(key)
        if tables is None:
            strides = list(map(torch.Tensor.stride, outs))
            if strides != self._output_strides:
                self._output_layouts = [group.output_layout(outs) for group in self.groups]
                self._output_strides = strides
            tables = [group.output_table(layout, pointers) for group, layout in zip(self.groups, self._output_layouts)]
            self._output_tables[key] = tables
            while len(self._output_tables) > self._OUTPUT_TABLES_CACHED:
                self._output_tables.popitem(last=False)
        else:
            self._output_tables.move_to_end(key)
        self._latest_outputs = (pointers, tables)
        return tables


def _accumulator(precision: int):
    return tl.float64 if precision == F64.value else tl.float32


def _complete_rows(block_r: int, block_k: int, num_warps: int) -> int:
    """Rows of the Gram matrix the completing item handles at once: about 8 elements per thread
    (its tiles of 64-bit pointers would otherwise dominate the kernel's registers); under the
    interpreter, half the matrix (still two steps, at a fraction of the interpreted time)."""
    if _triton_interpreted():
        return max(1, block_r // 2)
    return min(block_r, max(1, 8 * 32 * num_warps // block_k))


# Kernel arguments that change from call to call; the others are fixed per group and variant.
_PER_CALL = ("outs", "out_base", "queue", "arrivals", "deviations", "norms", "inverses", "value", "scale", "coeff_hi",
             "coeff_lo", "official")
# (variant, candidates) -> index of the first candidate that compiled within the device's limits.
_chosen: dict[tuple, int] = {}


@dataclasses.dataclass
class _Launch:
    """One group's launch of one variant, ready to repeat: the compiled kernel and every
    argument in order, the per-call ones to be filled in."""

    config: Config
    programs: int
    kernel: CompiledLaunch
    arguments: list
    slots: list[int]

    def __call__(self, per_call: dict):
        arguments = self.arguments.copy()
        for slot, name in zip(self.slots, _PER_CALL):
            arguments[slot] = per_call[name]
        _launch_with_scratch(self.config, lambda: _launch_kernel(self.kernel, self.programs, arguments))


def _descriptor_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Global memory for the tensor descriptors a launch makes in its programs (on the current
    device and stream, where the launch runs; torch's blocks are aligned to 512 bytes)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _makes_descriptors(config: Config) -> bool:
    """Whether a launch under ``config`` makes tensor descriptors in its programs."""
    return config.gram_tma and HAS_DEVICE_TMA


def _launch_with_scratch(config: Config, launch: typing.Callable[[], object]):
    """``launch()``, for a kernel that makes tensor descriptors with our allocator in place: Triton
    asks its allocator, a setting of the calling thread (autograd runs backward passes on threads
    of its own), for their memory as it launches; the caller's own setting is back afterwards."""
    if not _makes_descriptors(config):
        return launch()
    if not isinstance(_triton_allocator, ContextVar):  # a Triton whose setting cannot be handed back
        triton.set_allocator(_descriptor_scratch)
        return launch()
    token = _triton_allocator.set(_descriptor_scratch)
    try:
        return launch()
    finally:
        _triton_allocator.reset(token)


def _launch_kernel(kernel: CompiledLaunch, programs: int, arguments: list):
    kernel((programs, 1, 1), arguments)


def _run(plan: Plan, group: _Group, mode: str, per_call: dict):
    """Run ``mode`` (forward, backward or step) over ``group`` with these per-call arguments."""
    precision = _precision(group.dtype)
    deterministic = torch.are_deterministic_algorithms_enabled()
    variant = (mode, precision, deterministic, *per_call["variant"], override)
    launch = group.launches.get(variant)
    if launch is None:
        launch = group.launches[variant] = _first_launch(plan, group, variant, per_call)
        if launch is None:  # the first launch ran the kernel already
            del group.launches[variant]
        return
    launch(per_call)


def _first_launch(plan: Plan, group: _Group, variant: tuple, per_call: dict) -> _Launch | None:
    """Compile (or find) the kernel of ``variant``, trying the candidate configurations in
    order, and run it; returns what repeats the launch (None under the interpreter)."""
    mode, precision, deterministic, has_value, scaled, out_aligned, _ = variant
    candidates = _candidates(precision, group.block_r, group.itemsize, mode)
    key = ((group.dtype, group.block_r, group.aligned) + variant, tuple(candidates))
    for i in range(_chosen.get(key, 0), len(candidates)):
        config = candidates[i]
        programs = plan.sms * config.programs_per_sm
        work, num_items = group.queue(mode, deterministic, config, programs)
        arguments = dict(
            mats=group.mats, work=work, num_items=num_items, gram_stride=plan.width * plan.width,
            gram_width=plan.width, count=plan.count, value_count=plan.count,
            DTYPE=group.tl_dtype, ACC_DTYPE=_accumulator(precision), PRECISION=precision, GRAM=LAUNCH_MODES[mode].gram,
            GRADIENT_PHASE=LAUNCH_MODES[mode].gradient, VALUE=has_value, SCALED=scaled,
            ACCUMULATE=LAUNCH_MODES[mode].accumulate,
            GRAM_ROWS=config.gram_rows, GRADIENT_ROWS=config.gradient_rows, BLOCK=group.gram_block(config),
            NUM_BLOCKS=group.block_r // group.gram_block(config), BLOCK_N=min(config.block_n, group.block_r),
            BLOCK_K=group.block_k, NUM_K=group.block_r // group.block_k,
            COMPLETE_ROWS=_complete_rows(group.block_r, group.block_k, config.num_warps),
            ALIGNED=group.aligned, OUT_ALIGNED=out_aligned, VEC=group.vec, VALUE_BLOCK=1024,
            OUTPUT_STAGES=config.output_stages, GRAM_TMA=_makes_descriptors(config),
            **{name: per_call[name] for name in _PER_CALL},
        )
        try:
            compiled = _launch_with_scratch(config, lambda: _ortho_kernel[(programs,)](
                **arguments, num_warps=config.num_warps, num_stages=config.num_stages))
        except OutOfResources:
            if i == len(candidates) - 1:
                raise
            continue
        _chosen[key] = i
        if _triton_interpreted():
            return None
        names = _ortho_kernel.arg_names
        # The per-call arguments are left out (the template must not keep this call's tensors alive).
        template = [None if name in _PER_CALL else arguments[name] for name in names]
        return _Launch(config, programs, CompiledLaunch(compiled, _ortho_kernel), template,
                       [names.index(name) for name in _PER_CALL])


def prepare(Us, Vts) -> Plan:
    return Plan(Us, Vts)


def forward(plan: Plan, Us, Vts, form):
    saved, counters = plan.workspace()
    value = torch.empty((), dtype=plan.gram_dtype, device=plan.device)
    official = int(form == "official")
    with on_device(plan.device):
        for group in plan.groups:
            value_if_last = value if group is plan.groups[-1] else None
            _run(plan, group, "forward", plan.per_call(group, counters, saved, value_if_last, official=official))
    return value, saved


def backward(plan: Plan, Us, Vts, saved, form, scale, wanted):
    counters = plan.counters()
    official = int(form == "official")
    grads = [None] * plan.count
    with on_device(plan.device):
        for group in plan.groups:
            table, views, elements, aligned = group.flat_outputs(tuple(wanted))
            if not elements:
                continue
            buffer = torch.empty(elements, dtype=group.dtype, device=plan.device)
            for i, view in zip(group.indices, views):
                if view is not None:
                    offset, shape = view
                    grads[i] = buffer[offset : offset + shape[0] * shape[1]].view(shape)
            _run(plan, group, "backward", plan.per_call(group, counters, saved, None, official=official, outs=table,
                                                        out_base=buffer.data_ptr(), out_aligned=aligned, scale=scale))
    return grads


def step_(plan: Plan, Us, Vts, form, coeff, outs):
    saved, counters = plan.workspace()
    value = torch.empty((), dtype=plan.gram_dtype, device=plan.device)
    official = int(form == "official")
    with on_device(plan.device):
        for group, (table, aligned) in zip(plan.groups, plan.output_tables(outs)):
            value_if_last = value if group is plan.groups[-1] else None
            gradients = dict(official=official, outs=table, out_aligned=aligned, coeff=coeff)
            if two_launch_step(_precision(group.dtype), group.block_r):
                _run(plan, group, "forward", plan.per_call(group, counters, saved, None, official=official))
                _run(plan, group, "accumulate", plan.per_call(group, counters, saved, value_if_last, second_launch=True,
                                                              **gradients))
            else:
                _run(plan, group, "step", plan.per_call(group, counters, saved, value_if_last, **gradients))
    return value
