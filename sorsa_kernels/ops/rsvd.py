"""``rsvd``: randomized truncated SVD, batched over leading dimensions."""

from __future__ import annotations

import torch

from sorsa_kernels.backends import implementation, resolve
from sorsa_kernels.ops._validate import check_int, check_rank, check_tensor


@torch.no_grad()
def rsvd(
    W: torch.Tensor,
    rank: int,
    niter: int = 4,
    oversample: int = 16,
    generator: torch.Generator | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` SVD of ``W [..., m, n]`` by a randomized range finder.

    Args:
        W: matrix or batch of matrices, any float dtype (bfloat16/float16 are computed in float32).
        rank: number of singular triplets, ``1 <= rank <= min(m, n)``.
        niter: power iterations (each re-orthonormalized); more iterations, less excess error.
        oversample: extra sketch columns beyond ``rank``.
        generator: a ``torch.Generator`` on W's device for a reproducible sketch.
        backend: see :mod:`sorsa_kernels.backends`.

    Returns:
        ``(U [..., m, rank], S [..., rank], Vt [..., rank, n])`` with S descending, in float32
        (float64 for float64 input). Not differentiable.
    """
    check_tensor("W", W, dims=None)
    if W.dim() < 2:
        raise ValueError(f"W must be a matrix or a batch of matrices [..., m, n], got shape {tuple(W.shape)}")
    rank = check_rank(rank, W.shape[-2], W.shape[-1], "W")
    niter = check_int("niter", niter, minimum=0)
    oversample = check_int("oversample", oversample, minimum=0)
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != W.device.type:
            raise ValueError(f"generator is on {generator.device} but W is on {W.device}")
    name = resolve("rsvd", backend, W.device)
    return implementation("rsvd", name).rsvd(W, rank, niter, oversample, generator)
