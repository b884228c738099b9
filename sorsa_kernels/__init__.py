"""sorsa-kernels: fused kernels for SVD-based low-rank adapters (SORSA, PiSSA, LoRA, SoRA).

Functional ops (each takes ``backend="auto"|"torch"|"triton"|"cuda"``):
:func:`sorsa_linear`, :func:`ortho_reg`, :func:`ortho_reg_grad_`, :func:`rsvd`, :func:`sora_prox_`,
:func:`subtract_lowrank_`.
Modules: :class:`SORSALinear`, :func:`apply_sorsa`, :func:`sorsa_init_`, :func:`sorsa_parameters`.
"""

from sorsa_kernels.backends import BackendUnavailableError, available_backends
from sorsa_kernels.nn import SORSALinear, apply_sorsa, sorsa_init_, sorsa_layers, sorsa_parameters
from sorsa_kernels.ops import ortho_reg, ortho_reg_grad_, rsvd, sora_prox_, sorsa_linear, subtract_lowrank_

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "SORSALinear",
    "apply_sorsa",
    "available_backends",
    "ortho_reg",
    "ortho_reg_grad_",
    "rsvd",
    "sora_prox_",
    "sorsa_init_",
    "sorsa_layers",
    "sorsa_linear",
    "sorsa_parameters",
    "subtract_lowrank_",
]
