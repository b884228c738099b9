"""ortho_reg and ortho_reg_grad_ on every backend against a float64 autograd oracle: the value and
every gradient, both forms, mixed shapes, layouts and dtypes; the Triton kernel's work queue
(coverage and a deadlock-free order, on the host), many matrices cut into many work items, and
the plan cache (new storage, new .grad tensors, dead tensors).

Inputs are random factors whose Gram matrices are far from I, and near-orthonormal factors
(``G − I`` of order 1e-3, where trained adapters live), on which a float32 ``G`` less ``I``
would keep only the last digits of G's diagonal: the 1e-5 float32 contract holds on both.
"""

import gc
import importlib.util
import math
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from sorsa_kernels import ortho_reg, ortho_reg_grad_
from sorsa_kernels.backends import why_unavailable
from support import (
    DEVICE,
    TOLERANCE,
    assert_close,
    backend_params,
    gpu,
    interpretable_dtypes,
    poisoned_allocations,
)

BACKENDS = backend_params("ortho_reg")
FORMS = ["squared", "official"]
# float32 must match float64 to 1e-5 (float16 pairs on GPUs); narrower dtypes round their gradients.
TOL = {**TOLERANCE, torch.float32: 1e-5}

# U shapes [L, r] and Vt shapes [r, L]: L of 1, 19, 37, 130 (no multiple of 16), ranks 1 to 256.
MIXED = ([(37, 5), (130, 7), (23, 1)], [(7, 45), (1, 19), (16, 3)])
WIDE_RANKS = ([(40, 128), (70, 33)], [(256, 21), (100, 9)])
# Every pointer, stride, length and rank a multiple of 16 bytes: the vectorized (ALIGNED) path.
ALIGNED = ([(64, 16), (48, 32)], [(16, 80), (32, 32)])


def oracle(Us, Vts, form):
    """The regularizer as written in the SORSA paper and code, for autograd in float64."""
    norms = [torch.linalg.matrix_norm(U.T @ U - torch.eye(U.shape[1], dtype=U.dtype, device=U.device)) for U in Us]
    norms += [torch.linalg.matrix_norm(Vt @ Vt.T - torch.eye(Vt.shape[0], dtype=Vt.dtype, device=Vt.device)) for Vt in Vts]
    norms = torch.stack(norms)
    return norms.square().sum() if form == "squared" else norms.mean()


def factor(shape, dtype, tall_dim=0):
    """A random factor whose Gram matrix is far from I (the long dimension is ``tall_dim``)."""
    scale = 0.5 / shape[tall_dim] ** 0.5  # G near I/4, so every ‖G − I‖ is of order 1
    return (torch.randn(shape, device=DEVICE) * scale).to(dtype).requires_grad_()


def near_orthonormal(shape, dtype, tall_dim=0, deviation=1e-3):
    """A factor orthonormal along its long dimension up to ``deviation``: ``Q(I + deviation·A)``
    with ``Q`` orthonormal and ``A`` random, so ``G − I ≈ deviation·(A + Aᵀ)``."""
    length, rank = shape[tall_dim], shape[1 - tall_dim]
    q = torch.linalg.qr(torch.randn(length, rank, dtype=torch.float64, device=DEVICE)).Q
    x = q @ (torch.eye(rank, dtype=torch.float64, device=DEVICE) + deviation * torch.randn(rank, rank, device=DEVICE))
    return (x if tall_dim == 0 else x.T).to(dtype).requires_grad_()


def make(shapes, dtype, kind=factor):
    U_shapes, Vt_shapes = shapes
    return [kind(s, dtype) for s in U_shapes], [kind(s, dtype, tall_dim=1) for s in Vt_shapes]


def expected(Us, Vts, form):
    ref_Us = [U.detach().double().requires_grad_() for U in Us]
    ref_Vts = [Vt.detach().double().requires_grad_() for Vt in Vts]
    value = oracle(ref_Us, ref_Vts, form)
    return value, torch.autograd.grad(value, ref_Us + ref_Vts)


def check(value, grads, Us, Vts, form, tol):
    ref_value, ref_grads = expected(Us, Vts, form)
    assert_close(value, ref_value, tol, "value")
    for i, (grad, ref, p) in enumerate(zip(grads, ref_grads, Us + Vts)):
        assert grad.dtype == p.dtype and grad.shape == p.shape, f"gradient {i}: {grad.dtype} {tuple(grad.shape)}"
        assert_close(grad, ref, tol, f"gradient {i}")


