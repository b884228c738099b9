"""The regularizer step over chunks of the adapter set: ``ortho_reg_grad_`` called on a few
adapters at a time, so that each chunk's gradient launch reads its factors again right after its
Gram launch read them, while they may still be in L2 (50 MB on an H100), instead of after the
Gram launch of the whole set. Device time from CUDA graphs (L2 flushed before each replay, as
``do_bench`` does), against the whole set in one call, for the Llama-2-7B and Llama-3-8B sets at
r = 128, with the default work items (4096 rows in the Gram launch, 1024 in the gradient launch:
a call on a few matrices leaves most SMs idle) and with smaller ones. A timing probe only: each
chunk's value is its own chunk's mean, not the set's. ``python bench/probe_ortho_l2.py`` on a GPU;
raw output in ``bench/results/ortho-l2-probe-*.txt``."""

import dataclasses

import torch

from sorsa_kernels import ortho_reg_grad_
from sorsa_kernels.benchmark.common import median_ms
from sorsa_kernels.benchmark.ortho import COEFF, LLAMA2_7B, LLAMA3_8B, adapter_set
from sorsa_kernels.ops import ortho as ops_ortho
from sorsa_kernels.triton import ortho as triton_ortho
from sorsa_kernels.triton.common import graphed

# Adapters per call: the whole set (224), a few layers, one layer (7), and less.
CHUNKS = (224, 28, 14, 7, 4, 2, 1)
# Rows per work item in both launches besides the defaults (None).
ITEM_ROWS = (None, 512, 256)
DEFAULT_CONFIGS = triton_ortho.default_configs


def configs_with_items(rows: int | None):
    """``default_configs`` whose work items hold ``rows`` rows (the defaults for None)."""
    if rows is None:
        return DEFAULT_CONFIGS
    return lambda *args, **kwargs: [dataclasses.replace(config, chunk_rows=rows)
                                    for config in DEFAULT_CONFIGS(*args, **kwargs)]


def chunked_step(Us, Vts, adapters: int):
    chunks = [(Us[i : i + adapters], Vts[i : i + adapters]) for i in range(0, len(Us), adapters)]

    def step():
        for chunk_Us, chunk_Vts in chunks:
            ortho_reg_grad_(chunk_Us, chunk_Vts, COEFF, "official", backend="triton")

    return step


def main():
    device = torch.device("cuda")
    # Every chunk keeps its plan: a plan made again inside a capture would copy tables there.
    ops_ortho._FACTOR_SETS_CACHED = 1 << 20
    print(torch.cuda.get_device_name(), f"torch {torch.__version__}")
    for name, layer in (("llama2-7b r=128", LLAMA2_7B), ("llama3-8b r=128", LLAMA3_8B)):
        Us, Vts = adapter_set(layer, 32, 128, device)
        megabytes = sum(p.numel() for p in Us + Vts) * 4 / 2**20 / len(Us)
        print(f"\n== {name}: {len(Us)} adapters, {megabytes:.1f} MB of factors per adapter on average")
        for rows in ITEM_ROWS:
            # A new configuration needs new plans: the factor sets are forgotten first.
            ops_ortho._factor_sets.clear()
            ops_ortho._latest[:] = [None, None]
            triton_ortho.default_configs = configs_with_items(rows)
            for adapters in CHUNKS:
                ms = median_ms(graphed(chunked_step(Us, Vts, adapters)))
                items = "default items" if rows is None else f"items of {rows} rows"
                print(f"  {items}, {adapters:4d} adapters a call ({adapters * megabytes:6.1f} MB): {ms:.3f} ms")


if __name__ == "__main__":
    main()
