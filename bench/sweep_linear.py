"""Every candidate configuration of each sorsa_linear Triton launch, timed one by one (one GPU call).

From the repository root, with the package importable (installed, or ``PYTHONPATH=.``)::

    python bench/sweep_linear.py                       # the default cases, about 3 minutes on an H100
    python bench/sweep_linear.py --cases 4096x4096x4096x128 --no-precompile

First it compiles every candidate kernel of the cases (and, with ``--precompile-tune``, of the
shapes bench/tune_linear.py and the GPU tests use) in parallel processes into Triton's cache.
Then for each case ``MxINxOUTxR`` (bf16 x and weight, float32 adapters) it runs the six launches
of a training step with each candidate configuration: checks the outputs against PyTorch (a
config that computes wrong is flagged WRONG and never best), times it (``do_bench`` median), and
sets it next to its yardstick: cuBLAS for the two extended GEMMs (``F.linear`` for y, ``dy @ W``
for dx; the GEMMs also with round 1's pointer kernel, and without the rank tail, which isolates
the tail's cost), and for
the memory-bound passes the bytes they must move at 3 TB/s. Prints a table per launch and the
best of each; writes all timings under bench/results/.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sorsa_kernels.benchmark.common import format_table, median_ms, write_results  # noqa: E402
from sorsa_kernels.benchmark.linear_products import GRADIENT_PASS_PRODUCT, precompile, step_products  # noqa: E402
from sorsa_kernels.triton import linear as kernels  # noqa: E402

DEFAULT_CASES = ["4096x4096x4096x128", "4096x4096x4096x16", "4096x4096x11008x128", "4096x11008x4096x128",
                 "16384x4096x11008x128", "16384x4096x1024x64"]  # fmt: skip
# The shapes of bench/tune_linear.py and tests/test_linear*.py on a GPU.
TUNE_CASES = [
    (rows, i, o, r) for rows in (4096, 16384) for i, o in ((4096, 4096), (4096, 11008), (11008, 4096), (4096, 14336), (4096, 1024))
    for r in (16, 64, 128)
] + [(rows, 4096, 4096, r) for rows in (1, 8, 64) for r in (16, 128)] + [(4112, 4096, 4112, 128)]  # fmt: skip
HBM_BYTES_PER_S = 3.0e12
WRONG = 2e-2  # relative difference from PyTorch that marks a configuration as computing wrong


def rel_diff(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def sweep_case(rows, in_features, out_features, rank, scale=0.5, device="cuda"):
    cuda = dict(device=device)
    x = torch.randn(rows, in_features, dtype=torch.bfloat16, **cuda)
    weight = (torch.randn(out_features, in_features, **cuda) / in_features**0.5).to(torch.bfloat16)
    U = torch.randn(out_features, rank, **cuda) / out_features**0.5
    S = torch.rand(rank, **cuda) + 0.5
    Vt = torch.randn(rank, in_features, **cuda) / in_features**0.5
    dy = torch.randn(rows, out_features, dtype=torch.bfloat16, **cuda)
    case = f"{rows}x{in_features}x{out_features}x{rank}"
    yardstick = {
        "y": median_ms(lambda: torch.nn.functional.linear(x, weight), warmup_ms=5, rep_ms=20),
        "dx": median_ms(lambda: dy @ weight, warmup_ms=5, rep_ms=20),
    }
    rows_out = []
    bare = {p.name: p for p in step_products(x, weight, U, S, Vt, dy, scale, rank_zero=True) if p.name in ("y", "dx")}
    for product in step_products(x, weight, U, S, Vt, dy, scale):
        references = product.reference()
        variants = [(product, "", product.candidates)]
        if product.name in ("y", "dx"):  # the GEMMs: also round 1's pointer kernel, and TMA without the tail
            pointer = kernels._matmul_candidates(rows, x.element_size(), tma=False)
            variants += [(product, "pointer", pointer), (bare[product.name], "no tail", bare[product.name].candidates)]
        for runner, tag, configs in variants:
            runner_refs = references if runner is product else runner.reference()
            for config in configs:
                runner.launch(config)
                error = max(rel_diff(o, r) for o, r in zip(runner.outputs, runner_refs))
                ms = median_ms(lambda: runner.launch(config), warmup_ms=5, rep_ms=20)
                row = {"case": case, "launch": product.name + (f" ({tag})" if tag else ""), "config": str(config), "ms": ms}
                if product.name in yardstick:
                    row["vs cuBLAS"] = ms / yardstick[product.name]
                    row["TFLOP/s"] = runner.flops / ms / 1e9
                else:
                    row["GB/s"] = runner.bytes / ms / 1e6
                    row["vs 3TB/s"] = ms / (runner.bytes / HBM_BYTES_PER_S * 1e3)
                row["err"] = error
                row["check"] = "ok" if error <= WRONG else "WRONG"
                rows_out.append(row)
        product.launch(product.candidates[0])  # the input of the later launches
    return rows_out, yardstick


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="MxINxOUTxR")
    parser.add_argument("--no-precompile", action="store_true")
    parser.add_argument("--precompile-tune", action="store_true", help="also compile what tune_linear and the tests run")
    args = parser.parse_args()
    start = time.time()
    cases = [tuple(map(int, c.split("x"))) for c in args.cases]
    if not args.no_precompile:  # before CUDA starts in this process: it forks compilers
        for shapes, sweep in ((cases, True), (TUNE_CASES if args.precompile_tune else [], False)):
            count, errors = precompile([(*s, torch.bfloat16, torch.float32) for s in shapes], sweep=sweep)
            print(f"[{time.time() - start:5.0f}s] precompiled {count} launches; {len(errors)} errors", flush=True)
            for error in errors:
                print("  ", error[:500])
    if not torch.cuda.is_available():
        raise SystemExit("bench/sweep_linear.py times GPU kernels: run it on a CUDA machine")

    every, best, dense = [], [], []
    for rows, in_features, out_features, rank in cases:
        rows_out, yardstick = sweep_case(rows, in_features, out_features, rank)
        every += rows_out
        case = rows_out[0]["case"]
        dense.append({"case": case, "dense fwd": yardstick["y"], "dense dx": yardstick["dx"]})
        print(f"\n[{time.time() - start:5.0f}s] {case}: cuBLAS y {yardstick['y']:.4f} ms, dx {yardstick['dx']:.4f} ms")
        for launch in dict.fromkeys(r["launch"] for r in rows_out):
            mine = sorted((r for r in rows_out if r["launch"] == launch), key=lambda r: (r["check"] != "ok", r["ms"]))
            best.append(mine[0])
            columns = ["config", "ms", *(["vs cuBLAS", "TFLOP/s"] if "vs cuBLAS" in mine[0] else ["GB/s", "vs 3TB/s"]), "err", "check"]
            print(f"  {launch}")
            print("    " + format_table(mine, columns).replace("\n", "\n    "))
        fastest = {r["launch"]: r["ms"] for r in best if r["case"] == case}
        forward = fastest["z"] + fastest["y"]
        gradient = min(fastest["dU+dS"] + fastest["g"], fastest.get(GRADIENT_PASS_PRODUCT, float("inf")))
        backward = gradient + fastest["dx"] + fastest["dVt"]
        print(f"  best launches: forward {forward:.4f} ms ({forward / yardstick['y']:.3f} x dense), backward "
              f"{backward:.4f} ms; fwd+bwd {(forward + backward) / (yardstick['y'] + yardstick['dx']):.3f} x dense")  # fmt: skip

    path = write_results("sweep_linear", every, dense=dense)
    print(f"\n{torch.cuda.get_device_name()}, {time.time() - start:.0f}s in all; results in {path}; times in ms")
    print("\nbest configuration of each launch (never a WRONG one):")
    columns = ["case", "launch", "config", "ms", "vs cuBLAS", "GB/s", "vs 3TB/s", "check"]
    print(format_table(best, columns))


if __name__ == "__main__":
    main()
