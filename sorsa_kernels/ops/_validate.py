"""Argument checks shared by the public ops: each error names the argument at fault."""

from __future__ import annotations

import numbers

import torch


def check_tensor(name: str, value, *, dims: int | tuple[int, ...] | None = None, optional: bool = False):
    """A floating-point tensor with the given number of dimensions (or ``None`` if optional)."""
    if value is None:
        if optional:
            return
        raise TypeError(f"{name} must be a tensor, got None")
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.dtype.is_floating_point:
        raise TypeError(f"{name} must have a floating-point dtype, got {value.dtype}")
    allowed = (dims,) if isinstance(dims, int) else dims
    if allowed is not None and value.dim() not in allowed:
        wanted = " or ".join(map(str, allowed))
        raise ValueError(f"{name} must be {wanted}-D, got shape {tuple(value.shape)}")


def check_same_device(reference_name: str, reference: torch.Tensor, **others):
    """Every tensor in ``others`` (``None`` skipped) lives on ``reference``'s device."""
    for name, value in others.items():
        if value is not None and value.device != reference.device:
            raise ValueError(f"{name} is on {value.device} but {reference_name} is on {reference.device}")


def check_matrix_group(weights, single_op: str) -> list[torch.Tensor]:
    """``weights`` as a non-empty list of 2-D tensors of one shape, dtype, device and strides (the
    same-shape layers of a model, handled as one batch); ``single_op`` names the op that takes
    one batched tensor instead."""
    if isinstance(weights, torch.Tensor):
        raise TypeError(f"weights must be a sequence of tensors (use {single_op} for one batched tensor)")
    weights = list(weights)
    if not weights:
        raise ValueError("weights must hold at least one matrix")
    first = weights[0]
    for i, W in enumerate(weights):
        check_tensor(f"weights[{i}]", W, dims=2)
        if (W.shape, W.dtype, W.device, W.stride()) != (first.shape, first.dtype, first.device, first.stride()):
            raise ValueError(
                f"weights[{i}] ({tuple(W.shape)}, {W.dtype}, {W.device}, strides {W.stride()}) differs from "
                f"weights[0] ({tuple(first.shape)}, {first.dtype}, {first.device}, strides {first.stride()})"
            )
    return weights


def check_dim(name: str, size: int, other_name: str, other_size: int):
    if size != other_size:
        raise ValueError(f"{name} ({size}) must match {other_name} ({other_size})")


def check_number(name: str, value, *, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return float(value)


def check_int(name: str, value, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_rank(rank: int, rows: int, cols: int, what: str) -> int:
    rank = check_int("rank", rank, minimum=1)
    if rank > min(rows, cols):
        raise ValueError(f"rank {rank} exceeds min(rows, cols) = {min(rows, cols)} of {what} [{rows}, {cols}]")
    return rank
