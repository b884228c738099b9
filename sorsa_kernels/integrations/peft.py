"""PEFT interop: export trained adapters as a stock PEFT LoRA adapter, and run PEFT's own LoRA
layers through the fused op.

Export (:func:`export_peft_lora`). A trained SVD-mode layer computes ``W_r + scale·U S Vt`` where
the frozen residual is ``W_r = W − scale·U₀ S₀ Vt₀`` (``S = I`` for PiSSA). Relative to the
original ``W`` it adds ``ΔW = scale·(U S Vt − U₀ S₀ Vt₀)``, a rank-``2r`` update which PEFT
represents exactly, as it does when converting PiSSA to LoRA, by stacking the factors::

    lora_A = [ S·Vt ; S₀·Vt₀ ]          [2r, in]   (S scales the rows)
    lora_B = [ scale·U , −scale·U₀ ]    [out, 2r]

with ``lora_alpha = r_export`` so that PEFT's scaling ``lora_alpha / r`` is exactly 1. LoRA and
SoRA layers start from ``U₀ = 0`` and export at rank ``r`` (SoRA's gate folded into ``lora_A``).
PEFT uses one rank for the whole adapter, so layers of a lower export rank are padded with zero
rows of ``lora_A`` and zero columns of ``lora_B``, which add nothing (``rank_pattern`` is avoided:
its key matching differs across PEFT versions).

Acceleration (:func:`accelerate_peft`). The route chosen is a class swap: every
``peft.tuners.lora.Linear`` of the model becomes a :class:`SORSAPeftLinear`, a subclass that only
overrides ``forward``. It keeps every parameter, buffer and attribute (nothing is copied), stays
an instance of PEFT's class (so merging, saving, adding or switching adapters all still work),
applies to any PEFT model however it was made (``get_peft_model``, ``PeftModel.from_pretrained``,
a trainer's wrapper), and :func:`restore_peft` undoes it. PEFT's experimental
``LoraConfig._register_custom_module({nn.Linear: SORSAPeftLinear})`` creates the same layers at
``get_peft_model`` time and also works, but only when you build the model yourself and through an
API PEFT marks as subject to change; so it is supported, not the primary route.
"""

from __future__ import annotations

import json
import numbers
import os
import warnings
from pathlib import Path

import torch
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from torch import nn

from sorsa_kernels.backends import _requested
from sorsa_kernels.nn.model import sorsa_layers
from sorsa_kernels.ops.linear import sorsa_linear
from sorsa_kernels.reference.linear import accumulation_dtype

