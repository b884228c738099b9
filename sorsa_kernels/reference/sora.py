"""Pure-PyTorch SoRA proximal step: the torch backend and the test oracle.

Backend interface of ``sora_prox_``:

``prox_(gates, threshold) -> None``
    In place on every tensor of ``gates``: ``g ← sign(g)·max(|g| − threshold, 0)``.
"""

from __future__ import annotations

import torch

from sorsa_kernels.reference.linear import accumulation_dtype


@torch.no_grad()
def prox_(gates, threshold):
    for g in gates:
        # In float32 (float64 for float64 gates), rounded once: a 16-bit threshold would move the step.
        wide = g.to(accumulation_dtype(g.dtype))
        g.copy_(wide.sign() * (wide.abs() - threshold).clamp_(min=0))
