"""The decode forward next to cuBLAS under Nsight Compute: one ``F.linear`` and one no-grad
``sorsa_linear`` (Triton, tuned first) of M rows, each launched once inside a profiler range.

    ncu --profile-from-start off --section SpeedOfLight --section MemoryWorkloadAnalysis \\
        --section LaunchStats --section Occupancy --section WarpStateStats --section SchedulerStats \\
        python bench/ncu_decode.py [MxINxOUTxR]

ncu flushes the caches before each kernel: the weight comes from DRAM, where from CUDA graphs it
may stay in L2 between calls. Raw output in ``bench/results/decode-ncu-*.txt``.
"""

import sys

import torch
import torch.nn.functional as F

import sorsa_kernels as sk
from sorsa_kernels.benchmark.linear import _inputs
from sorsa_kernels.triton import linear


def main(case: str = "64x4096x4096x128"):
    rows, fan_in, fan_out, rank = (int(n) for n in case.split("x"))
    x, weight, U, S, Vt, _ = _inputs(rows, fan_in, fan_out, rank, torch.device("cuda"))
    x, U, S, Vt = x.detach(), U.detach(), S.detach(), Vt.detach()
    with torch.no_grad():
        for _ in range(3):  # tuning and compilation outside the range
            F.linear(x, weight)
            sk.sorsa_linear(x, weight, U, S, Vt, None, 2.0, backend="triton")
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        F.linear(x, weight)
        sk.sorsa_linear(x, weight, U, S, Vt, None, 2.0, backend="triton")
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
    print("tuned:", [str(c) for key, c in linear._chosen.items() if key[0] == "few"])


if __name__ == "__main__":
    main(*sys.argv[1:])
