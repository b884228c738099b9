"""Whole-model helpers: put adapters on a model's linear layers and find them again."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from sorsa_kernels.nn.init import format_report, sorsa_init_
from sorsa_kernels.nn.linear import SORSALinear

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
        freeze_base: set ``requires_grad=False`` on every parameter outside the adapters.
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
        for param in model.parameters():
            param.requires_grad_(False)
    grouped_init = layer_options.get("init") == "rsvd" and layer_options.get("mode", "sorsa") in ("sorsa", "pissa")
    init_options = {}
    if grouped_init:
        init_options = {key: layer_options.pop(key) for key in ("niter", "oversample", "generator") if key in layer_options}
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
