"""Compile the ortho_reg Triton kernels for sm_90 (H100) without a GPU, as test_ortho runs it
in a subprocess (TRITON_INTERPRET must be unset for that): every default configuration of the
main variants must compile and fit the shared memory of one H100 block. Prints one line per
kernel with its shared memory."""

import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from sorsa_kernels.triton import ortho  # noqa: E402

H100_SHARED_BYTES = 232448
ALIGNED_POINTERS = [["tt.divisibility", 16]]


def compile_kernel(fn, pointers: dict[str, str], constexprs: dict, config) -> int:
    signature = {name: "constexpr" if name in constexprs else pointers.get(name, "i32") for name in fn.arg_names}
    attrs = {(fn.arg_names.index(name),): ALIGNED_POINTERS for name in pointers}
    kernel = triton.compile(
        ASTSource(fn, signature, constexprs, attrs),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": config.num_warps, "num_stages": config.num_stages},
    )
    return kernel.metadata.shared


def main():
    failures = 0
    for dtype, precision in [(tl.float32, ortho.F32_3XTF32.value), (tl.float32, ortho.F32_TF32.value), (tl.bfloat16, ortho.HALF.value)]:
        for block_r in (16, 128):
            accumulator = tl.float32
            config = ortho._candidates("gram", precision, block_r)[0]
            gram = {"mats": "*i64", "work": "*i64", "grams": "*fp32"}
            constexprs = dict(DTYPE=dtype, ACC_DTYPE=accumulator, PRECISION=precision, BLOCK_L=config.block_l,
                              BLOCK=block_r, NUM_BLOCKS=1, ALIGNED=True, VEC=16 // (dtype.primitive_bitwidth // 8))
            shared = compile_kernel(ortho._gram_kernel, gram, constexprs, config)
            print(f"gram {dtype} precision {precision} R={block_r} {config}: shared {shared}")
            failures += shared > H100_SHARED_BYTES
            config = ortho._candidates("gradient", precision, block_r)[0]
            gradient = {"mats": "*i64", "outs": "*i64", "work": "*i64", "grams": "*fp32", "norms": "*fp32", "scale": "*fp32"}
            for accumulate in (True, False):
                constexprs = dict(DTYPE=dtype, ACC_DTYPE=accumulator, PRECISION=precision, ACCUMULATE=accumulate,
                                  BLOCK_L=config.block_l, BLOCK_N=config.block_n, BLOCK_K=block_r, NUM_K=1,
                                  ALIGNED=True, VEC=16 // (dtype.primitive_bitwidth // 8))
                shared = compile_kernel(ortho._gradient_kernel, gradient, constexprs, config)
                print(f"gradient {dtype} precision {precision} R={block_r} accumulate={accumulate} {config}: shared {shared}")
                failures += shared > H100_SHARED_BYTES
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
