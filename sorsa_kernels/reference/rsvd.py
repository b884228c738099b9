"""Pure-PyTorch randomized SVD: the torch backend and the test oracle.

Backend interface of ``rsvd`` (every backend module implements both functions):

``rsvd(W, rank, niter, oversample, generator) -> (U, S, Vt)``
    W ``[..., m, n]``; returns the top-``rank`` factors ``U [..., m, rank]``, ``S [..., rank]``
    (descending) and ``Vt [..., rank, n]`` in float32 (float64 for float64 inputs).

``rsvd_grouped(weights, rank, niter, oversample, generator) -> (U, S, Vt)``
    The same for a list of ``B`` separate matrices of one shape, dtype, device and strides (the
    weights of a model's same-shape layers); returns ``U [B, m, rank]``, ``S [B, rank]``,
    ``Vt [B, rank, n]``. Backends may read the matrices in place but never modify them.

This version is the textbook range finder (Halko, Martinsson & Tropp 2011, algorithm 4.4):
a Gaussian sketch of ``rank + oversample`` columns, ``niter`` power iterations, each product
re-orthonormalized by Householder QR, then the exact SVD of the small projected matrix, all in
float32 (float64 for float64 inputs). Groups are processed one matrix at a time.
"""

from __future__ import annotations

import torch

from sorsa_kernels.reference.linear import accumulation_dtype


def rsvd(W, rank, niter, oversample, generator):
    A = W.to(accumulation_dtype(W.dtype))
    *batch, m, n = A.shape
    width = min(rank + oversample, m, n)
    sketch = torch.randn(*batch, n, width, generator=generator, device=A.device, dtype=A.dtype)
    Q = torch.linalg.qr(A @ sketch).Q
    for _ in range(niter):
        Q = torch.linalg.qr(A.mT @ Q).Q
        Q = torch.linalg.qr(A @ Q).Q
    U_small, S, Vt = torch.linalg.svd(Q.mT @ A, full_matrices=False)
    U = Q @ U_small
    return U[..., :rank], S[..., :rank], Vt[..., :rank, :]


def rsvd_grouped(weights, rank, niter, oversample, generator):
    factors = [rsvd(W, rank, niter, oversample, generator) for W in weights]
    return tuple(torch.stack(parts) for parts in zip(*factors))
