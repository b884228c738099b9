"""Triton backend of ``sorsa_linear``: the adapter linear at the cost of the frozen GEMM.

Implements the backend interface documented in :mod:`sorsa_kernels.reference.linear` with three
generic kernels, each launched through one function of this module:

* :func:`extended_matmul` ``c = a·b + ((t ⊙ S·scale) → a's dtype)·tb + bias``: one GEMM whose K
  loop runs over ``b`` and then over the rank-r tail, so the adapter's up-projection costs r more
  K steps of the frozen product and ``c`` is written once.
* :func:`rank_down` ``out = a·b`` for a skinny ``b [K, r]``: a memory-bound pass over ``a``
  (``b`` wider than ``a`` enters as two roundings, high part and residue, so z and g keep float32
  accuracy even where their sums cancel).
* :func:`row_reduction` ``out = aᵀ·(t·scale) ⊙ S`` reducing over the M rows, optionally also
  ``Σ_p out_raw ⊙ w`` into an ``[r]`` vector (how dS is obtained, see below).

The six products of one training step::

    forward   z  = x Vtᵀ                          rank_down(x, Vtᵀ)
              y  = x Wᵀ + (z ⊙ S·scale) Uᵀ + bias  extended_matmul(x, Wᵀ, z, Uᵀ)
    backward  dU = scale·dyᵀ (z ⊙ S), and dS       row_reduction(dy, z, w=U)
              g  = dy U                           rank_down(dy, U)
              dx = dy W + (g ⊙ S·scale) Vt         extended_matmul(dy, W, g, Vt)
              dVt = (xᵀ (g ⊙ S·scale))ᵀ            row_reduction(x, g), written transposed

``dS = scale·Σ_m z ⊙ g`` needs both the M×r products; it comes out of dU's pass instead, as
``dS_j = Σ_o U_oj · (scale·dyᵀ z)_oj``, so that ``rank_down`` stays a plain product that may split
its K loop across programs (an estimate, not yet a measurement: unsplit, each row tile of ``g``
re-reads all of ``U`` from L2, more bytes than its share of dy).

dU takes a second pass over dy rather than sharing ``rank_down``'s: a pass tiled over rows must
reduce dU's ``[out, r]`` across ``M/BLOCK_M`` row tiles with atomics (tens of millions at training
sizes, slower than reading dy again at full bandwidth); ``row_reduction`` owns whole column tiles
and loops over M itself, needing atomics only across the few M-splits chosen to fill the GPU.

Precision: products accumulate in float32 (float64 for float64 inputs). 16-bit inputs meet the
adapter operands rounded to their dtype on tensor cores (in ``rank_down`` plus the rounding
residue, see above); float32 inputs use full-precision dots unless
``torch.backends.cuda.matmul.allow_tf32`` is set. ``z`` and ``g`` stay in the accumulation dtype.

Launch configurations are autotuned per shape class on first use (``SORSA_KERNELS_AUTOTUNE=0``
takes the first configuration each class keeps instead); a configuration that splits a reduction
across programs accumulates with float atomics, so its last bits may vary from run to run.
"""

from __future__ import annotations

import contextlib
import functools
import os
import struct

import torch
import triton
import triton.language as tl

from sorsa_kernels.backends import _triton_interpreted
from sorsa_kernels.reference.linear import accumulation_dtype

# ----------------------------------------------------------------------------------------------
# Device helpers shared by the kernels


@triton.jit
def _multiply_accumulate(acc, a, b, PRECISION: tl.constexpr):
    """``acc + a @ b`` (tl.dot has no float64 before triton 3.4: those multiply and sum)."""
    if a.dtype == tl.float64:
        acc += tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    else:
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=acc.dtype)
    return acc


@triton.jit
def _scale(scale_hi, scale_lo, dtype: tl.constexpr):
    """The adapter scale in ``dtype``: float arguments reach a kernel as float32, so a float64
    scale travels as the float32 pair ``hi + lo`` (exact to about 2⁻⁴⁸)."""
    return tl.cast(scale_hi, dtype) + tl.cast(scale_lo, dtype)


