"""``ortho_reg`` and ``ortho_reg_grad_``: the SORSA orthonormal regularizer over many adapters.

Both forms are computed from the Gram matrices of every factor at once, so the number of
kernel launches does not grow with the number of adapters (on backends that batch them):

- ``"squared"``: ``Σ‖UᵀU − I‖²_F + Σ‖Vt Vtᵀ − I‖²_F``;
- ``"official"``: the mean over all ``2n`` matrices of the unsquared norms, as the reference
  SORSA code computes it (its gradient is taken as zero where a norm is exactly 0).

The math lives in :mod:`sorsa_kernels.reference.ortho`. A training loop calls these with the
same parameters every step, so everything about a factor set that does not change between
steps (validation, the backend's plan, e.g. device-side pointer tables) is cached under the
identities of the parameter tensors and checked against their data pointers: a repeated call
reads one pointer per factor (and per ``.grad``), nothing else. A cached set is dropped when
one of its tensors is garbage collected (so a new tensor reusing an identity cannot match).
Changing a parameter's shape or strides in place while it keeps its storage address
(``p.data = p.data[:, :k]``, ``set_``, ``as_strided_``) is not detected: pass new parameters.
"""

from __future__ import annotations

import functools
import itertools
import operator
import weakref
from collections import OrderedDict
from collections.abc import Sequence

import torch

from sorsa_kernels.backends import implementation, resolve
from sorsa_kernels.ops._validate import check_number, check_same_device, check_tensor
from sorsa_kernels.reference.ortho import FORMS

_FACTOR_SETS_CACHED = 8
_data_ptr = torch.Tensor.data_ptr
_grad = operator.attrgetter("grad")


class _FactorSet:
    """A validated factor set: its device, data pointers and each backend's plan."""

    def __init__(self, Us: list[torch.Tensor], Vts: list[torch.Tensor], key: tuple):
        self.device = (Us or Vts)[0].device
        self.pointers = (list(map(_data_ptr, Us)), list(map(_data_ptr, Vts)))
        self.plans: dict[str, object] = {}
        # When a factor dies its identity may be reused by a new tensor: drop the set with it.
        self._watchers = [weakref.ref(t, functools.partial(_forget, key)) for t in Us + Vts]

    def plan(self, backend: str, Us, Vts):
        if backend not in self.plans:
            self.plans[backend] = implementation("ortho_reg", backend).prepare(Us, Vts)
        return self.plans[backend]


_factor_sets: OrderedDict[tuple, _FactorSet] = OrderedDict()
# The key and set of the latest call: a training loop finds its set here without hashing the key.
_latest: list = [None, None]


def _forget(key, _reference):
    _factor_sets.pop(key, None)
    if _latest[0] == key:
        _latest[:] = [None, None]


def _as_list(name: str, value) -> list:
    if isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a sequence of tensors, got a tensor (wrap a single tensor in a list)")
    try:
        return list(value)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of tensors, got {type(value).__name__}") from None


def _validate(Us: list, Vts: list):
    names = [f"Us[{i}]" for i in range(len(Us))] + [f"Vts[{i}]" for i in range(len(Vts))]
    factors = Us + Vts
    if not factors:
        raise ValueError("ortho_reg needs at least one matrix in Us or Vts")
    for name, t in zip(names, factors):
        check_tensor(name, t, dims=2)
        if t.numel() == 0:
            raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")
    check_same_device(names[0], factors[0], **dict(zip(names[1:], factors[1:])))
    # The same storage twice would race in backends that update every .grad concurrently.
    seen: dict[tuple, str] = {}
    for name, t in zip(names, factors):
        key = (t.data_ptr(), t.shape, t.stride(), t.dtype)
        if key[0] != 0 and key in seen:
            raise ValueError(f"{name} is the same matrix as {seen[key]}; pass each factor once")
        seen[key] = name


def _factor_set(Us, Vts, form) -> tuple[list, list, _FactorSet]:
    """Validated ``(Us, Vts)`` and their cached :class:`_FactorSet`."""
    Us, Vts = _as_list("Us", Us), _as_list("Vts", Vts)
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    key = (tuple(map(id, Us)), tuple(map(id, Vts)))
    latest_key, factor_set = _latest
    if key != latest_key:
        factor_set = _factor_sets.get(key)
        if factor_set is not None:
            _factor_sets.move_to_end(key)
    if factor_set is not None:
        try:
            fresh = factor_set.pointers == (list(map(_data_ptr, Us)), list(map(_data_ptr, Vts)))
        except TypeError:  # not all tensors: _validate says which
            fresh = False
        if not fresh:
            del _factor_sets[key]
            factor_set = None
    if factor_set is None:
        _validate(Us, Vts)
        factor_set = _factor_sets[key] = _FactorSet(Us, Vts, key)
        while len(_factor_sets) > _FACTOR_SETS_CACHED:
            _factor_sets.popitem(last=False)
    _latest[:] = [key, factor_set]
    return Us, Vts, factor_set


