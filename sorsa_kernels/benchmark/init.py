"""Whole-model SVD initialization: ``sorsa_init_`` against a loop of full SVDs, a loop of
``torch.svd_lowrank(niter=4)`` and PEFT's ``pissa_niter_4`` init, on one model.

The GPU configuration is Llama-2-7B shaped: 32 layers × (q, k, v, o 4096×4096; gate, up
11008×4096; down 4096×11008) = 224 bfloat16 weights, rank 128. Their spectra are power laws
``σ_i ∝ (1+i)^-α`` with α of 0.3–0.5 per projection (the real weights of all-MiniLM-L6-v2 fit
α ≈ 0.26–0.42): ``W = (L·diag(σ))·Rᵀ`` with orthonormal factors drawn from a small pool of QR
factorizations by random column permutations and signs, so building the 13 GB model takes a
few seconds.

Excess error is ``‖W − W_init‖_F / ‖W − W_r‖_F − 1`` where ``‖W − W_r‖_F`` comes from a full
``torch.linalg.svdvals`` of the bfloat16 matrix: computed on one sample layer per shape (3 full
SVDs), not on all 224. Our own rows also report the relative residual of every layer (cheap,
see :func:`sorsa_kernels.sorsa_init_`). The full-SVD loop is timed on one matrix per shape and
extrapolated to the 224 (its rows say so). Extra rows: the precision/iteration sweep that
backs the defaults (``niter``, ``oversample``) and the small eigensolver options.

``run(quick=True)`` is a tiny CPU configuration of the same code (labelled ``quick``).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from sorsa_kernels.benchmark.common import format_table, peak_memory_mb, write_results
from sorsa_kernels.nn.init import sorsa_init_
from sorsa_kernels.nn.model import apply_sorsa
from sorsa_kernels.ops.rsvd import DEFAULT_NITER, default_oversample, rsvd_grouped

# Llama-2-7B projections: (out, in) and the power-law exponent of their synthetic spectra.
PROJECTIONS = {
    "q_proj": ((4096, 4096), 0.45),
    "k_proj": ((4096, 4096), 0.5),
    "v_proj": ((4096, 4096), 0.3),
    "o_proj": ((4096, 4096), 0.35),
    "gate_proj": ((11008, 4096), 0.35),
    "up_proj": ((11008, 4096), 0.3),
    "down_proj": ((4096, 11008), 0.35),
}
FULL = dict(layers=32, scale=1, rank=128, dtype=torch.bfloat16, device="cuda", sweep=[(4, 64), (5, 128), (6, 64), (6, 128), (7, 128), (8, 128)])
QUICK = dict(layers=2, scale=64, rank=8, dtype=torch.bfloat16, device="cpu", sweep=[(4, 64), (7, 64)])
COLUMNS = ["config", "method", "seconds", "excess_max", "sigma_error_max", "peak_extra_mb", "note"]


def _synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device):
    _synchronize(device)
    start = time.perf_counter()
    result = fn()
    _synchronize(device)
    return time.perf_counter() - start, result


def _peak_extra_mb(fn, device):
    """Call ``fn`` once; its peak CUDA memory above what was allocated before (None on CPU)."""
    if torch.device(device).type == "cuda":
        return peak_memory_mb(fn)
    fn()
    return None


def _shapes(config):
    scale = config["scale"]
    return {name: ((out // scale, inp // scale), alpha) for name, ((out, inp), alpha) in PROJECTIONS.items()}


class Decoder(nn.Module):
    """Only the linear layers of a Llama-shaped decoder, named as in transformers."""

    def __init__(self, config):
        super().__init__()
        kw = dict(bias=False, dtype=config["dtype"], device=config["device"])
        self.layers = nn.ModuleList(
            nn.ModuleDict({name: nn.Linear(inp, out, **kw) for name, ((out, inp), _) in _shapes(config).items()})
            for _ in range(config["layers"])
        )


@torch.no_grad()
def build_model(config, seed: int = 0) -> Decoder:
    """The model with power-law spectra (deterministic in ``seed``)."""
    device = config["device"]
    gen = torch.Generator(device).manual_seed(seed)
    model = Decoder(config)
    dims = {d for (shape, _) in _shapes(config).values() for d in shape}
    k_max = min(d for d in dims)
    pool = {d: [torch.linalg.qr(torch.randn(d, k_max, generator=gen, device=device)).Q for _ in range(2)] for d in dims}

    def factor(dim, k):
        base = pool[dim][int(torch.randint(2, (1,), generator=gen, device=device))]
        columns = torch.randperm(k_max, generator=gen, device=device)[:k]
        signs = torch.randint(2, (k,), generator=gen, device=device) * 2 - 1
        return base[:, columns] * signs

    for block in model.layers:
        for name, ((out, inp), alpha) in _shapes(config).items():
            k = min(out, inp)
            sigma = (1 + torch.arange(k, device=device, dtype=torch.float32)) ** -alpha * 0.5
            weight = (factor(out, k) * sigma).to(config["dtype"]) @ factor(inp, k).mT.to(config["dtype"])
            block[name].weight.copy_(weight)
    return model


def _sample_names(config):
    """One layer per distinct shape (the first projection of that shape in layer 0)."""
    seen, names = set(), []
    for name, (shape, _) in _shapes(config).items():
        if shape not in seen:
            seen.add(shape)
            names.append(name)
    return names


@torch.no_grad()
def _references(model, config):
    """Full singular values of the sample layers and copies of their weights."""
    refs = {}
    for name in _sample_names(config):
        weight = model.layers[0][name].weight.detach().clone()
        refs[name] = (weight, torch.linalg.svdvals(weight.float()).double())
    return refs


def _excess(residual_norm: float, sigma: torch.Tensor, rank: int) -> float:
    return residual_norm / sigma[rank:].square().sum().sqrt().item() - 1


@torch.no_grad()
def _factor_errors(weight, sigma, rank, U, S, Vt):
    residual = torch.linalg.matrix_norm(weight.float() - (U.float() * S.float()) @ Vt.float()).item()
    top = sigma[:rank]
    return _excess(residual, sigma, rank), ((S.double().cpu() - top.cpu()).abs() / top.cpu()).max().item()


def _row(config_name, method, seconds, excess=None, sigma_error=None, peak=None, note=""):
    return {
        "config": config_name,
        "method": method,
        "seconds": seconds,
        "excess_max": excess,
        "sigma_error_max": sigma_error,
        "peak_extra_mb": peak,
        "note": note,
    }


def _count(config, shape):
    return config["layers"] * sum(1 for s, _ in _shapes(config).values() if s == shape)


def bench_full_svd(config, name, refs):
    """Reference SORSA's init: a full float32 SVD per layer, timed on one matrix per shape."""
    total, parts = 0.0, []
    for sample, (weight, _) in refs.items():
        seconds, _ = _timed(lambda: torch.linalg.svd(weight.float(), full_matrices=False), config["device"])
        count = _count(config, tuple(weight.shape))
        total += seconds * count
        parts.append(f"{tuple(weight.shape)}: {seconds:.3f} s × {count}")
    return _row(name, "loop of torch.linalg.svd (fp32)", total, 0.0, 0.0,
                note="extrapolated from one timed matrix per shape: " + "; ".join(parts))


