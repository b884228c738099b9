"""What the zero fill of the decode forward costs: the op from CUDA graphs as it is, and with the
fill's buffer left unzeroed (its values then wrong: a timing bound, not a variant), against
``F.linear``; and the op's host time per eager call, three loops of 1000 calls.

From the repository root on a GPU machine::

    PYTHONPATH=.:bench python bench/probe_decode_fill.py
"""

import statistics

import torch
import torch.nn.functional as F
from host_linear import host_and_wall_us, layer

import sorsa_kernels as sk
from sorsa_kernels.benchmark.common import interleaved_ms
from sorsa_kernels.triton.common import graphed

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (4096, 14336), (4096, 1024)]


def unzeroed(self, *size, **options):
    return self.new_empty(*size, **options)


def main():
    print(torch.cuda.get_device_name())
    print(f"{'M':>3} {'in->out':>12} | dense  ours  unzeroed (graph us) | ours/dense unzeroed/dense | host us")
    zeros = torch.Tensor.new_zeros
    for rows in (1, 8, 64):
        for in_features, out_features in SHAPES:
            x, weight, U, S, Vt, _ = layer(rows, in_features, out_features, 128)
            x = x.detach()
            with torch.no_grad():

                def ours():
                    sk.sorsa_linear(x, weight, U, S, Vt, None, 0.5)

                fns = {"dense": graphed(lambda: F.linear(x, weight)), "ours": graphed(ours)}
                torch.Tensor.new_zeros = unzeroed  # the op's only new_zeros is the fill's buffer
                try:
                    fns["unzeroed"] = graphed(ours)
                finally:
                    torch.Tensor.new_zeros = zeros
                us = {name: statistics.median(rounds) * 1e3 for name, rounds in interleaved_ms(fns).items()}
                hosts = [host_and_wall_us(ours, 1000)[0] for _ in range(3)]
            print(f"{rows:3d} {in_features:5d}->{out_features:<6d} | {us['dense']:5.1f} {us['ours']:5.1f} "
                  f"{us['unzeroed']:5.1f} | {us['ours'] / us['dense']:.3f} {us['unzeroed'] / us['dense']:.3f} | "
                  + " ".join(f"{h:.1f}" for h in hosts), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
