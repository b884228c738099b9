"""The adapter linear, side by side with the frozen GEMM and with its peers.

For each shape (M tokens, in→out, rank r), in one run: the bare frozen GEMM (``F.linear``
forward + dx backward), our ``sorsa_linear``, PEFT's LoRA layer, the naive three-matmul SORSA
and the reference SORSA layer (which rebuilds the dense ``(B*S)@A`` every call). As in a
``Trainer(bf16=True)`` run, activations and frozen weights are bfloat16, adapters float32, and
every peer runs under bfloat16 autocast (the small CPU configuration runs everything in
float32, without autocast). The candidates of a shape are timed in turns, five rounds (see
:func:`~sorsa_kernels.benchmark.common.interleaved_ms`); a ratio is the median of the
per-round ratios to dense. The floor is the adapter's extra FLOPs over the base GEMM's.
"""

from __future__ import annotations

import importlib.util
import statistics
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from sorsa_kernels.benchmark.common import (
    activation_autocast,
    activation_dtype,
    format_table,
    interleaved_ms,
    median_ratio,
    peak_memory_mb,
    write_results,
)
from sorsa_kernels.ops.linear import sorsa_linear
from sorsa_kernels.triton.common import graphed

GPU_TOKENS = (4096, 16384)
GPU_SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096), (4096, 14336), (4096, 1024))
GPU_RANKS = (16, 64, 128)
DECODE_TOKENS = (1, 8, 64)
CPU_CONFIGS = ((256, 256, 384, 16), (256, 384, 256, 64))


def training_floor(in_features: int, out_features: int, rank: int) -> float:
    """Forward+backward FLOPs with the adapter over those of the frozen GEMM (fwd + dx)."""
    return 1 + 1.5 * rank * (in_features + out_features) / (in_features * out_features)


def inference_floor(in_features: int, out_features: int, rank: int) -> float:
    """Forward FLOPs with the adapter over those of the frozen GEMM."""
    return 1 + rank * (in_features + out_features) / (in_features * out_features)


class ReferenceSORSALinear(nn.Module):
    """The public reference SORSA layer's forward: it rebuilds the dense update every call."""

    def __init__(self, weight, U, S, Vt, scale):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.sorsa_B, self.sorsa_S, self.sorsa_A = (nn.Parameter(t) for t in (U, S, Vt))
        self.scale = scale

    def forward(self, x):
        return F.linear(x, self.weight) + F.linear(x, (self.sorsa_B * self.sorsa_S) @ self.sorsa_A) * self.scale


def _peft_lora_layer(weight: torch.Tensor, rank: int, alpha: float) -> nn.Module | None:
    if importlib.util.find_spec("peft") is None:
        return None
    from peft import LoraConfig, get_peft_model

    out_features, in_features = weight.shape
    base = nn.Sequential(nn.Linear(in_features, out_features, bias=False, device=weight.device, dtype=weight.dtype))
    with torch.no_grad():
        base[0].weight.copy_(weight)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=alpha, target_modules=["0"], lora_dropout=0.0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)  # a trained adapter, not PEFT's zero init
    return model


def _fwd_bwd(fn: Callable[[], torch.Tensor], dy: torch.Tensor, leaves) -> Callable[[], None]:
    """One training step's worth of the layer; gradients are dropped after each step, as
    ``zero_grad(set_to_none=True)`` does, so every step allocates them afresh."""

    def step():
        fn().backward(dy)
        for leaf in leaves:
            leaf.grad = None

    return step


def _inputs(tokens, in_features, out_features, rank, device):
    dtype = activation_dtype(device)
    x = torch.randn(tokens, in_features, device=device, dtype=dtype, requires_grad=True)
    weight = torch.randn(out_features, in_features, device=device, dtype=dtype) / in_features**0.5
    U = (torch.randn(out_features, rank, device=device) / out_features**0.5).requires_grad_()
    S = (torch.rand(rank, device=device) + 0.5).requires_grad_()
    Vt = (torch.randn(rank, in_features, device=device) / in_features**0.5).requires_grad_()
    dy = torch.randn(tokens, out_features, device=device, dtype=dtype)
    return x, weight, U, S, Vt, dy


