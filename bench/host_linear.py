"""Host time of sorsa_linear on a GPU machine: one launch by each path, and one step of a layer.

From the repository root, with the package importable (installed, or ``PYTHONPATH=.``)::

    python bench/host_linear.py [--profile | --launches | --decode]

``host`` is the Python time per call measured without waiting for the GPU, ``wall`` the same
with the GPU's work included: where they agree, the GPU waits on the host. The launch rows time
one tiny ``rank_down`` (64×256 by 256×16) through our launch function, through Triton's
``kernel[grid](...)``, and through the compiled kernel (``compiled.run`` with triton >= 3.4's
arguments); the step rows time a forward + backward (and a no-grad forward) of a small and of a
4096-token layer against ``F.linear`` alone. ``--profile`` instead prints where the host time
of those steps goes: cProfile of the forward + backward, run on the calling thread (autograd's
device threads are invisible to a profiler started on this one). ``--launches`` times the 4096-token
step's parts from the inside (the forward call, the backward call, each kernel's launches) and the
dense step, with the backward on autograd's device thread (torch's default) and on the calling
thread. ``--decode`` prints the host time of no-grad calls of decode shapes and of a 4096-token
step, each the fewest µs a call of five loops: run it against two revisions of the package (on
PYTHONPATH) to compare their host paths.
"""

import collections
import cProfile
import pstats
import sys
import time

import torch
import torch.nn.functional as F

import sorsa_kernels as sk
from sorsa_kernels.triton import common
from sorsa_kernels.triton import linear as kernels

DEVICE = "cuda"


def host_and_wall_us(fn, calls=2000) -> tuple[float, float]:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) / calls * 1e6
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / calls * 1e6
    return host, wall


