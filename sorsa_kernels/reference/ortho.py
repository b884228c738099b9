"""Pure-PyTorch orthonormal regularizer pieces: the torch backend and the test oracle.

The regularizer sees every adapter factor as a tall matrix ``X [L, r]`` whose columns should be
orthonormal: ``U_p`` as it is, ``Vt_p`` through its transposed view ``Vt_pᵀ``. Its Gram matrix is
``G = XᵀX`` and the gradient of ``‖G − I‖²_F`` is ``4·X(G − I)``.

Backend interface of ``ortho_reg`` (every backend module implements these two functions):

``grams(mats) -> Tensor [n, R, R]``
    ``mats`` is a sequence of n matrices ``[L_i, r_i]`` (any strides, mixed shapes and float
    dtypes). Returns every ``X_iᵀX_i`` stacked, zero-padded to ``R = max r_i``, in float32
    (float64 when any input is float64).

``add_scaled_grads_(mats, grams, coeffs, outs) -> None``
    ``outs[i] += coeffs[i] · X_i (G_i − I)`` for every i, with ``coeffs`` a float tensor ``[n]``
    on the inputs' device and ``outs[i]`` shaped like ``mats[i]`` (any strides; its own dtype).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def gram_dtype(mats: Sequence[torch.Tensor]) -> torch.dtype:
    """float64 when any matrix is float64, else float32."""
    return torch.float64 if any(m.dtype == torch.float64 for m in mats) else torch.float32


def grams(mats):
    acc = gram_dtype(mats)
    rank = max(m.shape[1] for m in mats)
    out = mats[0].new_zeros((len(mats), rank, rank), dtype=acc)
    for i, m in enumerate(mats):
        x = m.to(acc)
        r = m.shape[1]
        out[i, :r, :r] = x.T @ x
    return out


def add_scaled_grads_(mats, grams, coeffs, outs):
    for i, (m, out) in enumerate(zip(mats, outs)):
        r = m.shape[1]
        deviation = grams[i, :r, :r] - torch.eye(r, dtype=grams.dtype, device=grams.device)
        out += (coeffs[i] * (m.to(grams.dtype) @ deviation)).to(out.dtype)
