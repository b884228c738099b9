"""``ortho_reg`` and ``ortho_reg_grad_``: the SORSA orthonormal regularizer over many adapters.

Both forms are computed from the Gram matrices of every factor at once, so the number of
kernel launches does not grow with the number of adapters (on backends that batch them):

- ``"squared"``: ``Σ‖UᵀU − I‖²_F + Σ‖Vt Vtᵀ − I‖²_F``;
- ``"official"``: the mean over all ``2n`` matrices of the unsquared norms, as the reference
  SORSA code computes it (its gradient is taken as zero where a norm is exactly 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sorsa_kernels.backends import implementation, resolve
from sorsa_kernels.ops._validate import check_number, check_same_device, check_tensor

FORMS = ("squared", "official")


def _factor_views(Us: Sequence[torch.Tensor], Vts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Every factor as a tall ``[L, r]`` matrix whose columns should be orthonormal."""
    return [*Us, *(Vt.mT for Vt in Vts)]


def _check_factors(Us, Vts, form) -> list[torch.Tensor]:
    if isinstance(Us, torch.Tensor) or isinstance(Vts, torch.Tensor):
        raise TypeError("Us and Vts must be sequences of tensors (wrap a single tensor in a list)")
    Us, Vts = list(Us), list(Vts)
    for i, U in enumerate(Us):
        check_tensor(f"Us[{i}]", U, dims=2)
    for i, Vt in enumerate(Vts):
        check_tensor(f"Vts[{i}]", Vt, dims=2)
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    mats = _factor_views(Us, Vts)
    if not mats:
        raise ValueError("ortho_reg needs at least one matrix in Us or Vts")
    check_same_device("Us[0]" if Us else "Vts[0]", mats[0], **{f"matrix {i}": m for i, m in enumerate(mats)})
    return mats


def penalty(grams: torch.Tensor, ranks: Sequence[int], form: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The regularizer's value and, per matrix, the factor ``c_i`` of its gradient ``c_i·X(G − I)``.

    ``grams`` is the zero-padded ``[n, R, R]`` stack of the backend interface.
    """
    n, width, _ = grams.shape
    rank = torch.tensor(list(ranks), device=grams.device).unsqueeze(1)
    identity = torch.diag_embed((torch.arange(width, device=grams.device) < rank).to(grams.dtype))
    norms = torch.linalg.matrix_norm(grams - identity)
    if form == "squared":
        return norms.square().sum(), torch.full_like(norms, 4.0)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    return norms.mean(), torch.where(norms > 0, 2.0 / (n * safe), torch.zeros_like(norms))


class OrthoRegFunction(torch.autograd.Function):
    """Differentiable regularizer whose backward reuses the forward's Gram matrices."""

    @staticmethod
    def forward(ctx, form, backend, *mats):
        impl = implementation("ortho_reg", backend)
        grams = impl.grams(mats)
        value, coeffs = penalty(grams, [m.shape[1] for m in mats], form)
        ctx.save_for_backward(grams, coeffs, *mats)
        ctx.backend = backend
        return value

    @staticmethod
    def backward(ctx, grad_value):
        grams, coeffs, *mats = ctx.saved_tensors
        wanted = [i for i, need in enumerate(ctx.needs_input_grad[2:]) if need]
        grads = [None] * len(mats)
        for i in wanted:
            grads[i] = torch.zeros_like(mats[i])
        implementation("ortho_reg", ctx.backend).add_scaled_grads_(
            [mats[i] for i in wanted], grams[wanted], coeffs[wanted] * grad_value, [grads[i] for i in wanted]
        )
        return (None, None, *grads)


def ortho_reg(
    Us: Sequence[torch.Tensor], Vts: Sequence[torch.Tensor], form: str = "squared", backend: str = "auto"
) -> torch.Tensor:
    """Orthonormality penalty of SORSA's singular-vector factors, differentiable.

    Args:
        Us: left factors ``U_p [out_i, r_i]`` (any number, mixed shapes and float dtypes).
        Vts: right factors ``Vt_p [r_i, in_i]``.
        form: ``"squared"`` (sum of squared Frobenius norms of ``UᵀU − I`` and ``Vt Vtᵀ − I``) or
            ``"official"`` (the mean of the unsquared norms over all matrices, as the reference
            SORSA code; zero gradient where a norm is 0).
        backend: see :mod:`sorsa_kernels.backends`.

    Returns:
        A 0-dim float32 tensor (float64 if any factor is float64).
    """
    mats = _check_factors(Us, Vts, form)
    name = resolve("ortho_reg", backend, mats[0].device)
    return OrthoRegFunction.apply(form, name, *mats)


@torch.no_grad()
def ortho_reg_grad_(
    Us: Sequence[torch.Tensor],
    Vts: Sequence[torch.Tensor],
    coeff: float,
    form: str = "official",
    backend: str = "auto",
) -> torch.Tensor:
    """Add ``coeff · ∇ ortho_reg(Us, Vts, form)`` straight into each factor's ``.grad``.

    No autograd graph is built; a missing ``.grad`` is allocated (zeros) first. This is the
    reference SORSA training step's regularizer, applied after gradient clipping and before
    ``optimizer.step()`` with ``coeff = γ / peak_lr``.

    Returns:
        The regularizer's value (detached, 0-dim).
    """
    mats = _check_factors(Us, Vts, form)
    coeff = check_number("coeff", coeff)
    name = resolve("ortho_reg", backend, mats[0].device)
    for p in (*Us, *Vts):
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    outs = _factor_views([U.grad for U in Us], [Vt.grad for Vt in Vts])
    impl = implementation("ortho_reg", name)
    grams = impl.grams(mats)
    value, coeffs = penalty(grams, [m.shape[1] for m in mats], form)
    impl.add_scaled_grads_(mats, grams, coeffs * coeff, outs)
    return value
