"""Where the rank tail of the fused TMA GEMM costs its time: the forward product
``y = x Wᵀ + t (U⊙S)ᵀ`` with the tail's K steps before the main loop (as shipped), after it,
merged into the main loop (one loop whose steps past K load t and U⊙S), or absent, timed side by
side with cuBLAS's ``F.linear`` (one GPU call).

    python bench/probe_tail.py --compile     # sm_90 compile only (no GPU): registers, shared memory
    python bench/probe_tail.py               # on the GPU: times and errors
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sorsa_kernels.triton.common import PlannedDescriptor  # noqa: E402
from sorsa_kernels.triton.linear import _grouped_tile  # noqa: E402

NONE, FIRST, LAST, MERGED = 0, 1, 2, 3
PLACES = {"none": NONE, "first": FIRST, "last": LAST, "merged": MERGED}


@triton.jit
def _probe_kernel(a_desc, b_desc, t_desc, tb_desc, c, M, N, K, RANK, PROGRAMS,
                  PLACE: tl.constexpr, TAIL_K: tl.constexpr, TAIL_STAGES: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):  # fmt: skip
    DTYPE: tl.constexpr = a_desc.dtype
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    k_steps = tl.cdiv(K, BLOCK_K)
    for tile in range(tl.program_id(0), tiles_m * tiles_n, PROGRAMS):
        pid_m, pid_n = _grouped_tile(tile, tiles_m, tiles_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if PLACE == 1:
            for r0 in tl.range(0, RANK, TAIL_K, num_stages=TAIL_STAGES):
                acc = tl.dot(t_desc.load([off_m, r0]), tb_desc.load([off_n, r0]).T, acc)
        if PLACE == 3:
            tail_steps = tl.cdiv(RANK, BLOCK_K)
            for k in range(k_steps + tail_steps):
                if k < k_steps:
                    a = a_desc.load([off_m, k * BLOCK_K])
                    b = b_desc.load([off_n, k * BLOCK_K])
                else:
                    a = t_desc.load([off_m, (k - k_steps) * BLOCK_K])
                    b = tb_desc.load([off_n, (k - k_steps) * BLOCK_K])
                acc = tl.dot(a, b.T, acc)
        else:
            for k in range(k_steps):
                acc = tl.dot(a_desc.load([off_m, k * BLOCK_K]), b_desc.load([off_n, k * BLOCK_K]).T, acc)
        if PLACE == 2:
            for r0 in tl.range(0, RANK, TAIL_K, num_stages=TAIL_STAGES):
                acc = tl.dot(t_desc.load([off_m, r0]), tb_desc.load([off_n, r0]).T, acc)
        halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
        left, right = tl.split(halves)
        c.store([off_m, off_n], left.to(DTYPE))
        c.store([off_m, off_n + BLOCK_N // 2], right.to(DTYPE))


def launch(place, x, weight, t, tb, y, tail_k=32, tail_stages=2, block=(128, 256, 64), warps=8, stages=3, programs=None):
    """y = x weightᵀ + t tbᵀ (tb [N, r]) with the tail at ``place``."""
    bm, bn, bk = block
    rows, inner = x.shape
    cols, rank = tb.shape
    tail = bk if place == "merged" else min(tail_k, max(16, triton.next_power_of_2(rank)))
    tiles = triton.cdiv(rows, bm) * triton.cdiv(cols, bn)
    programs = programs or tiles
    _probe_kernel[(programs,)](
        PlannedDescriptor(x, [rows, inner], [x.stride(0), 1], [bm, bk]),
        PlannedDescriptor(weight, [cols, inner], [weight.stride(0), 1], [bn, bk]),
        PlannedDescriptor(t, [rows, rank], [t.stride(0), 1], [bm, tail]),
        PlannedDescriptor(tb, [cols, rank], [tb.stride(0), 1], [bn, tail]),
        PlannedDescriptor(y, [rows, cols], [y.stride(0), 1], [bm, bn // 2]),
        rows, cols, inner, rank, programs,
        PLACE=PLACES[place], TAIL_K=tail, TAIL_STAGES=tail_stages, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip


VARIANTS = [("none", {}), ("first", {}), ("first", dict(tail_k=64, tail_stages=1)), ("last", {}),
            ("last", dict(tail_k=64, tail_stages=1)), ("merged", {}), ("merged", dict(stages=4, block=(128, 256, 64)))]  # fmt: skip
CASES = [(4096, 4096, 4096, 16), (4096, 4096, 4096, 128), (16384, 4096, 4096, 128), (16384, 4096, 11008, 128),
         (16384, 11008, 4096, 128), (16384, 4096, 11008, 16)]  # fmt: skip


def operands(rows, inner, cols, rank, device):
    x = torch.randn(rows, inner, device=device, dtype=torch.bfloat16)
    weight = (torch.randn(cols, inner, device=device) / inner**0.5).to(torch.bfloat16)
    width = -(-rank // 8) * 8
    t = torch.randn(rows, width, device=device, dtype=torch.bfloat16)[:, :rank]
    tb = (torch.randn(cols, width, device=device) / rank**0.5).to(torch.bfloat16)[:, :rank]
    return x, weight, t, tb, torch.empty(rows, cols, device=device, dtype=torch.bfloat16)


def compile_only():
    from triton.backends.compiler import GPUTarget

    from sorsa_kernels.benchmark.precompile import captured_launches, compile_all, resource_usage

    labelled = []
    with captured_launches([_probe_kernel]) as launches:
        for rank in (16, 128):
            tensors = operands(4096, 4096, 4096, rank, "meta")
            for place, options in VARIANTS:
                del launches[:]
                launch(place, *tensors, **options)
                labelled.append((f"r={rank} {place} {options}", launches[0]))

    def usage(compiled):
        ttgir = compiled.asm["ttgir"]
        return (compiled.metadata.shared, *resource_usage(compiled.asm["cubin"]),
                ttgir.count("async_tma_copy_global_to_local"), ttgir.count("pendings = 0"))  # fmt: skip

    for (label, _), result in zip(labelled, compile_all([l for _, l in labelled], GPUTarget("cuda", 90, 32), summarize=usage)):
        if isinstance(result, str):
            print(label, result)
        else:
            shared, registers, stack, loads, waits = result
            print(f"{label} shared {shared} registers {registers} stack {stack} tma-loads {loads} full-waits {waits}")


def time_all():
    from triton.testing import do_bench

    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    for rows, inner, cols, rank in CASES:
        x, weight, t, tb, y = operands(rows, inner, cols, rank, "cuda")
        expected = (x.double() @ weight.double().T + t.double() @ tb.double().T)
        dense = do_bench(lambda x=x, weight=weight: torch.nn.functional.linear(x, weight), return_mode="median")
        print(f"== {rows}x{inner}->{cols} r={rank}: cuBLAS {dense * 1e3:.1f} us")
        for place, options in VARIANTS:
            y.fill_(float("nan"))
            def run(place=place, options=options, operands=(x, weight, t, tb, y)):
                launch(place, *operands, **options)

            run()
            reference = expected if place != "none" else x.double() @ weight.double().T
            err = ((y.double() - reference).norm() / reference.norm()).item()
            ms = do_bench(run, return_mode="median")
            print(f"  {place:7s} {str(options):45s} {ms * 1e3:8.1f} us  {ms / dense:.3f}x cuBLAS  err {err:.1e}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compile", action="store_true", help="compile for sm_90 only (no GPU needed)")
    args = parser.parse_args()
    compile_only() if args.compile else time_all()
