"""The six kernel launches of one ``sorsa_linear`` training step (and the inference forward's
own launch: for few rows its product, for many rows of 16-bit x the merged weight; where it
applies, the one pass over dy that may stand for dU+dS and g), each with its candidate
configurations and a float32 PyTorch reference: what the sweep times config by config, what
tune_linear times alone, what the GPU test checks for every configuration and what the sm_90
compile check compiles (on meta tensors)."""

from __future__ import annotations

import dataclasses
import functools
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from triton.backends.compiler import GPUTarget

from sorsa_kernels.reference.linear import accumulation_dtype
from sorsa_kernels.triton import linear as kernels


# The name of the inference forward of few rows among the products (it may split its K loop).
FEW_ROWS_PRODUCT = "y (few rows)"
# The name of the merged weight of the inference forward of many rows.
MERGE_PRODUCT = "merged weight"
# The name of the backward's one pass over dy (g, dU and dS), where its configurations apply.
GRADIENT_PASS_PRODUCT = "g+dU+dS"


@dataclass
class Product:
    """One launch: ``launch(config)`` writes ``outputs`` (``config=None``: the tuned choice);
    ``reference()`` computes them with PyTorch in float32; ``bytes`` is what the launch must
    read and write at the least; ``flops`` its multiply-add work."""

    name: str
    launch: Callable
    candidates: list
    outputs: tuple
    reference: Callable
    bytes: int
    flops: int


