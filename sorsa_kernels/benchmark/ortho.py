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
of one ``ortho_reg_grad_`` call (it hides behind the GPU only while it is shorter).

``python -m sorsa_kernels.benchmark.ortho [--quick] [--sweep]``: ``--quick`` runs a tiny set on
the CPU (a smoke test, not a measurement); ``--sweep`` also times each kernel of the 7B r=128
set alone under a few tile configurations.
"""

from __future__ import annotations

import argparse
import time

import torch

from sorsa_kernels import ortho_reg, ortho_reg_grad_
from sorsa_kernels.backends import resolve
from sorsa_kernels.benchmark.common import format_table, median_ms, write_results

# (out_features, in_features) of each adapted linear in one decoder layer.
LLAMA2_7B = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]
LLAMA3_8B = [(4096, 4096)] * 2 + [(1024, 4096)] * 2 + [(14336, 4096)] * 2 + [(4096, 14336)]
TINY = [(64, 64)] * 4 + [(176, 64)] * 2 + [(64, 176)]

COEFF = 0.1
COLUMNS = ["set", "n", "backend", "ms_grad_", "ms_autograd", "ms_loop", "speedup", "floor_ms", "ours/floor", "host_ms"]


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


def copy_bandwidth(device) -> float:
    """Bytes per millisecond of a large device-to-device copy (read + write counted)."""
    elements = (1 << 28) if device.type == "cuda" else (1 << 22)
    src = torch.empty(elements, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * src.nbytes / ms


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_ms(fn, device, calls: int = 20) -> float:
    """Python time per call, measured without waiting for the device."""
    fn()
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    _synchronize(device)
    return elapsed / calls * 1000


def measure(name: str, Us, Vts, bandwidth: float) -> dict:
    device = Us[0].device
    params = Us + Vts
    grad_ = lambda: ortho_reg_grad_(Us, Vts, COEFF, "official")  # noqa: E731
    autograd = lambda: ortho_reg(Us, Vts, "official").backward()  # noqa: E731
    loop = lambda: loop_reference(Us, Vts, COEFF)  # noqa: E731
    ms_grad_ = median_ms(grad_)
    ms_autograd = median_ms(autograd)
    ms_loop = median_ms(loop)
    floor_bytes = sum(p.nbytes for p in params) * 3  # read the factor, read and write its .grad
    floor_ms = floor_bytes / bandwidth
    return {
        "set": name,
        "n": len(params),
        "backend": resolve("ortho_reg", "auto", device),
        "ms_grad_": ms_grad_,
        "ms_autograd": ms_autograd,
        "ms_loop": ms_loop,
        "speedup": ms_loop / ms_grad_,
        "floor_ms": floor_ms,
        "ours/floor": ms_grad_ / floor_ms,
        "host_ms": host_ms(grad_, device),
        "floor_GB": floor_bytes / 1e9,
        "copy_GBps": bandwidth / 1e6,
    }


def run(quick: bool) -> list[dict]:
    """Time every adapter set on the current device (``quick``: a tiny labelled CPU set)."""
    if quick:
        device = torch.device("cpu")
        sets = [("tiny-cpu-smoke r=8 (quick, not a measurement)", TINY, 2, 8)]
    else:
        device = torch.device("cuda")
        sets = [
            ("llama2-7b r=128", LLAMA2_7B, 32, 128),
            ("llama3-8b r=128", LLAMA3_8B, 32, 128),
            ("llama2-7b r=16", LLAMA2_7B, 32, 16),
            ("llama3-8b r=16", LLAMA3_8B, 32, 16),
        ]
    bandwidth = copy_bandwidth(device)
    rows = []
    for name, layer, layers, rank in sets:
        Us, Vts = adapter_set(layer, layers, rank, device)
        rows.append(measure(name, Us, Vts, bandwidth))
        del Us, Vts
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def sweep() -> list[dict]:
    """Each Triton kernel alone on the Llama-2-7B r=128 set under a few tile configurations."""
    from sorsa_kernels.triton import ortho as triton_ortho

    Us, Vts = adapter_set(LLAMA2_7B, 32, 128, torch.device("cuda"))
    plan = triton_ortho.prepare(Us, Vts)
    grams = triton_ortho.grams(plan, Us, Vts)
    scale = torch.full((), COEFF, device=grams.device)
    U_grads, Vt_grads = [U.grad for U in Us], [Vt.grad for Vt in Vts]
    Config = triton_ortho.Config
    trials = [("gram", Config(block_l, warps, stages)) for block_l in (16, 32, 64) for warps in (4, 8) for stages in (2, 3)]
    trials += [
        ("gradient", Config(block_l, warps, stages, block_n))
        for block_l, block_n in ((32, 64), (64, 64), (32, 128), (64, 128), (128, 32))
        for warps in (4, 8)
        for stages in (1, 2)
    ]
    run_kernel = {
        "gram": lambda: triton_ortho.grams(plan, Us, Vts),
        "gradient": lambda: triton_ortho.add_penalty_grads_(
            plan, Us, Vts, grams, "official", scale, U_grads, Vt_grads, accumulate=True
        ),
    }
    rows = []
    try:
        for kernel, config in trials:
            triton_ortho.override[kernel] = config
            try:
                ms = median_ms(run_kernel[kernel])
            except Exception as error:  # a configuration beyond the device's limits
                ms = float("nan")
                print(f"{kernel} {config}: {type(error).__name__}: {str(error)[:120]}")
            triton_ortho.override.pop(kernel)
            rows.append({"kernel": kernel, **{k: v for k, v in vars(config).items()}, "ms": ms})
    finally:
        triton_ortho.override.clear()
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny set on the CPU (smoke test)")
    parser.add_argument("--sweep", action="store_true", help="also time each kernel under several tile configurations")
    args = parser.parse_args()
    rows = run(args.quick)
    print(format_table(rows, COLUMNS))
    print(f"results: {write_results('ortho', rows)}")
    if args.sweep and not args.quick:
        tuning = sweep()
        print(format_table(tuning, ["kernel", "block_l", "block_n", "num_warps", "num_stages", "ms"]))
        print(f"results: {write_results('ortho-sweep', tuning)}")


if __name__ == "__main__":
    main()
