"""Staged skinny operands against operands rounded in registers, paired in one process.

For each shape, one layer's step (bench/layer_step.py: sorsa_linear forward + backward) with
the untuned first configuration of every launch (``SORSA_KERNELS_AUTOTUNE=0``: the same tiles
either way, where staging puts a staged twin first on large passes) and with staging switched
off, alternating, beside ``F.linear`` forward + dx. ``python bench/probe_staging.py`` on a GPU,
from the repository root; raw output in ``bench/results/staging-probe-*.txt``.
"""

import os

os.environ["SORSA_KERNELS_AUTOTUNE"] = "0"

import torch  # noqa: E402
from layer_step import layer_steps  # noqa: E402

from sorsa_kernels.benchmark.common import median_ms  # noqa: E402
from sorsa_kernels.triton import linear  # noqa: E402

SHAPES = [(16384, 4096, 11008, 128), (16384, 11008, 4096, 128), (16384, 4096, 14336, 128), (16384, 4096, 4096, 64),
          (4096, 4096, 11008, 128), (4096, 4096, 4096, 128), (4096, 4096, 1024, 64)]  # fmt: skip
ROUNDS = 3


def main():
    stageable = linear._stageable
    print(torch.cuda.get_device_name(), f"torch {torch.__version__}")
    print(
        f"{'M x in -> out, r':>26} {'round':>5} {'dense ms':>9} {'staged ms':>10} {'in-register ms':>15} {'ratio':>6}"
    )
    for shape in SHAPES:
        steps = layer_steps(*shape)
        ours, dense = steps["ours"], steps["dense"]
        for round_ in range(ROUNDS):
            times = {}
            for name, switch in (("staged", stageable), ("register", lambda *_: False)):
                linear._stageable = switch
                linear._plans.clear()
                linear._chosen.clear()
                ours()  # plans (and, the first time, compiles) outside the timing
                times[name] = median_ms(ours)
            linear._stageable = stageable
            base = median_ms(dense)
            label = f"{shape[0]} x {shape[1]} -> {shape[2]}, {shape[3]}"
            print(f"{label:>26} {round_:>5} {base:9.3f} {times['staged']:10.3f} {times['register']:15.3f} "
                  f"{times['staged'] / times['register']:6.3f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
