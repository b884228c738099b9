"""Pure-PyTorch fused adapter linear: the torch backend and the test oracle.

Backend interface of ``sorsa_linear`` (every backend module implements these four functions):

``forward(x, weight, U, S, Vt, bias, scale) -> (y, z)``
    x ``[M, in]`` (2-D, any strides), weight ``[out, in]`` or ``None`` (no frozen base),
    U ``[out, r]``, S ``[r]`` or ``None``, Vt ``[r, in]``, bias ``[out]`` or ``None``.
    Returns ``y = x weightᵀ + scale·((x Vtᵀ) ⊙ S) Uᵀ + bias`` ``[M, out]`` in x's dtype and the
    intermediate saved for the backward, ``z`` ``[M, r]``: the backend's own form of ``x Vtᵀ``,
    which only its own backward reads (here ``x Vtᵀ`` itself).

``infer(x, weight, U, S, Vt, bias, scale) -> y``
    The same ``y`` where no gradient is needed (inference): the backend may skip z.

``saved_dtype(dtype) -> dtype``
    The dtype of that ``z`` for x of ``dtype`` (here :func:`accumulation_dtype`).

``backward(dy, x, z, weight, U, S, Vt, scale, needs) -> (dx, dU, dS, dVt)``
    ``needs`` is four booleans saying which of the gradients to compute; the others are
    ``None`` (so is dS when S is ``None``). Each gradient has its input's dtype.

With ``g = dy U`` and ``dz = scale·g ⊙ S``: ``dx = dy weight + dz Vt``, ``dU = scale·dyᵀ (z ⊙ S)``,
``dS = scale·Σ_m z ⊙ g``, ``dVt = dzᵀ x``.

All products accumulate in float32 (float64 for float64 inputs), so running this module on
float64 copies of the inputs gives the reference that every other backend is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for every narrower float."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def saved_dtype(dtype: torch.dtype) -> torch.dtype:
    return accumulation_dtype(dtype)


def _scaled(z: torch.Tensor, S: torch.Tensor | None, scale: float) -> torch.Tensor:
    return z * (S.to(z.dtype) * scale) if S is not None else z * scale


def forward(x, weight, U, S, Vt, bias, scale):
    acc = accumulation_dtype(x.dtype)
    z = x.to(acc) @ Vt.to(acc).T
    y = _scaled(z, S, scale) @ U.to(acc).T
    if weight is not None:
        y += F.linear(x, weight).to(acc)
    if bias is not None:
        y += bias.to(acc)
    return y.to(x.dtype), z


def infer(x, weight, U, S, Vt, bias, scale):
    return forward(x, weight, U, S, Vt, bias, scale)[0]


def backward(dy, x, z, weight, U, S, Vt, scale, needs):
    need_dx, need_dU, need_dS, need_dVt = needs
    acc = z.dtype
    dy_acc = dy.to(acc)
    g = dy_acc @ U.to(acc)
    dz = _scaled(g, S, scale)
    dx = dU = dS = dVt = None
    if need_dx:
        dx_acc = dz @ Vt.to(acc)
        if weight is not None:
            dx_acc += (dy @ weight.to(dy.dtype)).to(acc)
        dx = dx_acc.to(x.dtype)
    if need_dU:
        dU = (dy_acc.T @ _scaled(z, S, scale)).to(U.dtype)
    if need_dS and S is not None:
        dS = (scale * (g * z).sum(0)).to(S.dtype)
    if need_dVt:
        dVt = (dz.T @ x.to(acc)).to(Vt.dtype)
    return dx, dU, dS, dVt
