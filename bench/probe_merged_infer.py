"""The no-grad forward of many rows two ways, against ``F.linear`` in the same rounds: fused (the
training forward's z pass and rank-tailed GEMM, without keeping z) and merged (the weight merged
with the adapter into a temporary, then one cuBLAS product), eagerly and from CUDA graphs, at the
linear suite's forward-only shapes; and what the merge adds to the product from graphs.
``python bench/probe_merged_infer.py [--tokens M ...] [--shapes INxOUT ...] [--ranks R ...]`` on a
GPU, from the repository root; raw output in ``bench/results/merged-infer-probe-*.txt``."""

import argparse
import statistics

import torch
import torch.nn.functional as F

from sorsa_kernels.benchmark.common import environment, interleaved_ms, median_ratio
from sorsa_kernels.benchmark.linear import GPU_RANKS, GPU_SHAPES, GPU_TOKENS, _inputs, inference_floor
from sorsa_kernels.triton import linear
from sorsa_kernels.triton.common import graphed

SCALE = 2.0


@torch.no_grad()
def main(tokens_list, shapes, ranks):
    info = environment()
    print(info["device"], f"torch {info['versions']['torch']}, triton {info['versions']['triton']}")
    print(f"{'M':>6} {'in->out':>11} {'r':>4} {'target':>7} {'dense us':>9} {'fused':>6} {'merged':>6} "
          f"{'dense g':>8} {'fused g':>7} {'merged g':>8} {'merge us':>8}")  # fmt: skip
    device = torch.device("cuda")
    for tokens in tokens_list:
        for in_features, out_features in shapes:
            for rank in ranks:
                x, weight, U, S, Vt, _ = _inputs(tokens, in_features, out_features, rank, device)
                x = x.detach()
                ways = {
                    "dense": lambda: F.linear(x, weight),
                    "fused": lambda: linear._infer_by("fused", x, weight, U, S, Vt, None, SCALE),
                    "merged": lambda: linear._infer_by("merged", x, weight, U, S, Vt, None, SCALE),
                }
                eager = interleaved_ms(ways)
                graphs = interleaved_ms({name: graphed(fn) for name, fn in ways.items()})
                merge_ms = statistics.median(m - d for m, d in zip(graphs["merged"], graphs["dense"]))
                target = 1.05 * inference_floor(in_features, out_features, rank)
                print(f"{tokens:6d} {in_features:5d}->{out_features:<5d} {rank:4d} {target:6.3f}x "
                      f"{statistics.median(eager['dense']) * 1e3:9.1f} "
                      f"{median_ratio(eager['fused'], eager['dense']):5.3f}x "
                      f"{median_ratio(eager['merged'], eager['dense']):5.3f}x "
                      f"{statistics.median(graphs['dense']) * 1e3:8.1f} "
                      f"{median_ratio(graphs['fused'], graphs['dense']):6.3f}x "
                      f"{median_ratio(graphs['merged'], graphs['dense']):7.3f}x {merge_ms * 1e3:8.1f}",
                      flush=True)  # fmt: skip
                del x, weight, U, S, Vt
                torch.cuda.empty_cache()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, nargs="+", default=list(GPU_TOKENS))
    parser.add_argument("--shapes", nargs="+", default=[f"{i}x{o}" for i, o in GPU_SHAPES], help="IN x OUT")
    parser.add_argument("--ranks", type=int, nargs="+", default=list(GPU_RANKS))
    args = parser.parse_args()
    main(args.tokens, [tuple(map(int, shape.split("x"))) for shape in args.shapes], args.ranks)