def step_products(x, weight, U, S, Vt, dy, scale, *, rank_zero=False) -> list[Product]:
    """The launches of one step on these inputs (2-D x ``[M, in]``, dy ``[M, out]``), in the
    order the step runs them, with the inference forward's launch after y; the inputs z and g
    of later launches are produced by earlier ones, the rank tails' ``U ⊙ S`` and ``Vtᵀ ⊙ S``
    here, once (a small launch each, not timed). ``rank_zero``: y and dx without the rank tail
    (the bare GEMMs of the extended kernel)."""
    rows, in_features = x.shape
    out_features, rank = U.shape
    acc = accumulation_dtype(x.dtype)
    z, g = kernels._rank_buffer(x, rows, rank), kernels._rank_buffer(dy, rows, rank)
    y, dx = torch.empty_like(dy), torch.empty_like(x)
    dU, dS, dVt = (torch.empty(t.shape, dtype=acc, device=x.device) for t in (U, S, Vt))
    up, down = kernels.scaled_columns(U, S, x.dtype).T, kernels.scaled_columns(Vt.T, S, x.dtype).T
    tail = slice(0, 0) if rank_zero else slice(None)
    z_tail, g_tail, up_tail, down_tail = z[:, tail], g[:, tail], up[tail], down[tail]
    size, adapter = x.element_size(), U.element_size()

    def scaled(t):
        return t * (S.to(acc) * scale)

    def y_reference():
        out = F.linear(x, weight).to(acc)
        return ((out + scaled(x.to(acc) @ Vt.to(acc).T) @ U.to(acc).T) if not rank_zero else out).to(x.dtype)

    def dx_reference():
        out = (dy @ weight).to(acc)
        return ((out + scaled(dy.to(acc) @ U.to(acc)) @ Vt.to(acc)) if not rank_zero else out).to(x.dtype)

    def dU_reference():
        raw = dy.to(acc).T @ (x.to(acc) @ Vt.to(acc).T) * scale
        return raw * S.to(acc), (raw * U.to(acc)).sum(0)

    def dVt_reference():
        return (x.to(acc).T @ (dy.to(acc) @ U.to(acc) * scale) * S.to(acc)).T

    def reduction(c=None):
        dS.zero_()  # row_reduction adds into it
        return kernels.row_reduction(dy, z, S, dU, U, dS, c)

    def gradient_pass(c=None):
        dS.zero_()  # gradient_pass adds into it
        return kernels.gradient_pass(dy, U, z, S, g, dU, dS, scale, c)

    gemm_flops = 2 * rows * in_features * out_features
    tail_flops = 0 if rank_zero else 2 * rows * rank * max(in_features, out_features)
    products = [
        Product("z", lambda c=None: kernels.rank_down(x, Vt.T, z, scale, c), kernels.rank_down_candidates(x, Vt.T), (z,),
                lambda: (scale * (x.to(acc) @ Vt.to(acc).T),),
                rows * in_features * size + rank * in_features * adapter, 2 * rows * in_features * rank),
        Product("y", lambda c=None: kernels.extended_matmul(x, weight.T, z_tail, up_tail, None, y, c),
                kernels.matmul_candidates(x, weight.T, z_tail, up_tail, None, y), (y,), lambda: (y_reference(),),
                (rows * (in_features + out_features) + in_features * out_features) * size, gemm_flops + tail_flops),
        Product("dU+dS", reduction, kernels.row_reduction_candidates(dy, z, reduction=True), (dU, dS), dU_reference,
                rows * (out_features + rank) * size, 2 * rows * out_features * rank),
        Product("g", lambda c=None: kernels.rank_down(dy, U, g, scale, c), kernels.rank_down_candidates(dy, U), (g,),
                lambda: (scale * (dy.to(acc) @ U.to(acc)),),
                rows * out_features * size + rank * out_features * adapter, 2 * rows * out_features * rank),
        Product("dx", lambda c=None: kernels.extended_matmul(dy, weight, g_tail, down_tail, None, dx, c),
                kernels.matmul_candidates(dy, weight, g_tail, down_tail, None, dx), (dx,), lambda: (dx_reference(),),
                (rows * (in_features + out_features) + in_features * out_features) * size, gemm_flops + tail_flops),
        Product("dVt", lambda c=None: kernels.row_reduction(x, g, S, dVt.T, config=c),
                kernels.row_reduction_candidates(x, g), (dVt,), lambda: (dVt_reference(),),
                rows * (in_features + rank) * size, 2 * rows * in_features * rank),
    ]  # fmt: skip
    joint = kernels.gradient_pass_candidates(dy, U, joint_only=True)
    if joint:  # g, dU and dS from one pass over dy, where it may replace the two launches before it
        products.insert(4, Product(
            GRADIENT_PASS_PRODUCT, gradient_pass, joint, (g, dU, dS),
            lambda: (scale * (dy.to(acc) @ U.to(acc)), *dU_reference()),
            rows * (out_features + 2 * rank) * size + rank * out_features * adapter, 6 * rows * out_features * rank,
        ))  # fmt: skip
    if rows <= kernels.FEW_ROWS and x.dtype != torch.float64 and not rank_zero:
        # The no-grad forward of decode: y again, from x and the adapters (few_rows_forward).
        y_few = torch.empty_like(dy)
        products.insert(2, Product(
            FEW_ROWS_PRODUCT, lambda c=None: kernels.few_rows_forward(x, weight, U, S, Vt, None, scale, y_few, c),
            kernels.few_rows_candidates(x, weight, y_few), (y_few,), lambda: (y_reference(),),
            (rows * (in_features + out_features) + in_features * out_features) * size
            + rank * (in_features + out_features) * adapter,
            gemm_flops + 2 * rows * rank * (in_features + out_features),
        ))  # fmt: skip
    if rows > kernels.FEW_ROWS and kernels._mergeable(x, weight, None) and not rank_zero:
        # The no-grad forward of many rows by a merged weight: its merge (cuBLAS's product follows).
        merged = torch.empty_like(weight)
        products.insert(2, Product(
            MERGE_PRODUCT, lambda c=None: kernels.merge_weight(weight, U, S, Vt, scale, merged, c),
            kernels.merge_candidates(U), (merged,),
            lambda: ((weight.to(acc) + scaled(U.to(acc)) @ Vt.to(acc)).to(x.dtype),),
            2 * in_features * out_features * size + rank * (in_features + out_features) * adapter,
            2 * in_features * out_features * rank,
        ))  # fmt: skip
    return products


