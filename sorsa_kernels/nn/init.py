"""``sorsa_init_``: the SVD initialization of every adapter of a model in one call."""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from sorsa_kernels.backends import implementation, resolve
from sorsa_kernels.nn.linear import SORSALinear
from sorsa_kernels.ops._validate import check_int
from sorsa_kernels.ops.lowrank import subtract_lowrank_grouped_
from sorsa_kernels.ops.rsvd import DEFAULT_NITER, default_oversample, rsvd_grouped_start
from sorsa_kernels.profiling import stage

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


def _chunks(members: list[SORSALinear], per_layer_bytes: int, max_memory: int) -> list[list[SORSALinear]]:
    """The fewest chunks that keep ``per_layer_bytes × size`` within ``max_memory``, of even sizes."""
    largest = max(1, max_memory // max(1, per_layer_bytes))
    size = math.ceil(len(members) / math.ceil(len(members) / largest))
    return [members[i : i + size] for i in range(0, len(members), size)]


class _Clock:
    """Points in time on one device: CUDA events (read after the final synchronization) on a
    GPU, where the work is asynchronous; the host clock elsewhere."""

    def __init__(self, device: torch.device):
        self.device = device

    def mark(self):
        if self.device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def seconds(self, start, end) -> float:
        return start.elapsed_time(end) / 1000 if self.device.type == "cuda" else end - start


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
    batched computation (:func:`sorsa_kernels.ops.rsvd.rsvd_grouped_start`, reading the weights
    in place), in chunks small enough that the extra memory stays below ``max_memory``. The
    chunks are pipelined: the next one starts on the device before the current one's small
    eigenproblems (solved on host threads by the GPU backend) are collected. Each chunk's
    residuals are written in place by one fused pass
    (:func:`sorsa_kernels.ops.lowrank.subtract_lowrank_grouped_`), which also returns their norms.
    Layers in the ``lora`` and ``sora`` modes need no SVD and are left as they are.

    The current weight is taken as the base: call this on freshly built adapters, e.g. from
    ``apply_sorsa(model, ..., init="none")`` (which ``apply_sorsa(..., init="rsvd")`` does).

    Args:
        model_or_layers: a model (every :class:`SORSALinear` in it) or an iterable of layers.
        rank: if given, every SVD-initialized layer must have this rank (a check).
        niter, oversample, generator, backend: as for :func:`sorsa_kernels.rsvd` (``backend``
            also picks the residual writes' backend).
        max_memory: bound in bytes on the working memory (default 2 GiB), pipelining included.
        reference_layers: per group, how many layers (the first ones) to also decompose with a
            full float64 ``torch.linalg.svdvals`` for the excess error over the optimal
            truncation (costly on big matrices; not counted in ``seconds``).
        progress: show a tqdm progress bar (per layer).

    Returns:
        One dict per group: ``shape`` (out, in), ``rank``, ``dtype``, ``device``, ``count``,
        ``seconds`` (from the start of the group's first chunk to the end of its last residual
        write on the device; pipelining makes neighbouring groups overlap a little),
        ``relative_residual_max`` and ``relative_residual_mean`` (``‖W − U S Vt‖_F / ‖W‖_F``
        per layer, with ``‖W‖²_F = ‖W − U S Vt‖²_F + Σ σ²``, the residual's norm accumulated
        before it is rounded to the weight's dtype), and with ``reference_layers``:
        ``excess_max`` (``‖W − U S Vt‖_F / ‖W − W_r‖_F − 1``, the optimal ``‖W − W_r‖_F`` from
        the full singular values) and ``reference_count``.
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

    plan, optimal = [], {}
    for key, members in groups.items():
        shape, dtype, device, _, layer_rank = key
        extra = default_oversample(layer_rank) if oversample is None else oversample
        per_layer = implementation("rsvd", resolve("rsvd", backend, device)).working_bytes(*shape, layer_rank, extra, dtype)
        plan += [(key, chunk, extra) for chunk in _chunks(members, per_layer, max_memory)]
        for layer in members[:reference_layers]:
            values = torch.linalg.svdvals(layer.weight.to(torch.float64))
            optimal[layer] = values[layer_rank:].square().sum().sqrt()

    state = {key: dict(residuals=[], energies=[], excess=[], clock=_Clock(key[2])) for key in groups}
    bar = tqdm(total=sum(map(len, groups.values())), desc="sorsa_init_", unit="layer", disable=not progress)

    def finish(key, chunk, started):
        device = key[2]
        record = state[key]
        U, S, Vt = started.result()
        with stage("residual writes", device):
            norms = subtract_lowrank_grouped_([layer.weight for layer in chunk], U, S, Vt, backend=backend)
        with stage("adapter parameters", device):
            for i, layer in enumerate(chunk):
                layer._adapter_from_svd_(U[i], S[i], Vt[i])
        with stage("report", device):
            residuals = norms.clamp_min(0).sqrt()
            record["residuals"].append(residuals)
            record["energies"].append(S.square().sum(-1))
            record["excess"] += [residuals[i] / optimal[layer] - 1 for i, layer in enumerate(chunk) if layer in optimal]
        record["end"] = record["clock"].mark()
        bar.update(len(chunk))

    try:
        pending = None
        for key, chunk, extra in plan:
            record = state[key]
            if "start" not in record:
                record["start"] = record["clock"].mark()
            started = rsvd_grouped_start([layer.weight for layer in chunk], key[4], niter, extra, generator, backend=backend)
            if pending is not None:
                finish(*pending)
            pending = (key, chunk, started)
        if pending is not None:
            finish(*pending)
    finally:
        bar.close()

    report = []
    for key, members in groups.items():
        shape, dtype, device, _, layer_rank = key
        record = state[key]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        residuals = torch.cat(record["residuals"]).double()
        relative = (residuals / (residuals.square() + torch.cat(record["energies"]).double()).sqrt()).cpu()
        row = {
            "shape": shape,
            "rank": layer_rank,
            "dtype": str(dtype).removeprefix("torch."),
            "device": str(device),
            "count": len(members),
            "seconds": record["clock"].seconds(record["start"], record["end"]),
            "relative_residual_max": relative.max().item(),
            "relative_residual_mean": relative.mean().item(),
        }
        if record["excess"]:
            row["excess_max"] = torch.stack(record["excess"]).max().item()
            row["reference_count"] = len(record["excess"])
        report.append(row)
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
