"""``sorsa_init_``: the SVD initialization of every adapter of a model in one call."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from sorsa_kernels.backends import implementation, resolve
from sorsa_kernels.nn.linear import SORSALinear
from sorsa_kernels.ops._validate import check_int
from sorsa_kernels.ops.rsvd import DEFAULT_NITER, default_oversample, rsvd_grouped

DEFAULT_MAX_MEMORY = 2 * 2**30


def _layers(model_or_layers) -> list[SORSALinear]:
    if isinstance(model_or_layers, SORSALinear):
        return [model_or_layers]
    if isinstance(model_or_layers, nn.Module):
        return [module for module in model_or_layers.modules() if isinstance(module, SORSALinear)]
    if isinstance(model_or_layers, Iterable):
        layers = list(model_or_layers)
        for i, layer in enumerate(layers):
            if not isinstance(layer, SORSALinear):
                raise TypeError(f"model_or_layers[{i}] must be a SORSALinear, got {type(layer).__name__}")
        return layers
    raise TypeError(f"model_or_layers must be an nn.Module or an iterable of SORSALinear, got {type(model_or_layers).__name__}")


def _chunks(layers: list[SORSALinear], per_layer_bytes: int, max_memory: int) -> list[list[SORSALinear]]:
    size = max(1, max_memory // max(1, per_layer_bytes))
    return [layers[i : i + size] for i in range(0, len(layers), size)]


def _working_bytes(backend_name: str, layer: SORSALinear, oversample: int) -> int:
    """The backend's bound on its per-matrix memory, or an fp32 basis-sized estimate."""
    module = implementation("rsvd", backend_name)
    out, inp = layer.weight.shape
    if hasattr(module, "working_bytes"):
        return module.working_bytes(out, inp, layer.rank, oversample, layer.weight.dtype)
    k = min(layer.rank + oversample, out, inp)
    return 4 * k * 4 * (out + inp)


