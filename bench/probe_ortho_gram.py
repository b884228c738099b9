"""Where the Gram launch of the ortho step spends its time: the Llama-2-7B adapter set at
r = 128 (float32), its Gram launch timed as shipped and with parts of its tile loop taken out
(each variant in its own process, patched before the first compile), and its gradient launch;
``--once`` runs each launch once after a warm-up (for ncu). ``python bench/probe_ortho_gram.py
[variant | --once]`` on a GPU; variants: shipped, tf32, no_squares, one_product, loads_only."""

import sys

import torch
import triton
import triton.language as tl

from sorsa_kernels.benchmark.common import median_ms
from sorsa_kernels.benchmark.ortho import LLAMA2_7B, adapter_set
from sorsa_kernels.triton import ortho as T

sys.path.insert(0, "bench")
from probe_ortho_split import phases


@triton.jit
def _rows_without_squares(acc, squares, ptr, stride_l, stride_r, row_start, row_end, rank, cols_a, cols_b,
                          inverse_length, BLOCK_L: tl.constexpr, PRECISION: tl.constexpr, SAME: tl.constexpr,
                          VECTOR: tl.constexpr):
    fresh = tl.full(acc.shape, row_end.to(tl.float32) * 0.0, acc.dtype)
    for start in range(row_start, row_end, BLOCK_L):
        rows = start + tl.arange(0, BLOCK_L)
        xa = T._load_tile(ptr, rows, cols_a, stride_l, stride_r, row_end, rank, VECTOR)
        acc += T._gram_product(fresh, xa, xa, PRECISION, True)
    return acc, squares


@triton.jit
def _rows_one_product(acc, squares, ptr, stride_l, stride_r, row_start, row_end, rank, cols_a, cols_b,
                      inverse_length, BLOCK_L: tl.constexpr, PRECISION: tl.constexpr, SAME: tl.constexpr,
                      VECTOR: tl.constexpr):
    for start in range(row_start, row_end, BLOCK_L):
        rows = start + tl.arange(0, BLOCK_L)
        xa = T._load_tile(ptr, rows, cols_a, stride_l, stride_r, row_end, rank, VECTOR).to(tl.float16)
        acc = tl.dot(tl.trans(xa), xa, acc)
    return acc, squares


@triton.jit
def _rows_loads_only(acc, squares, ptr, stride_l, stride_r, row_start, row_end, rank, cols_a, cols_b,
                     inverse_length, BLOCK_L: tl.constexpr, PRECISION: tl.constexpr, SAME: tl.constexpr,
                     VECTOR: tl.constexpr):
    column = tl.zeros((BLOCK_L, acc.shape[1]), acc.dtype)
    for start in range(row_start, row_end, BLOCK_L):
        rows = start + tl.arange(0, BLOCK_L)
        column += T._load_tile(ptr, rows, cols_a, stride_l, stride_r, row_end, rank, VECTOR)
    acc += tl.sum(column, axis=0)[None, :]
    return acc, squares


VARIANTS = {"no_squares": _rows_without_squares, "one_product": _rows_one_product, "loads_only": _rows_loads_only}


def main():
    variant = sys.argv[1] if len(sys.argv) > 1 else "shipped"
    if variant == "tf32":
        torch.backends.cuda.matmul.allow_tf32 = True
    elif variant in VARIANTS:
        T._gram_rows = VARIANTS[variant]
    Us, Vts = adapter_set(LLAMA2_7B, 32, 128, "cuda")
    gram, accumulate = phases(T.prepare(Us, Vts), [p.grad for p in Us + Vts])
    gram()
    accumulate()
    torch.cuda.synchronize()
    if variant == "--once":
        gram()
        accumulate()
        torch.cuda.synchronize()
        return
    gigabytes = sum(p.nbytes for p in Us + Vts) / 1e9
    gram_ms = median_ms(gram)
    accumulate_ms = median_ms(accumulate)
    print(f"{variant:12s} gram {gram_ms:.3f} ms ({gigabytes / gram_ms:.2f} TB/s of factors)   "
          f"accumulate {accumulate_ms:.3f} ms ({3 * gigabytes / accumulate_ms:.2f} TB/s)")


if __name__ == "__main__":
    main()