# Training steps also replayed from CUDA graphs: the device's time alone, without the host's.
GRAPHED_PEERS = ("dense", "ours", "peft_lora", "naive")


def measure_training(tokens, in_features, out_features, rank, device) -> dict:
    """Forward+backward times (ms), ratios to dense, and peak memory of ours vs dense; on a GPU
    also the steps replayed from CUDA graphs (device time, without the host's launch costs)."""
    x, weight, U, S, Vt, dy = _inputs(tokens, in_features, out_features, rank, device)
    scale = 2.0
    reference = ReferenceSORSALinear(weight, U.detach().clone(), S.detach().clone(), Vt.detach().clone(), scale)
    peft_layer = _peft_lora_layer(weight, rank, alpha=scale * rank)
    candidates = {
        "dense": lambda: F.linear(x, weight),
        "ours": lambda: sorsa_linear(x, weight, U, S, Vt, None, scale),
        "naive": lambda: F.linear(x, weight) + ((x @ Vt.T) * S) @ U.T * scale,
        "reference": lambda: reference(x),
    }
    if peft_layer is not None:
        candidates["peft_lora"] = lambda: peft_layer(x)
    row = dict(mode="train", tokens=tokens, in_features=in_features, out_features=out_features, rank=rank)
    leaves = [x, U, S, Vt, *reference.parameters(), *(peft_layer.parameters() if peft_layer is not None else ())]
    with activation_autocast(device):
        steps = {name: _fwd_bwd(fn, dy, leaves) for name, fn in candidates.items()}
        _record(row, "", interleaved_ms(steps))
        row["dense_peak_mb"] = peak_memory_mb(steps["dense"])
        row["ours_peak_mb"] = peak_memory_mb(steps["ours"])
    if device.type == "cuda":
        # Without the autocast cache, a graph casts the adapters on each replay, as an eager step does once.
        with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False):
            graphs = {name: graphed(steps[name]) for name in GRAPHED_PEERS if name in steps}
            _record(row, "_graph", interleaved_ms(graphs))
    row["floor"] = training_floor(in_features, out_features, rank)
    row["ours_over_floor"] = row["ours_ratio"] / row["floor"]
    if row["dense_peak_mb"] is not None:
        row["extra_peak_mb"] = row["ours_peak_mb"] - row["dense_peak_mb"]
        row["extra_peak_budget_mb"] = 4 * tokens * rank * x.element_size() / 2**20
        row["adapter_grads_mb"] = sum(t.numel() * t.element_size() for t in (U, S, Vt)) / 2**20
    return row


def _record(row: dict, suffix: str, times: dict[str, list[float]]) -> None:
    """Each candidate's per-round times, their median and its median ratio to dense's round by
    round (see :func:`~sorsa_kernels.benchmark.common.interleaved_ms`) into ``row``."""
    for name, rounds in times.items():
        row[f"{name}{suffix}_rounds_ms"] = rounds
        row[f"{name}{suffix}_ms"] = statistics.median(rounds)
        if name != "dense":
            row[f"{name}{suffix}_ratio"] = median_ratio(rounds, times["dense"])


@torch.no_grad()
def measure_inference(tokens, in_features, out_features, rank, device) -> dict:
    """Forward-only (unmerged inference) time of ours vs the dense product: eager, and on a GPU
    also replayed from CUDA graphs (device time, without the host's launch costs)."""
    x, weight, U, S, Vt, _ = _inputs(tokens, in_features, out_features, rank, device)
    candidates = {"dense": lambda: F.linear(x, weight), "ours": lambda: sorsa_linear(x, weight, U, S, Vt, None, 2.0)}
    row = dict(mode="infer", tokens=tokens, in_features=in_features, out_features=out_features, rank=rank)
    _record(row, "", interleaved_ms(candidates))
    if device.type == "cuda":
        _record(row, "_graph", interleaved_ms({name: graphed(fn) for name, fn in candidates.items()}))
    row["floor"] = inference_floor(in_features, out_features, rank)
    return row