def check_added(value, Us, Vts, form, coeff, tol):
    """``ortho_reg_grad_``'s value, and the ``coeff``-scaled gradients it added into ``.grad``
    tensors that were absent before, against float64."""
    ref_value, ref_grads = expected(Us, Vts, form)
    assert_close(value, ref_value, tol, "value (grad_)")
    for i, (p, ref) in enumerate(zip(Us + Vts, ref_grads)):
        assert_close(p.grad, coeff * ref, tol, f"grad {i} (grad_)")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shapes", [MIXED, WIDE_RANKS, ALIGNED], ids=["mixed", "wide-ranks", "aligned"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_differentiable_matches_float64(backend, form, shapes, dtype):
    if dtype not in interpretable_dtypes(backend, [dtype]):
        pytest.skip("bfloat16 tl.dot is wrong under the Triton interpreter; covered on GPU")
    Us, Vts = make(shapes, dtype)
    with poisoned_allocations():
        value = ortho_reg(Us, Vts, form, backend=backend)
        grads = torch.autograd.grad(value, Us + Vts)
    assert value.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and value.dim() == 0
    check(value, grads, Us, Vts, form, TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("magnitude", ["tiny", "huge", "columns-1e-3-to-1e3", "rows-1e-3-to-1e3"])
def test_float32_at_extreme_magnitudes(backend, magnitude):
    """float32 factors far from unit size, and columns or rows of very different sizes: the
    float16 pairs of the GPU path are scaled per tile (Gram products) or per matrix (gradient
    products), so neither part overflows nor loses the bits that matter."""
    Us, Vts = make(MIXED, torch.float32)
    with torch.no_grad():
        for i, p in enumerate(Us + Vts):
            is_vt = i >= len(Us)
            if magnitude == "tiny":
                p.mul_(1e-12)
            elif magnitude == "huge":
                p.mul_(1e6)  # the squared form of 1e12 would overflow float32 itself
            elif magnitude.startswith("columns"):  # every column of the tall matrix (U's columns, Vt's rows)
                sizes = torch.logspace(-3, 3, p.shape[0 if is_vt else 1], device=p.device)
                p.mul_(sizes[:, None] if is_vt else sizes[None, :])
            else:  # every row of the tall matrix, so that its tiles differ too
                sizes = torch.logspace(-3, 3, p.shape[1 if is_vt else 0], device=p.device)
                p.mul_(sizes[None, :] if is_vt else sizes[:, None])
    for form in FORMS:
        with poisoned_allocations():
            value = ortho_reg(Us, Vts, form, backend=backend)
            grads = torch.autograd.grad(value, Us + Vts)
        check(value, grads, Us, Vts, form, TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("exponent", [-9, -8, 5, 6])
def test_float32_largest_magnitude_at_the_split_scale_edges(backend, exponent):
    """Factors whose largest magnitude is just below 2^exponent, at the edges of the range where
    the GPU path splits the gradient's float16 pairs at a constant scale (2^-8 up to 2^5): the
    scale must neither overflow float16 above it nor lose bits below it."""
    Us, Vts = make(MIXED, torch.float32)
    with torch.no_grad():
        for p in Us + Vts:
            p.mul_(2.0**exponent * (1 - 2.0**-12) / p.abs().max())
    for form in FORMS:
        with poisoned_allocations():
            value = ortho_reg(Us, Vts, form, backend=backend)
            grads = torch.autograd.grad(value, Us + Vts)
        check(value, grads, Us, Vts, form, TOL[torch.float32])


# Long enough for float32 sums of G's diagonal to drift well past 1e-5 of G − I.
NEAR_ORTHONORMAL = ([(2051, 7), (1030, 37)], [(16, 515), (7, 1300)])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_near_orthonormal_factors(backend, form, deterministic):
    """Near-orthonormal float32 factors: value and every gradient to 1e-5, through autograd and
    through ortho_reg_grad_, with and without split (atomic) Gram sums."""
    Us, Vts = make(NEAR_ORTHONORMAL, torch.float32, near_orthonormal)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    try:
        with poisoned_allocations():
            value = ortho_reg(Us, Vts, form, backend=backend)
            grads = torch.autograd.grad(value, Us + Vts)
        check(value, grads, Us, Vts, form, 1e-5)
        with poisoned_allocations():
            value = ortho_reg_grad_(Us, Vts, 0.5, form, backend=backend)
    finally:
        torch.use_deterministic_algorithms(False)
    check_added(value, Us, Vts, form, 0.5, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", FORMS)
def test_grad_adds_into_existing_and_allocates_missing(backend, form):
    Us, Vts = make(MIXED, torch.float32)
    before = {}
    for i, p in enumerate(Us + Vts):
        if i % 2 == 0:  # half the factors already have a gradient, the others none
            p.grad = torch.randn_like(p)
            before[i] = p.grad.clone()
    coeff = 0.37
    with poisoned_allocations():
        value = ortho_reg_grad_(Us, Vts, coeff, form, backend=backend)
    ref_value, ref_grads = expected(Us, Vts, form)
    assert_close(value, ref_value, 1e-5, "value")
    for i, (p, ref) in enumerate(zip(Us + Vts, ref_grads)):
        want = coeff * ref + (before[i].double() if i in before else 0)
        assert p.grad is not None and p.grad.dtype == p.dtype
        assert_close(p.grad, want, 1e-5, f"grad {i}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", FORMS)
def test_grad_at_gram_width_128_beside_another_dtype(backend, form):
    """float32 factors of ranks 65 to 128 take the step as two launches (Gram matrices, then
    gradients added into .grad; see two_launch_step), the float64 group after them one launch
    that sums the value of both."""
    Us = [factor((150, 100), torch.float32), factor((40, 70), torch.float32), factor((30, 6), torch.float64)]
    Vts = [factor((128, 131), torch.float32, tall_dim=1), factor((5, 29), torch.float64, tall_dim=1)]
    before = {}
    for i, p in enumerate(Us + Vts):
        p.grad = torch.randn_like(p)
        before[i] = p.grad.clone()
    with poisoned_allocations():
        value = ortho_reg_grad_(Us, Vts, 0.7, form, backend=backend)
    ref_value, ref_grads = expected(Us, Vts, form)
    assert value.dtype == torch.float64
    assert_close(value, ref_value, 1e-5, "value")
    for i, (p, ref) in enumerate(zip(Us + Vts, ref_grads)):
        assert_close(p.grad, 0.7 * ref + before[i].double(), 1e-5, f"grad {i}")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gram_launch_reads_aligned_factors_by_tma(form, dtype, monkeypatch):
    """The Gram launch (ortho_reg's forward, the first of a two-launch step) reads 16-byte aligned
    factors by TMA: U row-major, Vt as the rows of Vtᵀ, ranks past one Gram block in block pairs,
    lengths cut into several items. The value and every gradient match float64, and under the
    interpreter the pointer loop, replaced by one that fails, is never reached (a compiled kernel
    resolves every function it names, reached or not). The descriptors' memory comes from the
    package's allocator, not from one the caller set in Triton, which is in place again after."""
    ortho = pytest.importorskip("sorsa_kernels.triton.ortho")
    reason = why_unavailable("triton", DEVICE)
    if reason:
        pytest.skip(f"triton backend: {reason}")
    if not ortho.HAS_DEVICE_TMA:
        pytest.skip("this Triton makes no tensor descriptors in kernels (triton < 3.4)")
    if DEVICE.type == "cuda":
        monkeypatch.setattr(ortho, "override", ortho.Config(16, 16, 32, 32, programs_per_sm=2, gram_tma=True))
    else:

        def pointer_loop(*args):
            raise AssertionError("the Gram launch read aligned factors through pointers")

        monkeypatch.setattr(ortho, "_gram_rows", pointer_loop)

    def callers_allocator(size, alignment, stream):
        raise AssertionError("the Gram launch asked the caller's allocator for its descriptors' memory")

    Us, Vts = make(([(96, 136), (40, 8)], [(136, 52), (8, 36)]), dtype)
    token = ortho._triton_allocator.set(callers_allocator)
    try:
        with poisoned_allocations():
            value = ortho_reg(Us, Vts, form, backend="triton")
        assert ortho._triton_allocator.get() is callers_allocator, "the caller's allocator was replaced"
    finally:
        ortho._triton_allocator.reset(token)
    grads = torch.autograd.grad(value, Us + Vts)
    check(value, grads, Us, Vts, form, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_float64_keeps_the_coefficient_exact(backend):
    """0.1 is not a float32: a coefficient rounded to one would be off by 1.5e-9."""
    Us, Vts = make(MIXED, torch.float64)
    with poisoned_allocations():
        value = ortho_reg_grad_(Us, Vts, 0.1, "official", backend=backend)
    ref_value, ref_grads = expected(Us, Vts, "official")
    assert_close(value, ref_value, TOL[torch.float64], "value")
    for i, (p, ref) in enumerate(zip(Us + Vts, ref_grads)):
        assert_close(p.grad, 0.1 * ref, TOL[torch.float64], f"grad {i}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_repeated_steps_reuse_cached_plans(backend):
    """Same parameters, changing values and fresh .grad tensors each step, as in training."""
    Us, Vts = make(MIXED, torch.float32)
    for step in range(3):
        with torch.no_grad():
            for p in Us + Vts:
                p.mul_(0.9)
        for p in Us + Vts:
            p.grad = None if step == 1 else torch.zeros_like(p)
        with poisoned_allocations():
            value = ortho_reg_grad_(Us, Vts, 1.0, "squared", backend=backend)
        ref_value, ref_grads = expected(Us, Vts, "squared")
        assert_close(value, ref_value, 1e-5, f"value at step {step}")
        for i, (p, ref) in enumerate(zip(Us + Vts, ref_grads)):
            assert_close(p.grad, ref, 1e-5, f"grad {i} at step {step}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", FORMS)
def test_strided_layouts(backend, form):
    """Factors and gradients in every memory layout: transposed, sliced, and grads laid out
    unlike their parameters."""
    base = torch.randn(45, 90, device=DEVICE) / 12
    U_col = torch.randn(6, 41, device=DEVICE).div(10).T.requires_grad_()  # [41, 6], contiguous along L
    U_sliced = base[::2, ::3].detach().clone().requires_grad_()  # contiguous copy
    U_strided = torch.randn(70, 40, device=DEVICE).div(9)[::2, ::4].requires_grad_()  # [35, 10], no unit stride
    Vt_row = torch.randn(33, 5, device=DEVICE).div(10).T.requires_grad_()  # [5, 33], contiguous along r
    Vt_strided = torch.randn(8, 100, device=DEVICE).div(8)[::2, ::3].requires_grad_()  # [4, 34]
    Us, Vts = [U_col, U_sliced, U_strided], [Vt_row, Vt_strided]
    with poisoned_allocations():
        value = ortho_reg(Us, Vts, form, backend=backend)
        grads = torch.autograd.grad(value, Us + Vts)
    check(value, grads, Us, Vts, form, 1e-5)
    for p in Us + Vts:  # gradients laid out transposed to their parameters
        p.grad = torch.zeros(p.shape[::-1], device=DEVICE).T
    with poisoned_allocations():
        value = ortho_reg_grad_(Us, Vts, 2.0, form, backend=backend)
    ref_value, ref_grads = expected(Us, Vts, form)
    assert_close(value, ref_value, 1e-5, "value")
    for i, (p, ref) in enumerate(zip(Us + Vts, ref_grads)):
        assert_close(p.grad, 2.0 * ref, 1e-5, f"grad {i}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes(backend):
    """One launch per dtype group; float64 anywhere makes the value float64."""
    dtypes = interpretable_dtypes(backend, [torch.float32, torch.float16, torch.bfloat16])
    Us = [factor((37 + 8 * i, 5 + i), dtype) for i, dtype in enumerate(dtypes)]
    Vts = [factor((6, 29), torch.float64), factor((3, 50), torch.float32)]
    with poisoned_allocations():
        value = ortho_reg(Us, Vts, "official", backend=backend)
        grads = torch.autograd.grad(value, Us + Vts)
    assert value.dtype == torch.float64
    ref_value, ref_grads = expected(Us, Vts, "official")
    assert_close(value, ref_value, TOL[dtypes[-1]], "value")
    for i, (grad, ref, p) in enumerate(zip(grads, ref_grads, Us + Vts)):
        assert grad.dtype == p.dtype
        assert_close(grad, ref, TOL[p.dtype], f"gradient {i}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_some_gradients(backend):
    Us, Vts = make(MIXED, torch.float32)
    Us[1].requires_grad_(False)
    Vts[0].requires_grad_(False)
    wanted = [Us[0], Us[2], Vts[1], Vts[2]]
    with poisoned_allocations():
        grads = torch.autograd.grad(ortho_reg(Us, Vts, "official", backend=backend), wanted)
    _, ref_grads = expected(Us, Vts, "official")
    for grad, ref in zip(grads, [ref_grads[i] for i in (0, 2, 4, 5)]):
        assert_close(grad, ref, 1e-5, "gradient")


@pytest.mark.parametrize("backend", BACKENDS)
def test_official_form_zero_gradient_at_orthonormal(backend):
    """‖G − I‖ = 0 exactly (a signed permutation and a Hadamard/2 block are exact in binary):
    the official form's gradient there is a finite zero, not 0/0."""
    perm = torch.randperm(40, device=DEVICE)[:6]
    U_exact = torch.zeros(40, 6, device=DEVICE)
    U_exact[perm, torch.arange(6, device=DEVICE)] = torch.tensor([1.0, -1, 1, 1, -1, 1], device=DEVICE)
    hadamard = torch.tensor([[1.0, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], device=DEVICE) / 2
    Vt_exact = torch.cat([hadamard, torch.zeros(4, 13, device=DEVICE)], dim=1)  # [4, 17]
    Us = [U_exact.requires_grad_(), factor((33, 5), torch.float32)]
    Vts = [Vt_exact.requires_grad_(), factor((3, 21), torch.float32, tall_dim=1)]
    with poisoned_allocations():
        value = ortho_reg(Us, Vts, "official", backend=backend)
        grads = torch.autograd.grad(value, Us + Vts)
    assert torch.equal(grads[0], torch.zeros_like(U_exact)) and torch.equal(grads[2], torch.zeros_like(Vt_exact))
    ref_value, ref_grads = expected(Us, Vts, "official")
    assert_close(value, ref_value, 1e-5, "value")
    assert_close(grads[1], ref_grads[1], 1e-5, "gradient of U 1")
    assert_close(grads[3], ref_grads[3], 1e-5, "gradient of Vt 1")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shapes", [MIXED, WIDE_RANKS], ids=["mixed", "wide-ranks"])
def test_deterministic_mode(backend, shapes):
    Us, Vts = make(shapes, torch.float32)
    results = []
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        for _ in range(2):
            for p in Us + Vts:
                p.grad = None
            value = ortho_reg_grad_(Us, Vts, 1.0, "squared", backend=backend)
            results.append([value] + [p.grad.clone() for p in Us + Vts])
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(torch.equal(a, b) for a, b in zip(*results)), "two deterministic runs differ"
    ref_value, ref_grads = expected(Us, Vts, "squared")
    assert_close(results[0][0], ref_value, 1e-5, "value")
    for i, (grad, ref) in enumerate(zip(results[0][1:], ref_grads)):
        assert_close(grad, ref, 1e-5, f"grad {i}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    Us, Vts = make(([(9, 3)], [(2, 7)]), torch.float64)
    for form in FORMS:
        assert torch.autograd.gradcheck(lambda U, Vt: ortho_reg([U], [Vt], form, backend=backend), (*Us, *Vts),
                                        fast_mode=True)


# -- The persistent kernel's work queue and the plan cache ---------------------------------------

QUEUE_SHAPES = [(1, 1), (19, 7), (130, 16), (300, 128), (45, 200), (256, 256), (64, 33), (512, 5)]


def _tiles(intervals, length):
    """Whether the ``(start, end)`` intervals tile ``[0, length)`` exactly once."""
    position = 0
    for start, end in sorted(intervals):
        if start != position or end <= start:
            return False
        position = end
    return position == length


@pytest.mark.parametrize("mode", ["step", "forward", "backward", "accumulate"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("lag", [0.0, 0.5, math.inf])
@pytest.mark.parametrize("gram_block", [64, 128])
def test_work_queue_covers_every_row_once_in_a_safe_order(mode, deterministic, lag, gram_block):
    """Every row of every matrix is summed once per Gram block pair and updated once per column
    block; in the fused step every Gram item of a matrix comes before its gradient items (what
    makes the kernel's waits deadlock-free), and, with a finite lag, a bounded distance after."""
    ortho = pytest.importorskip("sorsa_kernels.triton.ortho")
    chunk, programs, block_n = 64, 3, 32
    config = ortho.Config(16, 32, block_n, chunk, lag=lag, gram_block=gram_block)
    queue = ortho._work_order(QUEUE_SHAPES, mode, deterministic, config, programs, gram_block, block_n)
    gram, gradient, counts = defaultdict(list), defaultdict(list), defaultdict(set)
    last_gram, first_gradient, gram_order = {}, {}, []
    for ticket, (m, start, end, phase, arg0, arg1, count, _) in enumerate(queue):
        counts[m].add(count)
        if phase == ortho.GRADIENT.value:
            gradient[m, arg0].append((start, end))
            first_gradient.setdefault(m, ticket)
            assert start % chunk == 0
        else:
            gram[m, arg0, arg1].append((start, end))
            last_gram[m] = ticket
            gram_order.append((m, start))
            assert (phase == ortho.GRAM_STORE.value) == (deterministic or QUEUE_SHAPES[m][0] <= chunk)
            assert start % (QUEUE_SHAPES[m][0] if deterministic else chunk) == 0
    for m, (length, rank) in enumerate(QUEUE_SHAPES):
        blocks = -(-rank // gram_block)
        pairs = {(a, b) for a in range(blocks) for b in range(a, blocks)}
        if mode in ("step", "forward"):
            assert {key[1:] for key in gram if key[0] == m} == pairs
            assert all(_tiles(gram[(m, *pair)], length) for pair in pairs)
            assert counts[m] == {sum(len(gram[(m, *pair)]) for pair in pairs)}
        if mode != "forward":
            assert {key[1] for key in gradient if key[0] == m} == set(range(0, rank, block_n))
            assert all(_tiles(gradient[m, col], length) for col in range(0, rank, block_n))
        if mode == "step":
            assert last_gram[m] < first_gradient[m], f"matrix {m}: a gradient item before a Gram item"
    if mode == "step" and not deterministic and not math.isinf(lag):
        # A matrix's first gradient item comes once the Gram stream has moved ``lag`` rows past
        # the matrix's end (in rows of factors): every Gram item up to there before it, none after.
        positions = [sum(length for length, _ in QUEUE_SHAPES[:m]) for m in range(len(QUEUE_SHAPES))]
        stream = [positions[g] + start for g, start in gram_order]
        for m, (length, _) in enumerate(QUEUE_SHAPES):
            threshold = positions[m] + length + lag * programs * chunk
            grams_before = sum(1 for t in range(first_gradient[m]) if queue[t][3] != ortho.GRADIENT.value)
            assert set(stream[:grams_before]) == {p for p in stream if p <= threshold}


# Twenty-four matrices of 1 to 120 rows: with 32-row work items most have several Gram items, and
# the queue interleaves them with the gradient items of earlier matrices.
MANY = ([(1 + 37 * i % 120, 1 + 5 * i % 20) for i in range(12)], [(1 + 7 * i % 20, 3 + 29 * i % 120) for i in range(12)])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lag", [0.0, math.inf])
def test_many_matrices_many_items(backend, lag, monkeypatch):
    """The fused step over many matrices cut into many small work items, gradient items right
    behind their Gram items or all after them (and the autograd passes, whose queues have no
    lag); three programs per SM (on a GPU, with real waits)."""
    if backend == "triton":
        ortho = pytest.importorskip("sorsa_kernels.triton.ortho")
        monkeypatch.setattr(ortho, "override", ortho.Config(16, 16, 32, 32, lag=lag, programs_per_sm=3))
    Us, Vts = make(MANY, torch.float32)
    if lag == 0:
        with poisoned_allocations():
            value = ortho_reg(Us, Vts, "official", backend=backend)
            grads = torch.autograd.grad(value, Us + Vts)
        check(value, grads, Us, Vts, "official", 1e-5)
    with poisoned_allocations():
        value = ortho_reg_grad_(Us, Vts, 0.5, "squared", backend=backend)
    check_added(value, Us, Vts, "squared", 0.5, 1e-5)


def test_work_items_shrink_for_small_sets_only():
    """A set with rows enough for ITEMS_PER_PROGRAM configured items per program keeps them;
    a smaller one gets items of about its share per item (at least MIN_ITEM_ROWS rows, whole
    tiles of both heights), never larger than configured."""
    ortho = pytest.importorskip("sorsa_kernels.triton.ortho")
    config = ortho.Config(64, 128, 128, 4096)
    llama_sized = [(4096, 128)] * 448
    assert ortho._balanced(config, llama_sized, 132) is config
    for shapes, programs in (([(4096, 128)] * 2, 132), ([(11008, 128), (300, 7)], 264), ([(5, 3)], 8),
                             ([(4096, 128)] * 100, 132)):
        rows = ortho._balanced(config, shapes, programs).chunk_rows
        wanted = max(sum(length for length, _ in shapes) / (programs * ortho.ITEMS_PER_PROGRAM), ortho.MIN_ITEM_ROWS)
        assert rows % 128 == 0 and wanted <= rows < wanted + 128 and rows < config.chunk_rows, (shapes, rows)


def test_small_set_in_shrunk_work_items(monkeypatch):
    """The step and the autograd passes over a set small enough for its work items to shrink
    (from the configured 128 rows to 16 or 32, the floor lowered for the interpreter's sizes)."""
    ortho = pytest.importorskip("sorsa_kernels.triton.ortho")
    reason = why_unavailable("triton", DEVICE)
    if reason:
        pytest.skip(f"triton backend: {reason}")
    monkeypatch.setattr(ortho, "MIN_ITEM_ROWS", 16)
    monkeypatch.setattr(ortho, "override", ortho.Config(16, 16, 32, 128, programs_per_sm=32))
    item_rows = []
    work_order = ortho._work_order

    def recorded(shapes, mode, deterministic, config, *args):
        item_rows.append(config.chunk_rows)
        return work_order(shapes, mode, deterministic, config, *args)

    monkeypatch.setattr(ortho, "_work_order", recorded)
    Us, Vts = make(MANY, torch.float32)
    with poisoned_allocations():
        value = ortho_reg(Us, Vts, "official", backend="triton")
        grads = torch.autograd.grad(value, Us + Vts)
    check(value, grads, Us, Vts, "official", 1e-5)
    with poisoned_allocations():
        value = ortho_reg_grad_(Us, Vts, 0.5, "squared", backend="triton")
    check_added(value, Us, Vts, "squared", 0.5, 1e-5)
    assert item_rows and all(rows in (16, 32) for rows in item_rows), item_rows


@pytest.mark.parametrize("backend", BACKENDS)
def test_new_storage_of_a_parameter_is_noticed(backend):
    """A cached plan must not keep reading a parameter's old storage."""
    Us, Vts = make(MIXED, torch.float32)
    ortho_reg_grad_(Us, Vts, 1.0, "squared", backend=backend)
    old = Us[1].data
    Us[1].data = old * 2
    old.fill_(3.0)  # what a stale pointer would read
    for p in Us + Vts:
        p.grad = None
    value = ortho_reg_grad_(Us, Vts, 1.0, "squared", backend=backend)
    ref_value, ref_grads = expected(Us, Vts, "squared")
    assert_close(value, ref_value, 1e-5, "value")
    for i, (p, ref) in enumerate(zip(Us + Vts, ref_grads)):
        assert_close(p.grad, ref, 1e-5, f"grad {i}")


def test_cache_forgets_factor_sets_whose_tensors_die():
    """A new tensor may reuse a dead one's identity: its factor set must be gone by then."""
    from sorsa_kernels.ops import ortho as ops_ortho

    Us, Vts = make(MIXED, torch.float32)
    ortho_reg_grad_(Us, Vts, 1.0, backend="torch")
    key = (tuple(map(id, Us)), tuple(map(id, Vts)))
    assert key in ops_ortho._factor_sets
    del Us, Vts
    gc.collect()
    assert key not in ops_ortho._factor_sets and ops_ortho._latest[0] != key


def _good():
    return [torch.randn(20, 4)], [torch.randn(4, 30)]


BAD_INPUTS = [
    # (arguments, exception, text the message must contain)
    (lambda U, V: (U[0], V), TypeError, "Us must be a sequence"),
    (lambda U, V: (U, 5), TypeError, "Vts must be a sequence"),
    (lambda U, V: (U + [torch.randn(5)], V), ValueError, r"Us\[1\] must be 2-D"),
    (lambda U, V: (U, [V[0].long()]), TypeError, r"Vts\[0\] must have a floating-point dtype"),
    (lambda U, V: (U, V, "cubed"), ValueError, "form must be one of"),
    (lambda U, V: (U, [V[0].to("meta")]), ValueError, r"Vts\[0\] is on meta but Us\[0\] is on cpu"),
    (lambda U, V: ([], []), ValueError, "at least one matrix"),
    (lambda U, V: (U + [torch.randn(0, 3)], V), ValueError, r"Us\[1\] must not be empty"),
    (lambda U, V: (U + U, V), ValueError, r"Us\[1\] is the same matrix as Us\[0\]"),
    (lambda U, V: (U, [V[0], "x"]), TypeError, r"Vts\[1\] must be a torch.Tensor"),
]


@pytest.mark.parametrize("arguments,error,text", BAD_INPUTS)
def test_bad_input_names_the_argument(arguments, error, text):
    args = arguments(*_good())
    with pytest.raises(error, match=text):
        ortho_reg(*args)
    with pytest.raises(error, match=text):
        ortho_reg_grad_(args[0], args[1], 1.0, *args[2:])


def test_grad_coeff_must_be_a_number():
    with pytest.raises(TypeError, match="coeff"):
        ortho_reg_grad_(*_good(), "1")


# -- GPU: realistic factor sizes (a Llama-2-7B attention and MLP adapter), both forms ---------


def _realistic(dtype):
    return make(([(4096, 128), (11008, 128)], [(128, 4096), (128, 11008)]), dtype)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("form", FORMS)
def test_realistic_sizes_on_gpu(dtype, form):
    Us, Vts = _realistic(dtype)
    with poisoned_allocations():
        value = ortho_reg(Us, Vts, form, backend="triton")
        grads = torch.autograd.grad(value, Us + Vts)
    check(value, grads, Us, Vts, form, TOL[dtype])
    with poisoned_allocations():
        value = ortho_reg_grad_(Us, Vts, 0.5, form, backend="triton")
    check_added(value, Us, Vts, form, 0.5, TOL[dtype])


# Two decoder layers of Llama-2-7B adapters at r = 128: 28 factors of 4096 and 11008 rows.
LLAMA2_LAYERS = (
    [(out, 128) for out, _ in [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]] * 2,
    [(128, in_) for _, in_ in [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]] * 2,
)


@gpu
@pytest.mark.parametrize("kind", [factor, near_orthonormal], ids=["far", "near-orthonormal"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_llama_layers_on_gpu(deterministic, kind):
    """The default queue (many Gram items per matrix, atomics, waits) at real sizes, and the
    deterministic path bitwise repeatable."""
    Us, Vts = make(LLAMA2_LAYERS, torch.float32, kind)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    try:
        with poisoned_allocations():
            value = ortho_reg(Us, Vts, "official", backend="triton")
            grads = torch.autograd.grad(value, Us + Vts)
        check(value, grads, Us, Vts, "official", 1e-5)
        runs = []
        for _ in range(2):
            for p in Us + Vts:
                p.grad = None
            with poisoned_allocations():
                runs.append([ortho_reg_grad_(Us, Vts, 0.5, "official", backend="triton")] +
                            [p.grad.clone() for p in Us + Vts])
    finally:
        torch.use_deterministic_algorithms(False)
    ref_value, ref_grads = expected(Us, Vts, "official")
    assert_close(runs[0][0], ref_value, 1e-5, "value (grad_)")
    for i, (grad, ref) in enumerate(zip(runs[0][1:], ref_grads)):
        assert_close(grad, 0.5 * ref, 1e-5, f"grad {i} (grad_)")
    if deterministic:
        assert all(torch.equal(a, b) for a, b in zip(*runs)), "two deterministic runs differ"


@gpu
def test_tf32_when_torch_allows_it():
    """With torch's TF32 matmuls allowed, float32 runs one TF32 product per tile: about 1e-3."""
    Us, Vts = _realistic(torch.float32)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        value = ortho_reg(Us, Vts, "squared", backend="triton")
        grads = torch.autograd.grad(value, Us + Vts)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    check(value, grads, Us, Vts, "squared", 5e-3)


@pytest.fixture(scope="module", autouse=True)
def hopper_compile():
    """The sm_90 compile check in a subprocess, started with the module's first test so that it
    runs beside the interpreter tests (it takes ~20 s of one core); stopped if nobody waits."""
    if importlib.util.find_spec("triton") is None:
        yield None
        return
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    process = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("ortho_hopper_compile.py"))],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    yield process
    if process.poll() is None:
        process.kill()
    process.communicate()


def test_kernels_compile_for_hopper(hopper_compile):
    """The default configurations compile for sm_90 and fit its shared memory (no GPU needed:
    the compiler and ptxas ship with Triton); catches GPU-only compile errors on CPU machines."""
    if hopper_compile is None:
        pytest.skip("triton is not installed")
    output, _ = hopper_compile.communicate(timeout=600)
    assert hopper_compile.returncode == 0, output[-6000:]
