"""One layer's training step for the probes in bench/: ``sorsa_linear`` (Triton backend) forward
+ backward beside ``F.linear`` forward + dx, on the linear bench's inputs (bf16 x and weight,
float32 adapters), gradients dropped after each step as the bench does. Built from whichever
``sorsa_kernels`` is importable (bench/compare_step.py runs it against another copy)."""

import torch
import torch.nn.functional as F

import sorsa_kernels as sk
from sorsa_kernels.benchmark.linear import _fwd_bwd, _inputs


def layer_steps(rows, in_features, out_features, rank) -> dict:
    """``{"ours": step, "dense": step}`` for one layer of these sizes on the current GPU."""
    x, weight, U, S, Vt, dy = _inputs(rows, in_features, out_features, rank, torch.device("cuda"))
    return {
        "ours": _fwd_bwd(lambda: sk.sorsa_linear(x, weight, U, S, Vt, None, 0.5, backend="triton"), dy, (x, U, S, Vt)),
        "dense": _fwd_bwd(lambda: F.linear(x, weight), dy, (x,)),
    }
