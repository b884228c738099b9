"""Pure-PyTorch SoRA proximal step: the torch backend and the test oracle.

Backend interface of ``sora_prox_``:

``prox_(gates, threshold) -> None``
    In place on every tensor of ``gates``: ``g ← sign(g)·max(|g| − threshold, 0)``.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def prox_(gates, threshold):
    for g in gates:
        g.copy_(g.sign() * (g.abs() - threshold).clamp_(min=0))
