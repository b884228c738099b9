"""The ortho step's two kinds of work launched apart (every Gram matrix; every gradient added into
.grad), each timed alone under several configurations, beside the default step, for the
Llama-2-7B and Llama-3-8B adapter sets at r = 128 (``--r16``: r = 16; ``--chunks``: r = 128, the
two launches under work items of several sizes; ``--blocks``: r = 128, every launch in the gradient
items' 4-warp programs, the Gram matrices summed as 64-wide block pairs, the step fused at several
lags). What chose ``two_launch_step`` and the per-mode defaults of ``sorsa_kernels.triton.ortho``;
raw output in ``bench/results/ortho-split-probe-*.txt`` (``--chunks``: ``ortho-chunks-probe-*.txt``,
``--blocks``: ``ortho-blocks-probe-*.txt``; ``--tma``: the Gram launch's tiles read by TMA or through
pointers, ``ortho-tma-probe-*.txt``). ``python bench/probe_ortho_split.py [--r16 | --chunks | --blocks |
--tma]`` on a GPU."""

import dataclasses
import functools
import math
import sys

import torch
from triton.runtime import OutOfResources

from sorsa_kernels import ortho_reg_grad_
from sorsa_kernels.benchmark.common import median_ms
from sorsa_kernels.benchmark.ortho import LLAMA2_7B, LLAMA3_8B, adapter_set
from sorsa_kernels.triton import ortho as T

two_launch_step = T.two_launch_step


def phases(plan, grads):
    """(gram launch, accumulate launch) closures over one workspace."""
    saved, counters = plan.workspace()
    value = torch.empty((), dtype=plan.gram_dtype, device=plan.device)
    tables = plan.output_tables(grads)

    def gram():
        counters.zero_()
        for group in plan.groups:
            T._run(plan, group, "forward", plan.per_call(group, counters, saved, None, official=1))

    def accumulate():
        counters.zero_()
        for group, (table, aligned) in zip(plan.groups, tables):
            T._run(
                plan,
                group,
                "accumulate",
                plan.per_call(
                    group, counters, saved, value, official=1, outs=table, out_aligned=aligned, coeff=0.1
                ),
            )

    return gram, accumulate


def varied(rank: int, mode: str):
    """``dataclasses.replace`` bound to the default float32 configuration of a launch mode."""
    return functools.partial(dataclasses.replace, T.default_configs(T.F32_SPLIT16.value, rank, 4, mode)[0])


def main():
    sets = [("llama2 r=128", LLAMA2_7B, 128), ("llama3 r=128", LLAMA3_8B, 128)]
    if "--r16" in sys.argv:
        sets = [("llama2 r=16", LLAMA2_7B, 16), ("llama3 r=16", LLAMA3_8B, 16)]
    print(torch.cuda.get_device_name())
    for name, layer, rank in sets:
        Us, Vts = adapter_set(layer, 32, rank, "cuda")
        grads = [p.grad for p in Us + Vts]
        plan = T.prepare(Us, Vts)
        gram, accumulate = phases(plan, grads)
        step = functools.partial(ortho_reg_grad_, Us, Vts, 0.1, "official")
        fused_configs = []
        if "--chunks" in sys.argv:
            # A program restarts its loop's pipeline and settles its sums once per work item.
            G, A = varied(rank, "forward"), varied(rank, "accumulate")
            gram_configs = [
                G(chunk_rows=rows, num_stages=stages) for rows in (1024, 2048, 4096, 8192) for stages in (3, 4)
            ]
            accumulate_configs = [A(chunk_rows=rows) for rows in (1024, 2048, 4096)]
        elif "--tma" in sys.argv:
            # The Gram launch's tiles read by TMA (descriptors made in the kernel) against pointers.
            G, A = varied(rank, "forward"), varied(rank, "accumulate")
            gram_configs = [G(gram_tma=False), G(), G(num_stages=3), G(gram_rows=32, num_stages=6),
                            G(gram_rows=128, num_stages=2), G(chunk_rows=2048)]
            accumulate_configs = [A()]
            # The TMA launch against the pointer one: the same Gram matrices, so the same gradients.
            outputs = []
            for gram_config in (G(gram_tma=False), G()):
                for grad in grads:
                    grad.zero_()
                T.override = gram_config
                gram()
                T.override = A()
                accumulate()
                outputs.append([grad.clone() for grad in grads])
            T.override = None
            worst = max(((a - b).norm() / b.norm()).item() for a, b in zip(*outputs))
            print(f"{name}: Gram matrices by TMA: largest relative difference from pointers {worst:.1e}")
        elif "--blocks" in sys.argv:
            # One register allocation can serve both kinds of item when the Gram accumulators are 64 wide.
            A = varied(rank, "accumulate")
            gram_configs = [A(gram_block=64, chunk_rows=rows) for rows in (512, 1024, 4096)]
            accumulate_configs = [A()]
            fused_configs = [
                A(gram_block=64, lag=lag, chunk_rows=rows) for rows in (512, 1024) for lag in (0.5, 1.0, 2.0, math.inf)
            ]
        elif rank == 128:
            G, A = varied(rank, "forward"), varied(rank, "accumulate")
            gram_configs = [G(), G(num_stages=4), G(gram_rows=32, num_stages=4), G(gram_rows=32, num_stages=6),
                            G(num_warps=16)]
            accumulate_configs = [
                A(),
                A(num_stages=3),
                A(output_stages=2),
                A(block_n=128, num_warps=8, programs_per_sm=1),
                A(gradient_rows=128, block_n=128, num_warps=8, programs_per_sm=1),
                A(gradient_rows=32),
                A(gradient_rows=32, block_n=128),
                A(gradient_rows=16, block_n=128),
            ]
            # The step as one launch (both kinds of items) under the accumulate and the Gram shapes.
            fused_configs = [A(), G(gradient_rows=64, block_n=64)]
        else:
            C = varied(rank, "step")
            gram_configs = [C(), C(programs_per_sm=3), C(programs_per_sm=4), C(gram_rows=128), C(num_warps=8)]
            accumulate_configs = [
                C(),
                C(programs_per_sm=3),
                C(programs_per_sm=4),
                C(gradient_rows=256),
                C(output_stages=2),
            ]
        rows = []
        for round_ in range(2):
            rows.append((f"ortho_reg_grad_ (the default step) #{round_}", median_ms(step)))
            for phase, fn, configs in (("gram", gram, gram_configs), ("accumulate", accumulate, accumulate_configs),
                                       ("fused", step, fused_configs)):
                for config in configs:
                    T.override = config
                    T.two_launch_step = two_launch_step if phase != "fused" else lambda *args: False
                    try:
                        ms = median_ms(fn)
                    except OutOfResources as error:
                        ms = float("nan")
                        print(phase, config, type(error).__name__, str(error)[:100])
                    T.override = None
                    T.two_launch_step = two_launch_step
                    label = (
                        f"{phase} c{config.chunk_rows} g{config.gram_rows} d{config.gradient_rows} n{config.block_n} "
                        f"gb{config.gram_block} l{config.lag} w{config.num_warps} s{config.num_stages} "
                        f"pps{config.programs_per_sm} os{config.output_stages} tma{config.gram_tma:d} #{round_}"
                    )
                    rows.append((label, ms))
        print(f"--- {name}")
        for label, ms in rows:
            print(f"  {label:70s} {ms:8.3f} ms")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
