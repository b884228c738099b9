"""Where the time of the Triton ``sorsa_linear`` goes, next to the dense frozen GEMM (one GPU call).

From the repository root, with the package importable (installed, or ``PYTHONPATH=.``)::

    python bench/tune_linear.py                 # the training shapes, then the decode rows
    python bench/tune_linear.py --rows 4096 --ranks 128 --shapes 4096x4096 --no-decode

For each shape (bf16 x and weight, float32 adapters, frozen base, x needing grad) it times with
``do_bench`` medians: dense = ``F.linear`` forward + the dx backward; ours = the op's forward +
backward (dx, dU, dS, dVt); forward alone against ``F.linear``; each of our six kernel launches
alone next to the two dense GEMMs; the peak memory above the dense step against the budget
``4·M·r·2`` bytes; and the largest relative difference of our outputs from the torch backend
(flagged MISMATCH above 2e-2: a wrong autotuned config). Targets: fwd+bwd ratio ≤ 1.05 × floor
with floor = 1 + 1.5·r(in+out)/(in·out); forward ratio ≤ 1.05 × (1 + r(in+out)/(in·out));
decode forward ≤ 1.2 × the dense product (timed eager, and replayed as a CUDA graph, which
removes the Python launch cost). Last, the host cost of one call where the GPU work is tiny
(M=64, 1024→1024, r=16): wall time per call of our fwd+bwd and forward next to dense's.

Every candidate kernel of these shapes is first compiled in parallel processes
(``--no-precompile`` skips it); autotuning happens on first use of each shape, before timing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sorsa_kernels import sorsa_linear  # noqa: E402
from sorsa_kernels.benchmark.common import format_table, median_ms, peak_memory_mb, write_results  # noqa: E402
from sorsa_kernels.benchmark.linear_products import GRADIENT_PASS_PRODUCT, precompile, step_products  # noqa: E402

SHAPES = ["4096x4096", "4096x11008", "11008x4096", "4096x14336", "4096x1024"]
KERNELS = ["z", "y", "dU+dS", "g", "dx", "dVt"]
MISMATCH = 2e-2  # relative difference from the torch backend that flags an autotuned config as wrong


def timed(fn):
    fn()  # compile and autotune outside the timing
    return median_ms(fn, warmup_ms=10, rep_ms=50)


def rel_diff(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def measure(rows, in_features, out_features, rank, scale=0.5, device="cuda"):
    cuda = dict(device=device)
    x = torch.randn(rows, in_features, dtype=torch.bfloat16, **cuda).requires_grad_()
    weight = (torch.randn(out_features, in_features, **cuda) / in_features**0.5).to(torch.bfloat16)
    U = (torch.randn(out_features, rank, **cuda) / out_features**0.5).requires_grad_()
    S = (torch.rand(rank, **cuda) + 0.5).requires_grad_()
    Vt = (torch.randn(rank, in_features, **cuda) / in_features**0.5).requires_grad_()
    dy = torch.randn(rows, out_features, dtype=torch.bfloat16, **cuda)
    leaves = (x, U, S, Vt)

    def dense_step():
        return torch.autograd.grad(F.linear(x, weight), x, dy)

    def our_step(backend="triton"):
        return torch.autograd.grad(sorsa_linear(x, weight, U, S, Vt, None, scale, backend=backend), leaves, dy)

    def our_outputs(backend):
        y = sorsa_linear(x, weight, U, S, Vt, None, scale, backend=backend)
        return (y.detach(), *torch.autograd.grad(y, leaves, dy))

    row = {"M": rows, "in->out": f"{in_features}->{out_features}", "r": rank}
    row["dense"] = timed(dense_step)
    row["ours"] = timed(our_step)
    row["ratio"] = row["ours"] / row["dense"]
    row["floor"] = 1 + 1.5 * rank * (in_features + out_features) / (in_features * out_features)
    with torch.no_grad():
        row["dense fwd"] = timed(lambda: F.linear(x, weight))
        row["ours fwd"] = timed(lambda: sorsa_linear(x, weight, U, S, Vt, None, scale, backend="triton"))
    row["fwd ratio"] = row["ours fwd"] / row["dense fwd"]
    row["fwd floor"] = 1 + rank * (in_features + out_features) / (in_features * out_features)
    row["dense dx"] = timed(lambda: dy @ weight)

    # Each launch of one step alone (the tuned configuration), on buffers of the step's shapes.
    for product in step_products(*(t.detach() for t in (x, weight, U, S, Vt, dy)), scale):
        row[product.name] = timed(product.launch)
    # Where it applies, the step runs the tuned gradient_pass (one pass or dU+dS and g) in their place.
    gradient = row.get(GRADIENT_PASS_PRODUCT)
    row["sum"] = sum(row[name] for name in KERNELS) + (0 if gradient is None else gradient - row["dU+dS"] - row["g"])

    dense_peak, our_peak = peak_memory_mb(dense_step), peak_memory_mb(our_step)
    row["mem+ MB"] = None if dense_peak is None else our_peak - dense_peak
    row["budget MB"] = 4 * rows * rank * 2 / 2**20
    row["max err"] = max(rel_diff(a, b) for a, b in zip(our_outputs("triton"), our_outputs("torch")))
    row["check"] = "ok" if row["max err"] <= MISMATCH else "MISMATCH"
    return row


def measure_decode(rows, features, rank, scale=0.5):
    from triton.testing import do_bench_cudagraph

    cuda = dict(device="cuda")
    x = torch.randn(rows, features, dtype=torch.bfloat16, **cuda)
    weight = (torch.randn(features, features, **cuda) / features**0.5).to(torch.bfloat16)
    U, Vt = torch.randn(features, rank, **cuda) / features**0.5, torch.randn(rank, features, **cuda) / features**0.5
    S = torch.rand(rank, **cuda) + 0.5
    with torch.no_grad():

        def ours():
            return sorsa_linear(x, weight, U, S, Vt, None, scale, backend="triton")

        def dense():
            return F.linear(x, weight)

        row = {"M": rows, "in->out": f"{features}->{features}", "r": rank}
        row["dense"], row["ours"] = timed(dense), timed(ours)
        row["ratio"] = row["ours"] / row["dense"]
        row["graph dense"] = do_bench_cudagraph(dense, rep=20, return_mode="median")
        row["graph ours"] = do_bench_cudagraph(ours, rep=20, return_mode="median")
        row["graph ratio"] = row["graph ours"] / row["graph dense"]
        row["max err"] = rel_diff(ours(), sorsa_linear(x, weight, U, S, Vt, None, scale, backend="torch"))
        row["check"] = "ok" if row["max err"] <= MISMATCH else "MISMATCH"
    return row


def measure_host(rows=64, features=1024, rank=16, scale=0.5, calls=200):
    """Wall time per call (µs) where the GPU work is tiny, so the host's launch path is the cost."""
    cuda = dict(device="cuda")
    x = torch.randn(rows, features, dtype=torch.bfloat16, **cuda).requires_grad_()
    weight = torch.randn(features, features, dtype=torch.bfloat16, **cuda)
    U = torch.randn(features, rank, **cuda).requires_grad_()
    S = torch.rand(rank, **cuda).requires_grad_()
    Vt = torch.randn(rank, features, **cuda).requires_grad_()
    dy = torch.randn(rows, features, dtype=torch.bfloat16, **cuda)
    leaves = (x, U, S, Vt)

    def ours():
        torch.autograd.grad(sorsa_linear(x, weight, U, S, Vt, None, scale, backend="triton"), leaves, dy)

    def dense():
        torch.autograd.grad(F.linear(x, weight), x, dy)

    def ours_forward():
        with torch.no_grad():
            sorsa_linear(x, weight, U, S, Vt, None, scale, backend="triton")

    def dense_forward():
        with torch.no_grad():
            F.linear(x, weight)

    row = {"M": rows, "in->out": f"{features}->{features}", "r": rank}
    for name, fn in (("ours", ours), ("dense", dense), ("ours fwd", ours_forward), ("dense fwd", dense_forward)):
        for _ in range(20):
            fn()
        best = float("inf")
        for _ in range(5):
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
            best = min(best, (time.perf_counter() - start) / calls * 1e6)
        row[name + " us"] = best
    row["ratio"] = row["ours us"] / row["dense us"]
    row["fwd ratio"] = row["ours fwd us"] / row["dense fwd us"]
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--shapes", nargs="+", default=SHAPES, help="IN x OUT, e.g. 4096x11008")
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64, 128])
    parser.add_argument("--no-decode", action="store_true")
    parser.add_argument("--no-precompile", action="store_true")
    args = parser.parse_args()
    start = time.time()
    if not args.no_precompile:  # before CUDA starts in this process: it forks compilers
        shapes = [(m, *map(int, shape.split("x")), r) for m in args.rows for shape in args.shapes for r in args.ranks]
        shapes += [] if args.no_decode else [(m, 4096, 4096, r) for r in (16, 128) for m in (1, 8, 64)]
        count, errors = precompile([(*s, torch.bfloat16, torch.float32) for s in shapes])
        print(f"[{time.time() - start:5.0f}s] precompiled {count} launches; {len(errors)} errors", *errors, flush=True)
    if not torch.cuda.is_available():
        raise SystemExit("bench/tune_linear.py times GPU kernels: run it on a CUDA machine")

    rows = []
    for m in args.rows:
        for shape in args.shapes:
            in_features, out_features = map(int, shape.split("x"))
            for rank in args.ranks:
                rows.append(measure(m, in_features, out_features, rank))
                cells = (f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[-1].items())
                print(f"[{time.time() - start:5.0f}s] " + "  ".join(cells), flush=True)
    decode = []
    if not args.no_decode:
        for rank in (16, 128):
            for m in (1, 8, 64):
                decode.append(measure_decode(m, 4096, rank))
    host = measure_host()
    path = write_results("tune_linear", rows + decode + [host])
    print(f"\n{torch.cuda.get_device_name()}, {time.time() - start:.0f}s in all; results in {path}; times in ms")
    print("\nkernels alone (ms): ours z, y (forward) and dU+dS, g, dx, dVt (backward) next to the dense GEMMs")
    print(format_table(rows, ["M", "in->out", "r", "dense fwd", "dense dx", *KERNELS, "sum"]))
    if decode:
        print("\ndecode forward (ms; target ratio <= 1.2): eager, and replayed as a CUDA graph")
        columns = ["M", "in->out", "r", "dense", "ours", "ratio", "graph dense", "graph ours", "graph ratio"]
        print(format_table(decode, [*columns, "max err", "check"]))
    print("\nhost cost per call (us, GPU work tiny; target: fwd+bwd ratio <= 2-3)")
    print(format_table([host], ["M", "in->out", "r", "ours us", "dense us", "ratio", "ours fwd us", "dense fwd us", "fwd ratio"]))
    print("\nfwd+bwd and forward against dense (target: ratio <= 1.05 x floor); memory above dense vs 4*M*r*2 bytes")
    columns = ["M", "in->out", "r", "dense", "ours", "ratio", "floor", "fwd ratio", "fwd floor"]
    print(format_table(rows, [*columns, "mem+ MB", "budget MB", "max err", "check"]))


if __name__ == "__main__":
    main()