def launch_rows():
    a = torch.randn(64, 256, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(256, 16, device=DEVICE)
    out = torch.empty(64, 16, device=DEVICE)
    kernels.rank_down(a, b, out)
    meta = next(iter(kernels._chosen.values())).kwargs
    args = (a, b, out, 64, 256, 16, 1.0, 0.0, *a.stride(), *b.stride(), *out.stride(), 1, 0, None, 0, 0)
    constants = dict(RANK_PAD=16, PRECISION="ieee", STAGED=False, SIGNAL=False, BESIDE=False, **meta)
    compiled = kernels._rank_down_kernel[(1, 1)](*args, **constants)
    every_argument = list(args) + [constants[n] for n in kernels._rank_down_kernel.arg_names[len(args) :]]
    stream = torch.cuda.current_stream().cuda_stream

    def compiled_run():
        compiled.run(1, 1, 1, stream, compiled.function, compiled.packed_metadata, None, None, None, *every_argument)

    return {
        "rank_down() (ours, full path)": lambda: kernels.rank_down(a, b, out),
        "JIT kernel[grid](...)": lambda: kernels._rank_down_kernel[(1, 1)](*args, **constants),
        "compiled[grid](*all)": lambda: compiled[(1, 1, 1)](*every_argument),
        "compiled.run(...)": compiled_run,
        "torch.empty": lambda: torch.empty(64, 16, device=DEVICE),
        "torch.mm tiny": lambda: torch.mm(a, a.T),
    }


def layer(rows, in_features, out_features, rank):
    """``(x, weight, U, S, Vt, dy)`` of one layer's step: bfloat16 activations, float32 adapters."""
    x = torch.randn(rows, in_features, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(out_features, in_features, device=DEVICE, dtype=torch.bfloat16)
    U = torch.randn(out_features, rank, device=DEVICE, requires_grad=True)
    S = torch.randn(rank, device=DEVICE, requires_grad=True)
    Vt = torch.randn(rank, in_features, device=DEVICE, requires_grad=True)
    dy = torch.randn(rows, out_features, device=DEVICE, dtype=torch.bfloat16)
    return x, weight, U, S, Vt, dy


def step_rows(rows, in_features, out_features, rank):
    x, weight, U, S, Vt, dy = layer(rows, in_features, out_features, rank)

    def ours():
        sk.sorsa_linear(x, weight, U, S, Vt, None, 0.5, backend="triton").backward(dy)

    def dense():
        F.linear(x, weight).backward(dy)

    def forward():
        with torch.no_grad():
            sk.sorsa_linear(x, weight, U, S, Vt, None, 0.5, backend="triton")

    name = f"M={rows} {in_features}->{out_features} r={rank}"
    return {f"{name} ours fwd+bwd": ours, f"{name} dense fwd+bwd": dense, f"{name} ours forward no_grad": forward}


def profile(calls=300):
    for shape in [(64, 256, 64, 16), (4096, 4096, 1024, 16)]:
        name, ours = next(iter(step_rows(*shape).items()))
        with torch.autograd.set_multithreading_enabled(False):
            for _ in range(50):
                ours()
            torch.cuda.synchronize()
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(calls):
                ours()
            profiler.disable()
        torch.cuda.synchronize()
        print(f"--- {name}, {calls} calls: top functions by own time, then by cumulative time")
        stats = pstats.Stats(profiler).strip_dirs()
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats(35)


def launches(calls=300):
    """Host time of a step's parts at 4096×4096→1024, r = 16, with the backward on autograd's
    device thread (torch's default for CUDA tensors) and on the calling thread: the forward call,
    the backward call, each kernel's launches (timed around ``KernelLaunch.__call__``) and, for
    comparison, the dense step."""
    x, weight, U, S, Vt, dy = layer(4096, 4096, 1024, 16)
    per_kernel = collections.defaultdict(lambda: [0.0, 0])
    launch = common.KernelLaunch.__call__

    def timed_launch(self, *arguments):
        start = time.perf_counter()
        launch(self, *arguments)
        entry = per_kernel[self.kernel.fn.__name__]
        entry[0] += time.perf_counter() - start
        entry[1] += 1

    common.KernelLaunch.__call__ = timed_launch
    try:
        for device_thread in (True, False, True, False):
            with torch.autograd.set_multithreading_enabled(device_thread):
                sk.sorsa_linear(x, weight, U, S, Vt, None, 0.5, backend="triton").backward(dy)  # tuned and planned
                torch.cuda.synchronize()
                per_kernel.clear()
                forward = backward = 0.0
                for _ in range(calls):
                    start = time.perf_counter()
                    y = sk.sorsa_linear(x, weight, U, S, Vt, None, 0.5, backend="triton")
                    middle = time.perf_counter()
                    y.backward(dy)
                    forward, backward = forward + middle - start, backward + time.perf_counter() - middle
                torch.cuda.synchronize()
                dense, _ = host_and_wall_us(lambda: F.linear(x, weight).backward(dy), calls)
            where = "autograd's device thread" if device_thread else "the calling thread"
            print(f"M=4096 4096->1024 r=16, backward on {where}: host us a step: forward {forward / calls * 1e6:.1f}, "
                  f"backward {backward / calls * 1e6:.1f}; dense step {dense:.1f}; launches a step:")  # fmt: skip
            for kernel, (seconds, count) in sorted(per_kernel.items()):
                print(f"  {kernel:32s} {count / calls:4.1f} launches  {seconds / calls * 1e6:7.1f} us")
    finally:
        common.KernelLaunch.__call__ = launch


def decode(calls=1000, loops=5):
    """Host µs per call (the fewest of ``loops`` loops; the GPU's work not waited for) of no-grad
    calls at 1×4096→4096, 8×4096→11008 and 64×4096→1024 (r = 128, backend "auto"), and of a
    step at 4096×4096→1024, r = 16."""

    def fewest_us(fn, calls):
        return min(host_and_wall_us(fn, calls)[0] for _ in range(loops))

    for rows, in_features, out_features in ((1, 4096, 4096), (8, 4096, 11008), (64, 4096, 1024)):
        x, weight, U, S, Vt, _ = layer(rows, in_features, out_features, 128)
        x = x.detach()
        with torch.no_grad():
            us = fewest_us(lambda: sk.sorsa_linear(x, weight, U, S, Vt, None, 0.5), calls)
        print(f"decode {rows}x{in_features}->{out_features} r=128: host {us:.1f} us")
    x, weight, U, S, Vt, dy = layer(4096, 4096, 1024, 16)

    def step():
        sk.sorsa_linear(x, weight, U, S, Vt, None, 0.5).backward(dy)
        for leaf in (x, U, S, Vt):
            leaf.grad = None

    print(f"step 4096x4096->1024 r=16: host {fewest_us(step, calls // 5):.1f} us")


def main():
    print(torch.cuda.get_device_name())
    if "--decode" in sys.argv[1:]:
        decode()
        return
    if "--profile" in sys.argv[1:]:
        profile()
        return
    if "--launches" in sys.argv[1:]:
        launches()
        return
    for name, fn in launch_rows().items():
        host, wall = host_and_wall_us(fn)
        print(f"{name:42s} host {host:8.1f} us  wall {wall:8.1f} us")
    for shape in [(64, 256, 64, 16), (4096, 4096, 1024, 16)]:
        for name, fn in step_rows(*shape).items():
            host, wall = host_and_wall_us(fn, 300)
            print(f"{name:42s} host {host:8.1f} us  wall {wall:8.1f} us")


if __name__ == "__main__":
    main()
