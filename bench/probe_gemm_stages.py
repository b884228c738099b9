"""The extended TMA GEMM's tile configurations and rank tails against cuBLAS, side by side in
rounds: the kernel's y (``x Wᵀ + z (U⊙S)ᵀ``) and dx (``dy W + g (Vtᵀ⊙S)ᵀ``) launches with their
rank tail (prefetched or by TMA) and without it (the bare GEMM), each configuration timed in
turns with cuBLAS's product (``F.linear``, ``dy @ W``) over 5 rounds of 20 ms; prints the least
round median and the median per-round ratio to cuBLAS, and the error against PyTorch. The
configurations are compiled first, in parallel.

    python bench/probe_gemm_stages.py [--cases MxINxOUTxR ...]

from the repository root on a GPU; raw output in ``bench/results/gemm-stages-probe-*.txt``.
"""

from __future__ import annotations

import argparse

import torch

from sorsa_kernels.benchmark.common import environment, interleaved_ms, median_ratio
from sorsa_kernels.benchmark.linear import _inputs
from sorsa_kernels.benchmark.linear_products import gpu_target, meta_step_inputs, step_products
from sorsa_kernels.benchmark.precompile import captured_launches, compile_all
from sorsa_kernels.triton import linear as kernels

# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, GROUP_M, persistent, epilogue, TAIL_K, TAIL_STAGES)
SHIPPED = (128, 256, 64, 8, 3, 8, False, "subtile", 32, 2)
BLOCKS = {
    "3 stages": SHIPPED,
    "3 stages, persistent": (128, 256, 64, 8, 3, 8, True, "subtile", 32, 2),
    "flattened, tail 16": (128, 256, 64, 8, 3, 8, "flattened", "subtile", 16, 1),
    "flattened, tail 32": (128, 256, 64, 8, 3, 8, "flattened", "subtile", 32, 1),
    "flattened, tail 64": (128, 256, 64, 8, 3, 8, "flattened", "subtile", 64, 1),
}
CASES = ["4096x4096x4096x16", "4096x4096x4096x32", "4096x4096x11008x16", "4096x11008x4096x16", "4096x4096x14336x16",
         "4096x4096x1024x16", "16384x4096x11008x16", "16384x11008x4096x16", "16384x4096x14336x16",
         "16384x4096x1024x16", "4096x4096x4096x128"]  # fmt: skip


def _configs(rank: int, bare: bool) -> dict:
    """The configurations timed: :data:`BLOCKS`' (the rank tail as the plan picks it; flattened
    tails no wider than the rank's), and up to the prefetched rank the shipped one with the tail
    by TMA before the main loop; the bare GEMM the shipped one and a flattened one."""
    if bare:
        return {"bare": kernels._tma_config(*SHIPPED), "flattened": kernels._tma_config(*BLOCKS["flattened, tail 16"])}
    configs = {name: kernels._tma_config(*block) for name, block in BLOCKS.items()
               if block[6] != "flattened" or block[8] <= kernels._rank_pad(rank)}
    if rank <= kernels._PREFETCHED_RANK:
        shipped = kernels._tma_config(*SHIPPED)
        configs["3 stages, TMA tail"] = kernels.Config.of(shipped.warps, shipped.stages, tma=True,
                                                          **dict(shipped.meta, TAIL_PREFETCH=False))
    return configs


def _gemms(products):
    return [p for p in products if p.name in ("y", "dx")]


def _precompile(cases):
    with captured_launches(kernels.KERNELS) as launches:
        for rows, in_features, out_features, rank in cases:
            inputs = meta_step_inputs(rows, in_features, out_features, rank, torch.bfloat16, torch.float32)
            for bare in (False, True):
                for product in _gemms(step_products(*inputs, 0.5, rank_zero=bare)):
                    for config in _configs(rank, bare).values():
                        product.launch(config)
    errors = {r for r in compile_all(launches, gpu_target()) if isinstance(r, str)}
    print(f"compiled {len(launches)} launches", *sorted(errors), sep="\n", flush=True)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main(cases):
    _precompile(cases)
    info = environment()
    print(info["device"], f"torch {info['versions']['torch']}, triton {info['versions']['triton']}", flush=True)
    cuda = torch.device("cuda")
    for rows, in_features, out_features, rank in cases:
        x, weight, U, S, Vt, dy = (t.detach() for t in _inputs(rows, in_features, out_features, rank, cuda))
        cublas = {"y": lambda: torch.nn.functional.linear(x, weight), "dx": lambda: dy @ weight}
        for bare in (False, True):
            products = step_products(x, weight, U, S, Vt, dy, 0.5, rank_zero=bare)
            by_name = {p.name: p for p in products}
            for source in ("z", "g"):  # the tails' inputs
                by_name[source].launch(by_name[source].candidates[0])
            for product in _gemms(products):
                reference = product.reference()[0]
                errors = {}
                configs = _configs(rank, bare)
                for name, config in configs.items():
                    product.outputs[0].fill_(float("nan"))
                    product.launch(config)
                    errors[name] = _rel(product.outputs[0], reference)
                fns = {"cuBLAS": cublas[product.name]}
                fns |= {name: (lambda c=config: product.launch(c)) for name, config in configs.items()}
                times = interleaved_ms(fns)
                label = f"{rows}x{in_features}->{out_features} r={rank} {product.name}{' bare' if bare else ''}"
                print(f"== {label}: cuBLAS {1000 * min(times['cuBLAS']):.1f} us (least round median)")
                for name in configs:
                    ratio, least = median_ratio(times[name], times["cuBLAS"]), 1000 * min(times[name])
                    print(f"  {name:28s} {least:8.1f} us  {ratio:.3f}x cuBLAS  err {errors[name]:.1e}")
                print(flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=CASES)
    arguments = parser.parse_args()
    main([tuple(int(v) for v in case.split("x")) for case in arguments.cases])
