"""The public functional API: each op validates its arguments, resolves a backend and runs it
(through autograd Functions and ``torch.library`` custom ops where the op is differentiable)."""

from sorsa_kernels.ops.linear import sorsa_linear
from sorsa_kernels.ops.lowrank import subtract_lowrank_
from sorsa_kernels.ops.ortho import ortho_reg, ortho_reg_grad_
from sorsa_kernels.ops.rsvd import rsvd
from sorsa_kernels.ops.sora import sora_prox_

__all__ = ["sorsa_linear", "ortho_reg", "ortho_reg_grad_", "rsvd", "sora_prox_", "subtract_lowrank_"]
