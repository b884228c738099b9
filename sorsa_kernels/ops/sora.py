"""``sora_prox_``: SoRA's proximal (soft-threshold) step on its gate vectors."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sorsa_kernels.backends import implementation, resolve
from sorsa_kernels.ops._validate import check_number, check_same_device, check_tensor


def sora_prox_(gates: torch.Tensor | Sequence[torch.Tensor], threshold: float, backend: str = "auto") -> None:
    """Soft-threshold every gate in place: ``g ← sign(g)·max(|g| − threshold, 0)``.

    This is the textbook proximal step of the L1 penalty (threshold = learning rate × λ), to be
    called after each optimizer step. Gates that reach exactly 0 can then be pruned
    (:meth:`sorsa_kernels.SORSALinear.prune_`).

    Args:
        gates: one tensor or a sequence of tensors (any shapes, float dtypes, one device).
        threshold: ``>= 0``.
        backend: see :mod:`sorsa_kernels.backends`.
    """
    gates = [gates] if isinstance(gates, torch.Tensor) else list(gates)
    if not gates:
        return
    for i, g in enumerate(gates):
        check_tensor(f"gates[{i}]", g)
    check_same_device("gates[0]", gates[0], **{f"gates[{i}]": g for i, g in enumerate(gates)})
    threshold = check_number("threshold", threshold, minimum=0.0)
    name = resolve("sora_prox", backend, gates[0].device)
    implementation("sora_prox", name).prox_(gates, threshold)
