"""The orthonormal regularizer over a whole model's adapters: ours against the Python loop of
the reference SORSA code and against the bytes floor, side by side in one run.

Adapter sets (float32 factors, every linear of every layer): Llama-2-7B (q, k, v, o 4096→4096;
gate, up 4096→11008; down 11008→4096; 32 layers) and Llama-3-8B (q, o 4096→4096; k, v
4096→1024; gate, up 4096→14336; down 14336→4096; 32 layers), each at r = 128 and r = 16.

Columns: ``ms_grad_`` is ``ortho_reg_grad_`` (official form, the trainer's path: value plus
``coeff·∇`` into every existing ``.grad``); ``ms_autograd`` is ``ortho_reg(...).backward()``;
``ms_loop`` is the reference loop (per factor ``torch.norm(UᵀU − I)``, summed, averaged,
backward); ``floor_ms`` reads every factor once and reads and writes every ``.grad`` once, at
the device-to-device copy bandwidth measured in the same run; ``host_ms`` is the Python time
of one ``ortho_reg_grad_`` call (it hides behind the GPU only while it is shorter);
``rel_err`` is the relative error of the value and every gradient (the worst of them) of one
``ortho_reg_grad_`` call against float64.

``python -m sorsa_kernels.benchmark.ortho [--quick | --sweep | --host]``: without an option, the
table above on the GPU; ``--quick`` runs a tiny set on the CPU (a smoke test, not a
measurement); ``--sweep`` instead times ``ortho_reg_grad_`` on every set under the Triton
configurations of :func:`sweep` and prints the best per set; ``--host`` times the host side of
``ortho_reg_grad_`` alone in stages (the Triton backend's planning, pointer checks, argument
packing and launches): on a GPU with the Llama-2-7B sets, elsewhere on 448 small CPU factors
with the kernel launch stubbed out.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time
from unittest import mock

import torch

from sorsa_kernels import ortho_reg, ortho_reg_grad_
from sorsa_kernels.backends import resolve
from sorsa_kernels.benchmark.common import format_table, median_ms, synchronize, write_results

# (out_features, in_features) of each adapted linear in one decoder layer.
LLAMA2_7B = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]
LLAMA3_8B = [(4096, 4096)] * 2 + [(1024, 4096)] * 2 + [(14336, 4096)] * 2 + [(4096, 14336)]
TINY = [(64, 64)] * 4 + [(176, 64)] * 2 + [(64, 176)]
SETS = [
    ("llama2-7b r=128", LLAMA2_7B, 32, 128),
    ("llama3-8b r=128", LLAMA3_8B, 32, 128),
    ("llama2-7b r=16", LLAMA2_7B, 32, 16),
    ("llama3-8b r=16", LLAMA3_8B, 32, 16),
]

COEFF = 0.1
COLUMNS = ["set", "n", "backend", "ms_grad_", "ms_autograd", "ms_loop", "speedup", "floor_ms", "ours/floor", "host_ms",
           "rel_err"]


def adapter_set(layer, layers: int, rank: int, device, dtype=torch.float32):
    """Fresh factors (``.grad`` allocated) of ``layers`` decoder layers, as float32 parameters."""
    Us, Vts = [], []
    for _ in range(layers):
        for out_features, in_features in layer:
            U = torch.randn(out_features, rank, device=device, dtype=dtype) / out_features**0.5
            Vt = torch.randn(rank, in_features, device=device, dtype=dtype) / in_features**0.5
            Us.append(torch.nn.Parameter(U))
            Vts.append(torch.nn.Parameter(Vt))
    for p in Us + Vts:
        p.grad = torch.zeros_like(p)
    return Us, Vts


def loop_reference(Us, Vts, coeff: float):
    """The reference SORSA regularizer step: one small matmul and norm per factor, then backward."""
    total, count = 0.0, 0
    for U in Us:
        total = total + torch.norm(U.T @ U - torch.eye(U.shape[1], device=U.device), p="fro")
        count += 1
    for Vt in Vts:
        total = total + torch.norm(Vt @ Vt.T - torch.eye(Vt.shape[0], device=Vt.device), p="fro")
        count += 1
    (coeff * total / count).backward()


def float64_error(Us, Vts) -> float:
    """Worst relative error (value, then each gradient) of one ``ortho_reg_grad_`` call against
    the official form in float64, one matrix at a time."""
    for p in Us + Vts:
        p.grad.zero_()
    value = ortho_reg_grad_(Us, Vts, COEFF, "official")
    factors = [U.detach().double() for U in Us] + [Vt.detach().double().T for Vt in Vts]
    norms, deviations = [], []
    for x in factors:
        deviation = x.T @ x - torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
        deviations.append(deviation)
        norms.append(torch.linalg.matrix_norm(deviation))
    norms = torch.stack(norms)
    worst = ((value.double() - norms.mean()).abs() / norms.mean()).item()
    for i, (p, x, deviation) in enumerate(zip(Us + Vts, factors, deviations)):
        grad = COEFF * 2 * x @ deviation / (len(factors) * norms[i])
        ours = p.grad.double() if i < len(Us) else p.grad.double().T
        worst = max(worst, ((ours - grad).norm() / grad.norm()).item())
    return worst


def copy_bandwidth(device) -> float:
    """Bytes per millisecond of a large device-to-device copy (read + write counted)."""
    elements = (1 << 28) if device.type == "cuda" else (1 << 22)
    src = torch.empty(elements, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * src.nbytes / ms


def host_ms(fn, device, calls: int = 20) -> float:
    """Python time per call, measured without waiting for the device."""
    fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    synchronize(device)
    return elapsed / calls * 1000


def floor_ms(Us, Vts, bandwidth: float) -> float:
    """Read every factor once, read and write every ``.grad`` once."""
    return sum(p.nbytes for p in Us + Vts) * 3 / bandwidth


def measure(name: str, Us, Vts, bandwidth: float) -> dict:
    device = Us[0].device
    params = Us + Vts
    grad_ = lambda: ortho_reg_grad_(Us, Vts, COEFF, "official")  # noqa: E731
    autograd = lambda: ortho_reg(Us, Vts, "official").backward()  # noqa: E731
    loop = lambda: loop_reference(Us, Vts, COEFF)  # noqa: E731
    ms_grad_ = median_ms(grad_)
    ms_autograd = median_ms(autograd)
    ms_loop = median_ms(loop)
    floor = floor_ms(Us, Vts, bandwidth)
    return {
        "set": name,
        "n": len(params),
        "backend": resolve("ortho_reg", "auto", device),
        "ms_grad_": ms_grad_,
        "ms_autograd": ms_autograd,
        "ms_loop": ms_loop,
        "speedup": ms_loop / ms_grad_,
        "floor_ms": floor,
        "ours/floor": ms_grad_ / floor,
        "host_ms": host_ms(grad_, device),
        "rel_err": float64_error(Us, Vts),
        "floor_GB": floor * bandwidth / 1e9,
        "copy_GBps": bandwidth / 1e6,
    }


def run(quick: bool) -> list[dict]:
    """Time every adapter set on the current device (``quick``: a tiny labelled CPU set)."""
    if quick:
        device = torch.device("cpu")
        sets = [("tiny-cpu-smoke r=8 (quick, not a measurement)", TINY, 2, 8)]
    else:
        device = torch.device("cuda")
        sets = SETS
    bandwidth = copy_bandwidth(device)
    rows = []
    for name, layer, layers, rank in sets:
        Us, Vts = adapter_set(layer, layers, rank, device)
        rows.append(measure(name, Us, Vts, bandwidth))
        del Us, Vts
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# -- Tuning sweep ------------------------------------------------------------------------------

# Per Gram block width: (gram_rows, gradient_rows, block_n, num_warps, num_stages, gram_block), each
# compiled once. At r = 128 (float32 as float16 pairs) 8 warps hold the 128×128 Gram
# accumulator; gradient tiles of 128 rows run wgmma, narrower ones mma.sync; 16 warps halve the
# registers per thread but spill more.
_TILES = {
    128: [(64, 128, 128, 8, 2, 128), (32, 128, 128, 8, 2, 128), (128, 128, 128, 8, 2, 128), (64, 128, 64, 8, 2, 128),
          (64, 64, 128, 8, 2, 128), (64, 128, 128, 16, 2, 128)],
    16: [(256, 128, 16, 4, 3, 128), (128, 128, 16, 4, 3, 128), (256, 256, 16, 4, 3, 128), (128, 256, 16, 4, 3, 128),
         (256, 256, 16, 8, 3, 128), (512, 512, 16, 8, 3, 128)],
}
# Runtime knobs tried with the best tiles: rows per work item (in units of 256 KiB of float32
# factor rows at r = 128, so the same list fits every rank), lag, programs per SM.
_CHUNK_KIB = (64, 128, 256, 512, 1024)
_LAGS = (0.0, 1.0, math.inf)
_PROGRAMS_PER_SM = (1, 2, 4)


def sweep_configs(block_r: int) -> list:
    """Every tile configuration the sweep compiles for Gram blocks of ``block_r`` (with the
    default runtime knobs)."""
    from sorsa_kernels.triton import ortho as triton_ortho

    default = triton_ortho.default_configs(triton_ortho.F32_SPLIT16.value, block_r, 4)[0]
    return [dataclasses.replace(default, gram_rows=g, gradient_rows=d, block_n=n, num_warps=w, num_stages=s,
                                gram_block=b, chunk_rows=max(default.chunk_rows, g, d))
            for g, d, n, w, s, b in _TILES[block_r]]


def _runtime_configs(tiles, block_r: int) -> list:
    configs = []
    for kib in _CHUNK_KIB:
        rows = max(tiles.gram_rows, tiles.gradient_rows, (kib << 10) // (block_r * 4))
        for lag in _LAGS:
            for programs in _PROGRAMS_PER_SM:
                configs.append(dataclasses.replace(tiles, chunk_rows=rows, lag=lag, programs_per_sm=programs))
    return configs


def sweep(sets=SETS, device: str = "cuda") -> list[dict]:
    """``ortho_reg_grad_`` on every set under every configuration of the sweep: stage A tries
    each tile configuration with the default runtime knobs, stage B the runtime knobs with the
    best tiles. Prints the best per set."""
    from sorsa_kernels.triton import ortho as triton_ortho

    device = torch.device(device)
    bandwidth = copy_bandwidth(device)
    rows, best = [], []
    try:
        for name, layer, layers, rank in sets:
            Us, Vts = adapter_set(layer, layers, rank, device)
            floor = floor_ms(Us, Vts, bandwidth)

            def time_config(stage, config):
                triton_ortho.override = config
                try:
                    ms = median_ms(lambda: ortho_reg_grad_(Us, Vts, COEFF, "official", backend="triton"),
                                   warmup_ms=10, rep_ms=40)
                except Exception as error:  # a configuration beyond the device's limits
                    ms = math.nan
                    print(f"{name} {config}: {type(error).__name__}: {str(error)[:120]}")
                row = {"set": name, "stage": stage, **vars(config), "ms": ms, "ours/floor": ms / floor}
                rows.append(row)
                return row

            block_r = max(16, 1 << (rank - 1).bit_length())
            stage_a = [time_config("A", config) for config in sweep_configs(block_r)]
            tiles = min(stage_a, key=lambda row: (math.isnan(row["ms"]), row["ms"]))
            tile_config = triton_ortho.Config(**{k: tiles[k] for k in vars(sweep_configs(block_r)[0])})
            stage_b = [time_config("B", config) for config in _runtime_configs(tile_config, block_r)]
            best.append(min(stage_a + stage_b, key=lambda row: (math.isnan(row["ms"]), row["ms"])))
            del Us, Vts
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        triton_ortho.override = None
    columns = ["set", "stage", "gram_rows", "gradient_rows", "block_n", "gram_block", "chunk_rows", "lag", "num_warps",
               "num_stages", "programs_per_sm", "ms", "ours/floor"]
    print(format_table(rows, columns))
    print("best per set:")
    print(format_table(best, columns))
    return rows


# -- Host cost -----------------------------------------------------------------------------------


def _stub_first_launch(plan, group, variant, per_call):
    """What the Triton backend keeps for repeated launches, without compiling or launching."""
    from sorsa_kernels.triton import ortho as triton_ortho

    mode, precision, deterministic, *_ = variant
    config = triton_ortho.default_configs(precision, group.block_r, group.itemsize)[0]
    group.queue(mode, deterministic, config, plan.sms * config.programs_per_sm)
    names = triton_ortho._ortho_kernel.arg_names
    return triton_ortho._Launch(config, plan.sms, None, [None] * len(names),
                                [names.index(name) for name in triton_ortho._PER_CALL])


def host_cost(device: str = "cpu", calls: int = 200) -> list[dict]:
    """Microseconds of host time per ``ortho_reg_grad_`` call through the Triton backend, in
    stages: what a training step pays on the host besides the device's work. On the CPU, 448
    small factors with the launch itself stubbed out (the workspace a CPU ``torch.zeros``, a
    real memset, on one thread: a parallel fill's thread pool would only add its wake-up
    latency). On a GPU, the Llama-2-7B sets at r = 16 and 128 with real launches (the
    workspace an allocation from the caching allocator and an asynchronous fill), timed
    without waiting for the device (``calls`` launches queue well within its limit)."""
    from sorsa_kernels.ops import ortho as ops_ortho
    from sorsa_kernels.triton import ortho as triton_ortho

    device = torch.device(device)
    if device.type == "cpu":
        sets = [("64x64 r=16", [(64, 64)], 224, 16)]
    else:
        sets = [(f"llama2-7b r={rank}", LLAMA2_7B, 32, rank) for rank in (16, 128)]

    def us_per_call(fn, setup=None) -> float:
        total = 0.0
        for _ in range(calls):
            if setup is not None:
                setup()
            start = time.perf_counter()
            fn()
            total += time.perf_counter() - start
        synchronize(device)
        return total / calls * 1e6

    rows = []
    for set_name, layer, layers, rank in sets:
        Us, Vts = adapter_set(layer, layers, rank, device)

        def fresh_grads():
            for p in Us + Vts:
                p.grad = torch.zeros_like(p)

        def call():
            ortho_reg_grad_(Us, Vts, COEFF, "official", backend="triton")

        start = time.perf_counter()
        call()
        synchronize(device)
        first = (time.perf_counter() - start) * 1e6
        plan = ops_ortho._factor_set(Us, Vts, "official")[2].plans["triton"]
        grads = [p.grad for p in Us + Vts]
        launch_seconds = []
        launch_kernel = triton_ortho._launch_kernel

        def timed_launch(*arguments):
            start = time.perf_counter()
            launch_kernel(*arguments)
            launch_seconds.append(time.perf_counter() - start)

        stages = [
            ("factor set: identities, data pointers", lambda: ops_ortho._factor_set(Us, Vts, "official")),
            (".grad tensors gathered, None check", lambda: ops_ortho._grads(Us + Vts)),
            ("output table: .grad data pointers", lambda: plan.output_tables(grads)),
            ("workspace (torch.zeros) and value (torch.empty)",
             lambda: (plan.workspace(), torch.empty((), device=plan.device))),
            ("backend step: workspace, arguments, launches",
             lambda: triton_ortho.step_(plan, Us, Vts, "official", COEFF, grads)),
            ("whole call, same .grad tensors", call),
        ]
        set_rows = [{"case": name, "us_per_call": us_per_call(fn)} for name, fn in stages]
        with mock.patch.object(triton_ortho, "_launch_kernel", timed_launch):
            us_per_call(call)
        launch_us = sum(launch_seconds) / calls * 1e6
        set_rows.append({"case": "of a whole call: its kernel launches", "us_per_call": launch_us})
        set_rows.append({"case": "whole call, new .grad tensors", "us_per_call": us_per_call(call, fresh_grads)})
        set_rows.append({"case": "first call (validation, plan, tables)", "us_per_call": first})
        for row in set_rows:
            row.update(set=set_name, factors=len(Us + Vts))
        rows += set_rows
    return rows


def _host_cost_stubbed(calls: int = 200) -> list[dict]:
    """:func:`host_cost` on the CPU, Triton's interpreter selected and every launch stubbed out."""
    from sorsa_kernels.triton import ortho as triton_ortho

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with mock.patch.dict(os.environ, {"TRITON_INTERPRET": "1"}), \
                mock.patch.object(triton_ortho, "_first_launch", _stub_first_launch), \
                mock.patch.object(triton_ortho, "_launch_kernel", lambda *args: None):
            return host_cost("cpu", calls)
    finally:
        torch.set_num_threads(threads)


def main(quick: bool, out_dir: str = "bench/results") -> None:
    """The suite as ``sorsa-kernels bench`` runs it: time every set, print, store the JSON."""
    rows = run(quick)
    print(format_table(rows, COLUMNS))
    print(f"results: {write_results('ortho', rows, out_dir, quick=quick)}")


def _command_line():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny set on the CPU (smoke test)")
    parser.add_argument("--sweep", action="store_true", help="time the kernel under the sweep's configurations")
    parser.add_argument("--host", action="store_true", help="only the host cost per call, in stages")
    args = parser.parse_args()
    if args.host:
        rows = host_cost("cuda") if torch.cuda.is_available() else _host_cost_stubbed()
        print(format_table(rows, ["set", "case", "factors", "us_per_call"]))
        print(f"results: {write_results('ortho-host', rows)}")
    elif args.sweep:
        print(f"results: {write_results('ortho-sweep', sweep())}")
    else:
        main(args.quick or not torch.cuda.is_available())


if __name__ == "__main__":
    _command_line()
