"""``subtract_lowrank_``: ``W ← W − U·diag(S)·Vt`` in place, the residual write of SVD inits."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sorsa_kernels.backends import implementation, resolve
from sorsa_kernels.ops._validate import check_dim, check_matrix_group, check_same_device, check_tensor
from sorsa_kernels.reference.linear import accumulation_dtype


@torch.no_grad()
def subtract_lowrank_(
    W: torch.Tensor,
    U: torch.Tensor,
    S: torch.Tensor | None,
    Vt: torch.Tensor,
    backend: str = "auto",
) -> torch.Tensor:
    """Subtract the low-rank product ``U·diag(S)·Vt`` from ``W`` in place and return ``W``.

    The product is accumulated in float32 (float64 when W is float64) and the difference is
    rounded once to W's dtype. The GPU kernel reads and writes each tile of W once and allocates
    no ``[m, n]`` temporary; the torch backend works on blocks of rows.

    Args:
        W: ``[..., m, n]`` (leading dimensions are a batch), any float dtype; modified in place.
        U: ``[..., m, r]``; S: ``[..., r]`` or ``None`` (all ones); Vt: ``[..., r, n]``.
            Any float dtypes: they are converted to W's accumulation dtype.
        backend: see :mod:`sorsa_kernels.backends`.
    """
    check_tensor("W", W)
    check_tensor("U", U)
    check_tensor("S", S, optional=True)
    check_tensor("Vt", Vt)
    if W.dim() < 2:
        raise ValueError(f"W must be a matrix or a batch of matrices [..., m, n], got shape {tuple(W.shape)}")
    batch = W.shape[:-2]
    if U.shape[:-2] != batch or Vt.shape[:-2] != batch or U.dim() != W.dim() or Vt.dim() != W.dim():
        raise ValueError(
            f"U {tuple(U.shape)} and Vt {tuple(Vt.shape)} must have W's batch dimensions {tuple(batch)} "
            "followed by [m, r] and [r, n]"
        )
    check_dim("U.shape[-2]", U.shape[-2], "W.shape[-2]", W.shape[-2])
    check_dim("Vt.shape[-1]", Vt.shape[-1], "W.shape[-1]", W.shape[-1])
    check_dim("Vt.shape[-2]", Vt.shape[-2], "U.shape[-1]", U.shape[-1])
    if S is not None:
        if S.shape != (*batch, U.shape[-1]):
            raise ValueError(f"S must have shape {(*batch, U.shape[-1])}, got {tuple(S.shape)}")
    check_same_device("W", W, U=U, S=S, Vt=Vt)
    acc = accumulation_dtype(W.dtype)
    U, Vt = U.to(acc), Vt.to(acc)
    S = None if S is None else S.to(acc)
    name = resolve("subtract_lowrank", backend, W.device)
    implementation("subtract_lowrank", name).subtract_lowrank_(W, U, S, Vt)
    return W


@torch.no_grad()
def subtract_lowrank_grouped_(
    weights: Sequence[torch.Tensor],
    U: torch.Tensor,
    S: torch.Tensor | None,
    Vt: torch.Tensor,
    backend: str = "auto",
) -> torch.Tensor:
    """:func:`subtract_lowrank_` for a group of separate matrices of one shape (the same-shape
    layers of a model), in one pass, returning each residual's squared Frobenius norm.

    Args:
        weights: ``B >= 1`` tensors ``[m, n]`` of one dtype, device and strides; modified in place.
        U: ``[B, m, r]``; S: ``[B, r]`` or ``None``; Vt: ``[B, r, n]``, converted to the weights'
            accumulation dtype.
        backend: see :mod:`sorsa_kernels.backends`.

    Returns:
        ``[B]`` in the accumulation dtype: ``‖W_b − U_b·diag(S_b)·Vt_b‖²_F`` accumulated before
        the result is rounded to the weights' dtype.
    """
    weights = check_matrix_group(weights, "subtract_lowrank_")
    first = weights[0]
    check_tensor("U", U, dims=3)
    check_tensor("S", S, dims=2, optional=True)
    check_tensor("Vt", Vt, dims=3)
    m, n = first.shape
    check_dim("U.shape[0]", U.shape[0], "len(weights)", len(weights))
    check_dim("U.shape[1]", U.shape[1], "weights[0].shape[0]", m)
    check_dim("Vt.shape[0]", Vt.shape[0], "len(weights)", len(weights))
    check_dim("Vt.shape[2]", Vt.shape[2], "weights[0].shape[1]", n)
    check_dim("Vt.shape[1]", Vt.shape[1], "U.shape[2]", U.shape[2])
    if S is not None and S.shape != (len(weights), U.shape[2]):
        raise ValueError(f"S must have shape {(len(weights), U.shape[2])}, got {tuple(S.shape)}")
    check_same_device("weights[0]", first, U=U, S=S, Vt=Vt)
    acc = accumulation_dtype(first.dtype)
    U, Vt = U.to(acc), Vt.to(acc)
    S = None if S is None else S.to(acc)
    name = resolve("subtract_lowrank", backend, first.device)
    return implementation("subtract_lowrank", name).subtract_lowrank_grouped_(weights, U, S, Vt)