@torch.no_grad()
def sorsa_init_(
    model_or_layers: nn.Module | Iterable[SORSALinear],
    rank: int | None = None,
    *,
    niter: int = DEFAULT_NITER,
    oversample: int | None = None,
    generator: torch.Generator | None = None,
    backend: str = "auto",
    max_memory: int = DEFAULT_MAX_MEMORY,
    reference_layers: int = 0,
    progress: bool = True,
) -> list[dict]:
    """Initialize every ``sorsa``/``pissa`` adapter from a randomized SVD of its current weight,
    and replace each weight by its residual, in place; returns a report per group of layers.

    Layers of one weight shape, dtype, device and rank form a group whose SVDs run as one
    batched computation (:func:`sorsa_kernels.ops.rsvd.rsvd_grouped`, reading the weights in
    place), in chunks small enough that the extra memory stays below ``max_memory``; each
    residual is written in place by the fused :func:`sorsa_kernels.subtract_lowrank_`. Layers
    in the ``lora`` and ``sora`` modes need no SVD and are left as they are.

    The current weight is taken as the base: call this on freshly built adapters, e.g. from
    ``apply_sorsa(model, ..., init="none")`` (which ``apply_sorsa(..., init="rsvd")`` does).

    Args:
        model_or_layers: a model (every :class:`SORSALinear` in it) or an iterable of layers.
        rank: if given, every SVD-initialized layer must have this rank (a check).
        niter, oversample, generator, backend: as for :func:`sorsa_kernels.rsvd`.
        max_memory: bound in bytes on the SVD's working memory per chunk (default 2 GiB).
        reference_layers: per group, how many layers (the first ones) to also decompose with a
            full ``torch.linalg.svdvals`` for the excess error over the optimal truncation
            (costly on big matrices: about a second per 4096×4096 on a GPU).
        progress: show a tqdm progress bar (per layer).

    Returns:
        One dict per group: ``shape`` (out, in), ``rank``, ``dtype``, ``device``, ``count``,
        ``seconds`` (wall time of the group: SVDs, residual writes and the residual norms,
        synchronized; the reference SVDs are not counted),
        ``relative_residual_max`` and ``relative_residual_mean`` (``‖W − U S Vt‖_F / ‖W‖_F``
        per layer, with ``‖W‖²_F = ‖W − U S Vt‖²_F + Σ σ²``: the residual is orthogonal to the
        rank-r projection, so this costs one read of the new weights), and with
        ``reference_layers``: ``excess_max`` (``‖W − U S Vt‖_F / ‖W − W_r‖_F − 1``, the
        optimal ``‖W − W_r‖_F`` from the full singular values) and ``reference_count``.
    """
    layers = _layers(model_or_layers)
    niter = check_int("niter", niter, minimum=0)
    max_memory = check_int("max_memory", max_memory, minimum=1)
    reference_layers = check_int("reference_layers", reference_layers, minimum=0)
    if rank is not None:
        rank = check_int("rank", rank, minimum=1)
    groups: dict[tuple, list[SORSALinear]] = defaultdict(list)
    for layer in layers:
        if layer.mode not in ("sorsa", "pissa"):
            continue
        if rank is not None and layer.rank != rank:
            raise ValueError(f"rank={rank} was given but a layer {tuple(layer.weight.shape)} has rank {layer.rank}")
        if layer.merged:
            raise RuntimeError("sorsa_init_ needs unmerged layers: call unmerge() first")
        weight = layer.weight
        groups[(tuple(weight.shape), weight.dtype, weight.device, weight.stride(), layer.rank)].append(layer)

    report = []
    bar = tqdm(total=sum(map(len, groups.values())), desc="sorsa_init_", unit="layer", disable=not progress)
    try:
        for (shape, dtype, device, _, layer_rank), members in groups.items():
            name = resolve("rsvd", backend, device)
            extra = default_oversample(layer_rank) if oversample is None else oversample
            synchronize = torch.cuda.synchronize if device.type == "cuda" else lambda: None
            optimal = {}
            for layer in members[:reference_layers]:
                values = torch.linalg.svdvals(layer.weight.to(torch.float64 if dtype == torch.float64 else torch.float32))
                optimal[layer] = values[layer_rank:].square().sum().sqrt()
            synchronize()
            start = time.perf_counter()
            relative, excess = [], []
            for chunk in _chunks(members, _working_bytes(name, members[0], extra), max_memory):
                U, S, Vt = rsvd_grouped(
                    [layer.weight for layer in chunk], layer_rank, niter, extra, generator, backend=name
                )
                for i, layer in enumerate(chunk):
                    layer.set_principal_(U[i], S[i], Vt[i])
                    residual = torch.linalg.vector_norm(layer.weight, dtype=S.dtype)
                    relative.append(residual / (residual.square() + S[i].square().sum()).sqrt())
                    if layer in optimal:
                        excess.append(residual / optimal[layer] - 1)
                del U, S, Vt
                bar.update(len(chunk))
            relative = torch.stack(relative).double().cpu()
            synchronize()
            row = {
                "shape": shape,
                "rank": layer_rank,
                "dtype": str(dtype).removeprefix("torch."),
                "device": str(device),
                "count": len(members),
                "seconds": time.perf_counter() - start,
                "relative_residual_max": relative.max().item(),
                "relative_residual_mean": relative.mean().item(),
            }
            if excess:
                row["excess_max"] = torch.stack(excess).max().item()
                row["reference_count"] = len(excess)
            report.append(row)
    finally:
        bar.close()
    return report


def format_report(report: list[dict]) -> str:
    """The report of :func:`sorsa_init_` as one line per group."""
    lines = []
    for row in report:
        excess = f", excess over optimal ≤ {row['excess_max']:.2e} ({row['reference_count']} checked)" if "excess_max" in row else ""
        lines.append(
            f"{row['count']} × {row['shape'][0]}×{row['shape'][1]} {row['dtype']} r={row['rank']}: "
            f"{row['seconds']:.3f} s, relative residual ≤ {row['relative_residual_max']:.4f}{excess}"
        )
    return "\n".join(lines)
