"""Can a TMA product of few rows match cuBLAS? ``y = x Wᵀ`` alone (no rank path), x ``[M, K]``
with M ≤ 64, W ``[N, K]`` bfloat16, both read by TMA in a software pipeline of STAGES copies:
each program takes BLOCK_N columns and one of SPLIT K ranges (split sums added into a zeroed
float32 buffer). SWAP computes ``yᵀ = W xᵀ``, the weight's columns in the tensor cores' M
dimension and the few rows in their N dimension, as cuBLAS's decode kernels do. Every
configuration is checked against ``F.linear`` and timed by its kernels' device time (profiler,
the weight warm in L2 as in the linear bench's graph replays) beside cuBLAS's.
``python bench/probe_decode_tma.py [--shapes MxINxOUT ...]`` on a GPU, from the repository root;
raw output in ``bench/results/decode-tma-probe-*.txt``.
"""

import itertools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from probe_decode import kernel_us, main_over_shapes
from triton.tools.tensor_descriptor import TensorDescriptor

SHAPES = [(8, 4096, 4096), (64, 4096, 4096), (64, 4096, 14336)]


@triton.jit
def _few_rows_product_kernel(x_desc, w_desc, y_ptr, M, N, K, SPLIT, stride_ym, SWAP: tl.constexpr,
                             STAGES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)
    off_n = (pid // SPLIT) * BLOCK_N
    steps = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT)
    k_first = (pid % SPLIT) * steps
    k_last = tl.minimum(k_first + steps, tl.cdiv(K, BLOCK_K))
    if SWAP:
        acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for k in tl.range(k_first, k_last, num_stages=STAGES):
            acc_t = tl.dot(w_desc.load([off_n, k * BLOCK_K]), x_desc.load([0, k * BLOCK_K]).T, acc_t)
        acc = acc_t.T
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in tl.range(k_first, k_last, num_stages=STAGES):
            acc = tl.dot(x_desc.load([0, k * BLOCK_K]), w_desc.load([off_n, k * BLOCK_K]).T, acc)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = off_n + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    if SPLIT == 1:
        tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(ptrs, acc, mask=mask, sem="relaxed")


def configs(rows: int, cols: int):
    block_m = max(16, triton.next_power_of_2(rows))
    for block_n, block_k, stages, swap in itertools.product((32, 64, 128, 256), (64, 128), (4, 6), (False, True)):
        if swap and block_n < 64 or stages * (block_m + block_n) * block_k * 2 > 200 * 1024:
            continue
        tiles = triton.cdiv(cols, block_n)
        for split in (1, 2, 4, 8, 16):
            if 96 <= tiles * split <= 600:
                yield {"SWAP": swap, "STAGES": stages, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k}, split


def probe(rows: int, inner: int, cols: int):
    device = torch.device("cuda")
    x = torch.randn(rows, inner, device=device, dtype=torch.bfloat16)
    weight = torch.randn(cols, inner, device=device, dtype=torch.bfloat16) / inner**0.5
    expected = F.linear(x, weight).float()
    cublas = kernel_us(lambda: F.linear(x, weight))
    print(f"\n== M={rows} {inner}->{cols}: cuBLAS {sum(cublas.values()):.2f} us "
          + " + ".join(f"{us:.2f} ({name[:40]})" for name, us in cublas.items()))  # fmt: skip
    results = []
    for meta, split in configs(rows, cols):
        x_desc = TensorDescriptor.from_tensor(x, [meta["BLOCK_M"], meta["BLOCK_K"]])
        w_desc = TensorDescriptor.from_tensor(weight, [meta["BLOCK_N"], meta["BLOCK_K"]])
        out_dtype = torch.float32 if split > 1 else x.dtype
        grid = (triton.cdiv(cols, meta["BLOCK_N"]) * split,)

        def run(split=split, out_dtype=out_dtype, grid=grid, meta=meta, x_desc=x_desc, w_desc=w_desc):
            y = (torch.zeros if split > 1 else torch.empty)(rows, cols, device=device, dtype=out_dtype)
            _few_rows_product_kernel[grid](x_desc, w_desc, y, rows, cols, inner, split, y.stride(0), num_warps=4,
                                           **meta)  # fmt: skip
            return y

        y = torch.full((rows, cols), float("nan"), device=device)
        y.copy_(run())
        error = ((y - expected).norm() / expected.norm()).item()
        times = kernel_us(run)
        total = sum(times.values())
        results.append((total, meta, split, error))
        print(f"  {total:6.2f} us  split={split} {meta}  rel err {error:.1e}")
    best = min(results, key=lambda r: r[0])
    print(f"best: {best[0]:.2f} us against cuBLAS {sum(cublas.values()):.2f} us  split={best[2]} {best[1]}")


if __name__ == "__main__":
    main_over_shapes(__doc__, SHAPES, probe)