class OrthoRegFunction(torch.autograd.Function):
    """Differentiable regularizer whose backward reuses what the backend's forward saved (the
    deviations ``G − I`` and norms)."""

    @staticmethod
    def forward(ctx, form, backend, factor_set, num_Us, *factors):
        Us, Vts = factors[:num_Us], factors[num_Us:]
        plan = factor_set.plan(backend, Us, Vts)
        value, saved = implementation("ortho_reg", backend).forward(plan, Us, Vts, form)
        ctx.save_for_backward(*saved, *factors)
        ctx.form, ctx.backend, ctx.plan, ctx.num_Us, ctx.num_saved = form, backend, plan, num_Us, len(saved)
        return value

    @staticmethod
    def backward(ctx, grad_value):
        saved, factors = ctx.saved_tensors[: ctx.num_saved], ctx.saved_tensors[ctx.num_saved :]
        k = ctx.num_Us
        grads = implementation("ortho_reg", ctx.backend).backward(
            ctx.plan, factors[:k], factors[k:], saved, ctx.form, grad_value, ctx.needs_input_grad[4:]
        )
        return (None, None, None, None, *grads)


def ortho_reg(
    Us: Sequence[torch.Tensor], Vts: Sequence[torch.Tensor], form: str = "squared", backend: str = "auto"
) -> torch.Tensor:
    """Orthonormality penalty of SORSA's singular-vector factors, differentiable.

    Args:
        Us: left factors ``U_p [out_i, r_i]`` (any number, mixed shapes and float dtypes).
        Vts: right factors ``Vt_p [r_i, in_i]``.
        form: ``"squared"`` (sum of squared Frobenius norms of ``UᵀU − I`` and ``Vt Vtᵀ − I``) or
            ``"official"`` (the mean of the unsquared norms over all matrices, as the reference
            SORSA code; zero gradient where a norm is 0).
        backend: see :mod:`sorsa_kernels.backends`.

    Returns:
        A 0-dim float32 tensor (float64 if any factor is float64).
    """
    Us, Vts, factor_set = _factor_set(Us, Vts, form)
    name = resolve("ortho_reg", backend, factor_set.device)
    return OrthoRegFunction.apply(form, name, factor_set, len(Us), *Us, *Vts)


def _grads(factors: list) -> list:
    """Every factor's ``.grad``, allocating the missing ones (zeros) in one buffer per dtype."""
    grads = list(map(_grad, factors))
    if not all(map(operator.is_not, grads, itertools.repeat(None))):  # ("None in grads" compares tensors)
        missing: dict[torch.dtype, list] = {}
        for p, g in zip(factors, grads):
            if g is None:
                missing.setdefault(p.dtype, []).append(p)
        for dtype, params in missing.items():
            buffer = torch.zeros(sum(p.numel() for p in params), dtype=dtype, device=params[0].device)
            for p, flat in zip(params, buffer.split([p.numel() for p in params])):
                p.grad = flat.view(p.shape)
        grads = list(map(_grad, factors))
    return grads


@torch.no_grad()
def ortho_reg_grad_(
    Us: Sequence[torch.Tensor],
    Vts: Sequence[torch.Tensor],
    coeff: float,
    form: str = "official",
    backend: str = "auto",
) -> torch.Tensor:
    """Add ``coeff · ∇ ortho_reg(Us, Vts, form)`` straight into each factor's ``.grad``.

    No autograd graph is built; a missing ``.grad`` is allocated (zeros) first. This is the
    reference SORSA training step's regularizer, applied after gradient clipping and before
    ``optimizer.step()`` with ``coeff = γ / peak_lr``. Each factor must appear once.

    Returns:
        The regularizer's value (detached, 0-dim; float32, or float64 if any factor is float64).
    """
    coeff = check_number("coeff", coeff)
    Us, Vts, factor_set = _factor_set(Us, Vts, form)
    name = resolve("ortho_reg", backend, factor_set.device)
    plan = factor_set.plan(name, Us, Vts)
    return implementation("ortho_reg", name).step_(plan, Us, Vts, form, coeff, _grads(Us + Vts))
