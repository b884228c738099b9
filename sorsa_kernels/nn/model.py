"""Whole-model helpers: put adapters on a model's linear layers and find them again."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from sorsa_kernels.nn.linear import SORSALinear


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
        **layer_options: passed to :meth:`SORSALinear.from_linear` (``alpha``, ``init``,
            ``mode``, ``dropout``, ``adapter_dtype``, ``backend``, ``generator``, ...).

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
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, SORSALinear.from_linear(linear, rank, **layer_options))
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
