"""The four skinny passes of a training step (z, g, dU+dS, dVt), ours against cuBLAS products.

Each pass as the Triton backend runs it (tuned launch, with its staging, zero fills and
roundings), beside the same result from cuBLAS: z = scale·x Vtᵀ and g = scale·dy U as one
``[M, 2r]`` float32 product of x with the float32 adapter's bfloat16 rounding and residue
(``torch.mm(..., out_dtype=torch.float32)``), summed and rounded by one elementwise pass;
dU (with dS) and dVt as one float32-output product each, S and the dS sum applied after. Also
the bare bfloat16 product (adapter rounded to 16 bits, one product: not our precision) and the
time to read the streamed operand once at 3 TB/s. The adapter's rounding is made on every call
in both paths, as a training step makes it. ``python bench/probe_skinny.py`` on a GPU, from the
repository root; raw output in ``bench/results/skinny-probe-*.txt``.
"""

import torch

from sorsa_kernels.benchmark.common import median_ms
from sorsa_kernels.benchmark.linear import _inputs
from sorsa_kernels.triton import linear

SHAPES = [(4096, 4096, 4096, 16), (4096, 4096, 4096, 128), (4096, 4096, 11008, 128), (4096, 11008, 4096, 128),
          (16384, 4096, 4096, 128), (16384, 4096, 11008, 128)]  # fmt: skip


def halves(adapter):
    """``[K, 2r]`` bfloat16: the float32 ``adapter [K, r]`` rounded, then its residue rounded."""
    high = adapter.to(torch.bfloat16)
    return torch.cat([high, (adapter - high.float()).to(torch.bfloat16)], dim=1)


def down_cublas(a, adapter, scale):
    rank = adapter.shape[1]
    sums = torch.mm(a, halves(adapter), out_dtype=torch.float32)
    return ((sums[:, :rank] + sums[:, rank:]) * scale).to(a.dtype)


def dU_cublas(dy, z, S, U):
    raw = torch.mm(dy.T, z, out_dtype=torch.float32)
    return raw * S, (raw * U).sum(0)


def shape_passes(rows, fan_in, fan_out, rank):
    """``{pass: (ours, cuBLAS, bare bfloat16 product, streamed operand, our result)}`` for one shape."""
    device = torch.device("cuda")
    x, _, U, S, Vt, dy = _inputs(rows, fan_in, fan_out, rank, device)
    x, U, S, Vt = x.detach(), U.detach(), S.detach(), Vt.detach()
    scale = 0.5
    z = linear._rank_buffer(x, rows, rank)
    g = linear._rank_buffer(dy, rows, rank)
    dU = torch.empty(fan_out, rank, device=device)
    dS = torch.zeros(rank, device=device)
    dVt = torch.empty(rank, fan_in, device=device)
    linear.rank_down(x, Vt.T, z, scale)
    linear.rank_down(dy, U, g, scale)
    return {
        "z": (lambda: linear.rank_down(x, Vt.T, z, scale), lambda: down_cublas(x, Vt.T, scale),
              lambda: torch.mm(x, Vt.T.to(torch.bfloat16)), x, z),
        "g": (lambda: linear.rank_down(dy, U, g, scale), lambda: down_cublas(dy, U, scale),
              lambda: torch.mm(dy, U.to(torch.bfloat16)), dy, g),
        "dU+dS": (lambda: linear.row_reduction(dy, z, S, dU, w=U, red=dS), lambda: dU_cublas(dy, z, S, U)[0],
                  lambda: torch.mm(dy.T, z), dy, dU),
        "dVt": (lambda: linear.row_reduction(x, g, S, dVt.T), lambda: torch.mm(g.T, x, out_dtype=torch.float32) * S[:, None],
                lambda: torch.mm(g.T, x), x, dVt),
    }  # fmt: skip


def main():
    print(torch.cuda.get_device_name(), f"torch {torch.__version__}")
    print(f"{'M x in -> out, r':>26} {'pass':>6} {'ours us':>8} {'cuBLAS us':>9} {'bf16 us':>8} {'read us':>8}")
    for shape in SHAPES:
        label = "{} x {} -> {}, {}".format(*shape)
        for name, (ours, cublas, bare, streamed, result) in shape_passes(*shape).items():
            ours()
            reference = result.float()
            error = ((cublas().float() - reference).norm() / reference.norm()).item()
            read_us = streamed.numel() * streamed.element_size() / 3e12 * 1e6
            print(f"{label:>26} {name:>6} {median_ms(ours) * 1e3:8.1f} {median_ms(cublas) * 1e3:9.1f} "
                  f"{median_ms(bare) * 1e3:8.1f} {read_us:8.1f}   (cuBLAS vs ours rel {error:.1e})", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
