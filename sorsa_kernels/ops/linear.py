"""``sorsa_linear``: the one fused adapter linear behind SORSA, PiSSA, LoRA and SoRA.

The op is an autograd Function over the backend interface. Under ``torch.compile`` its
forward and backward call two ``torch.library`` custom ops (each dispatching to the resolved
backend), so that ``fullgraph=True`` sees two opaque nodes and no graph break; in eager mode they
call the backend directly (see :func:`_through_custom_op`). Where no gradient is needed, a third
op computes y alone.
"""

from typing import Optional

import torch

from sorsa_kernels.backends import implementation, resolve
from sorsa_kernels.ops._validate import check_dim, check_number, check_same_device, check_tensor
from sorsa_kernels.reference.linear import accumulation_dtype

Tensor = torch.Tensor


@torch.library.custom_op("sorsa_kernels::linear_forward", mutates_args=())
def linear_forward(
    x: Tensor,
    weight: Optional[Tensor],
    U: Tensor,
    S: Optional[Tensor],
    Vt: Tensor,
    bias: Optional[Tensor],
    scale: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """``(y, z)`` of the backend interface documented in :mod:`sorsa_kernels.reference.linear`."""
    return implementation("sorsa_linear", backend).forward(x, weight, U, S, Vt, bias, scale)


@linear_forward.register_fake
def _linear_forward_fake(x, weight, U, S, Vt, bias, scale, backend):
    rows = x.shape[0]
    saved = implementation("sorsa_linear", backend).saved_dtype(x.dtype)
    return x.new_empty((rows, U.shape[0])), x.new_empty((rows, U.shape[1]), dtype=saved)


@torch.library.custom_op("sorsa_kernels::linear_infer", mutates_args=())
def linear_infer(
    x: Tensor,
    weight: Optional[Tensor],
    U: Tensor,
    S: Optional[Tensor],
    Vt: Tensor,
    bias: Optional[Tensor],
    scale: float,
    backend: str,
) -> Tensor:
    """``y`` of the backend interface's ``infer``: the forward where no gradient is needed."""
    return implementation("sorsa_linear", backend).infer(x, weight, U, S, Vt, bias, scale)


@linear_infer.register_fake
def _linear_infer_fake(x, weight, U, S, Vt, bias, scale, backend):
    return x.new_empty((x.shape[0], U.shape[0]))


@torch.library.custom_op("sorsa_kernels::linear_backward", mutates_args=())
def linear_backward(
    dy: Tensor,
    x: Tensor,
    z: Tensor,
    weight: Optional[Tensor],
    U: Tensor,
    S: Optional[Tensor],
    Vt: Tensor,
    scale: float,
    needs: list[bool],
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dx, dU, dS, dVt)``; a gradient not in ``needs`` comes back as an empty tensor."""
    grads = implementation("sorsa_linear", backend).backward(dy, x, z, weight, U, S, Vt, scale, tuple(needs))
    return tuple(g if g is not None else dy.new_empty(0) for g in grads)


@linear_backward.register_fake
def _linear_backward_fake(dy, x, z, weight, U, S, Vt, scale, needs, backend):
    like = (x, U, S, Vt)
    return tuple(
        torch.empty_like(t) if need and t is not None else dy.new_empty(0) for need, t in zip(needs, like)
    )


def _through_custom_op(x) -> bool:
    # Eager calls skip the custom ops: their dispatcher round trip (schema checks, output aliasing
    # checks, Python re-entry) costs more host time than the kernels of a small layer take on the
    # GPU. A traced graph (torch.compile, export) must contain the opaque ops instead, and so must
    # tensor subclasses (fake or functional tensors of a tracer), whose data no kernel can read.
    return torch.compiler.is_compiling() or type(x) is not torch.Tensor


def _forward(x, weight, U, S, Vt, bias, scale, backend):
    if _through_custom_op(x):
        return torch.ops.sorsa_kernels.linear_forward(x, weight, U, S, Vt, bias, scale, backend)
    return implementation("sorsa_linear", backend).forward(x, weight, U, S, Vt, bias, scale)


def _infer(x, weight, U, S, Vt, bias, scale, backend):
    if _through_custom_op(x):
        return torch.ops.sorsa_kernels.linear_infer(x, weight, U, S, Vt, bias, scale, backend)
    return implementation("sorsa_linear", backend).infer(x, weight, U, S, Vt, bias, scale)


def _backward(dy, x, z, weight, U, S, Vt, scale, needs, backend):
    if _through_custom_op(dy):
        grads = torch.ops.sorsa_kernels.linear_backward(dy, x, z, weight, U, S, Vt, scale, needs, backend)
        return [g if need else None for g, need in zip(grads, needs)]
    return implementation("sorsa_linear", backend).backward(dy, x, z, weight, U, S, Vt, scale, tuple(needs))


class SORSALinearFunction(torch.autograd.Function):
    """Autograd for ``sorsa_linear``: saves only x and the backend's ``[M, r]`` intermediate
    (a form of ``x Vtᵀ``; the other saved tensors are the parameters themselves)."""

    @staticmethod
    def forward(ctx, x, weight, U, S, Vt, bias, scale, backend):
        y, z = _forward(x, weight, U, S, Vt, bias, scale, backend)
        ctx.save_for_backward(x, z, weight, U, S, Vt)
        ctx.scale = scale
        ctx.backend = backend
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, z, weight, U, S, Vt = ctx.saved_tensors
        need_x, need_weight, need_U, need_S, need_Vt, need_bias = ctx.needs_input_grad[:6]
        needs = [need_x, need_U, need_S, need_Vt]
        dx, dU, dS, dVt = _backward(dy, x, z, weight, U, S, Vt, ctx.scale, needs, ctx.backend)
        dweight = (dy.T @ x).to(weight.dtype) if need_weight else None
        dbias = dy.sum(0, dtype=accumulation_dtype(dy.dtype)).to(ctx.bias_dtype) if need_bias else None
        return dx, dweight, dU, dS, dVt, dbias, None, None


def _inputs_valid(x, weight, U, S, Vt, bias, scale) -> bool:
    # Every call's check, in one expression: True only for inputs _check_inputs accepts (False
    # may also mean inputs it accepts in a slower way, such as a numpy scale).
    try:
        device = x.device
        in_features = x.shape[-1]
        out_features, rank = U.shape
        adapter_dtype = U.dtype
        return (
            isinstance(x, Tensor) and isinstance(U, Tensor) and isinstance(Vt, Tensor)
            and type(scale) in (float, int)
            and x.dtype.is_floating_point
            and adapter_dtype.is_floating_point
            and U.device == device
            and Vt.dtype == adapter_dtype
            and Vt.device == device
            and Vt.shape == (rank, in_features)
            and 1 <= rank <= min(in_features, out_features)
            and (S is None or (isinstance(S, Tensor) and S.dtype == adapter_dtype and S.device == device
                               and S.shape == (rank,)))
            and (weight is None or (isinstance(weight, Tensor) and weight.dtype.is_floating_point
                                    and weight.device == device and weight.shape == (out_features, in_features)))
            and (bias is None or (isinstance(bias, Tensor) and bias.dtype.is_floating_point
                                  and bias.device == device and bias.shape == (out_features,)))
        )  # fmt: skip
    except (AttributeError, IndexError, TypeError, ValueError):
        return False


def _check_inputs(x, weight, U, S, Vt, bias, scale):
    if _inputs_valid(x, weight, U, S, Vt, bias, scale):
        return
    # The named error of the first check that fails.
    check_tensor("x", x, dims=None)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension [..., in_features]")
    device = x.device
    for name, tensor, dims in (("weight", weight, 2), ("U", U, 2), ("S", S, 1), ("Vt", Vt, 2), ("bias", bias, 1)):
        if tensor is None and name in ("U", "Vt"):
            check_tensor(name, tensor)  # raises
        if tensor is not None:
            check_tensor(name, tensor, dims=dims)
            if tensor.device != device:
                check_same_device("x", x, **{name: tensor})  # raises
    check_number("scale", scale)
    in_features = x.shape[-1]
    out_features, rank = U.shape
    check_dim("Vt.shape[1]", Vt.shape[1], "x.shape[-1]", in_features)
    check_dim("Vt.shape[0]", Vt.shape[0], "U.shape[1]", rank)
    if S is not None:
        check_dim("S.shape[0]", S.shape[0], "U.shape[1]", rank)
    if weight is not None:
        check_dim("weight.shape[1]", weight.shape[1], "x.shape[-1]", in_features)
        check_dim("weight.shape[0]", weight.shape[0], "U.shape[0]", out_features)
    if bias is not None:
        check_dim("bias.shape[0]", bias.shape[0], "U.shape[0]", out_features)
    if rank < 1:
        raise ValueError("U and Vt must have rank >= 1 (a layer pruned to rank 0 is a plain linear)")
    if rank > min(in_features, out_features):
        raise ValueError(
            f"rank {rank} (U.shape[1]) exceeds min(in_features, out_features) = {min(in_features, out_features)}"
        )
    adapter_dtype = U.dtype
    if Vt.dtype != adapter_dtype or (S is not None and S.dtype != adapter_dtype):
        name, adapter = ("Vt", Vt) if Vt.dtype != adapter_dtype else ("S", S)
        raise TypeError(f"{name} has dtype {adapter.dtype} but U has {adapter_dtype}; the adapters share one dtype")


def sorsa_linear(
    x: Tensor,
    weight: Optional[Tensor],
    U: Tensor,
    S: Optional[Tensor],
    Vt: Tensor,
    bias: Optional[Tensor] = None,
    scale: float = 1.0,
    backend: str = "auto",
) -> Tensor:
    """Fused adapter linear ``y = x @ weight.T + scale * ((x @ Vt.T) * S) @ U.T + bias``.

    One op serves the four adapters: for SORSA ``S`` holds the trainable singular values, for
    SoRA the gate, and for LoRA/PiSSA it is ``None`` (then ``U`` is LoRA's B and ``Vt`` its A).

    Args:
        x: input ``[..., in]`` in float16, bfloat16, float32 or float64 (any strides).
        weight: frozen residual ``[out, in]`` in x's dtype, or ``None`` for the adapter path alone.
        U: ``[out, r]``; S: ``[r]`` or ``None``; Vt: ``[r, in]``. The adapters share one dtype,
            which may be wider than x's (float32 adapters under a bfloat16 model, as the
            reference SORSA setup trains them).
        bias: ``[out]`` or ``None``.
        scale: the adapter's scale (``alpha / r`` by convention).
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"`` (see :mod:`sorsa_kernels.backends`).

    Returns:
        ``[..., out]`` in x's dtype. Products accumulate in float32. Under autocast, x and weight
        are cast to the autocast dtype first, as ``F.linear`` would; the adapters keep theirs.
        Gradients flow to x, U, S and Vt, and to weight and bias only when they require grad;
        the backward saves only x and the ``[M, r]`` product ``x Vtᵀ`` (the Triton backend keeps
        it scaled and in x's dtype: with bfloat16 x, 2·M·r bytes).

    Raises:
        TypeError / ValueError naming the argument for wrong types, dtypes, shapes, devices or a
        rank above ``min(in, out)``; :class:`~sorsa_kernels.backends.BackendUnavailableError` when
        the requested backend cannot run on x's device.
    """
    _check_inputs(x, weight, U, S, Vt, bias, scale)
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x = x.to(dtype)
        weight = None if weight is None else weight.to(dtype)
        with torch.autocast(device_type, enabled=False):
            return sorsa_linear(x, weight, U, S, Vt, bias, scale, backend)
    if weight is not None and weight.dtype != x.dtype:
        raise TypeError(f"weight has dtype {weight.dtype} but x has {x.dtype}; they must match (or run under autocast)")
    name = resolve("sorsa_linear", backend, x.device)
    # A 2-D x goes in as is: a reshape would add two view nodes to the autograd graph.
    rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, U, S, Vt, bias)):
        y = SORSALinearFunction.apply(rows, weight, U, S, Vt, bias, float(scale), name)
    else:  # inference: no autograd node to build, and no z to keep
        y = _infer(rows, weight, U, S, Vt, bias, float(scale), name)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], U.shape[0])