__all__ = ["SORSAPeftLinear", "accelerate_peft", "export_peft_lora", "restore_peft"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _export_factors(name: str, layer) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lora_A, lora_B)`` of one layer, before padding, with ``lora_B @ lora_A = ΔW``."""
    acc = accumulation_dtype(layer.U.dtype)

    def factors(U, S, Vt, sign):
        U, Vt = U.detach().to("cpu", acc), Vt.detach().to("cpu", acc)
        A = Vt if S is None else S.detach().to("cpu", acc)[:, None] * Vt
        return A, (sign * layer.scale) * U

    A, B = factors(layer.U, layer.S, layer.Vt, 1.0)
    if layer.mode in ("lora", "sora"):
        return A, B
    if layer.initial_adapter is None:
        raise ValueError(
            f"layer {name!r} (mode {layer.mode!r}) has no record of its initial adapter, without which the "
            "original weight is unknown: build the adapters with apply_sorsa(..., keep_initial=True)"
        )
    A0, B0 = factors(*layer.initial_adapter, -1.0)
    return torch.cat([A, A0]), torch.cat([B, B0], dim=1)


def export_peft_lora(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write the trained adapters of ``model`` as a standard PEFT LoRA adapter, so that
    ``PeftModel.from_pretrained(original_base_model, path)`` reproduces ``model``'s outputs.

    Every :class:`~sorsa_kernels.SORSALinear` becomes a LoRA layer whose ``lora_B @ lora_A`` is
    the layer's change from the original weight (construction in the module docstring): the SVD
    modes (``sorsa``, ``pissa``) at rank ``2r``, which needs the initial adapters kept on the
    CPU by ``apply_sorsa(..., keep_initial=True)``; ``lora`` and ``sora`` at rank ``r``. The base
    weights themselves are not written: the adapter applies to the untouched original model.

    Args:
        model: the model :func:`~sorsa_kernels.apply_sorsa` was applied to; its module names are
            those of the base model that will load the adapter (a ``transformers`` model, for one).
        path: directory to write ``adapter_config.json`` and ``adapter_model.safetensors`` to
            (created if missing).
        base_model_name_or_path: recorded in the config; default ``model.name_or_path`` if set.
        task_type: PEFT task type, e.g. ``"CAUSAL_LM"`` (``PeftModelForCausalLM`` on loading);
            ``None`` loads as a plain ``PeftModel``.
        dtype: dtype of the written factors (float32 by default).

    Returns:
        The directory written. The config sets ``r = lora_alpha`` (scaling exactly 1),
        ``target_modules`` to the full names of the adapted layers, no dropout, no bias.

    Raises:
        ValueError: when ``model`` has no SORSALinear, or an SVD-mode layer lacks its initial
            adapter.
    """
    layers = list(sorsa_layers(model))
    if not layers:
        raise ValueError("model has no SORSALinear layer to export")
    exported = {name: _export_factors(name, layer) for name, layer in layers}
    rank = max(A.shape[0] for A, _ in exported.values())
    tensors = {}
    for name, (A, B) in exported.items():
        padding = rank - A.shape[0]
        tensors[f"base_model.model.{name}.lora_A.weight"] = nn.functional.pad(A, (0, 0, 0, padding)).to(dtype)
        tensors[f"base_model.model.{name}.lora_B.weight"] = nn.functional.pad(B, (0, padding)).to(dtype)
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(model, "name_or_path", None) or None
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": rank,
        "use_rslora": False,
        "target_modules": sorted(exported),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (path / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return path


_WIDTH = {torch.float16: 16, torch.bfloat16: 16, torch.float32: 32, torch.float64: 64}


def _static_obstacle(layer: LoraLinear, adapter: str) -> str | None:
    """Why ``adapter`` of ``layer`` can never take the fused path, or ``None``."""
    if adapter in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(adapter, False):
        return "a LoRA variant (DoRA, aLoRA, ...)"
    if getattr(layer, "lora_bias", {}).get(adapter, False):
        return "lora_bias"
    if layer.fan_in_fan_out:
        return "fan_in_fan_out (Conv1D base layer)"
    if type(layer.base_layer) is not nn.Linear:
        return f"a {type(layer.base_layer).__name__} base layer (not nn.Linear)"
    A, B = layer.lora_A[adapter], layer.lora_B[adapter]
    if type(A) is not nn.Linear or type(B) is not nn.Linear or A.bias is not None or B.bias is not None:
        return "non-standard lora_A/lora_B modules"
    return None


class SORSAPeftLinear(LoraLinear):
    """PEFT's LoRA ``Linear`` whose forward runs :func:`sorsa_kernels.sorsa_linear` (``S=None``,
    ``scale`` = PEFT's scaling): one fused op for ``base(x) + scaling·lora_B(lora_A(x))``.

    The fused path is taken when PEFT's forward would compute exactly that: adapters enabled and
    not merged, one active adapter, no LoRA variant (DoRA, ...) or ``lora_bias``, a plain
    ``nn.Linear`` base without hooks, no extra forward arguments (``adapter_names`` mixed
    batches), adapters at least as wide as x. Otherwise PEFT's own forward runs, unchanged.
    Dropout > 0 in training mode applies PEFT's dropout module to the adapter's input (same RNG
    use as PEFT) and runs the adapter alone through the fused op. Products accumulate in float32;
    with float32 everywhere the result equals PEFT's up to rounding order.
    """

    sorsa_backend = "auto"

    def _fused_adapter(self, x: torch.Tensor, args, kwargs) -> str | None:
        if args or kwargs or self.disable_adapters or self.merged:
            return None
        active = [name for name in self.active_adapters if name in self.lora_A]
        if len(active) != 1 or _static_obstacle(self, active[0]) is not None:
            return None
        base = self.base_layer
        if base._forward_hooks or base._forward_pre_hooks:
            return None
        adapter = active[0]
        A, B = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        if A.dtype != B.dtype or _WIDTH.get(A.dtype, 0) < _WIDTH.get(x.dtype, 65):
            return None
        if not isinstance(self.scaling[adapter], numbers.Real):
            return None
        return adapter

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter = self._fused_adapter(x, args, kwargs)
        if adapter is None:
            return super().forward(x, *args, **kwargs)
        base = self.base_layer
        A, B = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        scaling = float(self.scaling[adapter])
        dropout = self.lora_dropout[adapter]
        if isinstance(dropout, nn.Dropout) and dropout.p > 0 and dropout.training:
            adapter_out = sorsa_linear(dropout(x), None, B, None, A, None, scaling, self.sorsa_backend)
            return base(x) + adapter_out
        return sorsa_linear(x, base.weight, B, None, A, base.bias, scaling, self.sorsa_backend)


def accelerate_peft(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Make every PEFT LoRA/PiSSA ``Linear`` of ``model`` compute through
    :func:`sorsa_kernels.sorsa_linear`, in place and reversibly (:func:`restore_peft`).

    Each ``peft.tuners.lora.Linear`` becomes a :class:`SORSAPeftLinear` (a class swap: no
    parameter is copied, outputs and gradients are unchanged up to rounding, and the layer stays
    a PEFT layer for merging, saving and adapter switching). Layers none of whose adapters can
    use the fused op (DoRA and other variants, ``lora_bias``, a Conv1D or quantized base) are
    left as they are, with a warning naming them. States that change at run time (merged,
    disabled adapters, several active adapters, mixed-adapter batches) fall back to PEFT's
    forward on the fly.

    Args:
        model: a PEFT model (or any module holding PEFT LoRA layers).
        backend: backend of the fused op, ``"auto"`` by default.

    Returns:
        ``model``.

    Raises:
        ValueError: when ``model`` holds no PEFT LoRA layer, or ``backend`` is unknown.
    """
    _requested(backend)  # an unknown name fails here rather than at the first forward
    found, skipped = 0, {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        found += 1
        if type(module) not in (LoraLinear, SORSAPeftLinear):
            skipped[name] = f"{type(module).__name__} is not PEFT's plain Linear"
            continue
        obstacles = {_static_obstacle(module, adapter) for adapter in module.lora_A}
        if module.lora_A and None not in obstacles:
            skipped[name] = ", ".join(sorted(obstacles))
            continue
        module.__class__ = SORSAPeftLinear
        module.sorsa_backend = backend
    if not found:
        raise ValueError("model holds no PEFT LoRA layer to accelerate")
    if skipped:
        listed = "; ".join(f"{name}: {why}" for name, why in list(skipped.items())[:5])
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        warnings.warn(f"{len(skipped)} PEFT LoRA layers stay on PEFT's forward ({listed}{more})", stacklevel=2)
    return model


def restore_peft(model: nn.Module) -> nn.Module:
    """Undo :func:`accelerate_peft`: every :class:`SORSAPeftLinear` of ``model`` becomes PEFT's
    ``Linear`` again. Returns ``model``."""
    for module in model.modules():
        if isinstance(module, SORSAPeftLinear):
            module.__class__ = LoraLinear
            module.__dict__.pop("sorsa_backend", None)
    return model
