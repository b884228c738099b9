"""Triton backend of ``ortho_reg``: every Gram matrix in one launch, every gradient in another.

Interface: :mod:`sorsa_kernels.reference.ortho`. Each factor is read as its tall matrix
``X [L, r]`` (``U`` as is, ``Vt`` through ``Vtᵀ``) through device-side tables of data pointers,
lengths, ranks and strides that :func:`prepare` builds once per factor set, so a launch covers
any number of adapters of any shapes. Factors of different dtypes take one launch per dtype.

Gram launch
    A program sums ``X[rows]ᵀ X[rows]`` over one chunk of one matrix's rows (a block pair of
    it when ``r > 128``). Long matrices are cut into a few chunks so that about four programs
    per SM exist, added into the zeroed ``[n, R, R]`` stack with relaxed atomics: at most a
    handful of ``r×r`` additions per matrix (about 5 M float adds for the 448 factors of a
    Llama-2-7B r=128 set, against 320 M elements read). Under
    ``torch.use_deterministic_algorithms(True)`` no matrix is cut and every sum is a plain store.
    Programs run longest chunk first, so the short ones fill the tail.

Gradient launch
    A program takes one chunk of rows of one matrix (and one block of its columns): it reads
    ``G``, computes ``‖G − I‖_F`` and the coefficient of the chosen form itself (so no torch
    op runs between the launches), and writes or adds ``coeff·X(G − I)`` into the output;
    each matrix's first program also stores its norm, from which the ops layer takes the value.

Precision
    float32 factors run 3xTF32 unless torch allows TF32 matmuls
    (``torch.backends.cuda.matmul.allow_tf32``): each operand is split into a TF32-exact high
    part and the remainder, and the products ``hi·hi + hi·lo + lo·hi`` keep about 21 bits
    (relative error near 1e-6, inside the 1e-5 contract). For the Gram matrix the two cross
    terms are transposes of each other, so ``hiᵀhi + 2·hiᵀlo`` is accumulated and
    symmetrized once: two tensor-core products per tile instead of three. With TF32 allowed,
    one TF32 product per tile (relative error near 1e-3, like torch's TF32 matmuls).
    16-bit factors: the Gram matrix is a 16-bit product accumulated in float32; the gradient
    multiplies the factor (exact in TF32) by ``G − I`` split in two TF32 parts. float64: IEEE
    float64 products.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import OrderedDict

import torch
import triton
import triton.language as tl
from triton.runtime import OutOfResources

from sorsa_kernels.backends import _triton_interpreted
from sorsa_kernels.reference.ortho import factor_matrices, gram_dtype

# How a tall matrix lies in memory: along r (U), along L (Vtᵀ), or neither.
ROW_MAJOR = tl.constexpr(0)
COL_MAJOR = tl.constexpr(1)
STRIDED = tl.constexpr(2)

# Columns of the matrix table.
MAT_PTR = tl.constexpr(0)
MAT_STRIDE_L = tl.constexpr(1)
MAT_STRIDE_R = tl.constexpr(2)
MAT_RANK = tl.constexpr(3)
MAT_KIND = tl.constexpr(4)
MAT_INDEX = tl.constexpr(5)
MAT_FIELDS = tl.constexpr(6)
# Columns of the output table (KIND: the matrix's kind if the output lies the same way, else STRIDED).
OUT_PTR = tl.constexpr(0)
OUT_STRIDE_L = tl.constexpr(1)
OUT_STRIDE_R = tl.constexpr(2)
OUT_KIND = tl.constexpr(3)
OUT_FIELDS = tl.constexpr(4)
# Columns of a work table: matrix, first row, end row, then the Gram block pair and whether to add
# atomically (Gram launch) or the first column (gradient launch).
WORK_MATRIX = tl.constexpr(0)
WORK_ROW_START = tl.constexpr(1)
WORK_ROW_END = tl.constexpr(2)
WORK_BLOCK_A = tl.constexpr(3)
WORK_BLOCK_B = tl.constexpr(4)
WORK_ATOMIC = tl.constexpr(5)
WORK_COL_START = tl.constexpr(3)
WORK_FIELDS = tl.constexpr(6)

# Precision plans (see the module docstring).
F64 = tl.constexpr(0)
F32_3XTF32 = tl.constexpr(1)
F32_TF32 = tl.constexpr(2)
HALF = tl.constexpr(3)

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float64: tl.float64}

# Gram blocks are at most this wide (a 128×128 float32 accumulator per program).
MAX_GRAM_BLOCK = 128


@triton.jit
def _split_tf32(x):
    """``x = hi + lo`` exactly, ``hi`` rounded to TF32 (10 mantissa bits, nearest, ties away)."""
    hi = ((x.to(tl.uint32, bitcast=True) + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return hi, x - hi


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
def _gram_update(acc, xa, xb, PRECISION: tl.constexpr, SAME: tl.constexpr):
    """``acc += xaᵀ xb``; with ``SAME`` (xa is xb) the 3xTF32 sum is right only once symmetrized."""
    if PRECISION == F32_3XTF32:
        a_hi, a_lo = _split_tf32(xa)
        if SAME:
            acc = tl.dot(tl.trans(a_hi), a_lo * 2.0, acc, input_precision="tf32")
            acc = tl.dot(tl.trans(a_hi), a_hi, acc, input_precision="tf32")
        else:
            b_hi, b_lo = _split_tf32(xb)
            acc = tl.dot(tl.trans(a_lo), b_hi, acc, input_precision="tf32")
            acc = tl.dot(tl.trans(a_hi), b_lo, acc, input_precision="tf32")
            acc = tl.dot(tl.trans(a_hi), b_hi, acc, input_precision="tf32")
    elif PRECISION == F32_TF32:
        acc = tl.dot(tl.trans(xa), xb, acc, input_precision="tf32")
    elif PRECISION == F64:
        acc = tl.dot(tl.trans(xa), xb, acc, input_precision="ieee", out_dtype=tl.float64)
    else:
        acc = tl.dot(tl.trans(xa), xb, acc)
    return acc


@triton.jit
def _gram_rows(acc, ptr, stride_l, stride_r, row_start, row_end, rank, cols_a, cols_b,
               BLOCK_L: tl.constexpr, PRECISION: tl.constexpr, SAME: tl.constexpr, VECTOR: tl.constexpr):
    for start in range(row_start, row_end, BLOCK_L):
        rows = start + tl.arange(0, BLOCK_L)
        xa = _load_tile(ptr, rows, cols_a, stride_l, stride_r, row_end, rank, VECTOR)
        if SAME:
            acc = _gram_update(acc, xa, xa, PRECISION, True)
        else:
            xb = _load_tile(ptr, rows, cols_b, stride_l, stride_r, row_end, rank, VECTOR)
            acc = _gram_update(acc, xa, xb, PRECISION, False)
    return acc


# Integers that vary between calls are not specialized on (fewer compilations).
@triton.jit(do_not_specialize=["gram_stride", "gram_width"])
def _gram_kernel(mats, work, grams, gram_stride, gram_width,
                 DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_L: tl.constexpr,
                 BLOCK: tl.constexpr, NUM_BLOCKS: tl.constexpr, ALIGNED: tl.constexpr, VEC: tl.constexpr):
    item = work + tl.program_id(0) * WORK_FIELDS
    entry = mats + tl.load(item + WORK_MATRIX) * MAT_FIELDS
    row_start = tl.multiple_of(tl.load(item + WORK_ROW_START).to(tl.int32), BLOCK_L)
    row_end = tl.load(item + WORK_ROW_END).to(tl.int32)
    address = tl.load(entry + MAT_PTR)
    rank = tl.load(entry + MAT_RANK).to(tl.int32)
    kind = tl.load(entry + MAT_KIND)
    if ALIGNED:  # _Group checked these for every matrix of the launch
        address = tl.multiple_of(address, 16)
        rank = tl.multiple_of(rank, VEC)
        row_end = tl.multiple_of(row_end, VEC)
    ptr = address.to(tl.pointer_type(DTYPE))
    if NUM_BLOCKS == 1:
        block_a = 0
        block_b = 0
    else:
        block_a = tl.load(item + WORK_BLOCK_A).to(tl.int32)
        block_b = tl.load(item + WORK_BLOCK_B).to(tl.int32)
    cols_a = block_a * BLOCK + tl.arange(0, BLOCK)
    cols_b = block_b * BLOCK + tl.arange(0, BLOCK)
    same: tl.constexpr = NUM_BLOCKS == 1
    acc = tl.zeros((BLOCK, BLOCK), ACC_DTYPE)
    # One loop per layout, so that the compiler knows the contiguous dimension (stride 1) and,
    # when aligned, the other stride's divisibility (loaded in its branch, so the hint stays true).
    if kind == ROW_MAJOR:
        stride_l = tl.load(entry + MAT_STRIDE_L)
        if ALIGNED:
            stride_l = tl.multiple_of(stride_l, VEC)
        acc = _gram_rows(acc, ptr, stride_l, 1, row_start, row_end, rank, cols_a, cols_b, BLOCK_L, PRECISION, same,
                         ALIGNED)
    elif kind == COL_MAJOR:
        stride_r = tl.load(entry + MAT_STRIDE_R)
        if ALIGNED:
            stride_r = tl.multiple_of(stride_r, VEC)
        acc = _gram_rows(acc, ptr, 1, stride_r, row_start, row_end, rank, cols_a, cols_b, BLOCK_L, PRECISION, same,
                         ALIGNED)
    else:
        acc = _gram_rows(acc, ptr, tl.load(entry + MAT_STRIDE_L), tl.load(entry + MAT_STRIDE_R), row_start, row_end,
                         rank, cols_a, cols_b, BLOCK_L, PRECISION, same, False)
    if same and PRECISION == F32_3XTF32:
        acc = (acc + tl.trans(acc)) * 0.5
    value = acc.to(grams.dtype.element_ty)
    base = grams + tl.load(entry + MAT_INDEX) * gram_stride
    mask = (cols_a[:, None] < rank) & (cols_b[None, :] < rank)
    target = base + cols_a[:, None] * gram_width + cols_b[None, :]
    if NUM_BLOCKS > 1:
        mirror = block_a != block_b  # an off-diagonal block also fills its transpose
    else:
        mirror = False
    mirrored = base + cols_b[None, :] * gram_width + cols_a[:, None]
    if tl.load(item + WORK_ATOMIC) != 0:
        tl.atomic_add(target, value, mask=mask, sem="relaxed")
        if mirror:
            tl.atomic_add(mirrored, value, mask=mask, sem="relaxed")
    else:
        tl.store(target, value, mask=mask)
        if mirror:
            tl.store(mirrored, value, mask=mask)


@triton.jit
def _split_deviation(d, PRECISION: tl.constexpr):
    if PRECISION == F32_3XTF32 or PRECISION == HALF:
        return _split_tf32(d)
    return d, d


@triton.jit
def _product_update(acc, x, d_hi, d_lo, PRECISION: tl.constexpr):
    """``acc += x·d`` where ``(d_hi, d_lo)`` came from :func:`_split_deviation`."""
    if PRECISION == F32_3XTF32:
        x_hi, x_lo = _split_tf32(x)
        acc = tl.dot(x_lo, d_hi, acc, input_precision="tf32")
        acc = tl.dot(x_hi, d_lo, acc, input_precision="tf32")
        acc = tl.dot(x_hi, d_hi, acc, input_precision="tf32")
    elif PRECISION == HALF:
        x32 = x.to(tl.float32)  # 16-bit values are exact in TF32
        acc = tl.dot(x32, d_lo, acc, input_precision="tf32")
        acc = tl.dot(x32, d_hi, acc, input_precision="tf32")
    elif PRECISION == F32_TF32:
        acc = tl.dot(x, d_hi, acc, input_precision="tf32")
    else:
        acc = tl.dot(x, d_hi, acc, input_precision="ieee", out_dtype=tl.float64)
    return acc


@triton.jit
def _deviation_block(gram, gram_width, rows, cols, rank, ACC_DTYPE: tl.constexpr):
    """``(G − I)[rows, cols]``, zero outside ``rank``."""
    inside = (rows[:, None] < rank) & (cols[None, :] < rank)
    g = tl.load(gram + rows[:, None] * gram_width + cols[None, :], mask=inside, other=0.0).to(ACC_DTYPE)
    return g - tl.where(inside & (rows[:, None] == cols[None, :]), 1.0, 0.0).to(ACC_DTYPE)


@triton.jit
def _gradient_rows(ptr, stride_l, stride_r, out, out_stride_l, out_stride_r, row_start, row_end, rank, cols,
                   gram, gram_width, d_hi, d_lo, coeff, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                   ACCUMULATE: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   NUM_K: tl.constexpr, VECTOR: tl.constexpr):
    for start in range(row_start, row_end, BLOCK_L):
        rows = start + tl.arange(0, BLOCK_L)
        acc = tl.zeros((BLOCK_L, BLOCK_N), ACC_DTYPE)
        for kb in tl.static_range(NUM_K):
            ks = kb * BLOCK_K + tl.arange(0, BLOCK_K)
            x = _load_tile(ptr, rows, ks, stride_l, stride_r, row_end, rank, VECTOR)
            if NUM_K == 1:
                acc = _product_update(acc, x, d_hi, d_lo, PRECISION)
            else:  # ranks above 128: the deviation blocks come again from L2 for every tile
                blk_hi, blk_lo = _split_deviation(_deviation_block(gram, gram_width, ks, cols, rank, ACC_DTYPE),
                                                  PRECISION)
                acc = _product_update(acc, x, blk_hi, blk_lo, PRECISION)
        targets = _tile_pointers(out, rows, cols, out_stride_l, out_stride_r, VECTOR)
        mask = (rows[:, None] < row_end) & (cols[None, :] < rank)
        update = coeff * acc
        if ACCUMULATE:
            update += tl.load(targets, mask=mask).to(ACC_DTYPE)
        tl.store(targets, update.to(out.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["gram_stride", "gram_width", "count", "official"])
def _gradient_kernel(mats, outs, work, grams, norms, scale, gram_stride, gram_width, count, official,
                     DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr, ACCUMULATE: tl.constexpr,
                     BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_K: tl.constexpr,
                     ALIGNED: tl.constexpr, VEC: tl.constexpr):
    item = work + tl.program_id(0) * WORK_FIELDS
    matrix = tl.load(item + WORK_MATRIX)
    row_start = tl.multiple_of(tl.load(item + WORK_ROW_START).to(tl.int32), BLOCK_L)
    row_end = tl.load(item + WORK_ROW_END).to(tl.int32)
    col_start = tl.multiple_of(tl.load(item + WORK_COL_START).to(tl.int32), BLOCK_N)
    entry = mats + matrix * MAT_FIELDS
    rank = tl.load(entry + MAT_RANK).to(tl.int32)
    index = tl.load(entry + MAT_INDEX)
    gram = grams + index * gram_stride

    # ‖G − I‖_F, then the coefficient c of the gradient c·X(G − I).
    squares = tl.zeros((BLOCK_K, BLOCK_K), ACC_DTYPE)
    for ib in tl.static_range(NUM_K):
        for jb in tl.static_range(NUM_K):
            d = _deviation_block(gram, gram_width, ib * BLOCK_K + tl.arange(0, BLOCK_K),
                                 jb * BLOCK_K + tl.arange(0, BLOCK_K), rank, ACC_DTYPE)
            squares += d * d
    norm = tl.sqrt(tl.sum(squares))
    if (row_start == 0) & (col_start == 0):
        tl.store(norms + index, norm.to(norms.dtype.element_ty))
    factor = tl.load(scale).to(ACC_DTYPE)
    if official != 0:
        coeff = tl.where(norm > 0, 2.0 * factor / (count * tl.where(norm > 0, norm, 1.0)), 0.0)
    else:
        coeff = 4.0 * factor

    out_entry = outs + matrix * OUT_FIELDS
    out_address = tl.load(out_entry + OUT_PTR)
    if out_address != 0:  # 0: this factor's gradient is not wanted
        address = tl.load(entry + MAT_PTR)
        kind = tl.load(out_entry + OUT_KIND)
        if ALIGNED:  # _OutputTable checked these for every matrix of the launch
            address = tl.multiple_of(address, 16)
            out_address = tl.multiple_of(out_address, 16)
            rank = tl.multiple_of(rank, VEC)
            row_end = tl.multiple_of(row_end, VEC)
        ptr = address.to(tl.pointer_type(DTYPE))
        out = out_address.to(tl.pointer_type(DTYPE))
        cols = col_start + tl.arange(0, BLOCK_N)
        if NUM_K == 1:
            deviation = _deviation_block(gram, gram_width, tl.arange(0, BLOCK_K), cols, rank, ACC_DTYPE)
            d_hi, d_lo = _split_deviation(deviation, PRECISION)
        else:
            d_hi = 0.0
            d_lo = 0.0
        if kind == ROW_MAJOR:
            stride_l = tl.load(entry + MAT_STRIDE_L)
            out_stride_l = tl.load(out_entry + OUT_STRIDE_L)
            if ALIGNED:
                stride_l = tl.multiple_of(stride_l, VEC)
                out_stride_l = tl.multiple_of(out_stride_l, VEC)
            _gradient_rows(ptr, stride_l, 1, out, out_stride_l, 1, row_start, row_end, rank, cols, gram, gram_width,
                           d_hi, d_lo, coeff, ACC_DTYPE, PRECISION, ACCUMULATE, BLOCK_L, BLOCK_N, BLOCK_K, NUM_K,
                           ALIGNED)
        elif kind == COL_MAJOR:
            stride_r = tl.load(entry + MAT_STRIDE_R)
            out_stride_r = tl.load(out_entry + OUT_STRIDE_R)
            if ALIGNED:
                stride_r = tl.multiple_of(stride_r, VEC)
                out_stride_r = tl.multiple_of(out_stride_r, VEC)
            _gradient_rows(ptr, 1, stride_r, out, 1, out_stride_r, row_start, row_end, rank, cols, gram, gram_width,
                           d_hi, d_lo, coeff, ACC_DTYPE, PRECISION, ACCUMULATE, BLOCK_L, BLOCK_N, BLOCK_K, NUM_K,
                           ALIGNED)
        else:
            _gradient_rows(ptr, tl.load(entry + MAT_STRIDE_L), tl.load(entry + MAT_STRIDE_R), out,
                           tl.load(out_entry + OUT_STRIDE_L), tl.load(out_entry + OUT_STRIDE_R), row_start, row_end,
                           rank, cols, gram, gram_width, d_hi, d_lo, coeff, ACC_DTYPE, PRECISION, ACCUMULATE, BLOCK_L,
                           BLOCK_N, BLOCK_K, NUM_K, False)


# ----------------------------------------------------------------------------------------------
# Host side: plans (tables built once per factor set), configurations, launches.


@dataclasses.dataclass(frozen=True)
class Config:
    """Tile shape and launch parameters of one kernel (``block_n``: gradient columns per program)."""

    block_l: int
    num_warps: int
    num_stages: int
    block_n: int = 0


# Tuning hook: a kernel name ("gram" or "gradient") mapped to the Config to use instead of the defaults.
override: dict[str, Config] = {}

# Chunk boundaries are multiples of this many rows, a multiple of every block_l in use.
_GPU_ROW_GRANULE = 256
_INTERPRETER_ROW_GRANULE = 16
# About this many programs per SM, so that chunks of unequal matrices even out.
_PROGRAMS_PER_SM = 4
_GPU_MIN_CHUNK_ROWS = 512


def _candidates(kernel: str, precision: int, block: int) -> list[Config]:
    """Configurations to try in order: a later one is used when an earlier one runs out of
    registers or shared memory."""
    if kernel in override:
        return [override[kernel]]
    if _triton_interpreted():
        return [Config(16, 4, 1, min(block, 32))]
    if kernel == "gram":
        if precision == F64.value:
            return [Config(16, 4, 2), Config(16, 4, 1)]
        if block >= 128:
            return [Config(32 if precision != HALF.value else 64, 8, 3), Config(16, 4, 2), Config(16, 4, 1)]
        return [Config(64, 4, 3), Config(32, 4, 2), Config(16, 4, 1)]
    block_n = min(block, 64)
    if precision == F64.value:
        return [Config(16, 4, 2, min(block, 32)), Config(16, 4, 1, 16)]
    if block >= 128:
        return [Config(32, 8, 2, block_n), Config(32, 4, 1, block_n), Config(16, 4, 1, 32)]
    return [Config(128, 4, 3, block_n), Config(64, 4, 2, block_n), Config(16, 4, 1, block_n)]


# (kernel, variant) -> index of the first candidate that compiled within the device's limits.
_chosen: dict[tuple, int] = {}


def _launch(kernel: str, variant: tuple, precision: int, block: int, run):
    candidates = _candidates(kernel, precision, block)
    key = (kernel, variant, tuple(candidates))
    for i in range(_chosen.get(key, 0), len(candidates)):
        try:
            run(candidates[i])
        except OutOfResources:
            if i == len(candidates) - 1:
                raise
            continue
        _chosen[key] = i
        return


def _precision(dtype: torch.dtype) -> int:
    if dtype == torch.float64:
        return F64.value
    if dtype == torch.float32:
        return F32_TF32.value if torch.backends.cuda.matmul.allow_tf32 else F32_3XTF32.value
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


def _chunked(spans: list[tuple[int, int, int]], programs: int, granule: int, min_rows: int, split: bool):
    """Cut each ``(matrix, length, pieces)`` into row chunks (multiples of ``granule``) so that
    about ``programs`` (chunk, piece) work items exist; longest first."""
    units = sum(length * pieces for _, length, pieces in spans)
    rows = max(min_rows, -(-units // programs))
    rows = -(-rows // granule) * granule
    items = []
    for matrix, length, _ in spans:
        step = rows if split else length
        starts = range(0, length, step)
        items.extend((matrix, start, min(start + step, length), len(starts)) for start in starts)
    items.sort(key=lambda item: item[1] - item[2])
    return items


def _device_table(rows: list[list[int]], width: int, device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, width).to(device)


class _Group:
    """The factors of one dtype: one launch of each kernel."""

    def __init__(self, dtype, members, plan):
        self.plan = plan
        self.dtype = dtype
        self.tl_dtype = _TL_DTYPES[dtype]
        self.vec = 16 // dtype.itemsize
        # members: (index in the factor list, pointer, length, rank, stride_l, stride_r, kind)
        self.members = members
        self.block_r = max(16, triton.next_power_of_2(max(m[3] for m in members)))
        self.gram_block = min(self.block_r, MAX_GRAM_BLOCK)
        self.block_k = min(self.block_r, MAX_GRAM_BLOCK)
        self.aligned = all(_vectorizable(p, L, r, sl, sr, kind, self.vec) for _, p, L, r, sl, sr, kind in members)
        self.mats = _device_table([[p, sl, sr, r, kind, i] for i, p, L, r, sl, sr, kind in members], MAT_FIELDS.value,
                                  plan.device)
        self._gram_work: dict[bool, torch.Tensor] = {}
        self._gradient_work: dict[int, torch.Tensor] = {}

    def gram_work(self, deterministic: bool) -> torch.Tensor:
        if deterministic not in self._gram_work:
            spans = []
            for local, (_, _, L, r, *_rest) in enumerate(self.members):
                blocks = -(-r // self.gram_block)
                spans.append((local, L, blocks * (blocks + 1) // 2))
            rows = []
            for local, start, end, chunks in self.plan.chunk(spans, split=not deterministic):
                blocks = -(-self.members[local][3] // self.gram_block)
                for a in range(blocks):
                    for b in range(a, blocks):
                        rows.append([local, start, end, a, b, int(chunks > 1)])
            self._gram_work[deterministic] = _device_table(rows, WORK_FIELDS.value, self.plan.device)
        return self._gram_work[deterministic]

    def gradient_work(self, block_n: int) -> torch.Tensor:
        if block_n not in self._gradient_work:
            spans = [(local, m[2], -(-m[3] // block_n)) for local, m in enumerate(self.members)]
            rows = []
            for local, start, end, _ in self.plan.chunk(spans, split=True):
                for col in range(0, self.members[local][3], block_n):
                    rows.append([local, start, end, col, 0, 0])
            self._gradient_work[block_n] = _device_table(rows, WORK_FIELDS.value, self.plan.device)
        return self._gradient_work[block_n]


class _OutputTable:
    """Per group, the device table of output pointers and strides, and whether all are aligned."""

    def __init__(self, plan, outs: list):
        self.tables = []
        self.aligned = []
        for group in plan.groups:
            rows, aligned = [], group.aligned
            for i, p, L, r, sl, sr, kind in group.members:
                out = outs[i]
                if out is None:
                    rows.append([0, 0, 0, STRIDED.value])
                    continue
                if out.shape != (L, r) or out.dtype != group.dtype or out.device != plan.device:
                    raise ValueError(f"output {i} must be a {group.dtype} tensor like its factor [{L}, {r}] on "
                                     f"{plan.device}, got {out.dtype} {tuple(out.shape)} on {out.device}")
                out_sl, out_sr = out.stride()
                out_kind = _kind(r, out_sl, out_sr)
                joint = kind if out_kind == kind else STRIDED.value
                aligned = aligned and _vectorizable(out.data_ptr(), L, r, out_sl, out_sr, joint, group.vec)
                rows.append([out.data_ptr(), out_sl, out_sr, joint])
            self.tables.append(_device_table(rows, OUT_FIELDS.value, plan.device))
            self.aligned.append(aligned)


class Plan:
    """Everything about a factor set that stays fixed while its parameters keep their storage."""

    _OUTPUT_TABLES_CACHED = 4

    def __init__(self, Us, Vts):
        mats = factor_matrices(Us, Vts)
        self.device = mats[0].device
        self.count = len(mats)
        self.width = max(m.shape[1] for m in mats)
        self.gram_dtype = gram_dtype(mats)
        interpreted = self.device.type != "cuda"
        self.granule = _INTERPRETER_ROW_GRANULE if interpreted else _GPU_ROW_GRANULE
        self.min_chunk_rows = self.granule if interpreted else _GPU_MIN_CHUNK_ROWS
        sms = 1 if interpreted else torch.cuda.get_device_properties(self.device).multi_processor_count
        self.programs = _PROGRAMS_PER_SM * sms
        by_dtype: dict[torch.dtype, list] = {}
        for i, m in enumerate(mats):
            L, r = m.shape
            sl, sr = m.stride()
            by_dtype.setdefault(m.dtype, []).append((i, m.data_ptr(), L, r, sl, sr, _kind(r, sl, sr)))
        self.groups = [_Group(dtype, members, self) for dtype, members in by_dtype.items()]
        self._output_tables: OrderedDict[tuple, _OutputTable] = OrderedDict()

    def chunk(self, spans, split: bool):
        return _chunked(spans, self.programs, self.granule, self.min_chunk_rows, split)

    def output_table(self, U_outs, Vt_outs) -> _OutputTable:
        """The output table for these tensors (cached: .grad tensors mostly keep their storage too)."""
        key = tuple([None if o is None else (o.data_ptr(), o.stride()) for o in (*U_outs, *Vt_outs)])
        table = self._output_tables.get(key)
        if table is None:
            table = self._output_tables[key] = _OutputTable(self, factor_matrices(U_outs, Vt_outs))
            while len(self._output_tables) > self._OUTPUT_TABLES_CACHED:
                self._output_tables.popitem(last=False)
        else:
            self._output_tables.move_to_end(key)
        return table


def _on_device(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _accumulator(precision: int):
    return tl.float64 if precision == F64.value else tl.float32


def prepare(Us, Vts) -> Plan:
    return Plan(Us, Vts)


def grams(plan: Plan, Us, Vts) -> torch.Tensor:
    width = plan.width
    out = torch.zeros((plan.count, width, width), dtype=plan.gram_dtype, device=plan.device)
    deterministic = torch.are_deterministic_algorithms_enabled()
    with _on_device(plan.device):
        for group in plan.groups:
            precision = _precision(group.dtype)
            work = group.gram_work(deterministic)

            def run(config, group=group, precision=precision, work=work):
                _gram_kernel[(work.shape[0],)](
                    group.mats, work, out, width * width, width,
                    DTYPE=group.tl_dtype, ACC_DTYPE=_accumulator(precision), PRECISION=precision,
                    BLOCK_L=config.block_l, BLOCK=group.gram_block, NUM_BLOCKS=group.block_r // group.gram_block,
                    ALIGNED=group.aligned, VEC=group.vec, num_warps=config.num_warps, num_stages=config.num_stages,
                )

            _launch("gram", (group.dtype, precision, group.gram_block), precision, group.gram_block, run)
    return out


def add_penalty_grads_(plan: Plan, Us, Vts, grams, form, scale, U_outs, Vt_outs, accumulate):
    width = plan.width
    outputs = plan.output_table(U_outs, Vt_outs)
    norms = torch.empty(plan.count, dtype=grams.dtype, device=plan.device)
    official = int(form == "official")
    with _on_device(plan.device):
        for group, table, aligned in zip(plan.groups, outputs.tables, outputs.aligned):
            precision = _precision(group.dtype)

            def run(config, group=group, precision=precision, table=table, aligned=aligned):
                work = group.gradient_work(config.block_n)
                _gradient_kernel[(work.shape[0],)](
                    group.mats, table, work, grams, norms, scale, width * width, width, plan.count, official,
                    DTYPE=group.tl_dtype, ACC_DTYPE=_accumulator(precision), PRECISION=precision,
                    ACCUMULATE=bool(accumulate), BLOCK_L=config.block_l, BLOCK_N=config.block_n,
                    BLOCK_K=group.block_k, NUM_K=group.block_r // group.block_k, ALIGNED=aligned, VEC=group.vec,
                    num_warps=config.num_warps, num_stages=config.num_stages,
                )

            _launch("gradient", (group.dtype, precision, group.block_r), precision, group.block_r, run)
    return norms