def run(quick: bool, tokens=GPU_TOKENS, shapes=GPU_SHAPES, ranks=GPU_RANKS, decode=DECODE_TOKENS) -> Iterator[dict]:
    """Every measurement, one row at a time: the H100 grid (or a part of it), or (``quick``) a
    small CPU configuration."""
    if quick:
        device = torch.device("cpu")
        yield from (measure_training(m, i, o, r, device) for m, i, o, r in CPU_CONFIGS)
        yield from (measure_inference(m, i, o, r, device) for m, i, o, r in CPU_CONFIGS)
        return
    device = torch.device("cuda")
    for m in tokens:
        for in_features, out_features in shapes:
            for rank in ranks:
                yield measure_training(m, in_features, out_features, rank, device)
                yield measure_inference(m, in_features, out_features, rank, device)
                torch.cuda.empty_cache()
    for m in decode:
        for in_features, out_features in shapes:
            yield measure_inference(m, in_features, out_features, 128, device)


TRAINING_COLUMNS = ["tokens", "in_features", "out_features", "rank", "dense_ms", "ours_ratio", "floor",
                    "peft_lora_ratio", "naive_ratio", "reference_ratio", "ours_graph_ratio", "peft_lora_graph_ratio",
                    "naive_graph_ratio", "extra_peak_mb", "extra_peak_budget_mb"]
INFERENCE_COLUMNS = ["tokens", "in_features", "out_features", "rank", "dense_ms", "ours_ratio", "dense_graph_ms",
                     "ours_graph_ratio", "floor"]


def main(quick: bool, out_dir: str = "bench/results", **grid) -> None:
    """Run the grid, a line per measurement as it comes; interrupted (Ctrl-C, ``timeout -s INT``),
    still write the rows measured so far, marked ``interrupted``."""
    rows, interrupted = [], False
    try:
        for row in run(quick, **grid):
            rows.append(row)
            ratio = f"{row['ours_ratio']:.3f}" + (f", graph {row['ours_graph_ratio']:.3f}" if "ours_graph_ratio" in row else "")
            print(f"{row['mode']} {row['tokens']} x {row['in_features']}->{row['out_features']} r={row['rank']}: "
                  f"ours/dense {ratio}", flush=True)  # fmt: skip
    except KeyboardInterrupt:
        interrupted = True
    training = [row for row in rows if row["mode"] == "train"]
    inference = [row for row in rows if row["mode"] == "infer"]
    print(format_table(training, TRAINING_COLUMNS))
    print(format_table(inference, INFERENCE_COLUMNS))
    path = write_results("linear", training + inference, out_dir, quick=quick,
                         **({"interrupted": True} if interrupted else {}))  # fmt: skip
    print(f"wrote {path}" + (" (interrupted: the rows measured so far)" if interrupted else ""))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="the adapter linear against the frozen GEMM and its peers")
    parser.add_argument("--tokens", type=int, nargs="*", default=list(GPU_TOKENS))
    parser.add_argument("--shapes", nargs="+", default=[f"{i}x{o}" for i, o in GPU_SHAPES], help="IN x OUT")
    parser.add_argument("--ranks", type=int, nargs="+", default=list(GPU_RANKS))
    parser.add_argument("--decode", type=int, nargs="*", default=list(DECODE_TOKENS))
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    shapes = [tuple(int(n) for n in shape.split("x")) for shape in args.shapes]
    main(not torch.cuda.is_available(), args.out, tokens=args.tokens, shapes=shapes, ranks=args.ranks, decode=args.decode)
