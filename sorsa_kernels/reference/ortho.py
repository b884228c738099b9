"""Pure-PyTorch orthonormal regularizer: the penalty's definition, the torch backend and the test oracle.

The regularizer sees every adapter factor as a tall matrix ``X [L, r]`` whose columns should be
orthonormal: ``U_p`` as it is, ``Vt_p`` through its transpose. With ``G = XᵀX`` and ``D = G − I``
over all ``n`` matrices:

- ``"squared"``: ``P = Σ_i ‖D_i‖²_F``, so ``∂P/∂X_i = 4·X_i D_i``;
- ``"official"``: ``P = (1/n) Σ_i ‖D_i‖_F`` as the reference SORSA code computes it, so
  ``∂P/∂X_i = 2·X_i D_i / (n‖D_i‖_F)``, taken as 0 where ``‖D_i‖_F = 0``.

Backend interface of ``ortho_reg`` (every backend module implements these three functions). The
factors come in their own orientation: ``Us`` (each ``[L, r]``) then ``Vts`` (each ``[r, L]``), any
strides, mixed shapes and float dtypes, all on one device; "matrix i" counts the Us first.

``prepare(Us, Vts) -> plan``
    Whatever the backend wants to reuse across calls. The ops layer caches the plan under the
    factors' data pointers, shapes, strides and dtypes, and hands it back only with factors
    that match all of them (so device-side pointer tables stay valid).

``grams(plan, Us, Vts) -> Tensor [n, R, R]``
    Every ``G_i``, zero-padded to ``R = max r_i``, in float32 (float64 when any factor is float64).

``add_penalty_grads_(plan, Us, Vts, grams, form, scale, U_outs, Vt_outs, accumulate) -> Tensor [n]``
    For every factor whose entry in ``U_outs``/``Vt_outs`` is not None, writes
    (``accumulate=False``) or adds (``True``) ``scale·∂P/∂factor`` into that tensor, which is
    shaped like its factor, has its dtype, and any strides. ``scale`` is a 0-dim tensor on the
    device; ``grams`` is the output of :func:`grams` for these factors. Returns ``‖D_i‖_F`` for
    every matrix, in the dtype of ``grams``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

FORMS = ("squared", "official")


def factor_matrices(Us: Sequence, Vts: Sequence) -> list:
    """Every factor as its tall ``[L, r]`` matrix (``None`` entries stay ``None``)."""
    return [*Us, *(None if Vt is None else Vt.mT for Vt in Vts)]


def gram_dtype(mats: Sequence[torch.Tensor]) -> torch.dtype:
    """float64 when any matrix is float64, else float32."""
    return torch.float64 if any(m.dtype == torch.float64 for m in mats) else torch.float32


def deviation_norms(grams: torch.Tensor, ranks) -> torch.Tensor:
    """``‖G_i − I_{r_i}‖_F`` for every zero-padded Gram matrix of the stack ``grams [n, R, R]``."""
    ranks = torch.as_tensor(ranks, device=grams.device)
    width = grams.shape[-1]
    deviation = grams.clone()
    deviation.diagonal(dim1=-2, dim2=-1).sub_((torch.arange(width, device=grams.device) < ranks.unsqueeze(1)).to(grams.dtype))
    return torch.linalg.matrix_norm(deviation)


def penalty_value(norms: torch.Tensor, form: str) -> torch.Tensor:
    """The regularizer's value from every ``‖D_i‖_F``."""
    return norms.square().sum() if form == "squared" else norms.mean()


def gradient_coefficients(norms: torch.Tensor, form: str) -> torch.Tensor:
    """Per matrix, the ``c_i`` of ``∂P/∂X_i = c_i·X_i D_i``."""
    if form == "squared":
        return torch.full_like(norms, 4.0)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    return torch.where(norms > 0, 2.0 / (norms.numel() * safe), torch.zeros_like(norms))


def prepare(Us, Vts):
    return None


def grams(plan, Us, Vts):
    mats = factor_matrices(Us, Vts)
    acc = gram_dtype(mats)
    rank = max(m.shape[1] for m in mats)
    out = mats[0].new_zeros((len(mats), rank, rank), dtype=acc)
    for i, m in enumerate(mats):
        x = m.to(acc)
        r = m.shape[1]
        out[i, :r, :r] = x.T @ x
    return out


def add_penalty_grads_(plan, Us, Vts, grams, form, scale, U_outs, Vt_outs, accumulate):
    mats = factor_matrices(Us, Vts)
    norms = deviation_norms(grams, [m.shape[1] for m in mats])
    coeffs = gradient_coefficients(norms, form) * scale
    for i, (m, out) in enumerate(zip(mats, factor_matrices(U_outs, Vt_outs))):
        if out is None:
            continue
        r = m.shape[1]
        deviation = grams[i, :r, :r] - torch.eye(r, dtype=grams.dtype, device=grams.device)
        grad = (coeffs[i] * (m.to(grams.dtype) @ deviation)).to(out.dtype)
        if accumulate:
            out += grad
        else:
            out.copy_(grad)
    return norms
