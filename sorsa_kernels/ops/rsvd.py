"""``rsvd`` and ``rsvd_grouped``: randomized truncated SVD of one matrix, a batch, or a group of
same-shape matrices (a model's layers).

Defaults, measured (``sorsa_kernels/benchmark/init.py`` re-measures them on the GPU): on
4096×4096 and 11008×4096 bfloat16 matrices with power-law spectra ``σ_i ∝ (1+i)^-α``,
α = 0.26–0.5 (trained weights fit α ≈ 0.26–0.42), rank 128, against float64 singular values,
the singular values need more than the residual: the smallest kept ones, next to the cut,
converge last. With the GPU backend's shifted iterations (:mod:`sorsa_kernels.triton.rsvd`),
``niter=6`` and ``max(rank, 64)`` extra columns put every one of the top r within 3.8e-4
relative at α = 0.26 (1.9e-4 at α = 0.3; ``niter=5`` left 1.2e-3 at α = 0.26) and the
residual within 5e-6 of the optimal one; 96 extra columns left 9.8e-4 at α = 0.26. The
unshifted reference iteration needs one or two more iterations for the same accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sorsa_kernels.backends import implementation, resolve
from sorsa_kernels.ops._validate import check_int, check_matrix_group, check_rank, check_tensor

DEFAULT_NITER = 6


def default_oversample(rank: int) -> int:
    """Extra sketch columns used when ``oversample`` is None: ``max(rank, 64)``."""
    return max(rank, 64)


def _check_options(rank, m, n, niter, oversample, generator, device, what):
    rank = check_rank(rank, m, n, what)
    niter = check_int("niter", niter, minimum=0)
    oversample = default_oversample(rank) if oversample is None else check_int("oversample", oversample, minimum=0)
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != device.type:
            raise ValueError(f"generator is on {generator.device} but {what} is on {device}")
    return rank, niter, oversample


@torch.no_grad()
def rsvd(
    W: torch.Tensor,
    rank: int,
    niter: int = DEFAULT_NITER,
    oversample: int | None = None,
    generator: torch.Generator | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` SVD of ``W [..., m, n]`` by a randomized range finder.

    Args:
        W: matrix or batch of matrices, any float dtype (bfloat16/float16 are computed in float32).
        rank: number of singular triplets, ``1 <= rank <= min(m, n)``.
        niter: power iterations (each re-orthonormalized); more iterations, less excess error.
        oversample: extra sketch columns beyond ``rank`` (None: :func:`default_oversample`).
        generator: a ``torch.Generator`` on W's device for a reproducible sketch.
        backend: see :mod:`sorsa_kernels.backends`.

    Returns:
        ``(U [..., m, rank], S [..., rank], Vt [..., rank, n])`` with S descending, in float32
        (float64 for float64 input). Not differentiable.
    """
    check_tensor("W", W, dims=None)
    if W.dim() < 2:
        raise ValueError(f"W must be a matrix or a batch of matrices [..., m, n], got shape {tuple(W.shape)}")
    rank, niter, oversample = _check_options(rank, W.shape[-2], W.shape[-1], niter, oversample, generator, W.device, "W")
    name = resolve("rsvd", backend, W.device)
    return implementation("rsvd", name).rsvd(W, rank, niter, oversample, generator)


def _check_group(weights, rank, niter, oversample, generator):
    weights = check_matrix_group(weights, "rsvd")
    m, n = weights[0].shape
    return weights, *_check_options(rank, m, n, niter, oversample, generator, weights[0].device, "weights[0]")


@torch.no_grad()
def rsvd_grouped(
    weights: Sequence[torch.Tensor],
    rank: int,
    niter: int = DEFAULT_NITER,
    oversample: int | None = None,
    generator: torch.Generator | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`rsvd` of a group of separate matrices of one shape, as one batched computation.

    The matrices (e.g. the weights of a model's same-shape layers) are read in place: no stacked
    copy is made on backends that batch them.

    Args:
        weights: ``B >= 1`` tensors ``[m, n]`` of one dtype, device and strides.
        rank, niter, oversample, generator, backend: as for :func:`rsvd`.

    Returns:
        ``(U [B, m, rank], S [B, rank], Vt [B, rank, n])`` as :func:`rsvd` returns them.
    """
    weights, rank, niter, oversample = _check_group(weights, rank, niter, oversample, generator)
    name = resolve("rsvd", backend, weights[0].device)
    return implementation("rsvd", name).rsvd_grouped(weights, rank, niter, oversample, generator)


@torch.no_grad()
def rsvd_grouped_start(
    weights: Sequence[torch.Tensor],
    rank: int,
    niter: int = DEFAULT_NITER,
    oversample: int | None = None,
    generator: torch.Generator | None = None,
    backend: str = "auto",
):
    """Start :func:`rsvd_grouped`; returns an object whose ``result()`` gives ``(U, S, Vt)``.

    On the GPU backend the call returns once the device work is queued and the small
    eigenproblems are handed to host threads, so that the next group can be started before
    this one is collected (``sorsa_init_`` pipelines its chunks this way). The weights must not
    be modified before ``result()`` returns.
    """
    weights, rank, niter, oversample = _check_group(weights, rank, niter, oversample, generator)
    name = resolve("rsvd", backend, weights[0].device)
    return implementation("rsvd", name).rsvd_grouped_start(weights, rank, niter, oversample, generator)
