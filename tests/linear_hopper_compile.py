"""Compile every candidate configuration of the sorsa_linear Triton kernels for sm_90 (H100)
without a GPU, as test_linear runs it in a subprocess (TRITON_INTERPRET must be unset): each must
fit the shared memory of one H100 block, and those of 16-bit and float32 operands must compile
without register spills (no stack frame in the cubin, per cuobjdump). The six launches of a training step run on meta tensors with
their kernel launches captured, so the arguments, specializations and configurations are exactly
those a GPU launch compiles; so do the forward's and the backward's ways with passes beside the
GEMM, with programmatic dependent launch as on an H100. Prints one line per compiled kernel.
"""

import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from sorsa_kernels.benchmark.linear_products import (  # noqa: E402
    compiled_variants,
    meta_step_inputs,
    step_products,
    step_ways,
)
from sorsa_kernels.benchmark.precompile import captured_launches, compile_all, resource_usage  # noqa: E402
from sorsa_kernels.triton import linear  # noqa: E402

H100_SHARED_BYTES = 232448
# (x dtype, adapter dtype, M, in, out, rank): the training shapes' classes (the smallest, the
# largest and an oversized rank), the one-pass gradient's class, unaligned rows, decode (at the
# largest rank too), and the other dtypes. (float16 compiles as bfloat16.)
CASES = [
    *((torch.bfloat16, torch.float32, 4096, 4096, 11008, rank) for rank in (16, 64, 128, 256)),
    *((torch.bfloat16, adapter, 16384, 4096, 11008, 32) for adapter in (torch.float32, torch.bfloat16)),
    (torch.bfloat16, torch.bfloat16, 4096, 4096, 4096, 128),
    *((torch.bfloat16, torch.float32, rows, 4100, 4096, 128) for rows in (4096, 8)),  # rows not 16-byte aligned
    *((torch.float32, torch.float32, rows, 4095, 1027, 128) for rows in (1000, 8)),
    (torch.bfloat16, torch.float32, 8, 4096, 4096, 128),
    *((torch.bfloat16, torch.float32, rows, 4096, 4096, rank) for rows, rank in ((1, 256), (64, 128))),
    *((torch.float32, torch.float32, rows, 4096, 4096, 128) for rows in (4096, 8)),
    (torch.float64, torch.float64, 512, 256, 256, 32),
]


def launches_of(case):
    dtype, adapter_dtype, rows, in_features, out_features, rank = case
    x, weight, U, S, Vt, dy = meta_step_inputs(rows, in_features, out_features, rank, dtype, adapter_dtype)
    labelled = []
    with captured_launches(linear.KERNELS) as launches:
        for product in step_products(x, weight, U, S, Vt, dy, 0.5):
            assert product.candidates, f"{product.name}: no candidate configuration for {case}"
            for config in compiled_variants(product):
                del launches[:]
                product.launch(config)
                label = f"{product.name} {dtype}/{adapter_dtype} M={rows} r={rank} [{config}]"
                labelled += [(label, launch) for launch in launches]
        for direction, ways in step_ways(x, weight, U, S, Vt, dy, 0.5).items():
            for way, run in ways.items():
                if way != linear._APART:  # (apart: the products above)
                    del launches[:]
                    run()
                    label = f"{direction} {dtype}/{adapter_dtype} M={rows} r={rank} {way}"
                    labelled += [(label, launch) for launch in launches]
    return labelled


def usage(compiled):
    return compiled.metadata.shared, *resource_usage(compiled.asm["cubin"])


def main():
    linear._has_pdl = lambda device: True  # as on an H100 (meta tensors are on no GPU)
    os.environ[linear.AUTOTUNE_ENV] = "0"  # the ways' other launches take their first candidates: nothing is timed
    labelled = [item for case in CASES for item in launches_of(case)]
    results = compile_all([launch for _, launch in labelled], GPUTarget("cuda", 90, 32), summarize=usage)
    failures, seen = 0, set()
    for (label, launch), result in zip(labelled, results):
        if launch.key() in seen:
            continue
        seen.add(launch.key())
        if isinstance(result, str):
            failed, line = True, f"error {result}"
        else:
            shared, registers, stack = result
            first = launch.args[0]
            strict = getattr(first, "base", first).dtype != torch.float64  # float64 may spill: a correctness path
            failed = shared > H100_SHARED_BYTES or (strict and stack > 0)
            line = f"shared {shared} registers {registers} stack {stack}"
        failures += failed
        print(f"{'FAIL' if failed else 'ok  '} {label}: {line}", flush=True)
    print(f"{len(seen)} kernels, {failures} failures")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
