"""Where the decode forward's time goes beyond its product, at the TMA tiles: kernel time
(profiler) and graph time of ``few_rows_forward`` with t's launch at several shapes
(``_DOWN_RANKS`` ranks per program; ``_DOWN_LAUNCH``: K step, warps, stages; ``_DOWN_STEPS``: the
fewest K steps per program, which sets its split), with programmatic dependent launch; for the
default also without it (the product's launch starts once t's has finished) and without the
weight (the rank path alone); beside cuBLAS.
``python bench/probe_decode_parts.py [--shapes MxINxOUT ...]`` on a GPU, from the repository root;
raw output in ``bench/results/decode-parts-probe-*-pdl.txt`` (``-unsplit``: t's programs over
the whole K loop; the file without suffix: t's programs inside the product's launch, the knobs
their row blocks and K ranges).
"""

import dataclasses

import torch
import torch.nn.functional as F
from probe_decode import kernel_us, main_over_shapes

from sorsa_kernels.benchmark.common import median_ms
from sorsa_kernels.benchmark.linear import _inputs
from sorsa_kernels.triton import linear
from sorsa_kernels.triton.common import graphed

RANK = 128
SHAPES = [(64, 4096, 4096), (8, 4096, 4096), (1, 4096, 1024), (64, 4096, 1024)]
# (ranks per program, (K step, warps, stages)) of t's launch, the default first; fewest K steps.
DOWN_SHAPES = [(linear._DOWN_RANKS, linear._DOWN_LAUNCH), (32, (64, 4, 4)), (64, (64, 4, 4)), (128, (32, 4, 4))]
DOWN_STEPS = (2, 4, 8)


@torch.no_grad()
def probe(rows, inner, cols):
    x, weight, U, S, Vt, _ = _inputs(rows, inner, cols, RANK, torch.device("cuda"))
    x, U, S, Vt = x.detach(), U.detach(), S.detach(), Vt.detach()
    y = torch.empty(rows, cols, device=x.device, dtype=x.dtype)
    dense = lambda: F.linear(x, weight)
    print(f"\n== M={rows} {inner}->{cols} r={RANK}: cuBLAS graph {median_ms(graphed(dense)) * 1e3:.1f} us, "
          f"kernels {sum(kernel_us(dense).values()):.2f} us")  # fmt: skip
    config = [c for c in linear.few_rows_candidates(x, weight, y) if c.tma and c.split == 1][0]
    original = linear._DOWN_RANKS, linear._DOWN_LAUNCH, linear._DOWN_STEPS, linear._has_pdl
    runs = [(ranks, down, steps, True, "op") for ranks, down in DOWN_SHAPES for steps in DOWN_STEPS]
    # The default without PDL, and the rank path alone: no weight, no product (nor its TMA tiles).
    runs += [(*original[:3], False, "op"), (*original[:3], True, "rank path")]
    for ranks, down, steps, pdl, name in runs:
        linear._DOWN_RANKS, linear._DOWN_LAUNCH, linear._DOWN_STEPS = ranks, down, steps
        linear._has_pdl = lambda device, pdl=pdl: pdl and original[3](device)
        w, c = (weight, config) if name == "op" else (None, dataclasses.replace(config, tma=False))
        run = lambda c=c, w=w: linear.few_rows_forward(x, w, U, S, Vt, None, 2.0, y, c)
        parts = " + ".join(f"{us:.2f}" for us in kernel_us(run).values())
        print(f"  ranks {ranks:3d} down {down} steps {steps} pdl {pdl:d} {name:9s} [{c}]: "
              f"graph {median_ms(graphed(run)) * 1e3:5.1f} us, kernels {parts} us")  # fmt: skip
    linear._DOWN_RANKS, linear._DOWN_LAUNCH, linear._DOWN_STEPS, linear._has_pdl = original


if __name__ == "__main__":
    main_over_shapes(__doc__, SHAPES, probe)
