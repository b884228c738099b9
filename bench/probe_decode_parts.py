"""Where the one-launch decode forward's time goes beyond its product, at the TMA tiles:
kernel time (profiler) and graph time of ``few_rows_forward`` with the rank-down part over row
blocks of 16 to 64 rows (``_DOWN_ROWS``) and 8 to 64 K ranges (``_down_split``), with and without
the weight (without: the rank path alone), beside cuBLAS.
``python bench/probe_decode_parts.py [--shapes MxINxOUT ...]`` on a GPU, from the repository root;
raw output in ``bench/results/decode-parts-probe-*.txt``."""

import dataclasses

import torch
import torch.nn.functional as F
from probe_decode import kernel_us, main_over_shapes

from sorsa_kernels.benchmark.common import median_ms
from sorsa_kernels.benchmark.linear import _graphed, _inputs
from sorsa_kernels.triton import linear

RANK = 128
SHAPES = [(64, 4096, 4096), (8, 4096, 4096)]


@torch.no_grad()
def probe(rows, inner, cols):
    x, weight, U, S, Vt, _ = _inputs(rows, inner, cols, RANK, torch.device("cuda"))
    x, U, S, Vt = x.detach(), U.detach(), S.detach(), Vt.detach()
    y = torch.empty(rows, cols, device=x.device, dtype=x.dtype)
    dense = lambda: F.linear(x, weight)
    print(f"\n== M={rows} {inner}->{cols} r={RANK}: cuBLAS graph {median_ms(_graphed(dense)) * 1e3:.1f} us, "
          f"kernels {sum(kernel_us(dense).values()):.2f} us")  # fmt: skip
    configs = [c for c in linear.few_rows_candidates(x, weight, y) if c.tma and c.split == 1][:2]
    original = linear._down_split, linear._DOWN_ROWS
    for config in configs:
        for down_rows in (16, 32, 64):
            if down_rows > max(16, rows):
                continue
            linear._DOWN_ROWS = down_rows
            for split in (8, 16, 32, 64):
                linear._down_split = lambda steps, row_tiles, device, split=split: split
                # The rank path alone: no weight, no product (nor its TMA tiles).
                for name, w, c in (("op", weight, config), ("rank path", None, dataclasses.replace(config, tma=False))):
                    run = lambda c=c, w=w: linear.few_rows_forward(x, w, U, S, Vt, None, 2.0, y, c)
                    parts = " + ".join(f"{us:.2f}" for us in kernel_us(run).values())
                    print(f"  rows {down_rows:2d} split {split:2d} {name:9s} [{c}]: "
                          f"graph {median_ms(_graphed(run)) * 1e3:5.1f} us, kernels {parts} us")  # fmt: skip
    linear._down_split, linear._DOWN_ROWS = original


if __name__ == "__main__":
    main_over_shapes(__doc__, SHAPES, probe)
