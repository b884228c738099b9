"""Device time of ``ortho_reg_grad_`` on adapter sets from one adapter to a whole model (Llama-2-7B
shapes; TinyLlama-1.1B's 22 layers), at r = 16 and 128, from CUDA graphs: where a set is too
small for the configured work items to reach every SM. ``python bench/probe_ortho_small.py`` on a
GPU, the package taken from PYTHONPATH (run it against two revisions to compare them); raw output
in ``bench/results/ortho-small-sets-probe-*.txt``."""

import torch

import sorsa_kernels
from sorsa_kernels import ortho_reg_grad_
from sorsa_kernels.benchmark.common import median_ms
from sorsa_kernels.benchmark.ortho import COEFF, LLAMA2_7B, adapter_set
from sorsa_kernels.triton.common import graphed

# (out_features, in_features) of each adapted linear in one TinyLlama-1.1B layer.
TINYLLAMA = [(2048, 2048)] * 2 + [(256, 2048)] * 2 + [(5632, 2048)] * 2 + [(2048, 5632)]
SETS = [("1 adapter 4096x4096", [(4096, 4096)], 1), ("1 layer llama2-7b", LLAMA2_7B, 1),
        ("4 layers llama2-7b", LLAMA2_7B, 4), ("22 layers tinyllama-1.1b", TINYLLAMA, 22),
        ("32 layers llama2-7b", LLAMA2_7B, 32)]


def main():
    print(sorsa_kernels.__file__)
    for rank in (16, 128):
        for name, layer, layers in SETS:
            Us, Vts = adapter_set(layer, layers, rank, torch.device("cuda"))
            ms = median_ms(graphed(lambda: ortho_reg_grad_(Us, Vts, COEFF, "official", backend="triton")))
            print(f"r={rank:3d} {name:26s} {ms * 1e3:9.1f} us")


if __name__ == "__main__":
    main()
