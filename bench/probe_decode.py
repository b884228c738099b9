"""Where decode time goes: the forward of few-row layers (M ≤ 64), kernel by kernel.

For each shape: the device time of each kernel of ``F.linear`` and of ``sorsa_linear``'s forward
(no grad) from the profiler, and both calls replayed from CUDA graphs as the linear bench times
them; then the inference forward (``few_rows_forward``) with each of its candidate product
tiles forced in turn, then a few other tiles (those of at most max(16, M) rows, unsplit and split
in two and four), and the tiles the tuner chose.
``python bench/probe_decode.py [--shapes MxINxOUT ...]`` on a GPU, from the repository root; raw
output in ``bench/results/decode-probe-*.txt`` (before 2026-11-24 the other tiles ran at M = 1 only).
"""

import argparse
import collections

import torch
import torch.nn.functional as F
import triton
from torch.profiler import ProfilerActivity, profile

import sorsa_kernels as sk
from sorsa_kernels.benchmark.common import median_ms
from sorsa_kernels.benchmark.linear import _inputs
from sorsa_kernels.triton import linear
from sorsa_kernels.triton.common import graphed

SHAPES = [(1, 4096, 4096), (1, 4096, 1024), (1, 4096, 11008), (1, 11008, 4096), (64, 4096, 4096), (64, 4096, 1024)]
RANK = 128
# Tiles beside the candidates, timed to see what the candidates miss (not checked for spills).
EXPLORED = [(16, 16, 256, 4, 4), (16, 32, 256, 8, 4), (16, 32, 512, 4, 3), (16, 64, 256, 4, 3), (16, 32, 128, 4, 8),
            (32, 32, 128, 4, 4), (64, 32, 128, 4, 4), (64, 32, 256, 4, 3), (64, 32, 64, 4, 6)]


def kernel_us(fn, calls=20) -> dict[str, float]:
    """Mean device µs per call of each kernel ``fn`` launches (names cut to 60 characters)."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    totals = collections.defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name[:60]] += event.device_time_total / calls
    return dict(totals)


@torch.no_grad()
def probe(rows, in_features, out_features):
    device = torch.device("cuda")
    x, weight, U, S, Vt, _ = _inputs(rows, in_features, out_features, RANK, device)
    x, U, S, Vt = x.detach(), U.detach(), S.detach(), Vt.detach()
    calls = {
        "dense": lambda: F.linear(x, weight),
        "ours": lambda: sk.sorsa_linear(x, weight, U, S, Vt, None, 2.0, backend="triton"),
    }
    print(f"\n== M={rows} {in_features}->{out_features} r={RANK}")
    for name, fn in calls.items():
        print(f"{name}: graph {median_ms(graphed(fn)) * 1e3:.1f} us")
        for kernel, us in kernel_us(fn).items():
            print(f"    {us:7.2f} us  {kernel}")
    y = torch.empty(rows, out_features, device=device, dtype=x.dtype)
    explored = [
        linear.Config.of(w, s, split, BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=8)
        for m, n, k, w, s in EXPLORED if m <= max(16, rows) for split in (1, 2, 4)
    ]  # fmt: skip
    for config in linear.few_rows_candidates(x, weight, y) + explored:
        replay = graphed(lambda c=config: linear.few_rows_forward(x, weight, U, S, Vt, None, 2.0, y, c))
        print(f"  few_rows_forward [{config}]: graph {median_ms(replay) * 1e3:.1f} us")
    chosen = [str(c) for key, c in linear._chosen.items() if key[0] == "few" and key[5:7] == (out_features, RANK)]
    print(f"  tuned: {chosen}")


def main_over_shapes(doc: str, shapes: list[tuple[int, int, int]], probe) -> None:
    """The decode probes' command line: ``probe(M, IN, OUT)`` for each of ``--shapes MxINxOUT``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=[f"{m}x{i}x{o}" for m, i, o in shapes], help="MxINxOUT")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), f"torch {torch.__version__}, triton {triton.__version__}")
    for shape in args.shapes:
        probe(*map(int, shape.split("x")))


if __name__ == "__main__":
    main_over_shapes(__doc__, SHAPES, probe)
