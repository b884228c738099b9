"""Pure-PyTorch randomized SVD: the torch backend and the test oracle.

Backend interface of ``rsvd`` (every backend module implements these functions):

``rsvd(W, rank, niter, oversample, generator) -> (U, S, Vt)``
    W ``[..., m, n]``; returns the top-``rank`` factors ``U [..., m, rank]``, ``S [..., rank]``
    (descending) and ``Vt [..., rank, n]`` in float32 (float64 for float64 inputs).

``rsvd_grouped(weights, rank, niter, oversample, generator) -> (U, S, Vt)``
    The same for a list of ``B`` separate matrices of one shape, dtype, device and strides (the
    weights of a model's same-shape layers); returns ``U [B, m, rank]``, ``S [B, rank]``,
    ``Vt [B, rank, n]``. Backends may read the matrices in place but never modify them.

``rsvd_grouped_start(weights, rank, niter, oversample, generator) -> pending``
    The same computation, returned as an object whose ``result()`` gives ``(U, S, Vt)``. A
    backend may return before the work is done (the GPU one queues its device work, leaves the
    small eigenproblems to host threads and returns), so that a caller can start the next
    group before it collects this one; the weights must stay unmodified until ``result()``.

``working_bytes(m, n, rank, oversample, dtype) -> int``
    Bound on the device memory per matrix of ``m × n`` beyond the weight while one group is
    being started and the previous one's result is still pending (how ``sorsa_init_`` sizes
    its chunks).

This version is the range finder of Halko, Martinsson & Tropp (2011, algorithm 4.4) with
shifted power iterations: a Gaussian sketch of ``k = rank + oversample`` columns, then
``niter`` times ``Q ← qr((AAᵀ − μI)Q)`` with ``μ`` half of ``σ_min(R) + μ_previous`` from the
previous QR factor (``R`` of ``(AAᵀ − μI)Q``): that lies below ``λ_k(AAᵀ)``, so the shift
only speeds the top ``rank`` up (see :mod:`sorsa_kernels.triton.rsvd` for why and how much),
then the exact SVD of the small projected matrix; Householder QR and all products in float32
(float64 for float64 inputs). Groups are processed one matrix at a time.
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
    shift = torch.zeros(batch, dtype=A.dtype, device=A.device)
    for _ in range(niter):
        Q, R = torch.linalg.qr(A @ (A.mT @ Q) - shift[..., None, None] * Q)
        shift = (torch.linalg.svdvals(R)[..., -1] + shift) / 2
    U_small, S, Vt = torch.linalg.svd(Q.mT @ A, full_matrices=False)
    U = Q @ U_small
    return U[..., :rank], S[..., :rank], Vt[..., :rank, :]


def rsvd_grouped(weights, rank, niter, oversample, generator):
    factors = [rsvd(W, rank, niter, oversample, generator) for W in weights]
    return tuple(torch.stack(parts) for parts in zip(*factors))


class _Done:
    """A result computed when it was started."""

    def __init__(self, factors):
        self._factors = factors

    def result(self):
        return self._factors


def rsvd_grouped_start(weights, rank, niter, oversample, generator):
    return _Done(rsvd_grouped(weights, rank, niter, oversample, generator))


def working_bytes(m, n, rank, oversample, dtype):
    k = min(rank + oversample, m, n)
    element = 8 if dtype == torch.float64 else 4
    # One matrix at a time: its float copy, the basis, a product and the QR workspace; the
    # results of the pending group and of the running one, each as a list and then stacked.
    return element * (m * n + 4 * k * (m + n)) + 4 * element * rank * (m + n + 1)
