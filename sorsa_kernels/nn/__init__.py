"""``nn`` modules: the adapter layer and the whole-model helpers."""

from sorsa_kernels.nn.init import sorsa_init_
from sorsa_kernels.nn.linear import SORSALinear
from sorsa_kernels.nn.model import apply_ortho_grad_, apply_sorsa, sorsa_layers, sorsa_parameters

__all__ = ["SORSALinear", "apply_ortho_grad_", "apply_sorsa", "sorsa_init_", "sorsa_layers", "sorsa_parameters"]