def step_ways(x, weight, U, S, Vt, dy, scale) -> dict[str, dict]:
    """``{"forward": {way: run}, "backward": {way: run}}``: every way the Triton backend's
    forward and backward may take on these inputs (apart, and with passes beside the GEMM where
    they apply), each ``run()`` computing the direction's outputs that way: what
    bench/probe_way_choice.py times and the sm_90 compile check compiles."""
    rows, rank = x.shape[0], U.shape[1]
    z, g = kernels._rank_buffer(x, rows, rank), kernels._rank_buffer(dy, rows, rank)
    y, up, down = torch.empty_like(dy), kernels.scaled_columns(U, S, x.dtype).T, Vt.T
    acc = accumulation_dtype(x.dtype)
    dU, dS = torch.empty_like(U, dtype=acc), torch.zeros_like(S, dtype=acc)
    forward = (x, weight.T, down, up, None, scale, z, y)
    backward = (dy, x, z, weight, U, S, Vt, scale, g, dU, dS, True, True)
    return {
        "forward": {way: functools.partial(kernels._forward_by, way, *forward)
                    for way in kernels._forward_ways(x, weight.T, down, up, z, y)},
        "backward": {way: functools.partial(kernels._backward_by, way, *backward)
                     for way in kernels._backward_ways(dy, x, z, weight, U, True, g)},
    }  # fmt: skip


def compiled_variants(product: Product) -> list:
    """The candidates of ``product`` with, for each unsplit one of a kernel that may split (the
    skinny ones and the few-row forward), a split twin: a split is a runtime argument, but 1
    compiles its own binary (without atomics), and which splits are candidates depends on the
    GPU's SM count (on meta tensors: none)."""
    twins = [
        dataclasses.replace(c, split=2) for c in product.candidates
        if c.split == 1 and (product.name == FEW_ROWS_PRODUCT or "TILE" in c.kwargs)
    ]  # fmt: skip
    return product.candidates + [t for t in twins if t not in product.candidates]


def gpu_target():
    """This machine's CUDA target read from nvidia-smi, so that the caller may still fork before
    it initializes CUDA (``None`` without a visible GPU)."""
    try:
        line = subprocess.run(
            ["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True, text=True, check=True
        ).stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return None
    major, minor = line.split(".")
    return GPUTarget("cuda", int(major) * 10 + int(minor), 32)


def meta_step_inputs(rows, in_features, out_features, rank, dtype, adapter_dtype):
    """``(x, weight, U, S, Vt, dy)`` of one training step as meta tensors (shapes and dtypes
    only): what the launch functions need to pick and compile their kernels, without a GPU."""
    meta = dict(device="meta")
    x = torch.empty(rows, in_features, dtype=dtype, **meta)
    weight = torch.empty(out_features, in_features, dtype=dtype, **meta)
    U, S = torch.empty(out_features, rank, dtype=adapter_dtype, **meta), torch.empty(rank, dtype=adapter_dtype, **meta)
    Vt = torch.empty(rank, in_features, dtype=adapter_dtype, **meta)
    dy = torch.empty(rows, out_features, dtype=dtype, **meta)
    return x, weight, U, S, Vt, dy


def precompile(cases, *, sweep=False, workers=None) -> tuple[int, list[str]]:
    """Compile, in parallel processes, every candidate launch of the step's products for each case
    ``(M, in, out, r, x dtype, adapter dtype)`` for this machine's GPU, into Triton's cache; with
    ``sweep`` also what bench/sweep_linear.py times besides (the GEMMs without the rank tail, and
    with the pointer kernel's configurations). Call it before this process initializes CUDA (it
    forks). Returns the number of launches and the errors met (none compile twice)."""
    try:
        from sorsa_kernels.benchmark.precompile import captured_launches, compile_all
    except ImportError as error:  # triton's compiler internals it uses changed
        return 0, [f"this triton cannot precompile ({error}): kernels compile on first launch"]
    target = gpu_target()
    if target is None:
        return 0, ["no GPU visible to nvidia-smi: nothing precompiled"]
    with captured_launches(kernels.KERNELS) as launches:
        for rows, in_features, out_features, rank, dtype, adapter_dtype in cases:
            x, weight, U, S, Vt, dy = meta_step_inputs(rows, in_features, out_features, rank, dtype, adapter_dtype)
            for bare in (False, True) if sweep else (False,):
                for product in step_products(x, weight, U, S, Vt, dy, 0.5, rank_zero=bare):
                    configs = compiled_variants(product)
                    if sweep and product.name in ("y", "dx"):
                        configs += kernels._matmul_candidates(rows, x.element_size(), tma=False)
                    for config in configs:
                        product.launch(config)
    results = compile_all(launches, target, workers)
    return len(launches), sorted({r for r in results if isinstance(r, str)})
