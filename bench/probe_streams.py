"""The Triton backward on one stream against the same launches spread over two.

The backward's launches depend on each other only through g: dU+dS (a pass over dy and z)
needs neither g nor dx, and dVt (a pass over x and g) not dx. Each shape's backward (every
gradient wanted; bf16 activations, float32 adapters, tuned launches) is timed as
``linear._backward`` runs it and with dU+dS and dVt on a second stream beside g and the dx
product, eagerly and replayed from a CUDA graph (the device's time alone), beside the dense dx
product; do_bench medians. ``python bench/probe_streams.py`` on a GPU, from the repository
root; raw output in ``bench/results/streams-probe-*.txt``.
"""

import torch

from sorsa_kernels.benchmark.common import median_ms
from sorsa_kernels.benchmark.linear import _inputs
from sorsa_kernels.triton import linear
from sorsa_kernels.triton.common import graphed

SHAPES = [(4096, 4096, 4096, 16), (4096, 4096, 4096, 128), (4096, 4096, 11008, 128), (4096, 11008, 4096, 128),
          (4096, 4096, 14336, 128), (4096, 4096, 1024, 64), (16384, 4096, 1024, 64), (16384, 4096, 4096, 128),
          (16384, 4096, 11008, 128)]  # fmt: skip
SCALE = 0.5


def backward_two_streams(dy, x, z, weight, U, S, Vt, side):
    """``linear._backward``'s launches (every gradient, S given) with dU+dS and dVt on ``side``."""
    main = torch.cuda.current_stream()
    rows, rank = z.shape
    dU = U.new_empty(U.shape)
    dS = S.new_zeros(S.shape)
    g = linear._rank_buffer(dy, rows, rank)
    dx = x.new_empty(x.shape)
    dVt = Vt.new_empty(Vt.shape)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        linear.row_reduction(dy, z, S, dU, w=U, red=dS)
    linear.rank_down(dy, U, g, SCALE)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        linear.row_reduction(x, g, S, dVt.T)
    linear.extended_matmul(dy, weight, g, linear.scaled_columns(Vt.T, S, dy.dtype).T, None, dx)
    main.wait_stream(side)
    return dx, dU, dS, dVt


def shape_row(shape, side) -> list[float]:
    """Median ms, eager then from a graph, of one stream then two, and of the dense dx product,
    after checking that both give the same gradients."""
    x, weight, U, S, Vt, dy = _inputs(*shape, torch.device("cuda"))
    x, U, S, Vt = x.detach(), U.detach(), S.detach(), Vt.detach()
    z = linear.forward(x, weight, U, S, Vt, None, SCALE)[1]

    def one():
        return linear._backward(dy, x, z, weight, U, S, Vt, SCALE, (True,) * 4)

    def two():
        return backward_two_streams(dy, x, z, weight, U, S, Vt, side)

    one()  # tunes every launch
    for ours, theirs in zip(one(), two()):  # float32 atomics sum in any order (dS cancels)
        error = ((theirs.double() - ours.double()).norm() / ours.double().norm()).item()
        assert error <= 1e-3, f"{shape}: relative error {error:.1e}"
    times = [median_ms(one), median_ms(two), median_ms(graphed(one)), median_ms(graphed(two))]
    return times + [median_ms(lambda: torch.mm(dy, weight))]


def main():
    side = torch.cuda.Stream()
    print(torch.cuda.get_device_name(), f"torch {torch.__version__}")
    print(f"{'M x in -> out, r':>26} {'eager: one stream':>18} {'two':>6} {'graph: one stream':>18} {'two':>6} "
          f"{'dense dx':>9}")  # fmt: skip
    for shape in SHAPES:
        times = shape_row(shape, side)
        label = "{} x {} -> {}, {}".format(*shape)
        print(f"{label:>26} {times[0]:18.3f} {times[1]:6.3f} {times[2]:18.3f} {times[3]:6.3f} {times[4]:9.3f}",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
