"""How well the tuner picks the forward's and the backward's ways (apart, or passes beside the
GEMM): for each shape, the way ``_choose`` picks in several fresh tunings (each timing every
way from CUDA graphs as on a first call), against every way timed from graphs in
turns over several rounds (:func:`~sorsa_kernels.benchmark.common.interleaved_ms`). Prints the
picks, the best way by the rounds' median and what each pick costs over it (µs).
``python bench/probe_way_choice.py [--tokens M ...] [--shapes INxOUT ...] [--ranks R ...]
[--tunings N]`` on a GPU, from the repository root; raw output in
``bench/results/way-choice-probe-*.txt``."""

import argparse
import statistics

import torch

from sorsa_kernels import sorsa_linear
from sorsa_kernels.benchmark.common import environment, interleaved_ms
from sorsa_kernels.benchmark.linear import _inputs
from sorsa_kernels.benchmark.linear_products import step_ways
from sorsa_kernels.triton import linear
from sorsa_kernels.triton.common import graphed

SCALE = 2.0


def _label(way) -> str:
    if way == linear._APART:
        return way
    return "|".join("-" if part is None else str(part).replace(" ", ",") for part in way[:-1])


def _picks(x, weight, U, S, Vt, dy, tunings: int) -> dict[str, list]:
    """The ways ``_choose`` picks for one training step in ``tunings`` fresh tunings."""
    picks = {"forward": [], "backward": []}
    for _ in range(tunings):
        for key in [k for k in linear._chosen if k[0] in picks]:
            del linear._chosen[key]
        leaves = [t.detach().requires_grad_() for t in (x, U, S, Vt)]
        sorsa_linear(leaves[0], weight, *leaves[1:], None, SCALE, backend="triton").backward(dy)
        for key, way in linear._chosen.items():
            if key[0] in picks:
                picks[key[0]].append(way)
    return picks


def main(tokens_list, shapes, ranks, tunings):
    info = environment()
    print(info["device"], f"torch {info['versions']['torch']}, triton {info['versions']['triton']}")
    device = torch.device("cuda")
    for tokens in tokens_list:
        for in_features, out_features in shapes:
            for rank in ranks:
                x, weight, U, S, Vt, dy = _inputs(tokens, in_features, out_features, rank, device)
                x, U, S, Vt = x.detach(), U.detach(), S.detach(), Vt.detach()
                picks = _picks(x, weight, U, S, Vt, dy, tunings)
                ways_of = step_ways(x, weight, U, S, Vt, dy, SCALE)
                ways_of["forward"][linear._APART]()  # z, which the backward's ways read
                for direction, ways in ways_of.items():
                    if len(ways) < 2:
                        continue
                    times = interleaved_ms({way: graphed(run) for way, run in ways.items()})
                    medians = {way: statistics.median(t) * 1e3 for way, t in times.items()}
                    best = min(medians, key=medians.get)
                    costs = [f"{_label(p)} +{medians[p] - medians[best]:.1f}" for p in picks[direction]]
                    print(f"{tokens:6d} {in_features:5d}->{out_features:<5d} r={rank:<3d} {direction:8s} "
                          f"ways={len(ways)} best={_label(best)} {medians[best]:.1f} us "
                          f"(apart {medians[linear._APART]:.1f}); picks: {'; '.join(costs)}", flush=True)  # fmt: skip
                del x, weight, U, S, Vt, dy
                torch.cuda.empty_cache()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--shapes", nargs="+", default=["4096x4096", "11008x4096", "4096x11008"], help="IN x OUT")
    parser.add_argument("--ranks", type=int, nargs="+", default=[16])
    parser.add_argument("--tunings", type=int, default=4)
    args = parser.parse_args()
    main(args.tokens, [tuple(map(int, s.split("x"))) for s in args.shapes], args.ranks, args.tunings)
