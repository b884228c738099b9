"""Triton backend of ``sorsa_linear``: the adapter linear at the cost of the frozen GEMM.

Implements the backend interface documented in :mod:`sorsa_kernels.reference.linear` with three
generic kernels, one for decode and one for the merged weight of inference, each launched
through one function of this module:

* :func:`extended_matmul` ``c = a·b + t·tb + bias``: one GEMM whose K loop also runs over the
  rank-r tail, so the adapter's up-projection costs r more K steps of the frozen product and
  ``c`` is written once. Two kernels: for 16-bit operands whose rows are 16-byte aligned (every
  LLM shape) tiles arrive by TMA, the tail's too, optionally from a persistent grid of one
  program per SM walking L2-grouped tiles (flattened: its tile and K loops one pipeline); any
  other operand (float32, float64, odd strides, few rows) takes the pointer kernel.
* :func:`rank_down` ``out = scale·a·b`` for a skinny ``b [K, r]``: a memory-bound pass over ``a``
  (``b`` wider than ``a`` enters as two roundings, high part and residue, so that an element of
  z or g whose sum cancels keeps its accuracy up to the final rounding).
* :func:`row_reduction` ``out = aᵀ·t ⊙ S`` reducing over the M rows, optionally also
  ``Σ_p out_raw ⊙ w`` into an ``[r]`` vector (how dS is obtained, see below). For 16-bit
  operands whose rows are 16-byte aligned its blocks may also arrive by TMA (the tuner picks).
* :func:`few_rows_forward`, the no-grad forward of at most :data:`FEW_ROWS` rows: a launch that
  sums ``x Vtᵀ``, and the product by the weight (its tiles read by pointers or, for 16-bit rows
  16-byte aligned, by TMA), which on sm_90 starts beside it and waits for it only before the
  rank tail.
* :func:`merge_weight` ``out = W + scale·(U ⊙ S) Vt``: the forward without gradients of many
  16-bit rows may multiply by it (:func:`merged_forward`, the frozen GEMM through cuBLAS) instead
  of running the fused forward; the tuner times both ways per shape class.
* :func:`gradient_pass`, the backward's ``dU``, ``dS`` and ``g``: ``row_reduction`` and
  ``rank_down`` over dy, or, where the tuner finds it faster (16-bit dy, r ≤ 32), one pass over
  dy that computes all three with float atomics.
* The forward may run z's pass beside the y GEMM (r ≤ 32), and the backward dU+dS and dVt
  beside the dx GEMM, instead of before or after it (sm_90 on: :func:`_forward_beside`,
  :func:`_backward_beside`); the tuner times the ways of the whole forward and backward per
  shape class.

The six products of one training step, with ``z`` and ``g`` kept scaled and rounded to x's dtype
(every use of them rounds them so for the tensor cores; for 16-bit x that halves their memory)
and ``S`` folded into a rounded copy of the other operand (:func:`scaled_columns`), so that every
tensor-core operand streams from memory as it is::

    forward   z  = scale·x Vtᵀ                     rank_down(x, Vtᵀ, scale)
              y  = x Wᵀ + z (U ⊙ S)ᵀ + bias        extended_matmul(x, Wᵀ, z, (U ⊙ S)ᵀ)
    backward  dU = (dyᵀ z) ⊙ S, and dS            row_reduction(dy, z, S, w=U)   } or both
              g  = scale·dy U                      rank_down(dy, U, scale)        } gradient_pass
              dx = dy W + g (Vtᵀ ⊙ S)ᵀ             extended_matmul(dy, W, g, (Vtᵀ ⊙ S)ᵀ)
              dVt = (xᵀ g ⊙ S)ᵀ                    row_reduction(x, g, S), written transposed

``dS = scale·Σ_m (x Vtᵀ) ⊙ (dy U)`` needs both the M×r products; it comes out of dU's pass
instead, as ``dS_j = Σ_o U_oj · (dyᵀ z)_oj``, so that ``rank_down`` stays a plain product that
may split its K loop across programs.

The skinny passes are memory-bound: their cost is reading ``a`` once, plus the ``[·, r]`` operand
that every program reads again from L2 (``2r/BLOCK`` times the bytes of ``a`` for a float32 operand
under 16-bit ``a``). Wide tiles (256 rows) keep that re-read small; a reduction that then has too
few tiles to fill the GPU is split across programs (float atomics into a zeroed float32 buffer).
rank_down's float32 ``b`` under 16-bit ``a`` is rounded in registers, or, in ``staged``
configurations, by a launch of its own ahead of the pass (see :func:`_round_kernel`); the tuner
chooses per shape.

Precision: products accumulate in float32 (float64 for float64 inputs). 16-bit inputs meet the
adapter operands rounded to their dtype on tensor cores (in ``rank_down`` plus the rounding
residue, see above); float32 inputs use full-precision dots unless
``torch.backends.cuda.matmul.allow_tf32`` is set.

Launch configurations: each launch function keys its shape (rows bucketed) and, on the first
launch of a key, times the candidate configurations once on the real outputs
(``SORSA_KERNELS_AUTOTUNE=0`` takes the first candidate instead). Host time: a layer's step
repeats the same launches with new tensors, so each launch is planned once per layout of its
tensors (the chosen configuration, grid, every non-tensor argument) and later calls launch the
compiled kernel directly (:class:`~sorsa_kernels.triton.common.KernelLaunch`), without Triton's
per-call binding of every argument.
The candidate lists are pruned to what compiles on an H100 without register spills (checked
offline for every configuration by tests/linear_hopper_compile.py); bench/sweep_linear.py times
each of them. A configuration that splits a reduction accumulates with float atomics, so its last
bits may vary from run to run; under ``torch.use_deterministic_algorithms(True)`` no reduction is
split (dS, a sum over column tiles, still adds with atomics) and gradient_pass makes two launches.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import statistics
import struct

import torch
import triton
import triton.language as tl
from triton.runtime import OutOfResources

from sorsa_kernels.backends import _triton_interpreted
from sorsa_kernels.reference.linear import accumulation_dtype
from sorsa_kernels.triton.common import KernelLaunch, PlannedDescriptor, layout_key, on_device, zeroed_workspace
from sorsa_kernels.triton.common import graphed as cuda_graphed  # (graphed: _choose's argument)

# TMA tiles need host tensor descriptors and their load/store methods in kernels (triton >= 3.4);
# without them the pointer kernel serves every shape.
HAS_TMA = PlannedDescriptor is not None and hasattr(tl, "make_tensor_descriptor")

# Programmatic dependent launch (sm_90 on): a launch may start while the one before it still runs
# and wait for it in the kernel (griddepcontrol); without it the two run one after the other.
try:
    from triton.backends.nvidia.compiler import CUDAOptions
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    HAS_PDL = "launch_pdl" in CUDAOptions.__dataclass_fields__
except ImportError:
    HAS_PDL = False

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
def _grouped_tile(tile, tiles_m, tiles_n, GROUP_M: tl.constexpr):
    """Tile index -> (row tile, column tile) in groups of GROUP_M row tiles that sweep the column
    tiles together, so each column tile of b is read from DRAM about once per group."""
    group_size = GROUP_M * tiles_n
    first_m = (tile // group_size) * GROUP_M
    group_m = min(tiles_m - first_m, GROUP_M)
    return first_m + (tile % group_size) % group_m, (tile % group_size) // group_m


@triton.jit
def _int32_at(float_ptr):
    """The int32 at a float32 address (a count kept in a float32 workspace)."""
    return float_ptr.to(tl.pointer_type(tl.int32), bitcast=True)


@triton.jit
def _split_range(length, part, SPLIT, STEP: tl.constexpr):
    """``(start, end)`` of part ``part`` of SPLIT contiguous ranges of whole STEP blocks over
    ``[0, length)`` (empty for parts past the end)."""
    span = tl.cdiv(tl.cdiv(length, STEP), SPLIT) * STEP
    start = part * span
    return start, min(length, start + span)


@triton.jit
def _beside_start(BESIDE: tl.constexpr):
    """A launch that runs beside the launches after it (programmatic dependent launch, sm_90 on):
    they may start at once, on the SMs its programs leave free."""
    if BESIDE:
        gdc_launch_dependents()


@triton.jit
def _beside_end(BESIDE: tl.constexpr):
    """The end of a launch that may have started beside the one before it: its last program waits
    for that one, so that the launch, and so the next one in the stream, ends after it."""
    if BESIDE:
        if tl.program_id(0) == tl.num_programs(0) - 1:
            gdc_wait()


@triton.jit
def _async_proxy_fence(ON: tl.constexpr):
    """Orders what this thread has read (a count acquired) before its TMA reads after it, which
    pass through another proxy than plain loads and stores (sm_90 on): without it they might read
    data that the count says another running launch has stored. Off where launches run one after
    the other (and under the interpreter)."""
    if ON:
        tl.inline_asm_elementwise("fence.proxy.async.global; // dummy $0", "=r", [], dtype=tl.int32, is_pure=False,
                                  pack=1)  # fmt: skip


@triton.jit
def _rank_tail(acc, t_ptr, tb_ptr, rows, cols, RANK, stride_tm, stride_tr, stride_tbr, stride_tbn,
               DTYPE: tl.constexpr, PRECISION: tl.constexpr, TAIL_K: tl.constexpr, TAIL_STAGES: tl.constexpr):  # fmt: skip
    """``acc + (t[rows] → DTYPE) · (tb[:, cols] → DTYPE)``: the rank-r end of the K loop (rows
    and cols already wrapped into range) in steps of TAIL_K ranks, pipelined TAIL_STAGES deep."""
    ranks = tl.arange(0, TAIL_K)
    t_ptrs = t_ptr + rows[:, None] * stride_tm + ranks[None, :] * stride_tr
    tb_ptrs = tb_ptr + ranks[:, None] * stride_tbr + cols[None, :] * stride_tbn
    for r0 in tl.range(0, RANK, TAIL_K, num_stages=TAIL_STAGES):
        in_rank = ranks < RANK - r0
        t = tl.load(t_ptrs, mask=in_rank[None, :], other=0.0).to(DTYPE)
        tb = tl.load(tb_ptrs, mask=in_rank[:, None], other=0.0).to(DTYPE)
        acc = _multiply_accumulate(acc, t, tb, PRECISION)
        t_ptrs += TAIL_K * stride_tr
        tb_ptrs += TAIL_K * stride_tbr
    return acc

# ----------------------------------------------------------------------------------------------
# Launch configurations and their choice


@dataclasses.dataclass(frozen=True)
class Config:
    """One launch configuration: the kernel's constexpr meta-parameters, warps, pipeline stages,
    and ``split``, the programs that share each reduction (above 1 they add their partial sums
    with atomics into a zeroed output). ``tma`` picks :func:`extended_matmul`'s TMA kernel and
    ``persistent`` its grid of one program per SM. ``staged``: a skinny kernel's ``[·, r]``
    operand, wider than the streamed one, is rounded to the streamed dtype by a launch of its own
    first (see :func:`_stage`). ``joint``: :func:`gradient_pass` in one pass over dy (else its
    two launches, each tuned)."""

    meta: tuple[tuple[str, object], ...]
    warps: int = 4
    stages: int = 3
    split: int = 1
    tma: bool = False
    persistent: bool = False
    staged: bool = False
    joint: bool = False

    @staticmethod
    def of(warps=4, stages=3, split=1, tma=False, persistent=False, staged=False, joint=False, **meta):
        return Config(tuple(meta.items()), warps, stages, split, tma, persistent, staged, joint)

    @functools.cached_property
    def kwargs(self) -> dict:
        """The meta-parameters and the compile options, as a launch takes them."""
        return dict(self.meta, num_warps=self.warps, num_stages=self.stages)

    def __str__(self):
        fields = [f"{k}={v}" for k, v in self.meta]
        fields += [f"warps={self.warps}", f"stages={self.stages}"]
        fields += [f"split={self.split}"] * (self.split > 1) + ["tma"] * self.tma + ["persistent"] * self.persistent
        fields += ["staged"] * self.staged + ["joint"] * self.joint
        return " ".join(fields)


AUTOTUNE_ENV = "SORSA_KERNELS_AUTOTUNE"

# (launch function, shape key) -> the chosen Config (or, for infer, the forward and the backward, the
# chosen way).
_chosen: dict[tuple, Config | str | tuple] = {}


def _choose(key: tuple, candidates, plan, reset=None, graphed=False) -> tuple[Config | str | tuple, bool]:
    """``(config, final)``: the configuration cached for ``key``; on a miss the fastest of
    ``candidates()``, each timed by running ``plan(config)()`` (a complete launch on the real
    outputs, which the caller repeats afterwards; ``reset()`` then undoes what the timing runs
    accumulated), with ``graphed`` as replays of a CUDA graph of it (device time: launches so
    short that the host's launch cost would decide an eager timing), in rounds (see
    :func:`_fastest`). Inside a CUDA graph capture, where nothing can be timed, the first
    candidate, not final: a later call chooses."""
    key += (torch.are_deterministic_algorithms_enabled(),)  # which candidates may split
    config = _chosen.get(key)
    if config is not None:
        return config, True
    configs = candidates()
    if len(configs) == 1 or _triton_interpreted() or os.environ.get(AUTOTUNE_ENV, "1") == "0":
        config = configs[0]
    elif torch.cuda.is_current_stream_capturing():
        return configs[0], False
    else:
        config = _fastest(configs, plan, graphed)
        if reset is not None:
            reset()
    _chosen[key] = config
    return config, True


# Rounds in which the tuner times every candidate from CUDA graphs, in turns (the order rotating
# each round), keeping the least median: a GPU's speed drifts within seconds, and with one timing
# each the ways picked for a shape class on an H100 changed from tuning to tuning and cost up to
# 193 µs over the best at 16384 tokens (bench/probe_way_choice.py, raw output in
# bench/results/way-choice-probe-*.txt).
_GRAPHED_ROUNDS = 5


def _fastest(configs: list, plan, graphed: bool):
    """The candidate of least time, each timed once, or with ``graphed`` in :data:`_GRAPHED_ROUNDS`
    rounds (see :func:`_choose`)."""
    rounds = _GRAPHED_ROUNDS if graphed else 1
    times: list[list[float]] = [[] for _ in configs]
    order = list(range(len(configs)))
    for round_ in range(rounds):
        turn = round_ % len(order)
        for index in order[turn:] + order[:turn]:
            times[index].append(_time_ms(plan(configs[index]), graphed))
    medians = [statistics.median(t) for t in times]
    return configs[medians.index(min(medians))]


def _time_ms(run, graphed: bool) -> float:
    try:
        # Short runs: choosing among a handful of configs needs less than do_bench's defaults.
        return triton.testing.do_bench(cuda_graphed(run) if graphed else run, warmup=2, rep=10)
    except OutOfResources:
        return float("inf")


# (launch function, layout_key of its tensors, the other arguments, precision, determinism) -> a plan:
# the launch with everything but the tensors fixed, ``plan(*tensors)``. Rows change from call to
# call (packed sequences): the oldest plans make way beyond a few thousand.
_plans: dict[tuple, object] = {}
_PLANS_KEPT = 4096


def _launch(tag: str, tensors: tuple, build, tuning_key, candidates, config=None, reset=None, scale=None,
            graphed=False) -> None:
    """Launch ``build(config)(*tensors)``: with ``config`` given, that one (benchmarks, sweeps);
    else the plan kept for these tensors' layout, made on a miss from the configuration tuned for
    ``tuning_key()`` among ``candidates()`` (see :func:`_choose`, whose ``reset`` and ``graphed``
    this passes) and kept unless provisional (chosen inside a CUDA graph capture)."""
    if config is not None:
        build(config)(*tensors)
        return
    key = (tag, layout_key(*tensors), scale, _mode(tensors[0].dtype))
    plan = _plans.get(key)
    if plan is None:
        chosen, final = _choose(tuning_key(), candidates, lambda c: functools.partial(build(c), *tensors), reset,
                                graphed)
        plan = build(chosen)
        if final:
            _remember(key, plan)
    plan(*tensors)


def _remember(key: tuple, plan) -> None:
    if len(_plans) >= _PLANS_KEPT:
        del _plans[next(iter(_plans))]
    _plans[key] = plan


def _planned(key: tuple, tensors: tuple, build, *more) -> None:
    """Launch ``build()(*tensors, *more)``: the plan kept under ``key`` for these tensors'
    layout, made on a miss (a fixed configuration's, see :func:`_backward_beside`)."""
    key = (*key, layout_key(*tensors), _mode(tensors[0].dtype))
    plan = _plans.get(key)
    if plan is None:
        plan = build()
        _remember(key, plan)
    plan(*tensors, *more)


def _mode(dtype: torch.dtype) -> tuple:
    """What a plan depends on besides its arguments: the dot precision and whether reductions
    may split (atomics)."""
    return _dot_precision(dtype), torch.are_deterministic_algorithms_enabled()


# Host-side arithmetic in plain Python: triton.cdiv and triton.next_power_of_2 are constexpr
# functions, several microseconds a call outside a kernel.


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@functools.cache
def _multiprocessor_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def _row_bucket(rows: int) -> int:
    """Key for a row count, which may change every step: the next power of two up to 64 rows
    (decode), of four above."""
    bucket = max(16, _next_power_of_2(rows))
    return bucket if bucket <= 64 else 4 ** ((bucket.bit_length()) // 2)


@functools.lru_cache(maxsize=256)
def _float32_pair(value: float) -> tuple[float, float]:
    """``value`` as float32 ``hi`` and ``lo`` with ``hi + lo`` ≈ value to about 2⁻⁴⁸ (see :func:`_scale`)."""
    hi = struct.unpack("f", struct.pack("f", value))[0]
    return hi, value - hi


def _rank_pad(rank: int) -> int:
    return max(16, _next_power_of_2(rank))


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


# Shared memory one H100 block may use (227 KiB), less room for the compiler's own scratch.
_SHARED_BYTES = 220 * 1024


def _split_choices(tiles: int, steps: int, device) -> list[int]:
    """Splits of a reduction of ``steps`` blocks over ``tiles`` output tiles: 1, the smallest power
    of two that fills the GPU, and half that (each split keeps at least four blocks)."""
    if torch.are_deterministic_algorithms_enabled():
        return [1]
    split = 1
    programs = _multiprocessor_count(device)
    while tiles * split < programs and split * 4 <= steps:
        split *= 2
    return sorted({1, max(1, split // 2), split})


# ----------------------------------------------------------------------------------------------
# extended_matmul: c = a·b + t·tb + bias


@triton.jit
def _base_sum(acc, a_ptr, b_ptr, rows, cols, K, stride_am, stride_ak, stride_bk, stride_bn,
              PRECISION: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """``acc + a[rows, :]·b[:, cols]``, the K loop of the pointer kernels in steps of BLOCK_K."""
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
    return acc


@triton.jit
def _extended_matmul_kernel(
    a_ptr, b_ptr, t_ptr, tb_ptr, bias_ptr, c_ptr,
    M, N, K, RANK,
    stride_am, stride_ak, stride_bk, stride_bn,
    stride_tm, stride_tr, stride_tbr, stride_tbn,
    stride_cm, stride_cn,
    HAS_BASE: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr, EVEN_K: tl.constexpr, TAIL_K: tl.constexpr, TAIL_STAGES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    DTYPE: tl.constexpr = c_ptr.dtype.element_ty
    ACC: tl.constexpr = tl.float64 if DTYPE == tl.float64 else tl.float32
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Edge tiles load wrapped-around rows and columns (valid memory) and drop them at the store.
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)

    if HAS_BASE:
        acc = _base_sum(acc, a_ptr, b_ptr, rows, cols, K, stride_am, stride_ak, stride_bk, stride_bn, PRECISION, EVEN_K,
                        BLOCK_K)  # fmt: skip
    acc = _rank_tail(acc, t_ptr, tb_ptr, rows, cols, RANK, stride_tm, stride_tr, stride_tbr, stride_tbn,
                     DTYPE, PRECISION, TAIL_K, TAIL_STAGES)  # fmt: skip
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(ACC)[None, :]
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n.to(tl.int64)[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(DTYPE), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


@triton.jit
def _tma_rank_tail(acc, t_desc, tb_desc, off_m, off_n, RANK, TAIL_K: tl.constexpr, TAIL_STAGES: tl.constexpr,
                   UNROLLED: tl.constexpr):
    """``acc + t[off_m:, :]·tb[off_n:, :]ᵀ``: the TMA kernel's rank tail in steps of TAIL_K ranks,
    a loop or (UNROLLED > 0) that many steps unrolled."""
    if UNROLLED:
        for step in tl.static_range(UNROLLED):
            acc = tl.dot(t_desc.load([off_m, step * TAIL_K]), tb_desc.load([off_n, step * TAIL_K]).T, acc)
    else:
        for r0 in tl.range(0, RANK, TAIL_K, num_stages=TAIL_STAGES):
            acc = tl.dot(t_desc.load([off_m, r0]), tb_desc.load([off_n, r0]).T, acc)
    return acc


@triton.jit
def _prefetched_rank_tail(t_ptr, tb_ptr, offs_m, offs_n, M, N, RANK, stride_tm, stride_tbn, TAIL_K: tl.constexpr):
    """The TMA kernel's rank tail tiles ``t[offs_m, :]`` and ``tb[offs_n, :]`` (one step of TAIL_K
    ≥ RANK ranks) by plain loads, which the tile's main loop does not wait for: its product after
    the loop finds them arrived. By TMA before the loop, each tile waited for them before its main
    loop's first loads went out (at 4096², r = 16, y took 1.067x cuBLAS so, 1.059x prefetched and
    1.048x without a tail: bench/results/gemm-stages-probe-*-tail.txt)."""
    ranks = tl.arange(0, TAIL_K)
    in_rank = (ranks < RANK)[None, :]
    t_tile = tl.load(t_ptr + offs_m.to(tl.int64)[:, None] * stride_tm + ranks[None, :],
                     mask=(offs_m < M)[:, None] & in_rank, other=0.0)  # fmt: skip
    tb_tile = tl.load(tb_ptr + offs_n.to(tl.int64)[:, None] * stride_tbn + ranks[None, :],
                      mask=(offs_n < N)[:, None] & in_rank, other=0.0)  # fmt: skip
    return t_tile, tb_tile


@triton.jit
def _held(tile, ON: tl.constexpr):
    """``tile`` (16-bit) passed through an opaque move where it is used, so that the compiler
    stages it into shared memory for a product there and not where it was loaded (which would wait
    for the load at once). Off under the interpreter, which runs no inline assembly."""
    if ON:
        tile = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [tile], dtype=tile.dtype, is_pure=False, pack=2)
    return tile


@triton.jit
def _extended_matmul_tma_kernel(
    a_desc, b_desc, t_desc, tb_desc, t_ptr, tb_ptr, c, bias_ptr, ready_ptr,
    M, N, K, RANK, PROGRAMS, stride_cm, stride_tm, stride_tbn,
    HAS_TAIL: tl.constexpr, HAS_BIAS: tl.constexpr, B_ROWS_N: tl.constexpr,
    TAIL_K: tl.constexpr, TAIL_STAGES: tl.constexpr, TAIL_PREFETCH: tl.constexpr, HOLD_TAIL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    TMA_STORE: tl.constexpr, SUBTILE: tl.constexpr, BESIDE: tl.constexpr, AWAIT_TAIL: tl.constexpr,
    FLATTEN: tl.constexpr, TAIL_UNROLLED: tl.constexpr,
):  # fmt: skip
    """Tiles of a ``[M, K]``, b (``[N, K]`` when B_ROWS_N, else ``[K, N]``), t ``[M, r]`` and
    tb ``[N, r]`` by TMA (reads out of range are zeros), or with TAIL_PREFETCH t and tb by plain
    loads from t_ptr and tb_ptr (see :func:`_prefetched_rank_tail`); c a descriptor (TMA_STORE:
    clipped stores, SUBTILE: in two halves, half the shared memory) or a pointer (row stride
    stride_cm).
    PROGRAMS programs walk the tiles: one each when PROGRAMS covers them, else a persistent grid.
    FLATTEN (a persistent grid): the rank tail by TMA after the main loop, in TAIL_UNROLLED steps
    unrolled, which lets Triton pipeline the tile and K loops as one (the next tile's first loads
    go out during this tile's tail and epilogue); with TAIL_UNROLLED = 0, a loop, which it does not.
    BESIDE: the launch may start beside the one before it (see :func:`_beside_end`), which it
    does not read, or, with AWAIT_TAIL, which writes t: a :func:`_rank_down_kernel` with SIGNAL,
    counting each block of BLOCK_M rows of t ready in the int32 ``ready`` for this launch's
    column tiles. A tile then adds its rank tail after its main loop, once its rows are counted,
    and takes itself off the count, which the launch so leaves zero."""
    DTYPE: tl.constexpr = a_desc.dtype
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    k_steps = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, PROGRAMS, flatten=FLATTEN):
        pid_m, pid_n = _grouped_tile(tile, tiles_m, tiles_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        offs_m = off_m + tl.arange(0, BLOCK_M)
        offs_n = off_n + tl.arange(0, BLOCK_N)
        # A rank tail by TMA, unawaited, a few K steps, starts the accumulator; one prefetched, awaited
        # or flattened ends the main loop.
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if HAS_TAIL and TAIL_PREFETCH:
            t_tile, tb_tile = _prefetched_rank_tail(t_ptr, tb_ptr, offs_m, offs_n, M, N, RANK, stride_tm, stride_tbn,
                                                    TAIL_K)  # fmt: skip
        elif HAS_TAIL and not (AWAIT_TAIL or FLATTEN):
            acc = _tma_rank_tail(acc, t_desc, tb_desc, off_m, off_n, RANK, TAIL_K, TAIL_STAGES, TAIL_UNROLLED)
        for k in range(k_steps):
            a = a_desc.load([off_m, k * BLOCK_K])
            if B_ROWS_N:
                b = b_desc.load([off_n, k * BLOCK_K]).T
            else:
                b = b_desc.load([k * BLOCK_K, off_n])
            acc = tl.dot(a, b, acc)
        if AWAIT_TAIL:
            ready = _int32_at(ready_ptr) + pid_m
            while tl.atomic_add(ready, 0, sem="acquire") == 0:
                pass
            _async_proxy_fence(BESIDE)  # t's rows, stored by the pass, are read by TMA below
            acc = _tma_rank_tail(acc, t_desc, tb_desc, off_m, off_n, RANK, TAIL_K, TAIL_STAGES, TAIL_UNROLLED)
            tl.atomic_add(ready, -1, sem="relaxed")
        if HAS_TAIL and FLATTEN:
            acc = _tma_rank_tail(acc, t_desc, tb_desc, off_m, off_n, RANK, TAIL_K, TAIL_STAGES, TAIL_UNROLLED)
        if HAS_TAIL and TAIL_PREFETCH:
            acc = tl.dot(_held(t_tile, HOLD_TAIL), _held(tb_tile, HOLD_TAIL).T, acc)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + (offs_n % N)).to(tl.float32)[None, :]
        if TMA_STORE:
            if SUBTILE:
                halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
                left, right = tl.split(halves)
                c.store([off_m, off_n], left.to(DTYPE))
                c.store([off_m, off_n + BLOCK_N // 2], right.to(DTYPE))
            else:
                c.store([off_m, off_n], acc.to(DTYPE))
        else:
            c_ptrs = c + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
            tl.store(c_ptrs, acc.to(DTYPE), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])
    _beside_end(BESIDE)


# The pointer kernel's row tiles reach this far ("few rows"); above, TMA tiles of 128 rows.
FEW_ROWS = 64
# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) of the pointer kernel by operand class.
_POINTER_BLOCKS = {
    "many rows": [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (64, 128, 64, 4, 4)],
    # Rows not 16-byte aligned load without vectors (nor async copies): smaller tiles, or spills.
    "many rows, unaligned": [(128, 128, 64, 8, 3), (128, 128, 32, 8, 3), (64, 128, 32, 4, 3)],
    "many rows, float32": [(128, 128, 32, 8, 3), (64, 128, 32, 4, 4)],
    "many rows, float32, unaligned": [(128, 64, 32, 8, 3), (64, 64, 32, 4, 3)],
    # Decode and other few-row shapes: the product is a read of b, spread over many column tiles.
    "few rows": [(16, 32, 256, 4, 4), (16, 64, 128, 4, 4), (16, 128, 64, 4, 3), (32, 64, 128, 4, 4),
                 (64, 64, 128, 4, 3)],
    "few rows, unaligned": [(16, 32, 128, 4, 4), (16, 128, 64, 4, 3), (32, 64, 64, 4, 3)],
    "few rows, float32": [(16, 64, 32, 4, 3), (16, 128, 32, 4, 3), (16, 32, 64, 4, 3)],
    "float64": [(32, 32, 8, 4, 1), (16, 32, 8, 4, 1)],
}

# TMA kernel: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, GROUP_M, persistent, epilogue, TAIL_K,
# TAIL_STAGES) with epilogue "tma", "subtile" (TMA stores of two halves: half the shared memory)
# or "pointer" (masked stores; with 128x128 tiles two programs fit one SM); a persistent grid
# (persistent True, or "flattened": see FLATTEN in :func:`_extended_matmul_tma_kernel`) walks the
# tiles in one program per SM; a rank tail by TMA (above _PREFETCHED_RANK, or flattened) takes
# TAIL_K ranks a step, its loads pipelined TAIL_STAGES deep. (Triton 3.6 does not warp-specialize
# the loops on Hopper: with 8 warps it ignores the request, with 4 it fails to compile.)
TMA_BLOCKS = [  # the H100 winners of bench/sweep_linear.py and bench/probe_gemm_stages.py
    (128, 256, 64, 8, 3, 8, False, "subtile", 32, 2),
    (128, 256, 64, 8, 3, 8, False, "subtile", 64, 1),
    (128, 256, 64, 8, 3, 8, True, "subtile", 32, 2),
    (128, 256, 64, 8, 3, 8, "flattened", "subtile", 64, 1),
]
# Up to this rank a flattened configuration's tail steps are unrolled, staged in one shared buffer
# (r = 64: 224 KB with the main loop's, of an H100 block's 227 KB); above, Triton 3.6 allocated more
# than there is (320 KB at r = 128), and the tail is a loop.
_UNROLLED_RANK = 64
# Up to this rank the TMA kernel loads its rank tail by plain loads before the main loop and
# multiplies it after (see :func:`_prefetched_rank_tail`); above, by TMA before the loop. (A
# configuration with TAIL_PREFETCH=False takes the tail by TMA at any rank: the probe
# bench/probe_gemm_stages.py times both.)
_PREFETCHED_RANK = 32
# Under the interpreter: small tiles, every grid and epilogue.
_INTERPRETER_TMA_BLOCKS = [
    (32, 32, 32, 4, 2, 2, True, "subtile", 16, 2), (16, 32, 16, 4, 2, 2, False, "tma", 16, 1),
    (16, 16, 16, 4, 2, 2, True, "pointer", 16, 1), (16, 32, 16, 4, 2, 2, "flattened", "subtile", 16, 1),
]


def _tma_config(block_m, block_n, block_k, warps, stages, group_m, persistent, epilogue, tail_k, tail_stages):
    return Config.of(
        warps, stages, tma=True, persistent=bool(persistent), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        GROUP_M=group_m, TMA_STORE=epilogue != "pointer", SUBTILE=epilogue == "subtile", TAIL_K=tail_k,
        TAIL_STAGES=tail_stages, FLATTEN=persistent == "flattened",
    )  # fmt: skip


def _fits(stages: int, *tiles: tuple[int, int]) -> bool:
    """Whether ``stages`` pipelined copies of tiles given as (elements, bytes each) fit."""
    return stages * sum(n * size for n, size in tiles) <= 180 * 1024


def _matmul_candidates(rows: int, size: int, tma: bool, aligned: bool = True) -> list[Config]:
    if _triton_interpreted():
        if tma:
            return [_tma_config(*b) for b in _INTERPRETER_TMA_BLOCKS]
        return [Config.of(4, 2, BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, GROUP_M=2)]
    if tma and rows > FEW_ROWS:  # a TMA tile is 128 rows: decode shapes take the few-row pointer tiles
        return [_tma_config(*b) for b in TMA_BLOCKS]
    if size == 8:
        name = "float64"
    elif size == 4 and rows <= FEW_ROWS:
        name = "few rows, float32"
    else:
        name = ("few rows" if rows <= FEW_ROWS else "many rows") + (", float32" if size == 4 else "")
        name += "" if aligned else ", unaligned"
    # Any tile computes any shape (loads and stores are masked): where the filters leave none, the last.
    blocks = [
        (m, n, k, w, s) for m, n, k, w, s in _POINTER_BLOCKS[name]
        if m <= max(16, rows) and _fits(s, (m * k, size), (k * n, size))
    ] or _POINTER_BLOCKS[name][-1:]  # fmt: skip
    return [Config.of(w, s, BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=8) for m, n, k, w, s in blocks]


def _aligned(tensor: torch.Tensor, strides: tuple[int, ...]) -> bool:
    """Whether loads along the tensor's contiguous dimension can be 16-byte vectors: base and
    every other stride multiples of 16 bytes."""
    size = tensor.element_size()
    return tensor.data_ptr() % 16 == 0 and all(s == 1 or s * size % 16 == 0 for s in strides)


def _tma_ready(tensor: torch.Tensor, strides: tuple[int, int]) -> bool:
    """Whether a 2-D tensor with these strides (its own, or swapped: its transpose) can be a TMA
    operand: 16-bit elements, unit stride along its columns, base and row stride 16-byte aligned."""
    return strides[1] == 1 and strides[0] % 8 == 0 and tensor.data_ptr() % 16 == 0


def _tma_layout(a, a_strides, b, b_strides, t, tb, out, out_strides):
    """``"[K, N]"`` or ``"[N, K]"``, how b suits the TMA kernel (stored as is, or transposed), or
    ``None`` when a, b, the tail or out do not suit it (then the pointer kernel runs). The tail
    suits it in a's dtype, t ``[M, r]`` as is and tb ``[r, N]`` stored as ``[N, r]``."""
    if not HAS_TMA or b is None or out.shape[0] <= FEW_ROWS or a.element_size() != 2 or b.dtype != a.dtype:
        return None
    if not (_tma_ready(a, a_strides) and _tma_ready(out, out_strides)):
        return None
    if t.shape[1] and not (t.dtype == tb.dtype == a.dtype and _tma_ready(t, t.stride()) and _tma_ready(tb, tb.stride()[::-1])):
        return None
    if _tma_ready(b, b_strides):
        return "[K, N]"
    if _tma_ready(b, b_strides[::-1]):
        return "[N, K]"
    return None


def _tail_width(rank: int, block_k: int, size: int) -> int:
    """Rank columns per tail step of the pointer kernels: a main-loop step's under operands of
    ``size`` bytes of 4 and more, half of it under 16-bit ones, and at most 64 (a whole step
    spilled on sm_90 at BLOCK_K = 128, 128 columns at BLOCK_K = 256)."""
    return min(_rank_pad(rank), block_k if size >= 4 else max(16, block_k // 2), 64)


def extended_matmul(a, b, t, tb, bias, out, config: Config | None = None):
    """``out = a·b + t·tb + bias`` in one GEMM over K = a's columns + r.

    a ``[M, K]``, b ``[K, N]`` or ``None`` (the tail alone), t ``[M, r]`` and tb ``[r, N]`` in
    any float dtype (rounded to a's on the way in: the TMA kernel takes them already in a's dtype,
    t with 16-byte aligned rows and tb stored as ``[N, r]``, see :func:`scaled_columns`), bias
    ``[N]`` or ``None``, out ``[M, N]`` in a's dtype; any strides (pass transposed views to
    multiply by a transpose). ``config`` overrides the tuned choice (for benchmarks; see
    :func:`matmul_candidates`).
    """
    tensors = (a, b, t, tb, bias, out)
    # Timed on graphs in rounds: the candidates differ by a few percent, less than the device's
    # drift between two single timings (bench/results/gemm-stages-probe-*-flattened.txt).
    _launch("matmul", tensors, lambda c: _extended_matmul_plan(*tensors, c), lambda: _matmul_key(*tensors),
            lambda: matmul_candidates(*tensors), config, graphed=True)  # fmt: skip
    return out


def _operand_class(a, b, t, tb, out) -> tuple[str | None, bool, tuple, tuple]:
    """``(layout, aligned, a_strides, b_strides)``: how the operands suit the TMA kernel (see
    :func:`_tma_layout`), whether the pointer kernel may load a and b as 16-byte vectors, and the
    strides it read."""
    a_strides = a.stride()
    b_strides = b.stride() if b is not None else (0, 0)
    layout = _tma_layout(a, a_strides, b, b_strides, t, tb, out, out.stride())
    aligned = layout is not None or (_aligned(a, a_strides) and (b is None or _aligned(b, b_strides)))
    return layout, aligned, a_strides, b_strides


def _matmul_key(a, b, t, tb, bias, out) -> tuple:
    """The shape class of an extended matmul, under which its tuned configuration is kept."""
    layout, aligned, a_strides, b_strides = _operand_class(a, b, t, tb, out)
    inner = a.shape[1] if b is not None else 0
    return ("matmul", a.get_device(), a.dtype, _row_bucket(out.shape[0]), out.shape[1], inner, t.shape[1], layout, aligned,
            a_strides[1] == 1, b_strides[0] == 1)  # fmt: skip


def _extended_matmul_plan(a, b, t, tb, bias, out, config: Config, beside: bool = False, await_tail: bool = False):
    """``plan(a, b, t, tb, bias, out)``: ``config``'s launch for tensors laid out as these;
    ``beside`` (a TMA config): the launch may start beside the one before it (see
    :func:`_backward_beside`); ``await_tail`` (a TMA config) too, and ``plan(..., ready)``
    awaits t's rows as that launch counts them ready (see :func:`_forward_beside`)."""
    rows, cols = out.shape
    inner = a.shape[1] if b is not None else 0
    rank = t.shape[1]
    a_strides, out_strides = a.stride(), out.stride()
    b_strides = b.stride() if b is not None else (0, 0)
    meta = config.kwargs
    if config.tma:
        layout = _tma_layout(a, a_strides, b, b_strides, t, tb, out, out_strides)
        block_m, block_n, block_k = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"]
        flatten = meta["FLATTEN"] and not await_tail
        prefetch = meta.get("TAIL_PREFETCH", 0 < rank <= _PREFETCHED_RANK) and not (await_tail or flatten)
        tail_k = _rank_pad(rank) if prefetch else min(_rank_pad(rank), meta["TAIL_K"])
        tiles = _cdiv(rows, block_m) * _cdiv(cols, block_n)
        programs = min(tiles, _multiprocessor_count(a.device)) if config.persistent else tiles
        pdl = (beside or await_tail) and _has_pdl(a.device)
        launch = KernelLaunch(
            _extended_matmul_tma_kernel, (programs,), HAS_TAIL=rank > 0, HAS_BIAS=bias is not None,
            B_ROWS_N=layout == "[N, K]", BESIDE=pdl, AWAIT_TAIL=await_tail,
            **dict(meta, TAIL_K=tail_k, TAIL_PREFETCH=prefetch, HOLD_TAIL=prefetch and not _triton_interpreted(),
                   FLATTEN=flatten, TAIL_UNROLLED=_cdiv(rank, tail_k) if flatten and rank <= _UNROLLED_RANK else 0),
            **({"launch_pdl": True} if pdl else {}),
        )  # fmt: skip
        # Descriptors hold the tensors: made on each call from these boxes (shape, strides, block).
        a_box = ([rows, inner], list(a_strides), [block_m, block_k])
        if layout == "[N, K]":
            b_box = ([cols, inner], [b_strides[1], 1], [block_n, block_k])
        else:
            b_box = ([inner, cols], list(b_strides), [block_k, block_n])
        t_box = ([rows, rank], list(t.stride()), [block_m, tail_k])
        tb_box = ([cols, rank], [tb.stride()[1], 1], [block_n, tail_k])
        c_box = ([rows, cols], list(out_strides), [block_m, block_n // 2 if meta["SUBTILE"] else block_n])
        tma_store = meta["TMA_STORE"]
        scalars = (rows, cols, inner, rank, programs, out_strides[0], t.stride(0), tb.stride(1))
        described = rank > 0 and not prefetch  # the tail by TMA

        def plan_tma(a, b, t, tb, bias, out, ready=None):
            c = PlannedDescriptor(out, *c_box) if tma_store else out
            t_desc = PlannedDescriptor(t, *t_box) if described else None
            tb_desc = PlannedDescriptor(tb, *tb_box) if described else None
            if not prefetch:
                t = tb = None
            launch(PlannedDescriptor(a, *a_box), PlannedDescriptor(b, *b_box), t_desc, tb_desc, t, tb, c, bias, ready,
                   *scalars)  # fmt: skip

        return plan_tma
    launch = KernelLaunch(
        _extended_matmul_kernel, (_cdiv(rows, meta["BLOCK_M"]) * _cdiv(cols, meta["BLOCK_N"]),),
        HAS_BASE=b is not None, HAS_BIAS=bias is not None, PRECISION=_dot_precision(a.dtype),
        EVEN_K=inner % meta["BLOCK_K"] == 0, TAIL_K=_tail_width(rank, meta["BLOCK_K"], a.element_size()),
        TAIL_STAGES=config.stages, **meta,
    )  # fmt: skip
    scalars = (rows, cols, inner, rank, *a_strides, *b_strides, *t.stride(), *tb.stride(), *out_strides)

    def plan(a, b, t, tb, bias, out):
        launch(a, b if b is not None else a, t, tb, bias, out, *scalars)

    return plan


def matmul_candidates(a, b, t, tb, bias, out) -> list[Config]:
    """The configurations :func:`extended_matmul` chooses among for these operands."""
    layout, aligned, _, _ = _operand_class(a, b, t, tb, out)
    candidates = _matmul_candidates(out.shape[0], out.element_size(), layout is not None, aligned)
    if 0 < t.shape[1] <= _PREFETCHED_RANK:
        # The tail's step and depth do not apply: configurations that differ only there are one.
        distinct = {}
        for config in candidates:
            meta = tuple((name, value) for name, value in config.meta if name not in ("TAIL_K", "TAIL_STAGES"))
            distinct.setdefault(dataclasses.replace(config, meta=meta), config)
        candidates = list(distinct.values())
    return candidates


# ----------------------------------------------------------------------------------------------
# Rounding: a [·, r] operand rounded to the streamed dtype by a launch of its own
#
# Tensor-core products take both operands in the streamed (16-bit) dtype. Rounded inside a
# kernel, a float32 operand passes through registers on every step, and Triton's Hopper pipeline
# keeps a product in flight only while both its operands come from pipelined loads: one made in
# registers is waited for before the next step (sm_90 TTGIR: wgmma waits with ``pendings = 0``
# after each product). Rounded ahead, both operands stream from shared memory. So are made the
# rank tails' ``U ⊙ S`` and ``Vtᵀ ⊙ S`` (:func:`scaled_columns`), rank_down's float32 ``b`` in
# ``staged`` configurations, and the float32 sums of a split rank_down with a 16-bit output.


@triton.jit
def _round_kernel(src_ptr, s_ptr, dst_ptr, R, C, stride_r, stride_c, stride_dst_r, stride_dst_c, stride_part,
                  HAS_S: tl.constexpr, PARTS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
    """``dst[0] = src ⊙ S`` (S scales the columns) rounded to dst's dtype and, with ``PARTS = 2``,
    ``dst[1]`` its rounding residue rounded (``stride_part`` after it): the values a kernel would
    round in registers, bit for bit."""
    DTYPE: tl.constexpr = dst_ptr.dtype.element_ty
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < R)[:, None] & (cols < C)[None, :]
    value = tl.load(src_ptr + rows[:, None] * stride_r + cols[None, :] * stride_c, mask=mask)
    if HAS_S:
        value *= tl.load(s_ptr + cols, mask=cols < C).to(value.dtype)[None, :]
    high = value.to(DTYPE)
    dst = dst_ptr + rows[:, None] * stride_dst_r + cols[None, :] * stride_dst_c
    tl.store(dst, high, mask=mask)
    if PARTS == 2:
        tl.store(dst + stride_part, (value - high.to(value.dtype)).to(DTYPE), mask=mask)


def _aligned_width(cols: int, dtype: torch.dtype) -> int:
    """Row stride, in elements, that starts every row of ``cols`` elements on 16 bytes."""
    per_16_bytes = max(1, 16 // dtype.itemsize)
    return _cdiv(cols, per_16_bytes) * per_16_bytes


def _rounding(shape, src_strides, dst_strides, part_stride: int, parts: int, with_s: bool):
    """``round(src, S, dst)`` (see :func:`_round_kernel`) for tensors of this shape laid out so."""
    rows, cols = shape
    block_rows, block_cols = 32, 64
    launch = KernelLaunch(_round_kernel, (_cdiv(rows, block_rows), _cdiv(cols, block_cols)), HAS_S=with_s, PARTS=parts,
                          BLOCK_R=block_rows, BLOCK_C=block_cols, num_warps=4, num_stages=1)  # fmt: skip
    scalars = (rows, cols, *src_strides, *dst_strides, part_stride)
    return lambda src, S, dst: launch(src, S, dst, *scalars)


def _stage(src, dtype: torch.dtype, parts: int):
    """``(stage, strides)``: ``stage(src)`` returns a new buffer of ``dtype`` holding ``src``
    rounded and, with ``parts = 2``, its rounding residue rounded, for tensors laid out as
    ``src [R, C]``; ``strides`` are those of its two indices and between its parts (row major:
    src's columns, the ranks, contiguous, as tensor cores take them; a column-major ``Vt.T``
    staged the other way round made some tiles spill on sm_90). Made once by the plan of the
    launch it feeds, which fixed the layout."""
    rows, cols = src.shape
    width = _aligned_width(cols, dtype)
    round_ = _rounding(src.shape, src.stride(), (width, 1), rows * width, parts, False)

    def stage(src):
        out = src.new_empty((parts, rows, width), dtype=dtype)
        round_(src, None, out)
        return out

    return stage, (width, 1, rows * width)


def scaled_columns(src, S, dtype: torch.dtype):
    """``src ⊙ S`` (S ``[C]`` scales the columns; ``None``: src as is) rounded to ``dtype``, as a new
    ``[R, C]`` tensor whose rows start on 16 bytes: the rank tail ``tb`` of :func:`extended_matmul`
    is its ``.T`` (``U ⊙ S`` for y, ``Vtᵀ ⊙ S`` for dx)."""
    key = ("columns", layout_key(src, S), dtype)
    plan = _plans.get(key)
    if plan is None:
        rows, cols = src.shape
        width = _aligned_width(cols, dtype)
        round_ = _rounding(src.shape, src.stride(), (width, 1), 0, 1, S is not None)

        def plan(src, S):
            out = src.new_empty((rows, width), dtype=dtype)[:, :cols]
            round_(src, S, out)
            return out

        _remember(key, plan)
    return plan(src, S)


def _stageable(streamed, skinny) -> bool:
    """Whether the skinny operand may be staged: wider than a 16-bit streamed operand."""
    return streamed.element_size() == 2 and skinny.element_size() > 2


# ----------------------------------------------------------------------------------------------
# rank_down: out[M, r] = a[M, K]·b[K, r]


@triton.jit
def _down_sum(a_ptr, b_ptr, rows, ranks, k_start, k_end, RANK, stride_am, stride_ak, stride_bk, stride_br, stride_bpart,
              PRECISION: tl.constexpr, STAGED: tl.constexpr, TILE: tl.constexpr, STEP: tl.constexpr,
              RANK_PAD: tl.constexpr, LOOP_STAGES: tl.constexpr):  # fmt: skip
    """``Σ_k a[rows, k]·b[k, ranks]`` over ``k_start ≤ k < k_end`` in steps of STEP, accumulated
    in float32 (float64 for float64 a); b wider than a enters as its rounding plus the residue.
    LOOP_STAGES: the loop's pipeline depth (None: the launch's num_stages)."""
    DTYPE: tl.constexpr = a_ptr.dtype.element_ty
    offs_k = k_start + tl.arange(0, STEP)
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + ranks[None, :] * stride_br
    acc = tl.zeros((TILE, RANK_PAD), dtype=tl.float64 if DTYPE == tl.float64 else tl.float32)
    for k in tl.range(k_start, k_end, STEP, num_stages=LOOP_STAGES):
        in_k = offs_k < k_end - (k - k_start)
        a = tl.load(a_ptrs, mask=in_k[None, :], other=0.0)
        b_mask = in_k[:, None] & (ranks < RANK)[None, :]
        b = tl.load(b_ptrs, mask=b_mask, other=0.0)
        b_high = b.to(DTYPE)
        acc = _multiply_accumulate(acc, a, b_high, PRECISION)
        if STAGED:  # b is the rounding of a wider operand; its residue follows (see _stage)
            acc = _multiply_accumulate(acc, a, tl.load(b_ptrs + stride_bpart, mask=b_mask, other=0.0), PRECISION)
        elif b.dtype.primitive_bitwidth > a.dtype.primitive_bitwidth:
            # b wider than a (float32 adapters under 16-bit x): its rounding residue too, or an
            # element of z or g that cancels (z = Σ x·Vt near 0) keeps only the residue's error.
            acc = _multiply_accumulate(acc, a, (b - b_high.to(b.dtype)).to(DTYPE), PRECISION)
        a_ptrs += STEP * stride_ak
        b_ptrs += STEP * stride_bk
    return acc


@triton.jit
def _rank_down_kernel(
    a_ptr, b_ptr, out_ptr,
    M, K, RANK, scale_hi, scale_lo,
    stride_am, stride_ak, stride_bk, stride_br, stride_om, stride_or,
    SPLIT,  # runtime: one compiled kernel serves every split (1 is specialized, with plain stores)
    stride_bpart,  # STAGED: from b's rounding to its residue
    ready_ptr, READY_ROWS, READERS,  # SIGNAL
    RANK_PAD: tl.constexpr, PRECISION: tl.constexpr, STAGED: tl.constexpr, SIGNAL: tl.constexpr, BESIDE: tl.constexpr,
    TILE: tl.constexpr, STEP: tl.constexpr,
):  # fmt: skip
    """Programs program_id(0), + num_programs(0), ... of row tiles, each program program_id(1)
    of SPLIT reducing one contiguous range of whole K blocks. SIGNAL (SPLIT = 1): once a tile's
    rows are stored, each block of READY_ROWS of them is counted ready in the int32 ``ready``
    with its READERS (see :func:`_extended_matmul_tma_kernel`'s AWAIT_TAIL); BESIDE: see
    :func:`_beside_start`."""
    _beside_start(BESIDE)
    k_start, k_end = _split_range(K, tl.program_id(1), SPLIT, STEP)
    arguments = (a_ptr, b_ptr, out_ptr, M, RANK, scale_hi, scale_lo, k_start, k_end, stride_am, stride_ak, stride_bk,
                 stride_br, stride_om, stride_or, SPLIT, stride_bpart)  # fmt: skip
    if SIGNAL:  # (a loop over one tile would hold more registers: z spilled at r = 128 on sm_90)
        for pid_m in range(tl.program_id(0), tl.cdiv(M, TILE), tl.num_programs(0)):
            _rank_down_tile(pid_m, *arguments, RANK_PAD, PRECISION, STAGED, TILE, STEP)
            tl.debug_barrier()  # every thread's stores happen before the counts that release them
            first = pid_m * TILE // READY_ROWS
            for block in range(first, min(first + TILE // READY_ROWS, tl.cdiv(M, READY_ROWS))):
                tl.atomic_xchg(_int32_at(ready_ptr) + block, READERS, sem="release")
    else:
        _rank_down_tile(tl.program_id(0), *arguments, RANK_PAD, PRECISION, STAGED, TILE, STEP)


@triton.jit
def _rank_down_tile(pid_m, a_ptr, b_ptr, out_ptr, M, RANK, scale_hi, scale_lo, k_start, k_end, stride_am, stride_ak,
                    stride_bk, stride_br, stride_om, stride_or, SPLIT, stride_bpart, RANK_PAD: tl.constexpr,
                    PRECISION: tl.constexpr, STAGED: tl.constexpr, TILE: tl.constexpr, STEP: tl.constexpr):  # fmt: skip
    """Row tile pid_m of :func:`_rank_down_kernel` over ``k_start ≤ k < k_end``."""
    offs_m = pid_m * TILE + tl.arange(0, TILE)
    ranks = tl.arange(0, RANK_PAD)
    acc = _down_sum(a_ptr, b_ptr, (offs_m % M).to(tl.int64), ranks, k_start, k_end, RANK, stride_am, stride_ak,
                    stride_bk, stride_br, stride_bpart, PRECISION, STAGED, TILE, STEP, RANK_PAD, None)  # fmt: skip
    acc *= _scale(scale_hi, scale_lo, acc.dtype)
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + ranks[None, :] * stride_or
    mask = (offs_m < M)[:, None] & (ranks < RANK)[None, :]
    if SPLIT == 1:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(out_ptrs, acc, mask=mask, sem="relaxed")


# (tile, step, warps, stages) of the skinny kernels by operand class: tiles of 256 rows keep the
# re-read of the [·, r] operand small; the pruning drops tiles whose accumulator would spill and
# steps whose pipelined operands overflow shared memory. row_reduction adds a tile of 8 warps for
# ranks above 128 under its dS epilogue (rank_down's spills there).
_SKINNY_16BIT = [  # the H100 sweep's winners (bench/sweep_linear.py), then tiles for small extents
    (256, 64, 8, 3), (256, 32, 8, 4), (128, 128, 8, 3), (128, 32, 8, 4), (64, 64, 4, 3), (32, 32, 4, 3), (16, 32, 4, 3),
]
_SKINNY_BLOCKS = {
    "rank_down": {"16-bit": _SKINNY_16BIT},
    "row_reduction": {"16-bit": _SKINNY_16BIT + [(64, 32, 8, 3)]},
}
for _blocks in _SKINNY_BLOCKS.values():
    _blocks.update({
        # Rows not 16-byte aligned load without vectors (nor async copies): smaller steps, or spills.
        "16-bit, unaligned": [(128, 64, 8, 3), (128, 32, 8, 4), (64, 32, 8, 3), (32, 32, 4, 3), (16, 32, 4, 3)],
        # (32-row tiles of 8 warps spill in rank_down's scaling epilogue on sm_90.)
        "float32": [(16, 64, 4, 3), (16, 32, 4, 3)],
        "float64": [(16, 8, 4, 1)],
    })  # fmt: skip
_INTERPRETER_SKINNY_BLOCKS = [(32, 32, 4, 1)]


def _registers_fit(tile: int, step: int, rank_pad: int, warps: int, size: int, epilogue_operand: bool) -> bool:
    """Whether a skinny kernel compiles without spilling on an H100 (calibrated on ptxas, see
    tests/linear_hopper_compile.py): the accumulator and the ``[step, r]`` operand converted in
    registers share a thread's registers, and an epilogue that reads a tile of the accumulator's
    shape (row_reduction's w) needs room for it; products of float32 (on CUDA cores) hold their
    operands in registers too."""
    threads = 32 * warps
    accumulator, operand = tile * rank_pad / threads, step * rank_pad / threads
    if size == 2:
        return accumulator + max(operand, accumulator if epilogue_operand else 0) <= 160
    return accumulator + operand <= 48


# Passes over at least this many streamed elements take a staged configuration first when untuned.
_STAGED_FIRST_ELEMENTS = 1 << 24


def _skinny_candidates(kernel, extent, length, rank_pad, size, skinny_size, device, aligned=True,
                       epilogue_operand=False, stageable=False, tma=False) -> list[Config]:  # fmt: skip
    """Configs of a skinny kernel whose ``[tile, rank_pad]`` accumulator covers ``extent`` in
    tiles and loops over ``length`` in steps (split across programs where the tiles are few);
    ``stageable``: each also staged (see :func:`_stage`), staged first on large passes; ``tma``:
    the operands suit row_reduction's TMA kernel, whose configurations follow."""
    configs = _unstaged_skinny_candidates(kernel, extent, length, rank_pad, size, skinny_size, device, aligned,
                                          epilogue_operand)  # fmt: skip
    if stageable:
        staged = [dataclasses.replace(c, staged=True) for c in configs]
        # The staging launch costs about what a small pass saves (and host time): untuned, small
        # passes keep the operand in registers.
        configs = staged + configs if extent * length >= _STAGED_FIRST_ELEMENTS else configs + staged
    if tma:
        configs += _tma_skinny_candidates(extent, length, rank_pad, device, epilogue_operand)
    return configs


# (tile, step, warps, stages) of the TMA row_reduction, pruned as the pointer ones. (A TMA
# rank_down, b staged, lost to the pointer kernel at 4096 rows on an H100 and won by 5–7 % at
# 16384: not kept.)
_TMA_SKINNY_BLOCKS = [(256, 64, 8, 3), (128, 64, 8, 4), (128, 64, 4, 4), (128, 128, 8, 3), (64, 64, 4, 4)]
_INTERPRETER_TMA_SKINNY_BLOCKS = [(32, 16, 4, 2)]


def _tma_skinny_candidates(extent, length, rank_pad, device, epilogue_operand) -> list[Config]:
    if _triton_interpreted():
        return _interpreter_skinny_configs(_INTERPRETER_TMA_SKINNY_BLOCKS, tma=True)
    extent_pad = max(16, _next_power_of_2(extent))
    blocks = [block for block in _TMA_SKINNY_BLOCKS if block[0] <= max(64, extent_pad)]  # TMA zero-fills edge tiles
    return _fitting_skinny_configs(blocks, extent, length, rank_pad, 2, 2, device, epilogue_operand, tma=True)


def _unstaged_skinny_candidates(kernel, extent, length, rank_pad, size, skinny_size, device, aligned,
                                epilogue_operand) -> list[Config]:  # fmt: skip
    if _triton_interpreted():
        return _interpreter_skinny_configs(_INTERPRETER_SKINNY_BLOCKS)
    name = {2: "16-bit" if aligned else "16-bit, unaligned", 4: "float32", 8: "float64"}[size]
    extent_pad = max(16, _next_power_of_2(extent))
    # Small 16-bit tiles serve small extents only.
    blocks = [
        block for block in _SKINNY_BLOCKS[kernel][name]
        if block[0] <= extent_pad and not (size == 2 and block[0] < min(64, extent_pad))
    ]  # fmt: skip
    configs = _fitting_skinny_configs(blocks, extent, length, rank_pad, size, skinny_size, device, epilogue_operand)
    if not configs:  # wide ranks of float32: every tile spills; the smallest is slow but right
        tile, step, warps, stages = _SKINNY_BLOCKS[kernel][name][-1]
        configs = [Config.of(warps, 1, 1, TILE=tile, STEP=step)]
    # Untuned (SORSA_KERNELS_AUTOTUNE=0) the first wins: one that fills the GPU.
    return configs


def _interpreter_skinny_configs(blocks, **flags) -> list[Config]:
    split = 1 if torch.are_deterministic_algorithms_enabled() else 2  # covers the atomics
    return [Config.of(w, s, split, TILE=t, STEP=k, **flags) for t, k, w, s in blocks]


def _fitting_skinny_configs(blocks, extent, length, rank_pad, size, skinny_size, device, epilogue_operand,
                            **flags) -> list[Config]:  # fmt: skip
    """The (tile, step, warps, stages) ``blocks`` of a skinny kernel whose accumulator fits the
    registers and whose pipelined operands fit shared memory, each with its splits."""
    configs = []
    for tile, step, warps, stages in blocks:
        if not _registers_fit(tile, step, rank_pad, warps, size, epilogue_operand):
            continue
        if stages * (tile * step * size + step * rank_pad * skinny_size) > _SHARED_BYTES:
            continue
        splits = [1] if size == 8 else _split_choices(_cdiv(extent, tile), _cdiv(length, step), device)
        configs += [Config.of(warps, stages, split, TILE=tile, STEP=step, **flags) for split in reversed(splits)]
    return configs


def rank_down(a, b, out, scale: float = 1.0, config: Config | None = None):
    """``out = scale·a·b``: a ``[M, K]`` (any float dtype), b ``[K, r]`` (any float dtype; wider
    than a's, it enters as a's rounding plus the residue), out ``[M, r]`` in a's dtype or its
    accumulation dtype (the sum is rounded once, at the end); any strides. ``config`` overrides
    the tuned choice (see :func:`rank_down_candidates`)."""
    tensors = (a, b, out)

    def tuning_key():
        rows, inner = a.shape
        a_strides = a.stride()
        return ("down", a.get_device(), a.dtype, b.dtype, out.dtype, _row_bucket(rows), inner, b.shape[1],
                _aligned(a, a_strides), a_strides[1] == 1, b.stride()[0] == 1)  # fmt: skip

    _launch("down", tensors, lambda c: _rank_down_plan(*tensors, scale, c), tuning_key, lambda: rank_down_candidates(a, b),
            config, scale=scale)  # fmt: skip
    return out


def _rank_down_plan(a, b, out, scale, config: Config, signal: tuple[int, int, int] | None = None):
    """``plan(a, b, out)``: ``config``'s launch for tensors laid out as these; with ``signal``
    ``(programs, ready_rows, readers)`` (an unsplit config), ``plan(a, b, out, ready)``: that
    many programs walk the row tiles in order, counting each block of ``ready_rows`` rows ready
    for ``readers`` tiles in ``ready`` (see :func:`_rank_down_kernel`), and on sm_90 the next
    launch may start at once, beside this one."""
    rows, inner = a.shape
    rank = b.shape[1]
    meta = config.kwargs
    tiles = _cdiv(rows, meta["TILE"])
    programs, ready_rows, readers = signal or (tiles, 0, 0)
    launch = KernelLaunch(
        _rank_down_kernel, (min(programs, tiles), config.split), RANK_PAD=_rank_pad(rank),
        PRECISION=_dot_precision(a.dtype), STAGED=config.staged, SIGNAL=signal is not None,
        BESIDE=signal is not None and _has_pdl(a.device), **meta,
    )  # fmt: skip
    stage, b_strides = _stage(b, a.dtype, 2) if config.staged else (None, (*b.stride(), 0))
    scalars = (rows, inner, rank, *_float32_pair(scale), *a.stride(), *b_strides[:2])
    split = config.split > 1
    # Split programs add float32 partial sums: into a zeroed buffer, rounded into a 16-bit out after.
    accumulation = accumulation_dtype(a.dtype)
    round_sums = _rounding(out.shape, (rank, 1), out.stride(), 0, 1, False) if split and out.dtype != accumulation else None
    sums_strides = (rank, 1) if round_sums else out.stride()

    def plan(a, b, out, ready=None):
        b = stage(b) if stage else b
        if round_sums:
            sums = out.new_zeros((rows, rank), dtype=accumulation)
            launch(a, b, sums, *scalars, *sums_strides, config.split, b_strides[2], None, ready_rows, readers)
            round_sums(sums, None, out)
        else:
            if split:
                out.zero_()
            launch(a, b, out, *scalars, *sums_strides, config.split, b_strides[2], ready, ready_rows, readers)

    return plan


def rank_down_candidates(a, b) -> list[Config]:
    """The configurations :func:`rank_down` chooses among for these operands."""
    rows, inner = a.shape
    return _skinny_candidates(
        "rank_down", rows, inner, _rank_pad(b.shape[1]), a.element_size(), b.element_size(), a.device, _aligned(a, a.stride()),
        stageable=_stageable(a, b),
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# few_rows_forward: the no-grad forward of at most FEW_ROWS rows (decode) in two launches

# The launch of t: its rows and ranks per program (tensor-core products take 16 of each), its
# (K step, warps, stages), a footprint small enough for its programs to share SMs with the
# product's tiles, and the fewest K steps per program, which sets its K split (a program over the
# whole K loop took 15-34 µs on an H100, see bench/probe_decode_parts.py).
_DOWN_ROWS = 16
_DOWN_RANKS = 32
_DOWN_LAUNCH = (64, 4, 4)
_DOWN_STEPS = 4
# Elements of t the product's last tile zeroes per store (at 1024 or 256, some tiles spilled
# registers on sm_90).
_ZERO_BLOCK = 4096


@triton.jit
def _few_rows_down_kernel(
    x_ptr, vt_ptr, s_ptr, t_ptr, M, K, RANK, scale_hi, scale_lo, stride_xm, stride_xk, stride_vk, stride_vr,
    SPLIT,  # runtime: programs sharing each block's K loop (1 is specialized, with plain stores)
    HAS_S: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr,
    DOWN_ROWS: tl.constexpr, DOWN_RANKS: tl.constexpr, DOWN_STEP: tl.constexpr, DOWN_STAGES: tl.constexpr,
):  # fmt: skip
    """``t = scale·(x Vtᵀ) ⊙ S`` in float32, one block of DOWN_ROWS rows and DOWN_RANKS ranks per
    program over one of SPLIT ranges of K (above one, added into the zeroed t). With PDL the
    product's launch may start at once."""
    if PDL:
        gdc_launch_dependents()
    rows = tl.program_id(0) * DOWN_ROWS + tl.arange(0, DOWN_ROWS)
    ranks = tl.program_id(1) * DOWN_RANKS + tl.arange(0, DOWN_RANKS)
    k_start, k_end = _split_range(K, tl.program_id(2), SPLIT, DOWN_STEP)
    part = _down_sum(x_ptr, vt_ptr, (rows % M).to(tl.int64), ranks, k_start, k_end, RANK, stride_xm, stride_xk,
                     stride_vk, stride_vr, 0, PRECISION, False, DOWN_ROWS, DOWN_STEP, DOWN_RANKS,
                     DOWN_STAGES)  # fmt: skip
    part *= _scale(scale_hi, scale_lo, part.dtype)
    if HAS_S:
        part *= tl.load(s_ptr + ranks, mask=ranks < RANK, other=0.0).to(part.dtype)[None, :]
    mask = (rows < M)[:, None] & (ranks < RANK)[None, :]
    if SPLIT == 1:
        tl.store(t_ptr + rows[:, None] * RANK + ranks[None, :], part, mask=mask)
    else:
        tl.atomic_add(t_ptr + rows[:, None] * RANK + ranks[None, :], part, mask=mask, sem="relaxed")


@triton.jit
def _few_rows_counts(work_ptr, M, N, RANK, SPLIT):
    """Where the int32 counts start in :func:`_few_rows_forward_kernel`'s workspace, after t
    ``[M, RANK]`` and (SPLIT > 1) the sums ``[M, N]``: the finished tiles', then each tile's parts'."""
    offset = M * RANK
    if SPLIT > 1:
        offset += M * N
    return _int32_at(work_ptr + offset)


@triton.jit
def _few_rows_sums(work_ptr, M, N, RANK, offs_m, offs_n):
    """The addresses of a tile's float32 sums ``[M, N]`` in :func:`_few_rows_forward_kernel`'s
    workspace, after t ``[M, RANK]`` (SPLIT > 1)."""
    return work_ptr + M * RANK + offs_m[:, None] * N + offs_n[None, :]


@triton.jit
def _few_rows_forward_kernel(
    x_ptr, w_ptr, x_desc, w_desc, u_ptr, bias_ptr, work_ptr, y_ptr,
    M, N, K, RANK,
    SPLIT,  # runtime: programs sharing each tile's K loop (1 is specialized, without the sums)
    stride_xm, stride_xk, stride_wk, stride_wn, stride_un, stride_ur, stride_ym, stride_yn,
    HAS_BASE: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
    TAIL_K: tl.constexpr, TAIL_STAGES: tl.constexpr, TMA: tl.constexpr, PDL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ZERO_BLOCK: tl.constexpr,
):  # fmt: skip
    """``y = x Wᵀ + t Uᵀ + bias`` for the float32 ``t [M, RANK]`` that the
    :func:`_few_rows_down_kernel` launched just before wrote at the start of the zeroed workspace
    ``work`` (its layout: :func:`_few_rows_counts`): a tile of y per program (with SPLIT > 1, one
    K range of it and one range of the rank tail's ranks, added into the float32 ``sums [M, N]``,
    the tile's last program to count itself in ``done[tile]`` going on with the whole). The
    launch leaves the workspace zeroed: each tile's last program zeroes its sums and count, and
    the last tile to count itself in ``finished`` zeroes t. With PDL this launch runs beside t's
    and waits for it (griddepcontrol) only before the rank tail, which the tile's main loop
    normally outlasts. With TMA the tile's x and W blocks arrive by TMA from ``x_desc``
    ``[M, K]`` and ``w_desc`` ``[N, K]`` (out-of-range reads are zeros) instead of pointer loads."""
    pid = tl.program_id(0)
    tile = pid // SPLIT
    tiles = tl.num_programs(0) // SPLIT
    pid_m, pid_n = _grouped_tile(tile, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_BASE:
        k_start, k_end = _split_range(K, pid % SPLIT, SPLIT, BLOCK_K)
        if TMA:
            for k in range(k_start, k_end, BLOCK_K):
                x_block = x_desc.load([pid_m * BLOCK_M, k])
                acc = _multiply_accumulate(acc, x_block, w_desc.load([pid_n * BLOCK_N, k]).T, PRECISION)
        else:
            acc = _base_sum(acc, x_ptr + k_start * stride_xk, w_ptr + k_start * stride_wk, rows, cols,
                            k_end - k_start, stride_xm, stride_xk, stride_wk, stride_wn, PRECISION, EVEN_K,
                            BLOCK_K)  # fmt: skip
    in_tile = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    DTYPE: tl.constexpr = y_ptr.dtype.element_ty
    if PDL:
        gdc_wait()  # t's launch has finished and its stores are visible
    # Each part adds its share of the rank tail, so that no part does all of it after the others.
    r_start, r_end = _split_range(RANK, pid % SPLIT, SPLIT, TAIL_K)
    acc = _rank_tail(acc, work_ptr + r_start, u_ptr + r_start * stride_ur, rows, cols, r_end - r_start, RANK, 1,
                     stride_ur, stride_un, DTYPE, PRECISION, TAIL_K, TAIL_STAGES)  # fmt: skip
    # (Workspace addresses are recomputed where used: fewer registers live across the loop.)
    last = True
    if SPLIT > 1:
        sums = _few_rows_sums(work_ptr, M, N, RANK, offs_m, offs_n)
        tl.atomic_add(sums, acc, mask=in_tile, sem="relaxed")
        tl.debug_barrier()  # every thread's adds (and so its reads of t) happen before the count
        done = _few_rows_counts(work_ptr, M, N, RANK, SPLIT) + 1 + tile
        last = tl.atomic_add(done, 1, sem="acq_rel") == SPLIT - 1  # the tile's last part goes on
        if last:
            acc = tl.load(sums, mask=in_tile, other=0.0, cache_modifier=".cg")
    if last:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
        y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n.to(tl.int64)[None, :] * stride_yn
        tl.store(y_ptrs, acc.to(DTYPE), mask=in_tile)
        finished = _few_rows_counts(work_ptr, M, N, RANK, SPLIT)
        if SPLIT > 1:  # the tile's sums and count, zeroed here where few registers are live
            sums = _few_rows_sums(work_ptr, M, N, RANK, offs_m, offs_n)
            tl.store(sums, tl.zeros((BLOCK_M, BLOCK_N), tl.float32), mask=in_tile)
            tl.store(finished + 1 + tile, 0)
        tl.debug_barrier()  # every thread's reads of t happen before the count that releases them
        if tl.atomic_add(finished, 1, sem="acq_rel") == tiles - 1:  # every tile has read t: zero it
            for start in range(0, M * RANK, ZERO_BLOCK):
                offsets = start + tl.arange(0, ZERO_BLOCK)
                tl.store(work_ptr + offsets, tl.zeros((ZERO_BLOCK,), tl.float32), mask=offsets < M * RANK)
            tl.store(finished, 0)


def few_rows_forward(x, weight, U, S, Vt, bias, scale, y, config: Config | None = None):
    """``y = x·weightᵀ + (scale·x Vtᵀ ⊙ S)·Uᵀ + bias`` for x of at most :data:`FEW_ROWS` rows in a
    16-bit dtype or float32: the forward of decode, where separate launches for ``x Vtᵀ``,
    ``U ⊙ S`` and the product cost more than the product itself. Two launches, t's then the
    product's, which on sm_90 and later starts beside t's (programmatic dependent launch) and
    waits for it only before its rank tail. Their workspace (t, and the sums where the product's K
    loop is split across programs) is kept zeroed between calls (see
    :func:`~sorsa_kernels.triton.common.zeroed_workspace`), not filled for each. Arguments as the
    backend interface's (S and bias contiguous), y ``[M, out]`` in x's dtype. ``config`` overrides
    the tuned choice of the product's tiles (see :func:`few_rows_candidates`)."""
    tensors = (x, weight, U, S, Vt, bias, y)

    def tuning_key():
        return ("few", x.get_device(), x.dtype, U.dtype, _row_bucket(x.shape[0]), *U.shape, x.shape[1], weight is None,
                _aligned(x, x.stride()), _few_rows_tma(x, weight))  # fmt: skip

    # Decode runs from CUDA graphs in serving engines, and its launches are short: tuned on graphs.
    _launch("few", tensors, lambda c: _few_rows_plan(*tensors, scale, c), tuning_key,
            lambda: few_rows_candidates(x, weight, y), config, scale=scale, graphed=True)  # fmt: skip
    return y


def _few_rows_tma(x, weight) -> bool:
    """Whether :func:`few_rows_forward` may read x and the weight by TMA (as ``[M, K]`` and
    ``[N, K]``: 16-bit, one dtype, rows 16-byte aligned)."""
    return (HAS_TMA and weight is not None and x.element_size() == 2 and weight.dtype == x.dtype
            and _tma_ready(x, x.stride()) and _tma_ready(weight, weight.stride()))  # fmt: skip


def _down_split(steps: int, blocks: int, device) -> int:
    """K ranges of t's launch: enough programs to read Vt at speed, each of
    :data:`_DOWN_STEPS` steps or more; none where reductions must be deterministic (the float
    atomics are not)."""
    if torch.are_deterministic_algorithms_enabled():
        return 1
    if _triton_interpreted():  # tiny shapes: still several parts, which the tests need
        return 2
    return max(1, min(steps // _DOWN_STEPS, _multiprocessor_count(device) // blocks))


@functools.cache
def _has_pdl(device: torch.device) -> bool:
    """Whether launches on ``device`` may use programmatic dependent launch (sm_90 on, compiled:
    the interpreter runs launches one after the other)."""
    return (HAS_PDL and not _triton_interpreted() and device.type == "cuda"
            and torch.cuda.get_device_capability(device) >= (9, 0))  # fmt: skip


def _few_rows_plan(x, weight, U, S, Vt, bias, y, scale, config: Config):
    """``plan(x, weight, U, S, Vt, bias, y)``: ``config``'s launches for tensors laid out as these."""
    rows, inner = x.shape
    cols, rank = U.shape
    meta = config.kwargs
    precision = _dot_precision(x.dtype)
    pdl = _has_pdl(x.device)
    down_step, down_warps, down_stages = _DOWN_LAUNCH
    blocks = (_cdiv(rows, _DOWN_ROWS), _cdiv(rank, _DOWN_RANKS))
    down_split = _down_split(_cdiv(inner, down_step), blocks[0] * blocks[1], x.device)
    down = KernelLaunch(
        _few_rows_down_kernel, (*blocks, down_split), HAS_S=S is not None,
        PRECISION=precision, PDL=pdl, DOWN_ROWS=_DOWN_ROWS, DOWN_RANKS=_DOWN_RANKS, DOWN_STEP=down_step,
        DOWN_STAGES=down_stages, num_warps=down_warps, num_stages=down_stages,
    )  # fmt: skip
    down_scalars = (rows, inner, rank, *_float32_pair(scale), *x.stride(), *Vt.T.stride(), down_split)
    tiles = _cdiv(rows, meta["BLOCK_M"]) * _cdiv(cols, meta["BLOCK_N"])
    launch = KernelLaunch(
        _few_rows_forward_kernel, (tiles * config.split,), HAS_BASE=weight is not None, HAS_BIAS=bias is not None,
        PRECISION=precision, EVEN_K=inner % meta["BLOCK_K"] == 0, TAIL_K=_tail_width(rank, meta["BLOCK_K"],
        x.element_size()), TAIL_STAGES=config.stages, TMA=config.tma, PDL=pdl, ZERO_BLOCK=_ZERO_BLOCK, **meta,
        **({"launch_pdl": True} if pdl else {}),
    )  # fmt: skip
    # TMA descriptors hold the tensors: made on each call from these boxes (shape, strides, block).
    boxes = None
    if config.tma:
        boxes = (([rows, inner], list(x.stride()), [meta["BLOCK_M"], meta["BLOCK_K"]]),
                 ([cols, inner], list(weight.stride()), [meta["BLOCK_N"], meta["BLOCK_K"]]))  # fmt: skip
    w_strides = weight.T.stride() if weight is not None else (0, 0)
    scalars = (rows, cols, inner, rank, config.split, *x.stride(), *w_strides, *U.stride(), *y.stride())
    # The launches' float32 workspace (see _few_rows_forward_kernel; counts as int32 bits, zero
    # alike), which they leave zeroed.
    workspace_size = rows * rank + 1 + (rows * cols + tiles if config.split > 1 else 0)
    device = x.device

    def plan(x, weight, U, S, Vt, bias, y):
        workspace = zeroed_workspace(device, workspace_size)
        down(x, Vt, S, workspace, *down_scalars)
        weight = weight if weight is not None else x
        tiled = (x, weight)
        if boxes is not None:
            tiled = (PlannedDescriptor(x, *boxes[0]), PlannedDescriptor(weight, *boxes[1]))
        launch(x, weight, *tiled, U, bias, workspace, y, *scalars)

    return plan


# TMA tiles of few_rows_forward: (BLOCK_N, BLOCK_K, warps, stages), BLOCK_M the rows' bucket;
# the H100 winners of bench/probe_decode_tma.py at 8 and 64 rows. Beyond 64·128 accumulator
# elements a 4-warp program spills on sm_90 (64x256 did).
_FEW_ROWS_TMA_BLOCKS = [(32, 128, 4, 6), (64, 128, 4, 4), (128, 128, 4, 4), (128, 64, 4, 4), (256, 64, 4, 4)]
_FEW_ROWS_TMA_ACCUMULATOR = 64 * 128


def few_rows_candidates(x, weight, y) -> list[Config]:
    """The configurations :func:`few_rows_forward` chooses among: the pointer kernel's tiles and,
    for operands that suit it, TMA tiles covering all the rows, each with the product's K loop
    split across programs where the tiles are too few to fill the GPU (under the interpreter,
    always split: the tests cover the sums)."""
    rows, inner = x.shape
    aligned = _aligned(x, x.stride()) and (weight is None or _aligned(weight, weight.stride()))
    configs = _matmul_candidates(rows, y.element_size(), tma=False, aligned=aligned)
    if _few_rows_tma(x, weight):
        bucket = _row_bucket(rows)
        blocks = [(32, 16, 4, 2)] if _triton_interpreted() else _FEW_ROWS_TMA_BLOCKS
        configs += [Config.of(w, s, tma=True, BLOCK_M=bucket, BLOCK_N=n, BLOCK_K=k, GROUP_M=1)
                    for n, k, w, s in blocks if bucket * n <= _FEW_ROWS_TMA_ACCUMULATOR]  # fmt: skip
    with_splits = []
    for config in configs:
        meta = config.kwargs
        tiles = _cdiv(rows, meta["BLOCK_M"]) * _cdiv(y.shape[1], meta["BLOCK_N"])
        if weight is None or torch.are_deterministic_algorithms_enabled():
            splits = [1]
        elif _triton_interpreted():
            splits = [2]
        else:
            splits = _split_choices(tiles, _cdiv(inner, meta["BLOCK_K"]), x.device)
        with_splits += [dataclasses.replace(config, split=split) for split in splits]
    return with_splits


# ----------------------------------------------------------------------------------------------
# merge_weight: the no-grad forward of many rows as one dense product by a merged weight
#
# Without a gradient, y = x·(W + scale·(U ⊙ S) Vt)ᵀ + bias needs neither z nor a rank tail: the
# merged weight costs a read of W and a write of its merge (no pass over x), whatever the rows,
# and the product is then the frozen GEMM itself. At many rows that is cheaper than the fused
# forward's pass over x and its tail; the tuner times both ways per shape class. (torch.addmm
# copies W into its output before cuBLAS adds to it: on an H100 the merge of a 4096² weight then
# added 59-61 µs to the product, this kernel 31-41; bench/results/merged-infer-probe-*.txt.)

# (BLOCK_N, BLOCK_K, RANK_STEP, warps, stages) of the merge, and under the interpreter.
_MERGE_BLOCKS = [(128, 128, 64, 8, 2), (64, 128, 64, 4, 2), (128, 128, 32, 8, 3)]
_INTERPRETER_MERGE_BLOCKS = [(32, 16, 16, 4, 1)]


@triton.jit
def _merge_weight_kernel(
    w_ptr, u_ptr, v_ptr, out_ptr, N, K, RANK, scale_hi, scale_lo,
    stride_wn, stride_wk, stride_un, stride_ur, stride_vk, stride_vr, stride_on, stride_ok,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, RANK_STEP: tl.constexpr, GROUP_N: tl.constexpr,
):  # fmt: skip
    """``out = W + scale·u vᵀ`` for ``u [N, r]`` and ``v [K, r]`` in W's dtype, a tile
    ``[BLOCK_N, BLOCK_K]`` per program, the sum in float32 rounded once to out's dtype."""
    pid_n, pid_k = _grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(K, BLOCK_K), GROUP_N)
    # Offsets within the tile (int32) from its corner: a tile of 64-bit offsets took 128
    # registers a thread.
    rows = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    ranks = tl.arange(0, RANK_STEP)
    in_n = rows < N - pid_n * BLOCK_N
    in_k = cols < K - pid_k * BLOCK_K
    in_tile = in_n[:, None] & in_k[None, :]
    corner_n = pid_n.to(tl.int64) * BLOCK_N
    corner_k = pid_k.to(tl.int64) * BLOCK_K
    # W first: its load runs under the rank product.
    w_tile = w_ptr + corner_n * stride_wn + corner_k * stride_wk
    base = tl.load(w_tile + rows[:, None] * stride_wn + cols[None, :] * stride_wk, mask=in_tile)
    u_ptrs = u_ptr + corner_n * stride_un + rows[:, None] * stride_un + ranks[None, :] * stride_ur
    v_ptrs = v_ptr + corner_k * stride_vk + cols[:, None] * stride_vk + ranks[None, :] * stride_vr
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for r0 in range(0, RANK, RANK_STEP):
        in_rank = ranks < RANK - r0
        u = tl.load(u_ptrs, mask=in_n[:, None] & in_rank[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=in_k[:, None] & in_rank[None, :], other=0.0)
        acc = tl.dot(u, v.T, acc)
        u_ptrs += RANK_STEP * stride_ur
        v_ptrs += RANK_STEP * stride_vr
    acc = acc * _scale(scale_hi, scale_lo, tl.float32) + base.to(tl.float32)
    out_tile = out_ptr + corner_n * stride_on + corner_k * stride_ok
    tl.store(out_tile + rows[:, None] * stride_on + cols[None, :] * stride_ok, acc.to(base.dtype), mask=in_tile)


def merge_weight(weight, U, S, Vt, scale, out, config: Config | None = None):
    """``out = weight + scale·(U ⊙ S) Vt`` for a 16-bit weight ``[out, in]`` (out like it, any
    strides): U and ``Vtᵀ ⊙ S`` rounded to its dtype (as the fused forward's rank tail rounds
    ``U ⊙ S``), their product summed in float32 with the weight and rounded once. ``config``
    overrides the tuned choice (see :func:`merge_candidates`)."""
    up = scaled_columns(U, None, weight.dtype)
    down = scaled_columns(Vt.T, S, weight.dtype)
    tensors = (out, weight, up, down)
    _launch("merge", tensors, lambda c: _merge_plan(*tensors, scale, c),
            lambda: ("merge", out.get_device(), out.dtype, *out.shape, U.shape[1]), lambda: merge_candidates(U), config,
            scale=scale)  # fmt: skip
    return out


def _merge_plan(out, weight, up, down, scale, config: Config):
    """``plan(out, weight, up, down)``: ``config``'s launch for tensors laid out as these."""
    meta = config.kwargs
    cols, inner = out.shape
    launch = KernelLaunch(_merge_weight_kernel, (_cdiv(cols, meta["BLOCK_N"]) * _cdiv(inner, meta["BLOCK_K"]),), **meta)
    scalars = (cols, inner, up.shape[1], *_float32_pair(scale), *weight.stride(), *up.stride(), *down.stride(),
               *out.stride())  # fmt: skip

    def plan(out, weight, up, down):
        launch(weight, up, down, out, *scalars)

    return plan


def merge_candidates(U) -> list[Config]:
    """The configurations :func:`merge_weight` chooses among (each rank step at most the rank's
    padding)."""
    blocks = _INTERPRETER_MERGE_BLOCKS if _triton_interpreted() else _MERGE_BLOCKS
    rank_pad = _rank_pad(U.shape[1])
    configs = [Config.of(w, s, BLOCK_N=n, BLOCK_K=k, RANK_STEP=min(step, rank_pad), GROUP_N=8)
               for n, k, step, w, s in blocks]  # fmt: skip
    return list(dict.fromkeys(configs))


def merged_forward(x, weight, U, S, Vt, bias, scale):
    """``y = x·(weight + scale·(U ⊙ S) Vt)ᵀ + bias`` for 16-bit x, weight and bias (where given)
    in x's dtype: the merged weight made in a temporary of the weight's size by
    :func:`merge_weight`, then y by one product with it through ``F.linear`` (cuBLAS)."""
    merged = torch.empty_like(weight)
    merge_weight(weight, U, S, Vt, scale, merged)
    return torch.nn.functional.linear(x, merged, bias)


def _mergeable(x, weight, bias) -> bool:
    """Whether :func:`merged_forward` computes this forward (16-bit x, a weight, a bias in x's
    dtype or none)."""
    return x.element_size() == 2 and weight is not None and (bias is None or bias.dtype == x.dtype)


# ----------------------------------------------------------------------------------------------
# row_reduction: out[P, r] = Σ_m a[m, P]ᵀ (t[m, r]·scale) ⊙ S, red[r] = Σ_p (Σ_m ...)[p, r]·w[p, r]


@triton.jit
def _row_reduction_kernel(
    a_ptr, t_ptr, s_ptr, w_ptr, out_ptr, red_ptr,
    M, P, RANK,
    stride_am, stride_ap, stride_tm, stride_tr, stride_wp, stride_wr, stride_op, stride_or,
    SPLIT,  # runtime: one compiled kernel serves every split (1 is specialized, with plain stores)
    RANK_PAD: tl.constexpr, HAS_S: tl.constexpr, HAS_REDUCTION: tl.constexpr, PRECISION: tl.constexpr,
    BESIDE: tl.constexpr, TILE: tl.constexpr, STEP: tl.constexpr,
):  # fmt: skip
    """BESIDE: the launch runs beside the launches after it, and may start beside the one before
    it (see :func:`_beside_start` and :func:`_beside_end`)."""
    _beside_start(BESIDE)
    DTYPE: tl.constexpr = a_ptr.dtype.element_ty
    ACC: tl.constexpr = out_ptr.dtype.element_ty
    pid_p = tl.program_id(0)
    # Program program_id(1) of SPLIT reduces one contiguous range of whole row blocks.
    m_start, m_end = _split_range(M, tl.program_id(1), SPLIT, STEP)

    offs_p = pid_p * TILE + tl.arange(0, TILE)
    cols = (offs_p % P).to(tl.int64)
    ranks = tl.arange(0, RANK_PAD)
    in_rank = ranks < RANK
    acc = tl.zeros((TILE, RANK_PAD), dtype=ACC)
    for m in range(m_start, m_end, STEP):
        offs_m = m + tl.arange(0, STEP)
        in_rows = offs_m < m_end
        rows = offs_m.to(tl.int64)
        a_t = tl.load(a_ptr + cols[:, None] * stride_ap + rows[None, :] * stride_am, mask=in_rows[None, :], other=0.0)
        t = tl.load(t_ptr + rows[:, None] * stride_tm + ranks[None, :] * stride_tr,
                    mask=in_rows[:, None] & in_rank[None, :], other=0.0)  # fmt: skip
        acc = _multiply_accumulate(acc, a_t, t.to(DTYPE), PRECISION)
    _reduction_epilogue(acc, offs_p, P, RANK, s_ptr, w_ptr, out_ptr, red_ptr, stride_wp, stride_wr, stride_op,
                        stride_or, SPLIT, RANK_PAD, HAS_S, HAS_REDUCTION)  # fmt: skip
    _beside_end(BESIDE)


@triton.jit
def _row_reduction_tma_kernel(
    a_desc, t_desc, s_ptr, w_ptr, out_ptr, red_ptr,
    M, P, RANK, stride_wp, stride_wr, stride_op, stride_or,
    SPLIT,  # runtime, as in _row_reduction_kernel
    RANK_PAD: tl.constexpr, HAS_S: tl.constexpr, HAS_REDUCTION: tl.constexpr, BESIDE: tl.constexpr,
    TILE: tl.constexpr, STEP: tl.constexpr,
):  # fmt: skip
    """:func:`_row_reduction_kernel` for a 16-bit ``a [M, P]`` and t ``[M, r]`` of its dtype, whose
    ``[STEP, ·]`` row blocks arrive by TMA (reads out of range are zeros); a's block enters the
    product transposed from shared memory."""
    _beside_start(BESIDE)
    m_start, m_end = _split_range(M, tl.program_id(1), SPLIT, STEP)
    off_p = tl.program_id(0) * TILE
    acc = tl.zeros((TILE, RANK_PAD), dtype=tl.float32)
    for m in range(m_start, m_end, STEP):
        acc = tl.dot(a_desc.load([m, off_p]).T, t_desc.load([m, 0]), acc)
    _reduction_epilogue(acc, off_p + tl.arange(0, TILE), P, RANK, s_ptr, w_ptr, out_ptr, red_ptr, stride_wp, stride_wr,
                        stride_op, stride_or, SPLIT, RANK_PAD, HAS_S, HAS_REDUCTION)  # fmt: skip
    _beside_end(BESIDE)


@triton.jit
def _reduction_epilogue(acc, offs_p, P, RANK, s_ptr, w_ptr, out_ptr, red_ptr, stride_wp, stride_wr, stride_op,
                        stride_or, SPLIT, RANK_PAD: tl.constexpr, HAS_S: tl.constexpr,
                        HAS_REDUCTION: tl.constexpr):  # fmt: skip
    """row_reduction's epilogue for columns ``offs_p``: ``red += Σ_p acc ⊙ w``, then ``acc ⊙ S``
    stored (SPLIT = 1) or added to the zeroed output."""
    ACC: tl.constexpr = out_ptr.dtype.element_ty
    cols = (offs_p % P).to(tl.int64)
    ranks = tl.arange(0, RANK_PAD)
    in_rank = ranks < RANK
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


def row_reduction(a, t, S, out, w=None, red=None, config: Config | None = None):
    """``out = aᵀ t ⊙ S`` reducing over the M rows; with ``w``, also ``red += Σ_p (aᵀ t)⊙w``.

    a ``[M, P]`` (any float dtype), t ``[M, r]`` (rounded to a's dtype in registers: pass it in
    a's dtype, or every product waits for the rounding, see :func:`_round_kernel`), S ``[r]`` or
    ``None``, out ``[P, r]`` and red ``[r]`` (zeroed by the caller) in a's accumulation dtype,
    w ``[P, r]``; any strides. ``config`` overrides the tuned choice (see
    :func:`row_reduction_candidates`).
    """
    tensors = (a, t, S, w, out, red)

    def tuning_key():
        rows, columns = a.shape
        a_strides = a.stride()
        return ("reduction", a.get_device(), a.dtype, t.dtype, _row_bucket(rows), columns, t.shape[1],
                _aligned(a, a_strides), a_strides[1] == 1, w is None, _reduction_tma_ready(a, t))  # fmt: skip

    _launch("reduction", tensors, lambda c: _row_reduction_plan(*tensors, c), tuning_key,
            lambda: row_reduction_candidates(a, t, w is not None), config, None if red is None else red.zero_)  # fmt: skip
    return out


def _row_reduction_plan(a, t, S, w, out, red, config: Config, beside: str | None = None):
    """``plan(a, t, S, w, out, red)``: ``config``'s launch for tensors laid out as these; ``beside``
    ``"first"`` or ``"next"``: the first launch, or a later one, of launches that run beside each
    other (see :func:`_backward_beside`)."""
    rows, columns = a.shape
    rank = t.shape[1]
    meta = config.kwargs
    grid = (_cdiv(columns, meta["TILE"]), config.split)
    pdl = beside is not None and _has_pdl(a.device)
    constants = dict(RANK_PAD=_rank_pad(rank), HAS_S=S is not None, HAS_REDUCTION=w is not None, BESIDE=pdl, **meta,
                     **({"launch_pdl": True} if pdl and beside == "next" else {}))  # fmt: skip
    w_strides = w.stride() if w is not None else (0, 0)
    split = config.split > 1
    if config.tma:
        kernel = KernelLaunch(_row_reduction_tma_kernel, grid, **constants)
        a_box = ([rows, columns], [a.stride(0), 1], [meta["STEP"], meta["TILE"]])
        t_box = ([rows, rank], [t.stride(0), 1], [meta["STEP"], constants["RANK_PAD"]])
        scalars = (rows, columns, rank, *w_strides, *out.stride(), config.split)

        def launch(a, t, S, w, out, red):
            kernel(PlannedDescriptor(a, *a_box), PlannedDescriptor(t, *t_box), S, w, out, red, *scalars)
    else:
        kernel = KernelLaunch(_row_reduction_kernel, grid, PRECISION=_dot_precision(a.dtype), **constants)
        scalars = (rows, columns, rank, *a.stride(), *t.stride(), *w_strides, *out.stride(), config.split)

        def launch(a, t, S, w, out, red):
            kernel(a, t, S, w, out, red, *scalars)

    def plan(a, t, S, w, out, red):
        if split:
            out.zero_()
        launch(a, t, S, w, out, red)

    return plan


def _reduction_tma_ready(a, t) -> bool:
    """Whether row_reduction's operands suit its TMA kernel: a 16-bit, t of its dtype, both TMA
    operands as they lie."""
    if not HAS_TMA or a.element_size() != 2 or t.dtype != a.dtype:
        return False
    return _tma_ready(a, a.stride()) and _tma_ready(t, t.stride())


def row_reduction_candidates(a, t, reduction: bool = False) -> list[Config]:
    """The configurations :func:`row_reduction` chooses among for these operands (``reduction``:
    with ``w`` and ``red``)."""
    rows, columns = a.shape
    return _skinny_candidates(
        "row_reduction", columns, rows, _rank_pad(t.shape[1]), a.element_size(), t.element_size(), a.device,
        _aligned(a, a.stride()), reduction, tma=_reduction_tma_ready(a, t),
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# gradient_pass: g = scale·dy U, dU = (dyᵀ z) ⊙ S and dS = Σ_o U ⊙ (dyᵀ z) from one read of dy


@triton.jit
def _gradient_pass_kernel(
    dy_ptr, u_ptr, w_ptr, z_ptr, s_ptr, g_ptr, du_ptr, ds_ptr,
    M, N, RANK, COLUMNS, scale_hi, scale_lo,
    stride_dm, stride_dn, stride_un, stride_ur, stride_upart, stride_wn, stride_wr, stride_zm, stride_zr,
    stride_gm, stride_gr, stride_dun, stride_dur,
    RANK_PAD: tl.constexpr, HAS_S: tl.constexpr, HAS_REDUCTION: tl.constexpr, STAGED: tl.constexpr,
    SPLIT: tl.constexpr, TILE: tl.constexpr, STEP: tl.constexpr,
):  # fmt: skip
    """TILE rows of dy against one range of COLUMNS of its columns: the rows' g summed over the
    range (stored, or with SPLIT added into float32 sums that the ranges share), and each column
    step's ``dyᵀ z`` added into the zeroed float32 dU (⊙ S) and, against w (U as it is), into dS.
    With STAGED, u holds the wider U as its rounding and, ``stride_upart`` after it, the residue
    (see :func:`_stage`); else u is U in dy's dtype."""
    DTYPE: tl.constexpr = dy_ptr.dtype.element_ty
    offs_m = tl.program_id(0) * TILE + tl.arange(0, TILE)
    in_rows = offs_m < M
    rows = offs_m.to(tl.int64)
    ranks = tl.arange(0, RANK_PAD)
    in_rank = ranks < RANK
    n_start = tl.program_id(1) * COLUMNS
    n_end = tl.minimum(n_start + COLUMNS, N)
    row_mask = in_rows[:, None] & in_rank[None, :]
    z = tl.load(z_ptr + rows[:, None] * stride_zm + ranks[None, :] * stride_zr, mask=row_mask, other=0.0).to(DTYPE)
    if HAS_S:
        s = tl.load(s_ptr + ranks, mask=in_rank, other=0.0).to(tl.float32)
    g = tl.zeros((TILE, RANK_PAD), dtype=tl.float32)
    red = tl.zeros((STEP, RANK_PAD), dtype=tl.float32)  # reduced across its rows once, at the end
    for n in range(n_start, n_end, STEP):
        cols = n + tl.arange(0, STEP)
        col_mask = (cols < n_end)[:, None] & in_rank[None, :]
        d = tl.load(dy_ptr + rows[:, None] * stride_dm + cols[None, :] * stride_dn,
                    mask=in_rows[:, None] & (cols < n_end)[None, :], other=0.0)  # fmt: skip
        u_ptrs = u_ptr + cols[:, None] * stride_un + ranks[None, :] * stride_ur
        g = tl.dot(d, tl.load(u_ptrs, mask=col_mask, other=0.0).to(DTYPE), g)
        if STAGED:
            g = tl.dot(d, tl.load(u_ptrs + stride_upart, mask=col_mask, other=0.0), g)
        # Each step's product over the block's rows starts from zero and the atomics add it into
        # dU in round-to-nearest: no tensor-core sum chains across blocks of rows (tensor cores
        # truncate a chained float32 sum).
        part = tl.dot(tl.trans(d), z)
        if HAS_REDUCTION:
            w = tl.load(w_ptr + cols[:, None] * stride_wn + ranks[None, :] * stride_wr, mask=col_mask, other=0.0)
            red += part * w.to(tl.float32)
        if HAS_S:
            part *= s[None, :]
        tl.atomic_add(du_ptr + cols[:, None] * stride_dun + ranks[None, :] * stride_dur, part, mask=col_mask,
                      sem="relaxed")  # fmt: skip
    if HAS_REDUCTION:
        tl.atomic_add(ds_ptr + ranks, tl.sum(red, axis=0), mask=in_rank, sem="relaxed")
    g *= _scale(scale_hi, scale_lo, g.dtype)
    g_ptrs = g_ptr + rows[:, None] * stride_gm + ranks[None, :] * stride_gr
    if SPLIT:
        tl.atomic_add(g_ptrs, g, mask=row_mask, sem="relaxed")
    else:
        tl.store(g_ptrs, g.to(g_ptr.dtype.element_ty), mask=row_mask)


def gradient_pass(dy, U, z, S, g, dU, dS=None, scale: float = 1.0, config: Config | None = None):
    """The backward's two products over dy: ``g = scale·dy U`` (rounded to g's dtype once),
    ``dU = (dyᵀ z) ⊙ S`` and, with dS (zeroed by the caller), ``dS += Σ_o U ⊙ (dyᵀ z)``.

    dy ``[M, N]``, U ``[N, r]``, z ``[M, r]``, S ``[r]`` or ``None``, g ``[M, r]``, dU ``[N, r]``
    and dS ``[r]`` in dy's accumulation dtype; any strides. The tuner chooses between
    :func:`rank_down` and :func:`row_reduction` (two reads of dy) and, for 16-bit dy at r ≤ 32
    where reductions may use atomics (see :data:`_GRADIENT_PASS_RANK`), one pass that computes
    both: each program takes a block of rows and a range of columns, sums its rows' g and adds
    each column step's part of dU and dS with float atomics, whose count grows with the rank.
    ``config`` overrides the tuned choice (see :func:`gradient_pass_candidates`).
    """
    tensors = (dy, U, z, S, g, dU, dS)
    if config is None and not _one_pass_applies(dy, U):  # nothing to choose, no plan to look up
        _two_launches(*tensors, scale)
        return

    def tuning_key():
        rows, columns = dy.shape
        return ("gradient", dy.get_device(), dy.dtype, U.dtype, _row_bucket(rows), columns, U.shape[1],
                _aligned(dy, dy.stride()), dS is None)  # fmt: skip

    _launch("gradient", tensors, lambda c: _gradient_pass_plan(*tensors, scale, c), tuning_key,
            lambda: gradient_pass_candidates(dy, U), config, None if dS is None else dS.zero_, scale=scale)  # fmt: skip


def _gradient_pass_plan(dy, U, z, S, g, dU, dS, scale, config: Config):
    """``plan(dy, U, z, S, g, dU, dS)``: ``config``'s launches for tensors laid out as these."""
    if not config.joint:
        return functools.partial(_two_launches, scale=scale)
    rows, columns = dy.shape
    rank = U.shape[1]
    meta = config.kwargs
    span = _cdiv(_cdiv(columns, config.split), meta["STEP"]) * meta["STEP"]
    ranges = _cdiv(columns, span)
    staged = _stageable(dy, U)
    launch = KernelLaunch(
        _gradient_pass_kernel, (_cdiv(rows, meta["TILE"]), ranges), RANK_PAD=_rank_pad(rank), HAS_S=S is not None,
        HAS_REDUCTION=dS is not None, STAGED=staged, SPLIT=ranges > 1, **meta,
    )  # fmt: skip
    stage, u_strides = _stage(U, dy.dtype, 2) if staged else (None, (*U.stride(), 0))
    scalars = (rows, columns, rank, span, *_float32_pair(scale), *dy.stride(), *u_strides, *U.stride(), *z.stride())
    # Ranges of columns add their parts of g into float32 sums, rounded into g after.
    round_sums = _rounding(g.shape, (rank, 1), g.stride(), 0, 1, False) if ranges > 1 else None

    def plan(dy, U, z, S, g, dU, dS):
        u = stage(U) if stage else U
        dU.zero_()
        if round_sums:
            sums = g.new_zeros((rows, rank), dtype=dU.dtype)
            launch(dy, u, U, z, S, sums, dU, dS, *scalars, rank, 1, *dU.stride())
            round_sums(sums, None, g)
        else:
            launch(dy, u, U, z, S, g, dU, dS, *scalars, *g.stride(), *dU.stride())

    return plan


def _two_launches(dy, U, z, S, g, dU, dS, scale):
    row_reduction(dy, z, S, dU, w=None if dS is None else U, red=dS)
    rank_down(dy, U, g, scale)


# (tile, step, warps, stages) of the one-pass gradient (the fastest of a wider sweep of tiles in an
# earlier version of bench/probe_dy_pass.py, H100) and the ranges of dy's columns each block of
# rows may be cut into (g's sums then split).
_GRADIENT_PASS_BLOCKS = [(128, 128, 8, 3), (128, 64, 4, 3), (64, 128, 4, 3)]
_GRADIENT_PASS_SPLITS = (1, 4, 8)
_INTERPRETER_GRADIENT_PASS_BLOCKS = [(32, 16, 4, 1)]
_INTERPRETER_GRADIENT_PASS_SPLITS = (1, 2)
# The widest padded rank the one pass serves: its atomics grow with the rank, and it was measured
# faster up to here (H100, each configuration planned once and timed alone, bench/probe_dy_pass.py,
# raw output in bench/results/gradient-pass-*.txt). r = 16: 16384 rows by 11008
# columns 165 against 265 µs for the two launches, by 4096 columns 75 against 111, 4096 by 4096
# 35 against 44; r = 32, 16384 by 11008: 204 against 271. Slower above (raw output in
# bench/results/tma-reduce-probe-*.txt): r = 64, 16384 by 11008, 301 against 278; r = 128 505
# against 320, and 4096 by 4096 71 against 66.
_GRADIENT_PASS_RANK = 32


def _one_pass_applies(dy, U) -> bool:
    """Whether :func:`gradient_pass` has one-pass configurations for these operands."""
    return (dy.element_size() == 2 and _rank_pad(U.shape[1]) <= _GRADIENT_PASS_RANK
            and not torch.are_deterministic_algorithms_enabled() and _aligned(dy, dy.stride()))  # fmt: skip


def gradient_pass_candidates(dy, U, joint_only: bool = False) -> list[Config]:
    """The configurations :func:`gradient_pass` chooses among: its two launches first (chosen
    untuned), then the one-pass ones where they apply (``joint_only``: those alone)."""
    configs = [] if joint_only else [Config.of()]
    if not _one_pass_applies(dy, U):
        return configs
    if _triton_interpreted():
        blocks, splits = _INTERPRETER_GRADIENT_PASS_BLOCKS, _INTERPRETER_GRADIENT_PASS_SPLITS
    else:
        blocks, splits = _GRADIENT_PASS_BLOCKS, _GRADIENT_PASS_SPLITS
    columns = dy.shape[1]
    for tile, step, warps, stages in blocks:
        configs += [
            Config.of(warps, stages, split, joint=True, TILE=tile, STEP=step)
            for split in splits if split == 1 or columns >= split * step
        ]  # fmt: skip
    return configs


# Every kernel of the module (offline compilation captures their launches).
KERNELS = (_extended_matmul_kernel, _extended_matmul_tma_kernel, _round_kernel, _rank_down_kernel,
           _row_reduction_kernel, _row_reduction_tma_kernel, _few_rows_down_kernel, _few_rows_forward_kernel,
           _merge_weight_kernel, _gradient_pass_kernel)


# ----------------------------------------------------------------------------------------------
# The backend interface


def _contiguous(vector):
    return None if vector is None else vector.contiguous()


def saved_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the ``[M, r]`` intermediate saved for the backward: x's own (see :func:`forward`)."""
    return dtype


def _rank_buffer(like, rows: int, rank: int):
    """A new ``[rows, rank]`` tensor of like's dtype whose rows start on 16 bytes (a TMA operand)."""
    return like.new_empty((rows, _aligned_width(rank, like.dtype)))[:, :rank]


# The forward's or the backward's launches one after another (untuned, and under the
# interpreter), or, on sm_90, with z's pass beside the y GEMM (_forward_beside), dU+dS's and
# dVt's beside the dx GEMM (_backward_beside).
_APART = "apart"
# Configurations of each pass beside the GEMM the tuner times (the first unsplit ones).
_BESIDE_CONFIGS = 3
# Programs of z's pass beside the y GEMM that the tuner tries: few enough to leave the GEMM
# most SMs (on an H100 the best of 8-66 was 8 on most shapes, 16 or 32 on a few; the probe of
# bench/results/overlap-probe-*-forward-*.txt, on the branch experiment/overlap-pass).
_BESIDE_PROGRAMS = (8, 16, 32)
# The widest z whose pass the tuner tries beside the y GEMM: on few SMs a wider pass (two
# products a step with the adapter's rounding and residue) outlasted the GEMM's main loops (in
# that probe, r = 16 saved up to 67 µs and lost on 1 of 8 shapes; r = 64 and 128 lost on 8 of
# 11, up to 96 µs).
_BESIDE_RANK = 32


def _beside_product() -> Config:
    """The GEMM's configuration in a way with passes beside it: the first TMA one with a program
    per tile, whose later tiles take the SMs the passes leave (a persistent grid would not)."""
    blocks = _INTERPRETER_TMA_BLOCKS if _triton_interpreted() else TMA_BLOCKS
    return next(_tma_config(*block) for block in blocks if not block[6])


def _unsplit(configs: list[Config]) -> list[Config]:
    return list(dict.fromkeys(dataclasses.replace(c, split=1) for c in configs))[:_BESIDE_CONFIGS]


def forward(x, weight, U, S, Vt, bias, scale):
    """The backend interface's forward, saving ``scale·x Vtᵀ`` rounded to x's dtype (its only
    uses, the rank tail and dU's pass, take it so on tensor cores), at half the memory of float32
    for 16-bit x."""
    rows = x.shape[0]
    y = x.new_empty((rows, U.shape[0]))
    z = _rank_buffer(x, rows, U.shape[1])
    if rows == 0:
        return y, z
    with on_device(x.device):
        b = None if weight is None else weight.T
        tail, bias = scaled_columns(U, _contiguous(S), x.dtype).T, _contiguous(bias)
        arguments = (x, b, Vt.T, tail, bias, scale, z, y)
        way = _APART
        if b is not None:
            key = ("forward", x.get_device(), x.dtype, U.dtype, _row_bucket(rows), *U.shape, x.shape[1],
                   layout_key(x, b, bias))  # fmt: skip
            way, _ = _choose(key, lambda: _forward_ways(x, b, Vt.T, tail, z, y),
                             lambda w: functools.partial(_forward_by, w, *arguments), graphed=True)  # fmt: skip
        _forward_by(way, *arguments)
    return y, z


def _forward_ways(x, b, down, tail, z, y) -> list:
    """The ways :func:`_forward_by` may take for these operands: :data:`_APART`, and the
    ``(z config, programs, y config)`` of :func:`_forward_beside` where it applies (a TMA y
    GEMM, r ≤ :data:`_BESIDE_RANK`, and programmatic dependent launch or the interpreter)."""
    ways = [_APART]
    if z.shape[1] > _BESIDE_RANK or not (_triton_interpreted() or _has_pdl(x.device)):
        return ways
    if _tma_layout(x, x.stride(), b, b.stride(), z, tail, y, y.stride()) is None:
        return ways
    product = _beside_product()
    block_m = product.kwargs["BLOCK_M"]
    passes = [c for c in _unsplit(rank_down_candidates(x, down)) if c.kwargs["TILE"] % block_m == 0]
    programs = (1, 2) if _triton_interpreted() else _BESIDE_PROGRAMS
    return ways + [(config, count, product) for config in passes for count in programs]


def _forward_by(way, x, b, down, tail, bias, scale, z, y) -> None:
    """z and y one way of :func:`_forward_ways`."""
    if way == _APART:
        rank_down(x, down, z, scale)
        extended_matmul(x, b, z, tail, bias, y)
    else:
        _forward_beside(way, x, b, down, tail, bias, scale, z, y)


def _forward_beside(way, x, b, down, tail, bias, scale, z, y) -> None:
    """z's pass on ``way``'s few programs, walking z's row tiles in order and counting each
    block of the y GEMM's rows ready, then the y GEMM, which on sm_90 starts at once on the other
    SMs (programmatic dependent launch, a non-persistent grid), each tile awaiting its rows of z
    only before its rank tail: the pass's read of x overlaps the GEMM's products."""
    z_config, programs, product = way
    block_m, block_n = product.kwargs["BLOCK_M"], product.kwargs["BLOCK_N"]
    rows = x.shape[0]
    # The counts of z's row blocks, left zero by the GEMM's tiles (one per column tile).
    ready = zeroed_workspace(x.device, _cdiv(rows, block_m))
    signal = (programs, block_m, _cdiv(y.shape[1], block_n))
    _planned(("beside", z_config, signal, scale), (x, down, z),
             lambda: _rank_down_plan(x, down, z, scale, z_config, signal), ready)  # fmt: skip
    _planned(("beside", product, "awaits"), (x, b, z, tail, bias, y),
             lambda: _extended_matmul_plan(x, b, z, tail, bias, y, product, await_tail=True), ready)  # fmt: skip


def infer(x, weight, U, S, Vt, bias, scale):
    """The backend interface's forward without z: at most :data:`FEW_ROWS` rows (decode) by
    :func:`few_rows_forward`; more as :func:`forward` or, where the tuner finds it faster for the
    shape class (16-bit x; timed from CUDA graphs in rounds, as one eager timing each picked
    differently from run to run), by :func:`merged_forward`."""
    rows = x.shape[0]
    if rows == 0 or x.dtype == torch.float64:
        return forward(x, weight, U, S, Vt, bias, scale)[0]
    if rows <= FEW_ROWS:
        y = x.new_empty((rows, U.shape[0]))
        with on_device(x.device):
            few_rows_forward(x, weight, U, _contiguous(S), Vt, _contiguous(bias), scale, y)
        return y
    way = "fused"
    if _mergeable(x, weight, bias):
        key = ("infer", x.get_device(), x.dtype, U.dtype, _row_bucket(rows), *U.shape, x.shape[1])
        way, _ = _choose(key, lambda: list(_INFER_WAYS),
                         lambda w: functools.partial(_infer_by, w, x, weight, U, S, Vt, bias, scale), graphed=True)
    return _infer_by(way, x, weight, U, S, Vt, bias, scale)


# The no-grad forward of many rows: the training forward without keeping z, or the merged weight
# (untuned, and under the interpreter, the first).
_INFER_WAYS = ("fused", "merged")


def _infer_by(way: str, x, weight, U, S, Vt, bias, scale):
    if way == "merged":
        with on_device(x.device):
            return merged_forward(x, weight, U, _contiguous(S), Vt, bias, scale)
    return forward(x, weight, U, S, Vt, bias, scale)[0]


def backward(dy, x, z, weight, U, S, Vt, scale, needs):
    """The backend interface's backward, for the ``z = scale·x Vtᵀ`` of :func:`forward`."""
    with on_device(dy.device):
        return _backward(dy, x, z, weight, U, S, Vt, scale, needs)


def _backward(dy, x, z, weight, U, S, Vt, scale, needs):
    # With z and g = scale·dy U both in dy's dtype: dU = (dyᵀ z) ⊙ S, dS = Σ_o U ⊙ (dyᵀ z),
    # dx = dy W + g (Vt ⊙ S), dVt = (xᵀ g ⊙ S)ᵀ. Beside z the step keeps g alone (and, where
    # g's sum splits, its float32 sums): at most 4·M·r elements of x's dtype in all.
    need_dx, need_dU, need_dS, need_dVt = needs
    need_dS = need_dS and S is not None
    acc = accumulation_dtype(dy.dtype)
    rows, rank = z.shape
    S = _contiguous(S)
    dU_acc = U.new_empty(U.shape, dtype=acc) if need_dU or need_dS else None
    dS_acc = S.new_zeros(S.shape, dtype=acc) if need_dS else None
    g = _rank_buffer(dy, rows, rank) if need_dx or need_dVt else None
    arguments = (dy, x, z, weight, U, S, Vt, scale, g, dU_acc, dS_acc, need_dx, need_dVt)
    way = _APART
    if rows > 0 and need_dx and need_dVt and dU_acc is not None:
        key = ("backward", dy.get_device(), dy.dtype, U.dtype, _row_bucket(rows), *U.shape, x.shape[1], need_dS,
               layout_key(dy, x, weight))  # fmt: skip
        way, _ = _choose(key, lambda: _backward_ways(dy, x, z, weight, U, need_dS, g),
                         lambda w: functools.partial(_backward_by, w, *arguments),
                         None if dS_acc is None else dS_acc.zero_, graphed=True)  # fmt: skip
    dx, dVt_acc = _backward_by(way, *arguments)
    return (dx, dU_acc.to(U.dtype) if need_dU else None, dS_acc.to(S.dtype) if need_dS else None,
            dVt_acc.to(Vt.dtype) if need_dVt else None)  # fmt: skip


def _backward_ways(dy, x, z, weight, U, need_dS, g) -> list:
    """The ways :func:`_backward_by` may take for these operands: :data:`_APART`, and the
    ``(dU+dS config or None, dVt config, dx config)`` of :func:`_backward_beside` where it applies
    (a TMA dx GEMM, and programmatic dependent launch or the interpreter)."""
    ways = [_APART]
    beside = _triton_interpreted() or _has_pdl(dy.device)
    # Beside the GEMM, dVt is made while dx's tail operand Vtᵀ ⊙ S [in, r] lives (apart, after):
    # with z and g, within the step's memory budget of 4·M·r elements while in ≤ 2·M.
    beside = beside and x.shape[1] <= 2 * x.shape[0]
    # (dx, a new tensor, is laid out as a contiguous x.)
    if not beside or weight is None or _tma_layout(dy, dy.stride(), weight, weight.stride(), g[:, :0], None, x,
                                                   (x.shape[1], 1)) is None:  # fmt: skip
        return ways
    product = _beside_product()
    # Unsplit: a split pass zero-fills its output first, a launch between the ones beside each other.
    dVt_configs = _unsplit(row_reduction_candidates(x, g))
    dU_configs = _unsplit(row_reduction_candidates(dy, z, need_dS))
    ways += [(None, dVt, product) for dVt in dVt_configs]
    return ways + [(dU, dVt, product) for dU in dU_configs for dVt in dVt_configs]


def _backward_by(way, dy, x, z, weight, U, S, Vt, scale, g, dU, dS, need_dx, need_dVt):
    """``(dx, float32 dVt)`` where needed, with g and the float32 dU and dS (zeroed) given where
    needed, one way of :func:`_backward_ways`. dx and dVt are made once the passes before them
    have freed their temporaries."""
    if way != _APART:
        return _backward_beside(way, dy, x, z, weight, U, S, Vt, scale, g, dU, dS)
    dx = dVt = None
    if z.shape[0] == 0:
        if dU is not None:
            dU.zero_()
    elif dU is not None and g is not None:
        gradient_pass(dy, U, z, S, g, dU, dS, scale)
    elif dU is not None:
        row_reduction(dy, z, S, dU, w=U if dS is not None else None, red=dS)
    elif g is not None:
        rank_down(dy, U, g, scale)
    if need_dx:
        dx = x.new_empty(x.shape)
        if z.shape[0] > 0:
            extended_matmul(dy, weight, g, scaled_columns(Vt.T, S, dy.dtype).T, None, dx)
    if need_dVt:
        dVt = Vt.new_empty(Vt.shape, dtype=accumulation_dtype(dy.dtype))
        if z.shape[0] == 0:
            dVt.zero_()
        else:
            row_reduction(x, g, S, dVt.T)
    return dx, dVt


def _backward_beside(way, dy, x, z, weight, U, S, Vt, scale, g, dU, dS):
    """The backward with its skinny passes that the dx GEMM does not read beside it: g (with dU+dS
    where ``way``'s dU config is None: :func:`gradient_pass`) first, then dU+dS (unless done) and
    dVt in few programs (one per column tile, unsplit), which on sm_90 let the GEMM start at once
    on the other SMs (programmatic dependent launch, a non-persistent grid), so that their reads
    of dy and x overlap its products."""
    dU_config, dVt_config, product = way
    w = U if dS is not None else None
    if dU_config is None:
        gradient_pass(dy, U, z, S, g, dU, dS, scale)
    else:
        rank_down(dy, U, g, scale)
    tail = scaled_columns(Vt.T, S, dy.dtype).T
    dx, dVt = x.new_empty(x.shape), Vt.new_empty(Vt.shape, dtype=accumulation_dtype(dy.dtype))
    chain = "first"
    if dU_config is not None:
        _planned(("beside", dU_config, chain), (dy, z, S, w, dU, dS),
                 lambda: _row_reduction_plan(dy, z, S, w, dU, dS, dU_config, "first"))  # fmt: skip
        chain = "next"
    _planned(("beside", dVt_config, chain), (x, g, S, None, dVt.T, None),
             lambda: _row_reduction_plan(x, g, S, None, dVt.T, None, dVt_config, chain))  # fmt: skip
    _planned(("beside", product), (dy, weight, g, tail, None, dx),
             lambda: _extended_matmul_plan(dy, weight, g, tail, None, dx, product, beside=True))  # fmt: skip
    return dx, dVt