@triton.jit
def _scaled_ranks(tile, s_ptr, ranks, rank, scale, HAS_S: tl.constexpr, DTYPE: tl.constexpr):
    """``tile ⊙ S[ranks]·scale`` (columns are ranks) in the tile's precision, then cast to DTYPE."""
    if HAS_S:
        s = tl.load(s_ptr + ranks, mask=ranks < rank, other=0.0).to(tile.dtype)
        tile = tile * (s * scale)[None, :]
    else:
        tile = tile * scale
    return tile.to(DTYPE)


# ----------------------------------------------------------------------------------------------
# Launch configurations


AUTOTUNE_ENV = "SORSA_KERNELS_AUTOTUNE"


def _bench_for_tuning(kernel_call, quantiles):
    """Autotuner timing; with SORSA_KERNELS_AUTOTUNE=0 none (for tests: no tuning cost)."""
    if os.environ.get(AUTOTUNE_ENV, "1") == "0":
        return [0.0, 0.0, 0.0]  # nothing runs: the first config the pruning kept wins
    # Short runs: choosing among a handful of configs needs less than do_bench's defaults.
    return triton.testing.do_bench(kernel_call, warmup=2, rep=10, quantiles=quantiles)


def _autotune(configs, interpreter_config, key, prune):
    """``triton.autotune`` over ``configs`` pruned per shape class by ``prune``; under
    TRITON_INTERPRET the one ``interpreter_config`` (the interpreter has no CUDA events to time with)."""
    if _triton_interpreted():
        return triton.autotune(configs=[interpreter_config], key=key)

    def decorate(kernel):
        tuner = triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune})(kernel)
        tuner.do_bench = _bench_for_tuning  # set here: triton 3.2's autotune() drops a do_bench argument
        return tuner

    return decorate


