"""Pure-PyTorch orthonormal regularizer: the penalty's definition, the torch backend and the test oracle.

The regularizer sees every adapter factor as a tall matrix ``X [L, r]`` whose columns should be
orthonormal: ``U_p`` as it is, ``Vt_p`` through its transpose. With ``G = XᵀX`` and ``D = G − I``
over all ``n`` matrices:

- ``"squared"``: ``P = Σ_i ‖D_i‖²_F``, so ``∂P/∂X_i = 4·X_i D_i``;
- ``"official"``: ``P = (1/n) Σ_i ‖D_i‖_F`` as the reference SORSA code computes it, so
  ``∂P/∂X_i = 2·X_i D_i / (n‖D_i‖_F)``, taken as 0 where ``‖D_i‖_F = 0``.

Backend interface of ``ortho_reg`` (every backend module implements these four functions). The
factors come in their own orientation: ``Us`` (each ``[L, r]``) then ``Vts`` (each ``[r, L]``), any
strides, mixed shapes and float dtypes, all on one device; "matrix i" counts the Us first. Values,
deviations ``D_i`` and norms are float32 (float64 when any factor is float64).

Accuracy: adapters stay near orthonormal, where ``G − I`` cancels all but the last digits of
``G``'s diagonal, so ``D`` is never computed as a float32 ``G`` less ``I``: here the whole Gram
matrix is summed in float64 (its off-diagonal entries, of the size of ``D``, are sums over the
long dimension whose float32 rounding reached 1e-5 of ``D``), then rounded.

``prepare(Us, Vts) -> plan``
    Whatever the backend wants to reuse across calls. The ops layer caches the plan for these
    parameter tensors and hands it back only while each keeps its storage (so device-side
    pointer tables stay valid).

``forward(plan, Us, Vts, form) -> (value, saved)``
    The penalty's value (0-dim) and a tuple of tensors for ``backward`` to reuse. Here
    ``(deviations, norms)``: every ``D_i`` zero-padded to a common width ``W >= max r_i``
    (``[n, W, W]``) and every ``‖D_i‖_F`` (``[n]``); a backend may keep more (or else).

``backward(plan, Us, Vts, saved, form, scale, wanted) -> list``
    ``scale·∂P/∂factor`` for every factor whose entry of ``wanted`` is true (None for the others),
    shaped like the factor, in its dtype; ``scale`` is a 0-dim tensor on the device, ``saved``
    comes from :func:`forward` for these factors.

``step_(plan, Us, Vts, form, coeff, outs) -> value``
    Adds ``coeff·∂P/∂factor`` (``coeff`` a Python float) into ``outs[i]`` for every factor ``i``
    (each shaped like its factor, in its dtype, any strides) and returns the value: the
    regularizer's whole training step.
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


def forward(plan, Us, Vts, form):
    mats = factor_matrices(Us, Vts)
    acc = gram_dtype(mats)
    rank = max(m.shape[1] for m in mats)
    deviations = mats[0].new_zeros((len(mats), rank, rank), dtype=acc)
    for i, m in enumerate(mats):
        x = m.double()
        r = m.shape[1]
        deviation = deviations[i, :r, :r]
        deviation.copy_(x.T @ x)
        deviation.diagonal().copy_(x.square().sum(0) - 1)
    norms = torch.linalg.matrix_norm(deviations)
    return penalty_value(norms, form), (deviations, norms)


def _gradients(mats, deviations, norms, form, scale, wanted):
    """``scale·∂P/∂X_i`` (tall orientation, in ``deviations``' dtype) for the wanted matrices."""
    coeffs = gradient_coefficients(norms, form) * scale
    grads = []
    for i, m in enumerate(mats):
        if not wanted[i]:
            grads.append(None)
            continue
        r = m.shape[1]
        grads.append(coeffs[i] * (m.to(deviations.dtype) @ deviations[i, :r, :r]))
    return grads


def backward(plan, Us, Vts, saved, form, scale, wanted):
    mats = factor_matrices(Us, Vts)
    deviations, norms = saved
    grads = _gradients(mats, deviations, norms, form, scale, wanted)
    return [None if g is None else (g if i < len(Us) else g.T).to(m.dtype)
            for i, (g, m) in enumerate(zip(grads, mats))]


def step_(plan, Us, Vts, form, coeff, outs):
    mats = factor_matrices(Us, Vts)
    value, (deviations, norms) = forward(plan, Us, Vts, form)
    grads = _gradients(mats, deviations, norms, form, coeff, [True] * len(mats))
    for out, grad in zip(factor_matrices(outs[: len(Us)], outs[len(Us) :]), grads):
        out += grad.to(out.dtype)
    return value
