"""Compile the ortho_reg Triton kernel for sm_90 (H100) without a GPU, as test_ortho runs it in a
subprocess (TRITON_INTERPRET must be unset for that): the default configuration of each launch of
the step (float32 as float16 pairs at R = 16, 32, 64 and 128; float32 TF32 and bfloat16 at R =
128) and of the autograd passes (float32 pairs, R = 128) must compile and fit the shared memory
of one H100 block. Prints one line per variant with its shared memory, registers and spills (ptxas of
the Triton install, on the PTX): spills are a matter for the benchmark (the fastest tiles
measured spill a little, see ``default_configs``).

``python tests/ortho_hopper_compile.py [--all]``: ``--all`` compiles every tile configuration
the benchmark sweep tries instead, in every mode (a look at their resources before a GPU run).
"""

import os
import re
import subprocess
import sys
import tempfile

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from sorsa_kernels.triton import ortho  # noqa: E402

H100_SHARED_BYTES = 232448
ALIGNED_POINTERS = [["tt.divisibility", 16]]
POINTERS = {"mats": "*i64", "outs": "*i64", "work": "*i32", "queue": "*i32", "arrivals": "*i32", "inverses": "*i32",
            "deviations": "*fp32", "norms": "*fp32", "value": "*fp32", "scale": "*fp32"}
FLOATS = {"coeff_hi": "fp32", "coeff_lo": "fp32"}
INT64 = {"out_base": "i64"}


def triton_ptxas() -> str:
    """The ptxas Triton compiles with (its own, or the one TRITON_PTXAS_PATH names), whose PTX
    version matches the PTX Triton writes."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(90).path
    except ImportError:  # triton < 3.4
        from triton.backends.nvidia.compiler import _path_to_binary

        return _path_to_binary("ptxas")[0]


def ptxas_usage(ptx: str) -> tuple[int, int]:
    """(registers, spill bytes) of the kernel, from ptxas -v."""
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "kernel.ptx")
        with open(source, "w") as f:
            f.write(ptx)
        result = subprocess.run([triton_ptxas(), "--gpu-name", "sm_90a", "-v", source, "-o", os.path.join(tmp, "k.cubin")],
                                capture_output=True, text=True)  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"ptxas failed:\n{result.stderr}")
        report = result.stderr
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", report))
    return registers, spills


def compile_variant(dtype, precision: int, block_r: int, mode: str, config) -> tuple[int, int, int]:
    fn = ortho._ortho_kernel
    itemsize = dtype.primitive_bitwidth // 8
    constexprs = dict(
        DTYPE=dtype, ACC_DTYPE=tl.float32, PRECISION=precision, GRAM=ortho.LAUNCH_MODES[mode].gram,
        GRADIENT_PHASE=ortho.LAUNCH_MODES[mode].gradient, VALUE=mode != "backward", SCALED=mode == "backward",
        ACCUMULATE=ortho.LAUNCH_MODES[mode].accumulate, GRAM_ROWS=config.gram_rows, GRADIENT_ROWS=config.gradient_rows,
        BLOCK=min(block_r, config.gram_block), NUM_BLOCKS=max(1, block_r // config.gram_block),
        BLOCK_N=min(config.block_n, block_r), BLOCK_K=min(block_r, ortho.MAX_GRAM_BLOCK),
        NUM_K=max(1, block_r // ortho.MAX_GRAM_BLOCK),
        COMPLETE_ROWS=ortho._complete_rows(block_r, min(block_r, ortho.MAX_GRAM_BLOCK), config.num_warps),
        ALIGNED=True, OUT_ALIGNED=True, VEC=16 // itemsize,
        VALUE_BLOCK=1024, OUTPUT_STAGES=config.output_stages, GRAM_TMA=config.gram_tma,
    )
    signature = {name: "constexpr" if name in constexprs else {**POINTERS, **FLOATS, **INT64}.get(name, "i32")
                 for name in fn.arg_names}
    attrs = {(fn.arg_names.index(name),): ALIGNED_POINTERS for name in POINTERS}
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                            options=options)
    registers, spills = ptxas_usage(kernel.asm["ptx"])
    return kernel.metadata.shared, registers, spills


def main():
    configs_of = None
    if "--all" in sys.argv:
        from sorsa_kernels.benchmark.ortho import sweep_configs

        configs_of = sweep_configs
    failures = 0
    variants = [(tl.float32, ortho.F32_SPLIT16.value), (tl.float32, ortho.F32_TF32.value), (tl.bfloat16, ortho.HALF.value)]
    for dtype, precision in variants[:1] if configs_of else variants:  # the sweep times float32 sets
        # Every width of the float16 pairs, the widest of the others (their narrow ones stay far
        # below the register file); the sweep's two.
        if configs_of:
            widths = (16, 128)
        elif precision == ortho.F32_SPLIT16.value:
            widths = (16, 32, 64, 128)
        else:
            widths = (128,)
        for block_r in widths:
            itemsize = dtype.primitive_bitwidth // 8
            if configs_of:
                modes = ("step", "forward", "backward")
            elif ortho.two_launch_step(precision, block_r):  # the step's two launches, the autograd passes
                modes = ("forward", "accumulate", "backward")
            else:
                modes = ("step",)
            for mode in modes:
                configs = configs_of(block_r) if configs_of else ortho.default_configs(precision, block_r, itemsize, mode)
                for config in configs if configs_of and mode == "step" else configs[:1]:
                    shared, registers, spills = compile_variant(dtype, precision, block_r, mode, config)
                    bad = shared > H100_SHARED_BYTES
                    print(f"{'FAIL ' if bad else ''}{mode} {dtype} precision {precision} R={block_r} {config}: "
                          f"shared {shared}, {registers} registers, {spills} bytes spilled")
                    failures += bad
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
