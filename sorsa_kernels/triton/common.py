"""Helpers shared by the Triton backend modules."""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl


def on_device(device: torch.device):
    """Make ``device`` current while kernels are launched for its tensors (Triton launches on
    the current GPU); nothing to do for CPU tensors (the interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def element_offsets(matrices: list[torch.Tensor]) -> tuple[torch.Tensor, bool]:
    """``(offsets, aligned)``: an int64 tensor on the matrices' device with each matrix's start
    in elements from ``matrices[0]`` (a kernel adds it to the first one's pointer), and whether
    every offset is a multiple of 16 elements.

    Addressing by offsets from one pointer argument (rather than by a table of raw pointers)
    keeps the compiler's knowledge of that pointer's 16-byte alignment; with ``aligned`` the
    kernel can assert it for every matrix, and tiles load as wide vectors."""
    first = matrices[0]
    size = first.element_size()
    if any((a.data_ptr() - first.data_ptr()) % size for a in matrices):
        raise ValueError("the matrices must be aligned to their element size")
    offsets = [(a.data_ptr() - first.data_ptr()) // size for a in matrices]
    table = torch.tensor(offsets, dtype=torch.int64).to(first.device, non_blocking=True)
    return table, all(offset % 16 == 0 for offset in offsets)


@triton.jit
def matrix_start(b, offsets, stride, INDIRECT: tl.constexpr, ALIGNED: tl.constexpr):
    """Where batch matrix ``b`` starts, in elements: ``offsets[b]`` from :func:`element_offsets`
    (INDIRECT; a multiple of 16 with ALIGNED), else ``b·stride``."""
    if INDIRECT:
        start = tl.load(offsets + b)
        if ALIGNED:
            start = tl.multiple_of(start, 16)
    else:
        start = b * stride
    return start
