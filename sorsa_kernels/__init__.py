"""sorsa-kernels: fused kernels for SVD-based low-rank adapters (SORSA, PiSSA, LoRA, SoRA).

Functional ops (each takes ``backend="auto"|"torch"|"triton"|"cuda"``):
:func:`sorsa_linear`, :func:`ortho_reg`, :func:`ortho_reg_grad_`, :func:`rsvd`, :func:`sora_prox_`,
:func:`subtract_lowrank_`.
Modules: :class:`SORSALinear`, :func:`apply_sorsa`, :func:`sorsa_init_`, :func:`sorsa_parameters`,
:func:`apply_ortho_grad_`. PEFT interop (needs ``peft``, imported on first use):
:func:`export_peft_lora`, :func:`accelerate_peft`, :func:`restore_peft`.
"""

import importlib

from sorsa_kernels.backends import BackendUnavailableError, available_backends
from sorsa_kernels.nn import SORSALinear, apply_ortho_grad_, apply_sorsa, sorsa_init_, sorsa_layers, sorsa_parameters
from sorsa_kernels.ops import ortho_reg, ortho_reg_grad_, rsvd, sora_prox_, sorsa_linear, subtract_lowrank_

__version__ = "0.1.0"

# Names served by modules that import optional dependencies: loaded on first access, so that
# ``import sorsa_kernels`` needs neither transformers nor peft.
_LAZY = {
    "export_peft_lora": "sorsa_kernels.integrations.peft",
    "accelerate_peft": "sorsa_kernels.integrations.peft",
    "restore_peft": "sorsa_kernels.integrations.peft",
}

__all__ = [
    "BackendUnavailableError",
    "SORSALinear",
    "accelerate_peft",
    "apply_ortho_grad_",
    "apply_sorsa",
    "available_backends",
    "export_peft_lora",
    "ortho_reg",
    "ortho_reg_grad_",
    "restore_peft",
    "rsvd",
    "sora_prox_",
    "sorsa_init_",
    "sorsa_layers",
    "sorsa_linear",
    "sorsa_parameters",
    "subtract_lowrank_",
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sorsa_kernels' has no attribute {name!r}")
