"""The four skinny passes of one training step (z, g, dU+dS, dVt), each at the best
configuration a sweep found, launched once inside a profiler range for Nsight Compute.

    ncu --profile-from-start off --set full -o skinny python bench/ncu_skinny.py 4096x4096x4096x128 \\
        bench/results/sweep_linear-<device>-<date>.json

The configurations come from a ``bench/sweep_linear.py`` result file, not from the tuner: tuned
under ncu, z and g at 4096², r = 128 took unsplit configurations of 64 and 32 programs, which
leave most of the GPU idle (the tuner times whole passes, zero fills and roundings included, and
ncu slows every launch). Every other launch of the step runs first (tuned), twice, so that the
profiled passes read what a step leaves behind. Raw output in ``bench/results/skinny-ncu-*.txt``.
"""

import json
import sys

import torch

from sorsa_kernels.benchmark.linear import _inputs
from sorsa_kernels.benchmark.linear_products import compiled_variants, step_products

PASSES = ("z", "g", "dU+dS", "dVt")


def best_configs(path: str, case: str) -> dict[str, tuple[float, str]]:
    """``{pass: (ms, config text)}``: the fastest correct configuration of each pass in a sweep."""
    best = {}
    for row in json.load(open(path))["rows"]:
        if row["case"] == case and row.get("check") == "ok" and row["launch"] in PASSES:
            if row["launch"] not in best or row["ms"] < best[row["launch"]][0]:
                best[row["launch"]] = (row["ms"], row["config"])
    return best


def main(case: str, sweep: str):
    rows, fan_in, fan_out, rank = (int(n) for n in case.split("x"))
    x, weight, U, S, Vt, dy = _inputs(rows, fan_in, fan_out, rank, torch.device("cuda"))
    products = {p.name: p for p in step_products(x.detach(), weight, U.detach(), S.detach(), Vt.detach(), dy, 0.5)}
    configs = {}
    for name, (ms, text) in best_configs(sweep, case).items():
        configs[name] = next(c for c in compiled_variants(products[name]) if str(c) == text)
        print(f"{name} {ms * 1e3:.1f} us in the sweep: {configs[name]}", flush=True)
    for product in products.values():
        for _ in range(2):
            product.launch(configs.get(product.name))
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for name in PASSES:
        products[name].launch(configs[name])
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


if __name__ == "__main__":
    main(*sys.argv[1:3])
