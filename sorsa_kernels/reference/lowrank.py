"""Pure-PyTorch in-place low-rank subtraction: the torch backend and the test oracle.

Backend interface of ``subtract_lowrank_``:

``subtract_lowrank_(W, U, S, Vt) -> None``
    W ``[..., m, n]`` (any float dtype, modified in place), U ``[..., m, r]``, S ``[..., r]`` or
    ``None`` (ones), Vt ``[..., r, n]``, all in :func:`accumulation_dtype` of W (the op converts
    them). Computes ``W ← W − U·diag(S)·Vt`` with the product accumulated in that dtype and the
    result rounded once to W's dtype.

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
    US = U if S is None else U * S.unsqueeze(-2)
    acc = accumulation_dtype(W.dtype)
    *batch, m, n = W.shape
    rows = max(1, CHUNK_ELEMENTS // (n * math.prod(batch)))
    for start in range(0, m, rows):
        block = W[..., start : start + rows, :]
        block.copy_(block.to(acc) - US[..., start : start + rows, :] @ Vt)
