"""Where the two launches of the ortho step spend their time: the Llama-2-7B adapter set at
r = 128 (float32), its Gram and gradient launches timed as shipped and with parts of their tile
loops taken out or changed (each variant in its own process, patched before the first compile);
``--once`` runs each launch once after a warm-up (for ncu). ``python bench/probe_ortho_gram.py
[variant | --once]`` on a GPU; variants: shipped, tf32; of the Gram loop no_squares, one_product,
loads_only, fixed_scale (every tile split at one fixed scale, without its largest magnitude); of
the gradient product gradient_tile_scale (each factor tile split by its own largest magnitude, as
before the matrices' scales came from the Gram launch), gradient_one_product, gradient_no_product
(loads and stores only)."""

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


@triton.jit
def _split_fixed_scale(x):
    scaled = x * 1024.0
    hi = scaled.to(tl.float16)
    return hi, (scaled - hi.to(tl.float32)).to(tl.float16), 1.0 / 1024.0


@triton.jit
def _product_tile_scale(zero, x, x_scale, x_inverse, d_hi, d_lo, d_inverse, PRECISION: tl.constexpr):
    x_hi, x_lo, x_inverse = T._split_fp16(x.to(tl.float32))
    product = tl.dot(x_lo, d_hi, zero)
    product = tl.dot(x_hi, d_lo, product)
    return tl.dot(x_hi, d_hi, product) * (x_inverse * d_inverse)


@triton.jit
def _product_one(zero, x, x_scale, x_inverse, d_hi, d_lo, d_inverse, PRECISION: tl.constexpr):
    return tl.dot((x.to(tl.float32) * x_scale).to(tl.float16), d_hi, zero) * (x_inverse * d_inverse)


@triton.jit
def _product_none(zero, x, x_scale, x_inverse, d_hi, d_lo, d_inverse, PRECISION: tl.constexpr):
    return zero + tl.sum(x.to(tl.float32), axis=1)[:, None]


VARIANTS = {"no_squares": _rows_without_squares, "one_product": _rows_one_product, "loads_only": _rows_loads_only}
SPLIT_VARIANTS = {"fixed_scale": _split_fixed_scale}
GRADIENT_VARIANTS = {"gradient_tile_scale": _product_tile_scale, "gradient_one_product": _product_one,
                     "gradient_no_product": _product_none}


def main():
    variant = sys.argv[1] if len(sys.argv) > 1 else "shipped"
    if variant == "tf32":
        torch.backends.cuda.matmul.allow_tf32 = True
    elif variant in VARIANTS:
        T._gram_rows = VARIANTS[variant]
    elif variant in SPLIT_VARIANTS:
        T._split_fp16 = SPLIT_VARIANTS[variant]
    elif variant in GRADIENT_VARIANTS:
        T._product = GRADIENT_VARIANTS[variant]
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
    print(f"{variant:22s} gram {gram_ms:.3f} ms ({gigabytes / gram_ms:.2f} TB/s of factors)   "
          f"accumulate {accumulate_ms:.3f} ms ({3 * gigabytes / accumulate_ms:.2f} TB/s)")


if __name__ == "__main__":
    main()