@functools.cache
def _multiprocessor_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def _row_bucket(rows: int) -> int:
    """Autotuning key for a row count, which may change every step: the next power of two up to
    64 rows (decode), of four above."""
    bucket = max(16, triton.next_power_of_2(rows))
    return bucket if bucket <= 64 else 4 ** ((bucket.bit_length()) // 2)


def _float32_pair(value: float) -> tuple[float, float]:
    """``value`` as float32 ``hi`` and ``lo`` with ``hi + lo`` ≈ value to about 2⁻⁴⁸ (see :func:`_scale`)."""
    hi = struct.unpack("f", struct.pack("f", value))[0]
    return hi, value - hi


def _rank_pad(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _zero_atomic_targets(args):
    """Config pre-hook: zero what the chosen config accumulates into with atomics."""
    if args["SPLIT"] > 1:
        args["out_ptr"].zero_()
    if args.get("red_ptr") is not None:
        args["red_ptr"].zero_()


# Ways to split a reduction across programs (accumulating with atomics) when its tiles are too few.
_SPLITS = (1, 2, 4, 8, 16, 32, 64)


def _config(pre_hook=None, warps=4, stages=3, **blocks):
    return triton.Config(blocks, num_warps=warps, num_stages=stages, pre_hook=pre_hook)


def _fits(stages: int, *tiles: tuple[int, int]) -> bool:
    """Whether ``stages`` pipelined copies of tiles given as (elements, bytes each) fit the
    shared memory that an H100 block may use, leaving room for the epilogue."""
    return stages * sum(n * size for n, size in tiles) <= 180 * 1024


def _split_choices(tiles: int, length: int, block: int, device) -> list[int]:
    """1, the smallest power-of-two split of ``length`` that fills the GPU with ``tiles`` tiles,
    and half that (each split keeps at least two blocks of the loop)."""
    limit = max(1, triton.cdiv(length, 2 * block))
    split = 1
    while tiles * split < _multiprocessor_count(device) and split * 2 <= limit:
        split *= 2
    return sorted({1, max(1, split // 2), split})


def _operand_class(element_size: int) -> str:
    return {2: "16-bit", 4: "float32", 8: "float64"}[element_size]


def _skinny_classes(blocks_by_class, tile: str, step: str):
    """Configs of a skinny kernel (a ``[tile, RANK_PAD]`` accumulator, a loop in ``step``s that
    may be split across programs) by operand class."""
    return {
        name: [
            _config(_zero_atomic_targets, **{tile: t, step: k}, SPLIT=split, warps=w, stages=s)
            for t, k, w, s in blocks
            for split in (_SPLITS if name != "float64" else (1,))
        ]
        for name, blocks in blocks_by_class.items()
    }


def _skinny_prune(classes, tile: str, step: str, *, tiled, split, skinny: str):
    """Pruning for a skinny kernel: ``tiled(args)`` is the extent cut into tiles, ``split(args)``
    the length of the loop, ``skinny`` the argument holding the ``[·, r]`` operand."""

    def prune(configs, args, **kwargs):
        size = args["a_ptr"].element_size()
        name = _operand_class(size)
        if name == "float64":
            return classes[name]
        rank_pad, extent, length = kwargs["RANK_PAD"], tiled(args), split(args)
        # Accumulator elements per thread that compile without spilling on an H100: a float32
        # product on CUDA cores holds its operands in registers too.
        per_thread = 64 if size == 2 else 16
        kept = []
        for c in classes[name]:
            rows, steps = c.kwargs[tile], c.kwargs[step]
            if rows > max(16, triton.next_power_of_2(extent)) or rows * rank_pad > per_thread * 32 * c.num_warps:
                continue
            splits = _split_choices(triton.cdiv(extent, rows), length, steps, args["a_ptr"].device)
            tiles = ((rows * steps, size), (steps * rank_pad, args[skinny].element_size()))
            if c.kwargs["SPLIT"] in splits and _fits(c.num_stages, *tiles):
                kept.append(c)
        # Untuned (SORSA_KERNELS_AUTOTUNE=0), the first wins: let it be one that fills the GPU.
        return sorted(kept, key=lambda c: -c.kwargs["SPLIT"])

    return prune


# ----------------------------------------------------------------------------------------------
# extended_matmul: c = a·b + (t ⊙ S·scale)·tb + bias


_MATMUL_CLASSES = {  # shape class -> [(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)]
    "many rows": [(128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (64, 128, 64, 4, 4)],
    "many rows, float32": [(128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4)],
    # Decode and other few-row shapes: the product is a read of b, spread over many column tiles.
    "few rows": [
        (16, 64, 128, 4, 4),
        (16, 128, 128, 4, 3),
        (32, 64, 128, 4, 4),
        (64, 64, 128, 4, 3),
        (16, 32, 256, 4, 3),
    ],
    "float64": [(32, 32, 8, 4, 1)],
}
_MATMUL_CLASSES = {
    name: [_config(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=8, warps=w, stages=s) for m, n, k, w, s in blocks]
    for name, blocks in _MATMUL_CLASSES.items()
}


def _prune_matmul(configs, args, **kwargs):
    size, rows = args["c_ptr"].element_size(), args["M_BUCKET"]
    if size == 8:
        return _MATMUL_CLASSES["float64"]
    name = "few rows" if rows <= 64 else "many rows, float32" if size == 4 else "many rows"
    kept = []
    for c in _MATMUL_CLASSES[name]:
        block_m, block_n, block_k = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        if block_m <= max(16, rows) and _fits(c.num_stages, (block_m * block_k, size), (block_k * block_n, size)):
            kept.append(c)
    return kept


def _tail_width(args):
    """Rank columns per tail step: the tail's float32 tiles then take as much shared memory per
    step as the main loop's tiles of 16-bit operands."""
    width = args["BLOCK_K"] if args["c_ptr"].element_size() >= 4 else args["BLOCK_K"] // 2
    return min(_rank_pad(args["RANK"]), width)


@_autotune(
    [c for configs in _MATMUL_CLASSES.values() for c in configs],
    _config(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=3),
    key=["M_BUCKET", "N", "K", "RANK", "stride_ak", "stride_bk"],
    prune=_prune_matmul,
)
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0, "TAIL_K": _tail_width})
@triton.jit(do_not_specialize=["M_BUCKET"])
def _extended_matmul_kernel(
    a_ptr, b_ptr, t_ptr, tb_ptr, s_ptr, bias_ptr, c_ptr,
    M, N, K, RANK, scale_hi, scale_lo, M_BUCKET,
    stride_am, stride_ak, stride_bk, stride_bn,
    stride_tm, stride_tr, stride_tbr, stride_tbn,
    stride_cm, stride_cn,
    HAS_BASE: tl.constexpr, HAS_S: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr, EVEN_K: tl.constexpr, TAIL_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    DTYPE: tl.constexpr = c_ptr.dtype.element_ty
    ACC: tl.constexpr = tl.float64 if DTYPE == tl.float64 else tl.float32
    # Grouped tile order: GROUP_M row tiles share each column tile of b while it sits in L2.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * tiles_n
    first_m = (pid // group_size) * GROUP_M
    group_m = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % group_m
    pid_n = (pid % group_size) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Edge tiles load wrapped-around rows and columns (valid memory) and drop them at the store.
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)

    if HAS_BASE:
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
        b_ptrs = b_ptr + offs_k[:, None] * stride_bk + cols[None, :] * stride_bn
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                in_k = offs_k < K - k * BLOCK_K
                a = tl.load(a_ptrs, mask=in_k[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=in_k[:, None], other=0.0)
            acc = _multiply_accumulate(acc, a, b, PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk

    # The rank tail: K continues over the r columns of t, transformed while loading.
    scale = _scale(scale_hi, scale_lo, ACC)
    ranks = tl.arange(0, TAIL_K)
    t_ptrs = t_ptr + rows[:, None] * stride_tm + ranks[None, :] * stride_tr
    tb_ptrs = tb_ptr + ranks[:, None] * stride_tbr + cols[None, :] * stride_tbn
    for r0 in range(0, RANK, TAIL_K):
        in_rank = ranks < RANK - r0
        t = tl.load(t_ptrs, mask=in_rank[None, :], other=0.0)
        t = _scaled_ranks(t, s_ptr, r0 + ranks, RANK, scale, HAS_S, DTYPE)
        tb = tl.load(tb_ptrs, mask=in_rank[:, None], other=0.0).to(DTYPE)
        acc = _multiply_accumulate(acc, t, tb, PRECISION)
        t_ptrs += TAIL_K * stride_tr
        tb_ptrs += TAIL_K * stride_tbr

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(ACC)[None, :]
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n.to(tl.int64)[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(DTYPE), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


def extended_matmul(a, b, t, tb, S, scale, bias, out):
    """``out = a·b + ((t ⊙ S·scale) in a's dtype)·tb + bias`` in one GEMM over K = a's columns + r.

    a ``[M, K]``, b ``[K, N]`` or ``None`` (the tail alone), t ``[M, r]`` in the accumulation
    dtype, tb ``[r, N]`` in any float dtype, S ``[r]`` or ``None``, bias ``[N]`` or ``None``, out
    ``[M, N]`` in a's dtype; any strides (pass transposed views to multiply by a transpose).
    """
    rows, cols = out.shape
    rank = t.shape[1]
    inner = a.shape[1] if b is not None else 0
    b_strides = b.stride() if b is not None else (0, 0)
    scale_hi, scale_lo = _float32_pair(scale)

    def grid(meta):
        return (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(cols, meta["BLOCK_N"]),)

    _extended_matmul_kernel[grid](
        a, b if b is not None else a, t, tb, S, bias, out,
        rows, cols, inner, rank, scale_hi, scale_lo, _row_bucket(rows),
        a.stride(0), a.stride(1), *b_strides,
        t.stride(0), t.stride(1), tb.stride(0), tb.stride(1),
        out.stride(0), out.stride(1),
        HAS_BASE=b is not None, HAS_S=S is not None, HAS_BIAS=bias is not None,
        PRECISION=_dot_precision(a.dtype),
    )  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------
# rank_down: out[M, r] = a[M, K]·b[K, r]


_DOWN_CLASSES = _skinny_classes(
    {  # (BLOCK_M, BLOCK_K, warps, stages); float32 multiplies on CUDA cores unless tf32: smaller tiles
        "16-bit": [(128, 64, 8, 3), (64, 64, 4, 3), (32, 128, 4, 3), (16, 128, 4, 4), (32, 32, 8, 3), (16, 32, 4, 3)],
        "float32": [(32, 32, 8, 3), (16, 64, 4, 3), (16, 32, 4, 3), (16, 32, 8, 3)],
        "float64": [(16, 8, 4, 1)],
    },
    tile="BLOCK_M",
    step="BLOCK_K",
)
_prune_down = _skinny_prune(
    _DOWN_CLASSES,
    "BLOCK_M",
    "BLOCK_K",
    tiled=lambda args: args["M_BUCKET"],
    split=lambda args: args["K"],
    skinny="b_ptr",
)


@_autotune(
    [c for configs in _DOWN_CLASSES.values() for c in configs],
    _config(_zero_atomic_targets, BLOCK_M=32, BLOCK_K=32, SPLIT=2),
    key=["M_BUCKET", "K", "RANK_PAD", "stride_ak", "stride_bk"],
    prune=_prune_down,
)
@triton.jit(do_not_specialize=["M_BUCKET"])
def _rank_down_kernel(
    a_ptr, b_ptr, out_ptr,
    M, K, RANK, M_BUCKET,
    stride_am, stride_ak, stride_bk, stride_br, stride_om, stride_or,
    SPLIT,  # runtime: one compiled kernel serves every split (1 is specialized, with plain stores)
    RANK_PAD: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    DTYPE: tl.constexpr = a_ptr.dtype.element_ty
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    # Program pid_k of SPLIT reduces one contiguous range of whole K blocks.
    k_span = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT) * BLOCK_K
    k_start = pid_k * k_span
    k_end = min(K, k_start + k_span)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = (offs_m % M).to(tl.int64)
    ranks = tl.arange(0, RANK_PAD)
    offs_k = k_start + tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + ranks[None, :] * stride_br
    acc = tl.zeros((BLOCK_M, RANK_PAD), dtype=out_ptr.dtype.element_ty)
    for k in range(k_start, k_end, BLOCK_K):
        in_k = offs_k < k_end - (k - k_start)
        a = tl.load(a_ptrs, mask=in_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=in_k[:, None] & (ranks < RANK)[None, :], other=0.0)
        b_high = b.to(DTYPE)
        acc = _multiply_accumulate(acc, a, b_high, PRECISION)
        if b.dtype.primitive_bitwidth > a.dtype.primitive_bitwidth:
            # b wider than a (float32 adapters under 16-bit x): its rounding residue too, or an
            # element of z or g that cancels (z = Σ x·Vt near 0) keeps only the residue's error.
            # The pass reads memory far slower than its tensor cores multiply.
            acc = _multiply_accumulate(acc, a, (b - b_high.to(b.dtype)).to(DTYPE), PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + ranks[None, :] * stride_or
    mask = (offs_m < M)[:, None] & (ranks < RANK)[None, :]
    if SPLIT == 1:
        tl.store(out_ptrs, acc, mask=mask)
    else:
        tl.atomic_add(out_ptrs, acc, mask=mask, sem="relaxed")


def rank_down(a, b, out):
    """``out = a·b``: a ``[M, K]`` (any float dtype), b ``[K, r]`` (any float dtype; wider than a's,
    it enters as a's rounding plus the residue), out ``[M, r]`` in a's accumulation dtype; any strides."""
    rows, inner = a.shape
    rank = b.shape[1]

    def grid(meta):
        return (triton.cdiv(rows, meta["BLOCK_M"]), meta["SPLIT"])

    _rank_down_kernel[grid](
        a, b, out,
        rows, inner, rank, _row_bucket(rows),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        RANK_PAD=_rank_pad(rank), PRECISION=_dot_precision(a.dtype),
    )  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------
# row_reduction: out[P, r] = Σ_m a[m, P]ᵀ (t[m, r]·scale) ⊙ S, red[r] = Σ_p (Σ_m ...)[p, r]·w[p, r]


_REDUCTION_CLASSES = _skinny_classes(
    {  # (BLOCK_P, BLOCK_M, warps, stages)
        "16-bit": [(128, 64, 8, 3), (64, 64, 4, 3), (256, 32, 8, 3), (128, 32, 8, 4), (64, 32, 8, 3)],
        "float32": [(32, 32, 8, 3), (64, 32, 8, 3), (32, 32, 4, 3), (16, 32, 8, 3)],
        "float64": [(16, 8, 4, 1)],
    },
    tile="BLOCK_P",
    step="BLOCK_M",
)
_prune_reduction = _skinny_prune(
    _REDUCTION_CLASSES,
    "BLOCK_P",
    "BLOCK_M",
    tiled=lambda args: args["P"],
    split=lambda args: args["M_BUCKET"],
    skinny="t_ptr",
)


@_autotune(
    [c for configs in _REDUCTION_CLASSES.values() for c in configs],
    _config(_zero_atomic_targets, BLOCK_P=32, BLOCK_M=32, SPLIT=2),
    key=["M_BUCKET", "P", "RANK_PAD", "stride_ap"],
    prune=_prune_reduction,
)
@triton.jit(do_not_specialize=["M_BUCKET"])
def _row_reduction_kernel(
    a_ptr, t_ptr, s_ptr, w_ptr, out_ptr, red_ptr,
    M, P, RANK, scale_hi, scale_lo, M_BUCKET,
    stride_am, stride_ap, stride_tm, stride_tr, stride_wp, stride_wr, stride_op, stride_or,
    SPLIT,  # runtime: one compiled kernel serves every split (1 is specialized, with plain stores)
    RANK_PAD: tl.constexpr, HAS_S: tl.constexpr, HAS_REDUCTION: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    DTYPE: tl.constexpr = a_ptr.dtype.element_ty
    ACC: tl.constexpr = out_ptr.dtype.element_ty
    pid_p = tl.program_id(0)
    pid_m = tl.program_id(1)
    # Program pid_m of SPLIT reduces one contiguous range of whole row blocks.
    m_span = tl.cdiv(tl.cdiv(M, BLOCK_M), SPLIT) * BLOCK_M
    m_start = pid_m * m_span
    m_end = min(M, m_start + m_span)

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    cols = (offs_p % P).to(tl.int64)
    ranks = tl.arange(0, RANK_PAD)
    in_rank = ranks < RANK
    scale = _scale(scale_hi, scale_lo, ACC)
    acc = tl.zeros((BLOCK_P, RANK_PAD), dtype=ACC)
    for m in range(m_start, m_end, BLOCK_M):
        offs_m = m + tl.arange(0, BLOCK_M)
        in_rows = offs_m < m_end
        rows = offs_m.to(tl.int64)
        a_t = tl.load(a_ptr + cols[:, None] * stride_ap + rows[None, :] * stride_am, mask=in_rows[None, :], other=0.0)
        t = tl.load(t_ptr + rows[:, None] * stride_tm + ranks[None, :] * stride_tr,
                    mask=in_rows[:, None] & in_rank[None, :], other=0.0)  # fmt: skip
        acc = _multiply_accumulate(acc, a_t, _scaled_ranks(t, s_ptr, ranks, RANK, scale, False, DTYPE), PRECISION)

    in_cols = offs_p < P
    if HAS_REDUCTION:
        w = tl.load(w_ptr + cols[:, None] * stride_wp + ranks[None, :] * stride_wr,
                    mask=in_cols[:, None] & in_rank[None, :], other=0.0)  # fmt: skip
        tl.atomic_add(red_ptr + ranks, tl.sum(acc * w.to(ACC), axis=0), mask=in_rank, sem="relaxed")
    if HAS_S:
        acc *= tl.load(s_ptr + ranks, mask=in_rank, other=0.0).to(ACC)[None, :]
    out_ptrs = out_ptr + offs_p.to(tl.int64)[:, None] * stride_op + ranks[None, :] * stride_or
    mask = in_cols[:, None] & in_rank[None, :]
    if SPLIT == 1:
        tl.store(out_ptrs, acc, mask=mask)
    else:
        tl.atomic_add(out_ptrs, acc, mask=mask, sem="relaxed")


def row_reduction(a, t, S, scale, out, w=None, red=None):
    """``out = scale·aᵀ t ⊙ S`` reducing over the M rows; with ``w``, also ``red = scale·Σ_p (aᵀ t)⊙w``.

    a ``[M, P]`` (any float dtype), t ``[M, r]`` (rounded to a's dtype after the scale), S ``[r]``
    or ``None``, out ``[P, r]`` and red ``[r]`` in a's accumulation dtype, w ``[P, r]``; any strides.
    """
    rows, columns = a.shape
    rank = t.shape[1]
    scale_hi, scale_lo = _float32_pair(scale)

    def grid(meta):
        return (triton.cdiv(columns, meta["BLOCK_P"]), meta["SPLIT"])

    _row_reduction_kernel[grid](
        a, t, S, w, out, red,
        rows, columns, rank, scale_hi, scale_lo, _row_bucket(rows),
        a.stride(0), a.stride(1), t.stride(0), t.stride(1),
        *(w.stride() if w is not None else (0, 0)), out.stride(0), out.stride(1),
        RANK_PAD=_rank_pad(rank), HAS_S=S is not None, HAS_REDUCTION=w is not None,
        PRECISION=_dot_precision(a.dtype),
    )  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------
# The backend interface


def _contiguous(vector):
    return None if vector is None else vector.contiguous()


def _on_device_of(tensor):
    """Triton launches on the current CUDA device: make it the tensors' (layers of one model may
    sit on several GPUs)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def forward(x, weight, U, S, Vt, bias, scale):
    rows = x.shape[0]
    y = x.new_empty((rows, U.shape[0]))
    z = x.new_empty((rows, U.shape[1]), dtype=accumulation_dtype(x.dtype))
    if rows == 0:
        return y, z
    with _on_device_of(x):
        rank_down(x, Vt.T, z)
        extended_matmul(x, None if weight is None else weight.T, z, U.T, _contiguous(S), scale, _contiguous(bias), y)
    return y, z


def backward(dy, x, z, weight, U, S, Vt, scale, needs):
    with _on_device_of(dy):
        return _backward(dy, x, z, weight, U, S, Vt, scale, needs)


def _backward(dy, x, z, weight, U, S, Vt, scale, needs):
    need_dx, need_dU, need_dS, need_dVt = needs
    need_dS = need_dS and S is not None
    acc = z.dtype
    rows, rank = z.shape
    S = _contiguous(S)
    dx = dU = dS = dVt = None
    if need_dU or need_dS:
        dU_acc = U.new_empty(U.shape, dtype=acc)
        dS_acc = S.new_empty(S.shape, dtype=acc) if need_dS else None
        if rows == 0:
            dU_acc.zero_()
            dS_acc = None if dS_acc is None else dS_acc.zero_()
        else:
            row_reduction(dy, z, S, scale, dU_acc, w=U if need_dS else None, red=dS_acc)
        dU = dU_acc.to(U.dtype) if need_dU else None
        dS = dS_acc.to(S.dtype) if need_dS else None
    if need_dx or need_dVt:
        g = z.new_empty((rows, rank))
        if rows > 0:
            rank_down(dy, U, g)
        if need_dx:
            dx = x.new_empty(x.shape)
            if rows > 0:
                extended_matmul(dy, weight, g, Vt, S, scale, None, dx)
        if need_dVt:
            dVt_acc = Vt.new_empty(Vt.shape, dtype=acc)
            if rows == 0:
                dVt_acc.zero_()
            else:
                row_reduction(x, g, S, scale, dVt_acc.T)
            dVt = dVt_acc.to(Vt.dtype)
    return dx, dU, dS, dVt
