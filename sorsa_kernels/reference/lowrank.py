"""Pure-PyTorch in-place low-rank subtraction: the torch backend and the test oracle.

Backend interface of ``subtract_lowrank_``:

``subtract_lowrank_(W, U, S, Vt) -> None``
    W ``[..., m, n]`` (any float dtype, modified in place), U ``[..., m, r]``, S ``[..., r]`` or
    ``None`` (ones), Vt ``[..., r, n]``, all in :func:`accumulation_dtype` of W (the op converts
    them). Computes ``W ← W − U·diag(S)·Vt`` with the product accumulated in that dtype and the
    result rounded once to W's dtype.

``subtract_lowrank_grouped_(weights, U, S, Vt) -> norms``
    The same for ``B`` separate matrices of one shape, dtype, device and strides (a group of
    layers) with stacked factors ``U [B, m, r]``, ``S [B, r]`` or ``None``, ``Vt [B, r, n]``;
    returns ``norms [B]`` (accumulation dtype) with ``‖W_b − U_b·diag(S_b)·Vt_b‖²_F`` computed
    before the rounding to W's dtype (what an SVD init reports as its residual).

This version works on blocks of rows so that no ``[m, n]`` temporary in the accumulation dtype
is ever allocated: the extra memory stays below :data:`CHUNK_ELEMENTS` elements.
"""

from __future__ import annotations

import math

import torch

from sorsa_kernels.reference.linear import accumulation_dtype

# Largest temporary (elements of the accumulation dtype) one block of rows may allocate.
CHUNK_ELEMENTS = 1 << 22


@torch.no_grad()
def subtract_lowrank_(W, U, S, Vt):
    _subtract(W, U, S, Vt)


def _subtract(W, U, S, Vt) -> torch.Tensor:
    """The subtraction, block by block; returns the squared norm of the unrounded result."""
    US = U if S is None else U * S.unsqueeze(-2)
    acc = accumulation_dtype(W.dtype)
    *batch, m, n = W.shape
    rows = max(1, CHUNK_ELEMENTS // (n * math.prod(batch)))
    norm = torch.zeros((), dtype=acc, device=W.device)
    for start in range(0, m, rows):
        block = W[..., start : start + rows, :]
        difference = block.to(acc) - US[..., start : start + rows, :] @ Vt
        norm += difference.square().sum()
        block.copy_(difference)
    return norm


@torch.no_grad()
def subtract_lowrank_grouped_(weights, U, S, Vt):
    return torch.stack([_subtract(W, U[i], None if S is None else S[i], Vt[i]) for i, W in enumerate(weights)])
