"""The backward's two products over dy, ``g = scale·dy U`` and ``dU = (dyᵀ z) ⊙ S`` with
``dS = Σ_o U ⊙ (dyᵀ z)``, as ``sorsa_kernels.triton.linear.gradient_pass`` makes them: its two
launches (``rank_down`` and ``row_reduction``, each tuned) against each of its one-pass
configurations, whatever its candidate filter would allow at the shape. Each configuration is
planned once and its plan repeated, as the tuner times it: a plan made on every call adds its
host time (up to 1.8x the one pass's time at 4096 columns in an earlier version of this probe).

``python bench/probe_dy_pass.py`` on a GPU, from the repository root; raw output in
``bench/results/gradient-pass-*.txt``.
"""

import functools

import torch
import triton

from sorsa_kernels.benchmark.common import median_ms
from sorsa_kernels.benchmark.linear import _inputs
from sorsa_kernels.triton import linear

# (M tokens, in, out, r): dy is [M, out], U [out, r].
SHAPES = [(16384, 4096, 11008, 16), (16384, 4096, 14336, 16), (16384, 11008, 4096, 16), (16384, 4096, 4096, 16),
          (8192, 4096, 4096, 16), (4096, 4096, 4096, 16), (4096, 4096, 11008, 16), (16384, 4096, 11008, 32)]  # fmt: skip


def main():
    print(torch.cuda.get_device_name(), f"torch {torch.__version__}, triton {triton.__version__}")
    joint = [linear.Config.of(warps, stages, split, joint=True, TILE=tile, STEP=step)
             for tile, step, warps, stages in linear._GRADIENT_PASS_BLOCKS for split in linear._GRADIENT_PASS_SPLITS]  # fmt: skip
    for shape in SHAPES:
        rows, fan_in, fan_out, rank = shape
        x, _, U, S, Vt, dy = _inputs(rows, fan_in, fan_out, rank, torch.device("cuda"))
        x, U, S, Vt = x.detach(), U.detach(), S.detach(), Vt.detach()
        z = linear._rank_buffer(x, rows, rank)
        linear.rank_down(x, Vt.T, z, 0.5)
        g = linear._rank_buffer(dy, rows, rank)
        dU, dS = torch.empty(fan_out, rank, device=dy.device), torch.zeros(rank, device=dy.device)
        timed = []
        for config in [linear.Config.of(), *joint]:
            plan = linear._gradient_pass_plan(dy, U, z, S, g, dU, dS, 0.5, config)
            run = functools.partial(plan, dy, U, z, S, g, dU, dS)
            try:
                run()
            except triton.runtime.OutOfResources:
                continue
            timed.append((median_ms(run) * 1e3, str(config) if config.joint else "two launches"))
        two = next(us for us, name in timed if name == "two launches")
        fastest = "; ".join(f"{name} {us:.1f}" for us, name in sorted(timed)[:2])
        print(f"{shape} two launches {two:.1f} us | fastest: {fastest}", flush=True)


if __name__ == "__main__":
    main()