def bench_svd_lowrank(config, name, model, refs):
    """PEFT's fast PiSSA SVD, alone: ``torch.svd_lowrank(W.float(), q=r, niter=4)`` per layer."""
    rank = config["rank"]
    weights = [layer.weight for block in model.layers for layer in block.values()]
    seconds, _ = _timed(lambda: [torch.svd_lowrank(w.float(), q=rank, niter=4) for w in weights], config["device"])
    excess, sigma_error = [], []
    for weight, sigma in refs.values():
        U, S, V = torch.svd_lowrank(weight.float(), q=rank, niter=4)
        e, s = _factor_errors(weight, sigma, rank, U, S, V.mT)
        excess.append(e)
        sigma_error.append(s)
    return _row(name, "loop of torch.svd_lowrank(niter=4)", seconds, max(excess), max(sigma_error),
                note=f"SVDs only, no residual writes; all {len(weights)} matrices timed")


def bench_peft(config, name, refs):
    """PEFT's ``pissa_niter_4`` init through get_peft_model on the same model."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return _row(name, "peft pissa_niter_4", None, note="peft is not installed")
    rank = config["rank"]
    model = build_model(config)
    lora = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="pissa_niter_4", target_modules=list(PROJECTIONS))
    result = {}

    def initialize():
        result["seconds"], result["model"] = _timed(lambda: get_peft_model(model, lora), config["device"])

    peak = _peak_extra_mb(initialize, config["device"])
    excess = []
    for sample, (_, sigma) in refs.items():
        residual = result["model"].base_model.model.layers[0][sample].base_layer.weight
        excess.append(_excess(torch.linalg.matrix_norm(residual.float()).item(), sigma, rank))
    seconds = result["seconds"]
    del result, model
    return _row(name, "peft get_peft_model(init_lora_weights='pissa_niter_4')", seconds, max(excess), None, peak,
                note="SVD + residual writes + adapter creation, one call")


def _warm_up(config):
    """Compile the Triton kernels on a small model of the same dtype and sketch width."""
    width = config["rank"] + default_oversample(config["rank"])
    small = dict(config, layers=1, scale=max(1, min(d for (shape, _) in PROJECTIONS.values() for d in shape) // (2 * width)))
    model = build_model(small)
    apply_sorsa(model, list(PROJECTIONS), config["rank"], init="rsvd", progress=False)
    _synchronize(config["device"])


def bench_ours(config, name, refs):
    model = build_model(config)
    apply_sorsa(model, list(PROJECTIONS), config["rank"], init="none")
    holder = {}
    peak = _peak_extra_mb(lambda: holder.update(timed=_timed(lambda: sorsa_init_(model, progress=False), config["device"])), config["device"])
    seconds, report = holder["timed"]
    excess = [
        _excess(torch.linalg.matrix_norm(model.layers[0][sample].weight.float()).item(), sigma, config["rank"])
        for sample, (_, sigma) in refs.items()
    ]
    sigma_error = [
        ((model.layers[0][sample].S.double().cpu() - sigma[: config["rank"]].cpu()).abs() / sigma[: config["rank"]].cpu()).max().item()
        for sample, (_, sigma) in refs.items()
    ]
    groups = "; ".join(
        f"{row['count']}×{row['shape'][0]}x{row['shape'][1]} {row['seconds']:.3f} s rel.res ≤ {row['relative_residual_max']:.4f}"
        for row in report
    )
    rows = [_row(name, f"sorsa_init_ (niter={DEFAULT_NITER}, oversample=max(r,64))", seconds, max(excess), max(sigma_error), peak,
                 note=f"SVD + fused residual writes of all layers; groups: {groups}")]
    del model
    return rows


def bench_sweep(config, name, model, refs):
    """Accuracy and time of the batched rsvd per (niter, oversample) on the 4096×4096 group."""
    rank = config["rank"]
    first = _sample_names(config)[0]
    shape = tuple(refs[first][0].shape)
    group = [layer.weight for block in model.layers for layer in block.values() if tuple(layer.weight.shape) == shape]
    rows = []
    for niter, oversample in config["sweep"]:
        seconds, _ = _timed(lambda: rsvd_grouped(group, rank, niter, oversample), config["device"])
        excess, sigma_error = [], []
        for weight, sigma in refs.values():
            e, s = _factor_errors(weight, sigma, rank, *rsvd_grouped([weight], rank, niter, oversample))
            excess.append(e)
            sigma_error.append(s)
        rows.append(_row(name, f"rsvd_grouped niter={niter} oversample={oversample}", seconds, max(excess), max(sigma_error),
                         note=f"time: {len(group)} matrices {shape[0]}x{shape[1]} (SVD only); errors: sample layers"))
    return rows


def bench_small_eigh(config, name):
    """The Rayleigh–Ritz eigenproblems of one group: host threads against torch's device eigh."""
    if torch.device(config["device"]).type != "cuda":
        return []
    from sorsa_kernels.triton.rsvd import _eigh_descending

    width = config["rank"] + default_oversample(config["rank"])
    x = torch.randn(32, width, width, device="cuda", dtype=torch.float64)
    G = x @ x.mT
    rows = []
    seconds, _ = _timed(lambda: _eigh_descending(G), "cuda")
    rows.append(_row(name, f"small eigh, host threads ({G.shape[0]}×{width}²)", seconds, note="sorsa_init_'s choice"))
    seconds, _ = _timed(lambda: torch.linalg.eigh(G), "cuda")
    rows.append(_row(name, f"small eigh, torch.linalg.eigh on device ({G.shape[0]}×{width}²)", seconds))
    try:
        previous = torch.backends.cuda.preferred_linalg_library()
        torch.backends.cuda.preferred_linalg_library("magma")
        try:
            seconds, _ = _timed(lambda: torch.linalg.eigh(G), "cuda")
            rows.append(_row(name, f"small eigh, magma on device ({G.shape[0]}×{width}²)", seconds))
        finally:
            torch.backends.cuda.preferred_linalg_library(previous)
    except RuntimeError as error:
        rows.append(_row(name, "small eigh, magma on device", None, note=f"unavailable: {error}"))
    return rows


def run(quick: bool) -> list[dict]:
    """All rows of the suite; ``quick`` runs the tiny CPU configuration."""
    config = QUICK if quick or not torch.cuda.is_available() else FULL
    name = "quick (CPU, 2 tiny layers)" if config is QUICK else "llama-2-7b shapes, 224 bf16 weights, r=128"
    build_seconds, model = _timed(lambda: build_model(config), config["device"])
    refs = _references(model, config)
    rows = [_row(name, "build the synthetic model (not part of any init)", build_seconds)]
    if torch.device(config["device"]).type == "cuda":
        _warm_up(config)  # compiles the Triton kernels before anything of ours is timed
    rows += bench_sweep(config, name, model, refs)
    rows.append(bench_full_svd(config, name, refs))
    rows.append(bench_svd_lowrank(config, name, model, refs))
    del model
    rows.append(bench_peft(config, name, refs))
    rows += bench_ours(config, name, refs)
    rows += bench_small_eigh(config, name)
    return rows


if __name__ == "__main__":
    import sys

    results = run(quick="--quick" in sys.argv)
    print(format_table(results, COLUMNS))
    print(f"wrote {write_results('init', results)}")
