"""Whole-model helpers: put adapters on a model's linear layers, find them again, and apply the
orthonormal regularizer to them in a training step."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn

from sorsa_kernels.nn.init import format_report, sorsa_init_
from sorsa_kernels.nn.linear import SORSALinear
from sorsa_kernels.ops._validate import check_number
from sorsa_kernels.ops.ortho import ortho_reg_grad_

logger = logging.getLogger("sorsa_kernels")


def _matches(name: str, target_modules: str | Sequence[str]) -> bool:
    """PEFT's rule: a string is a regular expression the whole name must match; a list holds
    names that equal the module name or its last dotted components."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == target or name.endswith("." + target) for target in target_modules)


def apply_sorsa(
    model: nn.Module,
    target_modules: str | Sequence[str],
    rank: int,
    *,
    freeze_base: bool = True,
    progress: bool = True,
    **layer_options,
) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` named by ``target_modules`` with a
    :class:`SORSALinear` built by :meth:`SORSALinear.from_linear`, in place.

    Args:
        model: any module; it is modified and returned.
        target_modules: as PEFT's ``LoraConfig.target_modules``: a list of names (``"q_proj"``
            matches ``"model.layers.0.self_attn.q_proj"``) or a regular expression matched
            against the full module name.
        rank: adapter rank for every targeted layer.
        freeze_base: set ``requires_grad=False`` on every parameter outside the adapters (those
            of an earlier call included).
        progress: with ``init="rsvd"``, show the progress bar of :func:`sorsa_init_`.
        **layer_options: passed to :meth:`SORSALinear.from_linear` (``alpha``, ``init``,
            ``mode``, ``dropout``, ``adapter_dtype``, ``backend``, ``generator``, ...).
            With ``init="rsvd"`` in the ``sorsa``/``pissa`` modes, the layers are built
            without an SVD and then initialized together by one :func:`sorsa_init_` call
            (same-shape weights as one batched computation; ``niter``, ``oversample`` and
            ``generator`` go to it); its per-group report is logged at INFO level on the
            ``sorsa_kernels`` logger.

    Raises:
        ValueError: when no ``nn.Linear`` matches ``target_modules``.
    """
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not isinstance(module, SORSALinear) and _matches(name, target_modules)
    ]
    if not targets:
        raise ValueError(f"target_modules={target_modules!r} matches no nn.Linear of the model")
    if freeze_base:
        adapters = set(sorsa_parameters(model))  # from an earlier call: they stay trainable
        for param in model.parameters():
            if param not in adapters:
                param.requires_grad_(False)
    grouped_init = layer_options.get("init") == "rsvd" and layer_options.get("mode", "sorsa") in ("sorsa", "pissa")
    init_options, keep_initial = {}, False
    if grouped_init:
        init_options = {key: layer_options.pop(key) for key in ("niter", "oversample", "generator") if key in layer_options}
        keep_initial = layer_options.pop("keep_initial", False)  # recorded once the SVD has run
        layer_options["init"] = "none"
    layers = []
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layers.append(SORSALinear.from_linear(linear, rank, **layer_options))
        setattr(parent, child, layers[-1])
    if grouped_init:
        report = sorsa_init_(layers, rank, progress=progress, **init_options)
        logger.info("sorsa_init_:\n%s", format_report(report))
        if keep_initial:
            for layer in layers:
                layer.keep_initial_adapter()
    return model


def sorsa_layers(model: nn.Module) -> Iterator[tuple[str, SORSALinear]]:
    """Every :class:`SORSALinear` of ``model`` with its qualified name."""
    for name, module in model.named_modules():
        if isinstance(module, SORSALinear):
            yield name, module


def sorsa_parameters(model: nn.Module) -> list[torch.nn.Parameter]:
    """The trainable adapter parameters (U, S, Vt) of every :class:`SORSALinear` of ``model``,
    in module order: hand them to the optimizer."""
    params = []
    for _, layer in sorsa_layers(model):
        params += [p for p in (layer.U, layer.S, layer.Vt) if p is not None]
    return params


def _ortho_factors(model_or_params) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The ``(Us, Vts)`` that :func:`apply_ortho_grad_` regularizes."""
    if isinstance(model_or_params, nn.Module):
        layers = [layer for _, layer in sorsa_layers(model_or_params) if layer.mode == "sorsa"]
        Us = [layer.U for layer in layers if layer.U.requires_grad]
        Vts = [layer.Vt for layer in layers if layer.Vt.requires_grad]
        if not Us and not Vts:
            raise ValueError(
                "model_or_params has no trainable SORSALinear in mode 'sorsa': the orthonormal "
                "regularizer applies to SORSA's singular vectors only (pissa, lora and sora have none)"
            )
        return Us, Vts
    if isinstance(model_or_params, torch.Tensor):
        raise TypeError("model_or_params must be a module or an iterable of tensors (wrap one tensor in a list)")
    Us, Vts = [], []
    for i, param in enumerate(model_or_params):
        if not isinstance(param, torch.Tensor):
            raise TypeError(f"model_or_params[{i}] must be a tensor, got {type(param).__name__}")
        if param.dim() == 1:
            continue
        if param.dim() != 2:
            raise ValueError(f"model_or_params[{i}] must be 1-D (skipped) or 2-D, got shape {tuple(param.shape)}")
        (Us if param.shape[0] >= param.shape[1] else Vts).append(param)
    if not Us and not Vts:
        raise ValueError("model_or_params holds no 2-D tensor to regularize")
    return Us, Vts


def apply_ortho_grad_(
    model_or_params: nn.Module | Iterable[torch.Tensor],
    gamma: float,
    peak_lr: float = 1.0,
    *,
    form: str = "official",
    backend: str = "auto",
) -> torch.Tensor:
    """Add ``(gamma / peak_lr) · ∇ ortho_reg(U's, Vt's, form)`` into the factors' ``.grad``: the
    SORSA orthonormal regularizer as the reference training step applies it.

    The reference SORSA trainer (``sorsalib/src/sorsa/trainer.py`` of Gunale0926/SORSA) does
    this once per optimizer step, after gradient clipping and right before
    ``optimizer.step()``, with ``gamma / args.learning_rate`` (the schedule's peak learning rate)
    as the coefficient of the ``"official"`` form: the mean, over every U and Vt of the model,
    of the unsquared ``‖UᵀU − I‖_F`` and ``‖Vt Vtᵀ − I‖_F``. Call it at that point of a
    hand-written loop: after ``clip_grad_norm_`` and before ``optimizer.step()``, once per step
    (not per micro-batch under gradient accumulation). Being added after clipping, the
    regularizer's gradient is never clipped. For ``transformers.Trainer`` use
    :class:`sorsa_kernels.integrations.transformers.OrthoRegCallback`.

    Args:
        model_or_params: a module, whose :class:`SORSALinear` layers in mode ``"sorsa"`` give
            their trainable U and Vt (``pissa``, ``lora`` and ``sora`` layers have no
            regularizer and are skipped); or an iterable of tensors, e.g.
            :func:`sorsa_parameters`, of which each 2-D tensor is regularized along its
            shorter side (a tall ``[out, r]`` as ``UᵀU``, a wide ``[r, in]`` as ``Vt Vtᵀ``;
            for a square one both agree) and each 1-D tensor (S, a gate, a bias) is skipped.
        gamma: the regularizer's weight γ, ``>= 0``.
        peak_lr: the peak learning rate; ``1.0`` makes ``gamma`` a plain coefficient (use it
            with ``form="squared"`` for a plain ``γ·‖·‖²`` penalty).
        form: ``"official"`` (default, as above) or ``"squared"`` (sum of squared norms).
        backend: backend of :func:`sorsa_kernels.ortho_reg_grad_`.

    Returns:
        The regularizer's value before the step (0-dim, detached): log it as "orthonormality".
        A missing ``.grad`` is allocated first.

    Raises:
        ValueError: when there is nothing to regularize (no trainable ``sorsa``-mode layer, or
            no 2-D tensor), or ``peak_lr <= 0``; TypeError for a wrong argument type.
    """
    gamma = check_number("gamma", gamma, minimum=0.0)
    peak_lr = check_number("peak_lr", peak_lr)
    if peak_lr <= 0:
        raise ValueError(f"peak_lr must be > 0, got {peak_lr}")
    Us, Vts = _ortho_factors(model_or_params)
    return ortho_reg_grad_(Us, Vts, gamma / peak_lr, form=form, backend=backend)
