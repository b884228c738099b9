"""``SORSALinear``: a frozen residual linear plus a trainable low-rank adapter.

Four adapters share the module and the fused op, differing only in their init and in S:

==========  =====================================  ==================  =====================
mode        U ``[out, r]`` / Vt ``[r, in]``        S ``[r]``           frozen ``weight``
==========  =====================================  ==================  =====================
``sorsa``   top-r singular vectors                 singular values     ``W − U diag(Σ) Vt``
``pissa``   ``U·√Σ`` / ``√Σ·Vt`` (PEFT's B / A)    none                ``W − U diag(Σ) Vt``
``lora``    zeros / Kaiming-uniform (B / A)        none                ``W``
``sora``    zeros / Kaiming-uniform (B / A)        gate, ones          ``W``
==========  =====================================  ==================  =====================

With a scale other than 1 the SVD modes divide Σ by it, so that the output is unchanged at
init and ``weight`` is the true SVD residual.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sorsa_kernels.ops._validate import check_number, check_rank
from sorsa_kernels.ops.linear import sorsa_linear
from sorsa_kernels.ops.lowrank import subtract_lowrank_
from sorsa_kernels.ops.rsvd import rsvd
from sorsa_kernels.reference.linear import accumulation_dtype

MODES = ("sorsa", "pissa", "lora", "sora")
INITS = ("svd", "rsvd", "none")


def adapter_scale(rank: int, alpha: float | None) -> float:
    """``alpha / rank``, or 1 when alpha is unset (the reference SORSA convention)."""
    return 1.0 if alpha is None else float(alpha) / rank


class SORSALinear(nn.Module):
    """A linear layer whose frozen ``weight`` is a residual and whose trainable adapter adds
    ``scale · ((x Vtᵀ) ⊙ S) Uᵀ``, computed with :func:`sorsa_kernels.sorsa_linear`.

    Build one from an existing layer with :meth:`from_linear`; the constructor makes an
    uninitialized module of the right shapes (for loading a state dict).

    Attributes:
        weight, bias: the frozen residual ``[out, in]`` and bias (``requires_grad=False``).
        U, S, Vt: the adapter parameters (``S`` is ``None`` for ``lora`` and ``pissa``).
        scale: the adapter scale; mode: one of ``sorsa``, ``pissa``, ``lora``, ``sora``.
        merged: whether the adapter is currently folded into ``weight``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        *,
        bias: bool = True,
        alpha: float | None = None,
        mode: str = "sorsa",
        dropout: float = 0.0,
        device=None,
        dtype: torch.dtype | None = None,
        adapter_dtype: torch.dtype = torch.float32,
        backend: str = "auto",
        base: nn.Linear | None = None,
    ):
        """Uninitialized adapter of the given shapes; with ``base``, that layer's weight and
        bias ``Parameter`` objects become this module's frozen ones (nothing is copied)."""
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        rank = check_rank(rank, out_features, in_features, "the layer's weight")
        dropout = check_number("dropout", dropout, minimum=0.0)
        if dropout >= 1.0:
            raise ValueError(f"dropout must be < 1, got {dropout}")
        self.in_features, self.out_features = in_features, out_features
        self.mode, self.backend = mode, backend
        self.scale = adapter_scale(rank, alpha)
        self.dropout = nn.Dropout(dropout)
        frozen = dict(device=device, dtype=dtype)
        adapter = dict(device=device, dtype=adapter_dtype)
        if base is None:
            self.weight = nn.Parameter(torch.empty(out_features, in_features, **frozen), requires_grad=False)
            self.bias = nn.Parameter(torch.empty(out_features, **frozen), requires_grad=False) if bias else None
        else:
            self.weight = base.weight.requires_grad_(False)
            self.bias = None if base.bias is None else base.bias.requires_grad_(False)
        self.U = nn.Parameter(torch.empty(out_features, rank, **adapter))
        self.S = nn.Parameter(torch.empty(rank, **adapter)) if mode in ("sorsa", "sora") else None
        self.Vt = nn.Parameter(torch.empty(rank, in_features, **adapter))
        self.merged = False
        self._unmerged_weight: torch.Tensor | None = None
        self.initial_adapter: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None = None

    @property
    def rank(self) -> int:
        return self.U.shape[1]

    @classmethod
    @torch.no_grad()
    def from_linear(
        cls,
        linear: nn.Linear,
        rank: int,
        alpha: float | None = None,
        init: str = "svd",
        mode: str = "sorsa",
        dropout: float = 0.0,
        adapter_dtype: torch.dtype = torch.float32,
        backend: str = "auto",
        generator: torch.Generator | None = None,
        keep_initial: bool = False,
        **rsvd_options,
    ) -> "SORSALinear":
        """Wrap ``linear``: its weight (the same ``Parameter``, now frozen) becomes the residual,
        written in place in its own dtype, and the output is unchanged at init.

        Args:
            linear: the layer to adapt.
            rank: adapter rank, ``1 <= rank <= min(in, out)``.
            alpha: scale is ``alpha / rank`` (1 when None).
            init: ``"svd"`` (exact, ``torch.linalg.svd``), ``"rsvd"`` (randomized; extra keyword
                arguments go to :func:`sorsa_kernels.rsvd`) or ``"none"`` (weight untouched, adapter
                all zeros so the output is the base layer's, for :func:`sorsa_kernels.sorsa_init_`
                to initialize many layers at once). Used by the ``sorsa`` and ``pissa`` modes;
                ``lora`` and ``sora`` start from Kaiming-uniform A and zero B.
            mode: ``"sorsa"``, ``"pissa"``, ``"lora"`` or ``"sora"`` (see the module docstring).
            dropout: dropout on the adapter's input (the base path sees x unchanged).
            adapter_dtype: dtype of U, S, Vt (float32 by default, whatever the base dtype).
            backend: backend of the forward op.
            generator: random source for the rsvd sketch or the LoRA init.
            keep_initial: record the initial adapter on the CPU (:meth:`keep_initial_adapter`),
                which :func:`sorsa_kernels.export_peft_lora` needs for the SVD modes.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if init == "none" and keep_initial and mode in ("sorsa", "pissa"):
            raise ValueError("keep_initial needs the SVD init: with init='none', call keep_initial_adapter() after sorsa_init_")
        layer = cls(
            linear.in_features,
            linear.out_features,
            rank,
            bias=linear.bias is not None,
            alpha=alpha,
            mode=mode,
            dropout=dropout,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
            adapter_dtype=adapter_dtype,
            backend=backend,
            base=linear,
        )
        if mode in ("sorsa", "pissa"):
            if init == "none":
                layer._zero_adapter()
            else:
                layer._init_from_svd(init, generator, rsvd_options)
        else:
            layer._init_lora(generator)
        if keep_initial:
            layer.keep_initial_adapter()
        return layer

    def _init_from_svd(self, init, generator, rsvd_options):
        if init == "svd":
            weight = self.weight.to(accumulation_dtype(self.weight.dtype))
            U, sigma, Vt = torch.linalg.svd(weight, full_matrices=False)
            U, sigma, Vt = U[:, : self.rank], sigma[: self.rank], Vt[: self.rank]
        else:
            U, sigma, Vt = rsvd(self.weight, self.rank, generator=generator, **rsvd_options)
        self.set_principal_(U, sigma, Vt)

    def _zero_adapter(self):
        self.U.zero_()
        self.Vt.zero_()
        if self.S is not None:
            self.S.zero_()

    @torch.no_grad()
    def set_principal_(self, U: torch.Tensor, sigma: torch.Tensor, Vt: torch.Tensor) -> None:
        """Initialize the adapter from the top-r SVD ``(U, Σ, Vt)`` of the current weight and
        replace the weight by the residual ``W − U diag(Σ) Vt`` in place (one fused pass, see
        :func:`sorsa_kernels.subtract_lowrank_`; no full-size temporary)."""
        subtract_lowrank_(self.weight, U, sigma, Vt, backend=self.backend)
        self._adapter_from_svd_(U, sigma, Vt)

    @torch.no_grad()
    def _adapter_from_svd_(self, U: torch.Tensor, sigma: torch.Tensor, Vt: torch.Tensor) -> None:
        """Set the adapter of the SVD modes from the top-r SVD ``(U, Σ, Vt)`` of the base
        weight, leaving the weight alone (the caller writes the residual)."""
        values = sigma / self.scale
        if self.mode == "sorsa":
            self.U.copy_(U)
            self.S.copy_(values)
            self.Vt.copy_(Vt)
        else:
            root = values.sqrt()
            self.U.copy_(U * root)
            self.Vt.copy_(root[:, None] * Vt)

    @torch.no_grad()
    def keep_initial_adapter(self) -> None:
        """Record the current ``(U, S, Vt)`` as the adapter's initial value, in
        :attr:`initial_adapter`: copies on the CPU, so they cost no accelerator memory.

        For ``sorsa`` and ``pissa`` the frozen weight is ``W − scale·U₀ diag(S₀) Vt₀``, so the
        original layer is known only with this record; :func:`sorsa_kernels.export_peft_lora`
        uses it to express the trained layer as ``W + ΔW``. The cost is ``r·(in + out + 1)``
        numbers of the adapter dtype per layer, in host memory. The record is a plain attribute:
        it follows neither ``.to()`` nor ``state_dict()`` (save it yourself to export later).
        For ``lora`` and ``sora`` the initial adapter is zero (``U₀ = 0``) and nothing is kept.
        """
        if self.mode in ("lora", "sora"):
            self.initial_adapter = None
            return
        self.initial_adapter = tuple(
            None if p is None else p.detach().to("cpu", copy=True) for p in (self.U, self.S, self.Vt)
        )

    def _init_lora(self, generator):
        bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform_(a=√5), as nn.Linear and PEFT
        self.Vt.copy_(torch.rand(self.Vt.shape, generator=generator, device=self.Vt.device).mul_(2 * bound).sub_(bound))
        self.U.zero_()
        if self.S is not None:
            self.S.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        if self.dropout.p > 0 and self.training:
            adapter = sorsa_linear(self.dropout(x), None, self.U, self.S, self.Vt, None, self.scale, self.backend)
            return F.linear(x, self.weight, self.bias) + adapter
        return sorsa_linear(x, self.weight, self.U, self.S, self.Vt, self.bias, self.scale, self.backend)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """The adapter as a dense ``[out, in]`` update ``scale·U diag(S) Vt``, in float32
        (float64 for float64 adapters)."""
        acc = accumulation_dtype(self.U.dtype)
        U = self.U.to(acc) if self.S is None else self.U.to(acc) * self.S.to(acc)
        return (U @ self.Vt.to(acc)) * self.scale

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into ``weight`` (for inference); :meth:`unmerge` undoes it exactly.

        The pre-merge residual is kept on the CPU, so unmerging costs no accelerator memory and
        loses nothing to the rounding of ``weight``'s dtype.
        """
        if self.merged:
            return
        self._unmerged_weight = self.weight.detach().to("cpu", copy=True)
        delta = self.delta_weight()
        self.weight.copy_(self.weight.to(delta.dtype) + delta)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the residual that :meth:`merge` replaced."""
        if not self.merged:
            return
        self.weight.copy_(self._unmerged_weight)
        self._unmerged_weight = None
        self.merged = False

    @torch.no_grad()
    def prune_(self, optimizer: torch.optim.Optimizer | None = None) -> int:
        """Drop the ranks whose gate (S) is exactly zero; returns the new rank.

        U, S and Vt are replaced by smaller parameters (autograd ties a leaf to its shape, so
        they cannot shrink in place). Pass the optimizer to have its parameter groups and
        per-parameter state (e.g. Adam's moments) follow; other references to the old
        parameters (such as a list from :func:`sorsa_parameters`) must be fetched again.
        A layer whose every gate is zero keeps one rank, whose contribution stays zero.
        """
        if self.S is None:
            raise ValueError(f"prune_ needs a gate: mode {self.mode!r} has no S")
        if self.merged:
            raise RuntimeError("unmerge() before pruning")
        keep = (self.S != 0).nonzero().flatten()
        if keep.numel() == 0:
            keep = keep.new_zeros(1)
        if keep.numel() == self.rank:
            return self.rank
        for name, dim in (("U", 1), ("S", 0), ("Vt", 0)):
            old = getattr(self, name)
            new = nn.Parameter(old.index_select(dim, keep), requires_grad=old.requires_grad)
            if old.grad is not None:
                new.grad = old.grad.index_select(dim, keep)
            setattr(self, name, new)
            if optimizer is not None:
                _replace_in_optimizer(optimizer, old, new, lambda t: t.index_select(dim, keep))
        return self.rank

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"mode={self.mode}, scale={self.scale:g}, bias={self.bias is not None}, merged={self.merged}"
        )


def _replace_in_optimizer(optimizer, old, new, slice_like_param):
    """Make ``optimizer`` hold ``new`` where it held ``old``, slicing the state tensors shaped
    like ``old`` (moments) and keeping the others (step counters) as they are."""
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    state = optimizer.state.pop(old, None)
    if state is not None:
        optimizer.state[new] = {
            key: slice_like_param(value) if isinstance(value, torch.Tensor) and value.shape == old.shape else value
            for key, value in state.items()
        }
