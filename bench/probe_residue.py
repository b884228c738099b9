"""What the rounding residue of the float32 adapter costs in the rank-down passes z and g.

``rank_down`` multiplies bfloat16 activations by a float32 adapter as two tensor-core products,
the adapter's bfloat16 rounding and its residue, so that every element of z = scale·x Vtᵀ and
g = scale·dy U is a faithful rounding of the exact sum. Autocast peers (PEFT's LoRA layer, the
reference SORSA layer) round the adapter to bfloat16 and multiply once. This probe times both
ways through the same tuned ``rank_down`` (the rounded adapter made once, outside the timing; its
own rounding launch is timed apart), in turns, and gives each one's error against float64: the
relative Frobenius error and the share of elements that are not faithful roundings (farther from
the exact sum than one bfloat16 ulp of it). ``python bench/probe_residue.py`` on a GPU, from the
repository root; raw output in ``bench/results/residue-probe-*.txt``.
"""

import statistics

import torch
from probe_skinny import SHAPES  # the same shapes as the skinny passes' probe (bench/ is this script's path)

from sorsa_kernels.benchmark.common import interleaved_ms
from sorsa_kernels.benchmark.linear import _inputs
from sorsa_kernels.triton import linear

SCALE = 0.5


def errors(result, a, b):
    """(relative Frobenius error, share of elements not faithful) of ``result`` against float64."""
    exact = SCALE * (a.double() @ b.double())
    difference = (result.double() - exact).abs()
    _, exponent = torch.frexp(exact)  # |exact| = m·2^e with m in [0.5, 1): a bfloat16 ulp is 2^(e - 8)
    ulp = torch.ldexp(torch.ones_like(exact), exponent - 8)
    return (difference.norm() / exact.norm()).item(), (difference > ulp).double().mean().item()


def main():
    print(torch.cuda.get_device_name(), f"torch {torch.__version__}")
    print(f"{'M x in -> out, r':>26} {'pass':>4} {'residue us':>10} {'rounded us':>10} {'ratio':>6} "
          f"{'rounding us':>11} {'err residue':>11} {'err rounded':>11} {'unfaithful':>10}")  # fmt: skip
    for shape in SHAPES:
        rows, fan_in, fan_out, rank = shape
        label = "{} x {} -> {}, {}".format(*shape)
        x, _, U, _, Vt, dy = _inputs(rows, fan_in, fan_out, rank, torch.device("cuda"))
        for name, a, b in (("z", x.detach(), Vt.detach().T), ("g", dy, U.detach())):
            rounded = b.to(a.dtype)
            with_residue, without = linear._rank_buffer(a, rows, rank), linear._rank_buffer(a, rows, rank)
            passes = {
                "residue": lambda: linear.rank_down(a, b, with_residue, SCALE),
                "rounded": lambda: linear.rank_down(a, rounded, without, SCALE),
                "rounding": lambda: b.to(a.dtype),
            }
            for run in passes.values():
                run()
            times = {k: statistics.median(v) * 1e3 for k, v in interleaved_ms(passes).items()}
            error_residue, unfaithful_residue = errors(with_residue, a, b)
            error_rounded, unfaithful_rounded = errors(without, a, b)
            print(f"{label:>26} {name:>4} {times['residue']:10.1f} {times['rounded']:10.1f} "
                  f"{times['rounded'] / times['residue']:6.2f} {times['rounding']:11.1f} {error_residue:11.1e} "
                  f"{error_rounded:11.1e} {unfaithful_residue:.1e}/{unfaithful_rounded:.1e}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
