"""Whole-model SVD initialization: ``sorsa_init_`` against a loop of full SVDs, a loop of
``torch.svd_lowrank(niter=4)`` and PEFT's ``pissa_niter_4`` init, on one model; where
``sorsa_init_``'s time goes, and the measurements behind its defaults and design.

The GPU configuration is Llama-2-7B shaped: 32 layers × (q, k, v, o 4096×4096; gate, up
11008×4096; down 4096×11008) = 224 bfloat16 weights, rank 128. Their spectra are power laws
``σ_i ∝ (1+i)^-α`` with α of 0.3–0.5 per projection (the real weights of all-MiniLM-L6-v2 fit
α ≈ 0.26–0.42): ``W = (L·diag(σ))·Rᵀ`` with orthonormal factors drawn from a small pool of QR
factorizations by random column permutations and signs, so building the 13 GB model takes a
few seconds.

Errors are measured on one sample layer per shape (3 of the 224: the slowest-decaying
projection of each shape, v, up and down) in float64 against the
singular values of the very bfloat16 matrix decomposed, from the float64 eigenvalues of its
Gram matrix. (Against float32 ``torch.linalg.svdvals`` on the GPU the excess came out at
−3.9e-4 for every niter from 5 to 8 and the singular-value error stuck at 5e-4: no rank-r
matrix beats the truncated SVD, so that reference was off by about that much.) Measured: the
excess ``‖W − U S Vt‖_F / ‖W − W_r‖_F − 1`` from the factors, before any rounding of the
residual to bfloat16, and the largest relative error of the top-r singular values. Rows:

- the peers and ``sorsa_init_`` (one call, pipelined; its groups in the note);
- ``stage:`` rows, a second ``sorsa_init_`` call with every stage synchronized
  (:mod:`sorsa_kernels.profiling`): what each stage costs alone; the host work (small eigh)
  overlaps with the device work in the plain call;
- ``sweep:`` the batched rsvd on the 4096×4096 group per (niter, oversample);
- ``products:`` the Triton products with the weights read in place against cuBLAS (torch.bmm)
  on a stacked copy of the same chunk, whose copy is timed apart;
- ``residual write:``, ``small ops:`` and ``small eigh:`` the other pieces at a chunk's size.

``run(quick=True)`` is a tiny CPU configuration of the same code (labelled ``quick``).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from sorsa_kernels.backends import resolve
from sorsa_kernels.benchmark.common import format_table, median_ms, peak_memory_mb, synchronize, write_results
from sorsa_kernels.nn.init import sorsa_init_
from sorsa_kernels.nn.model import apply_sorsa
from sorsa_kernels.ops.lowrank import subtract_lowrank_, subtract_lowrank_grouped_
from sorsa_kernels.ops.rsvd import DEFAULT_NITER, default_oversample, rsvd_grouped
from sorsa_kernels.profiling import record_stages

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
# chunk: the batch of the per-piece measurements (about what sorsa_init_'s memory bound allows).
FULL = dict(layers=32, scale=1, rank=128, dtype=torch.bfloat16, device="cuda", chunk=32,
            sweep=[(4, 128), (5, 128), (6, 96), (6, 128), (7, 128)])
QUICK = dict(layers=2, scale=64, rank=8, dtype=torch.bfloat16, device="cpu", chunk=4, sweep=[(4, 64), (6, 64)])
# Tilings of the product kernel compared with its default (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages).
PRODUCT_BLOCKS = [None, (128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (256, 128, 64, 8, 3)]
COLUMNS = ["config", "method", "seconds", "excess_max", "sigma_error_max", "peak_extra_mb", "note"]


def _timed(fn, device):
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
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
    """One layer per distinct shape: the projection of that shape in layer 0 with the slowest
    spectral decay, whose singular values next to the cut converge last."""
    slowest = {}
    for name, (shape, alpha) in _shapes(config).items():
        if shape not in slowest or alpha < _shapes(config)[slowest[shape]][1]:
            slowest[shape] = name
    return list(slowest.values())


@torch.no_grad()
def singular_values(weight: torch.Tensor) -> torch.Tensor:
    """All singular values of ``weight`` (descending, float64): square roots of the float64
    eigenvalues of its smaller Gram matrix (accurate to about 1e-16·σ₁²/σ_i² relative, far
    below what is measured here)."""
    W = weight.double()
    gram = W.mT @ W if W.shape[0] >= W.shape[1] else W @ W.mT
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0).sqrt()


@torch.no_grad()
def _references(model, config):
    """Copies of the sample layers' weights and their singular values."""
    refs = {}
    for name in _sample_names(config):
        weight = model.layers[0][name].weight.detach().clone()
        refs[name] = (weight, singular_values(weight))
    return refs


def _excess(residual_norm: float, sigma: torch.Tensor, rank: int) -> float:
    return residual_norm / sigma[rank:].square().sum().sqrt().item() - 1


@torch.no_grad()
def _factor_errors(weight, sigma, rank, U, S, Vt):
    """(excess, largest relative error of the top-r singular values), all in float64."""
    residual = torch.linalg.matrix_norm(weight.double() - (U.double() * S.double().unsqueeze(-2)) @ Vt.double()).max().item()
    top = sigma[:rank]
    return _excess(residual, sigma, rank), ((S.double().reshape(-1) - top).abs() / top).max().item()


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
    return _row(name, "loop of torch.linalg.svd (fp32)", total,
                note="extrapolated from one timed matrix per shape: " + "; ".join(parts))


def bench_svd_lowrank(config, name, model, refs):
    """PEFT's fast PiSSA SVD, alone: ``torch.svd_lowrank(W.float(), q=r, niter=4)`` per layer."""
    rank = config["rank"]
    weights = [layer.weight for block in model.layers for layer in block.values()]
    seconds, _ = _timed(lambda: [torch.svd_lowrank(w.float(), q=rank, niter=4) for w in weights], config["device"])
    errors = [_factor_errors(weight, sigma, rank, U, S, V.mT) for weight, sigma in refs.values()
              for U, S, V in [torch.svd_lowrank(weight.float(), q=rank, niter=4)]]
    return _row(name, "loop of torch.svd_lowrank(niter=4)", seconds, max(e for e, _ in errors), max(s for _, s in errors),
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
    for sample, (weight, sigma) in refs.items():
        layer = result["model"].base_model.model.layers[0][sample]
        delta = layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double() * layer.scaling["default"]
        excess.append(_excess(torch.linalg.matrix_norm(weight.double() - delta).item(), sigma, rank))
    seconds = result["seconds"]
    del result, model
    return _row(name, "peft get_peft_model(init_lora_weights='pissa_niter_4')", seconds, max(excess), None, peak,
                note="SVD + residual writes + adapter creation, one call; excess from the adapter, float64")


def _warm_up(config):
    """Compile the Triton kernels and start the host threads on a small model of the same dtype
    and sketch width."""
    width = config["rank"] + default_oversample(config["rank"])
    small = dict(config, layers=1, scale=max(1, min(d for (shape, _) in PROJECTIONS.values() for d in shape) // (2 * width)))
    for _ in range(2):
        model = build_model(small)
        apply_sorsa(model, list(PROJECTIONS), config["rank"], init="rsvd", progress=False)
    synchronize(config["device"])


def _layer_errors(model, config, refs):
    """Excess and singular-value error of the sample layers' adapters (``W − scale·U S Vt``)."""
    errors = []
    for sample, (weight, sigma) in refs.items():
        layer = model.layers[0][sample]
        S = layer.S.detach() * layer.scale
        errors.append(_factor_errors(weight, sigma, config["rank"], layer.U.detach(), S, layer.Vt.detach()))
    return max(e for e, _ in errors), max(s for _, s in errors)


def bench_ours(config, name, refs):
    model = build_model(config)
    apply_sorsa(model, list(PROJECTIONS), config["rank"], init="none")
    holder = {}
    peak = _peak_extra_mb(lambda: holder.update(timed=_timed(lambda: sorsa_init_(model, progress=False), config["device"])), config["device"])
    seconds, report = holder["timed"]
    excess, sigma_error = _layer_errors(model, config, refs)
    groups = "; ".join(
        f"{row['count']}×{row['shape'][0]}x{row['shape'][1]} {row['seconds']:.3f} s rel.res ≤ {row['relative_residual_max']:.4f}"
        for row in report
    )
    oversample = default_oversample(config["rank"])
    rows = [_row(name, f"sorsa_init_ (niter={DEFAULT_NITER}, oversample={oversample})", seconds, excess, sigma_error, peak,
                 note=f"SVD + fused residual writes of all layers, pipelined; groups (overlapping): {groups}")]
    del model
    return rows


def bench_stages(config, name):
    """One more ``sorsa_init_`` call with every stage synchronized: each stage's cost alone."""
    device = config["device"]
    model = build_model(config)
    apply_sorsa(model, list(PROJECTIONS), config["rank"], init="none")
    with record_stages(device) as times:
        sorsa_init_(model, progress=False)
    del model
    rows = [_row(name, f"stage: {stage}", seconds, note=f"{times.calls[stage]} entries, {100 * seconds / times.total:.0f} %")
            for stage, seconds in sorted(times.seconds.items(), key=lambda item: -item[1])]
    rows.append(_row(name, "stage: outside every stage (host: Python, launches)", times.outside(),
                     note=f"{100 * times.outside() / times.total:.0f} %"))
    rows.append(_row(name, "stage: total, every stage synchronized", times.total,
                     note="serialized: the host eigh no longer overlaps the next chunk's device work"))
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
        errors = [_factor_errors(weight, sigma, rank, *rsvd_grouped([weight], rank, niter, oversample)) for weight, sigma in refs.values()]
        rows.append(_row(name, f"sweep: rsvd_grouped niter={niter} oversample={oversample}", seconds,
                         max(e for e, _ in errors), max(s for _, s in errors),
                         note=f"time: {len(group)} matrices {shape[0]}x{shape[1]}, one batch (SVD only); errors: sample layers"))
    return rows


def _weights(config, shape, count):
    device = config["device"]
    return [torch.randn(shape, device=device).to(config["dtype"]) for _ in range(count)]


def bench_products(config, name):
    """Power-iteration products of one chunk: the Triton kernel reading the weights in place
    against cuBLAS bf16 batched GEMMs on a stacked copy."""
    from sorsa_kernels.triton import rsvd as triton_rsvd

    if resolve("rsvd", "auto", torch.device(config["device"])) != "triton":
        return []
    rank, count = config["rank"], config["chunk"]
    k = rank + default_oversample(rank)
    rows = []
    for shape in dict.fromkeys(shape for shape, _ in _shapes(config).values()):
        weights = _weights(config, shape, count)
        operand = triton_rsvd._Operand.of_matrices(weights)
        transposed = shape[0] > shape[1]
        X = operand.T if transposed else operand
        small, large = X.shape
        Q = torch.linalg.qr(torch.randn(count, small, k, device=config["device"])).Q
        flops = 2 * small * large * k * count
        P = triton_rsvd._product(X, Q, transpose=True, precision="fast", out_dtype=torch.bfloat16)
        timings, failures = {}, []
        for blocks in PRODUCT_BLOCKS:
            label = "default tiles" if blocks is None else "tiles {}x{}x{} w{} s{}".format(*blocks)
            try:
                timings[f"triton Xᵀ·Q (bf16 out), {label}"] = median_ms(
                    lambda: triton_rsvd._product(X, Q, transpose=True, precision="fast", out_dtype=torch.bfloat16, blocks=blocks))
                timings[f"triton X·P (fp32 out), {label}"] = median_ms(
                    lambda: triton_rsvd._product(X, P, transpose=False, precision="fast", blocks=blocks))
            except Exception as error:  # a tiling this GPU cannot run (e.g. out of shared memory)
                failures.append(f"{label}: {type(error).__name__}")
        copy_ms = median_ms(lambda: torch.stack(weights))
        stacked = torch.stack(weights)
        Xs = stacked.mT if transposed else stacked
        Qb = Q.to(config["dtype"])
        timings["cuBLAS bmm Xᵀ·Q (bf16 out)"] = median_ms(lambda: torch.bmm(Xs.mT, Qb))
        timings["cuBLAS bmm X·P (bf16 out)"] = median_ms(lambda: torch.bmm(Xs, P))
        try:
            timings["cuBLAS bmm X·P (fp32 out)"] = median_ms(lambda: torch.bmm(Xs, P, out_dtype=torch.float32))
        except (TypeError, RuntimeError):
            pass  # out_dtype needs a recent torch
        for label, ms in timings.items():
            rows.append(_row(name, f"products: {count}×{shape[0]}x{shape[1]} k={k} {label}", ms / 1000,
                             note=f"{flops / ms / 1e9:.0f} TFLOP/s"))
        if failures:
            rows.append(_row(name, f"products: {count}×{shape[0]}x{shape[1]} tilings that failed", None, note="; ".join(failures)))
        rows.append(_row(name, f"products: {count}×{shape[0]}x{shape[1]} stacking copy for cuBLAS", copy_ms / 1000,
                         note=f"{2 * stacked.numel() * stacked.element_size() / copy_ms / 1e9:.0f} GB/s; "
                              f"{stacked.numel() * stacked.element_size() / 2**20:.0f} MiB more memory"))
        del weights, stacked, Xs
    return rows


def bench_residual_write(config, name):
    """The fused residual write of one chunk of 4096×4096 weights: grouped (one launch) and a
    loop of subtract_lowrank_, against the bytes of W read and written once."""
    rank, count = config["rank"], config["chunk"]
    shape = _shapes(config)["q_proj"][0]
    weights = _weights(config, shape, count)
    device = config["device"]
    U = torch.linalg.qr(torch.randn(count, shape[0], rank, device=device)).Q
    S = torch.rand(count, rank, device=device) * 1e-3  # small: W keeps its magnitude over repeats
    Vt = torch.linalg.qr(torch.randn(count, shape[1], rank, device=device)).Q.mT.contiguous()
    moved = 2 * sum(w.numel() * w.element_size() for w in weights)
    grouped = median_ms(lambda: subtract_lowrank_grouped_(weights, U, S, Vt))
    loop = median_ms(lambda: [subtract_lowrank_(w, U[i], S[i], Vt[i]) for i, w in enumerate(weights)])
    flops = 2 * shape[0] * shape[1] * rank * count
    return [_row(name, f"residual write: {count}×{shape[0]}x{shape[1]} r={rank}, {label}", ms / 1000,
                 note=f"{moved / ms / 1e9:.0f} GB/s of W read+write; {flops / ms / 1e9:.0f} TFLOP/s of U·S·Vt (tf32x3)")
            for label, ms in (("grouped, with norms", grouped), ("loop of subtract_lowrank_", loop))]


def bench_small_ops(config, name):
    """Per-chunk pieces of the orthonormalization: a float64 batched Cholesky and triangular
    inverse (cuSOLVER/cuBLAS through torch), a whole CholeskyQR pass, the shift estimate."""
    from sorsa_kernels.triton import rsvd as triton_rsvd

    if resolve("rsvd", "auto", torch.device(config["device"])) != "triton":
        return []
    rank, count, device = config["rank"], config["chunk"], config["device"]
    k = rank + default_oversample(rank)
    small = min(_shapes(config)["q_proj"][0])
    Y = torch.randn(count, small, k, device=device)
    x = torch.randn(count, k, k, device=device, dtype=torch.float64)
    gram = x @ x.mT + k * torch.eye(k, device=device, dtype=torch.float64)
    L = torch.linalg.cholesky(gram)
    eye = torch.eye(k, device=device, dtype=torch.float64).expand_as(L)
    _, inverse, shift = triton_rsvd._cholesky_qr(Y, accurate=False, shift=8)
    vectors = torch.linalg.qr(x).Q
    timings = {
        f"cholesky_ex [{count},{k},{k}] fp64": median_ms(lambda: torch.linalg.cholesky_ex(gram)),
        f"solve_triangular (inverse) [{count},{k},{k}] fp64": median_ms(lambda: torch.linalg.solve_triangular(L.mT, eye, upper=True)),
        f"one fast CholeskyQR pass of [{count},{small},{k}]": median_ms(lambda: triton_rsvd._cholesky_qr(Y, accurate=False, shift=8)),
        f"final CholeskyQR3 + check of [{count},{small},{k}]": median_ms(lambda: triton_rsvd._orthonormal_basis(Y)),
        f"shift estimate [{count},{k},{k}]": median_ms(lambda: triton_rsvd._smallest_singular_value_bound(inverse, shift)),
        f"eigenvector refinement [{count},{k},{k}]": median_ms(lambda: triton_rsvd._refine_eigenvectors(gram, vectors)),
    }
    return [_row(name, f"small ops: {label}", ms / 1000) for label, ms in timings.items()]


def bench_small_eigh(config, name):
    """The Rayleigh–Ritz eigenproblems of one chunk: host threads (float32, ours; float64)
    against torch's device eigh (which loops one matrix at a time below torch 2.12)."""
    from sorsa_kernels.triton import rsvd as triton_rsvd

    if torch.device(config["device"]).type != "cuda":
        return []
    count, width = config["chunk"], config["rank"] + default_oversample(config["rank"])
    x = torch.randn(count, width, width, device="cuda", dtype=torch.float64)
    G = x @ x.mT
    flags = torch.zeros(count, dtype=torch.bool, device="cuda")

    def host(dtype):
        buffers, futures = triton_rsvd.start_host_eigenvectors(G, dtype, flags)
        for future in futures:
            future.result()
        return buffers.values.to("cuda", non_blocking=True)

    rows = []
    for label, fn in (
        ("host threads, float32 (sorsa_init_'s)", lambda: host(torch.float32)),
        ("host threads, float64", lambda: host(torch.float64)),
        ("torch.linalg.eigh on device, float32", lambda: torch.linalg.eigh(G.float())),
        ("torch.linalg.eigh on device, float64", lambda: torch.linalg.eigh(G)),
    ):
        fn()
        seconds, _ = _timed(fn, "cuda")
        rows.append(_row(name, f"small eigh: {label} ({count}×{width}²)", seconds, note="incl. transfers" if "host" in label else ""))
    return rows


def run(quick: bool) -> list[dict]:
    """All rows of the suite; ``quick`` runs the tiny CPU configuration."""
    config = QUICK if quick or not torch.cuda.is_available() else FULL
    name = "quick (CPU, 2 tiny layers)" if config is QUICK else "llama-2-7b shapes, 224 bf16 weights, r=128"
    build_seconds, model = _timed(lambda: build_model(config), config["device"])
    refs = _references(model, config)
    rows = [_row(name, "build the synthetic model (not part of any init)", build_seconds)]
    _warm_up(config)  # compiles the Triton kernels before anything of ours is timed
    rows += bench_sweep(config, name, model, refs)
    rows.append(bench_full_svd(config, name, refs))
    rows.append(bench_svd_lowrank(config, name, model, refs))
    del model
    rows.append(bench_peft(config, name, refs))
    rows += bench_ours(config, name, refs)
    rows += bench_stages(config, name)
    rows += bench_products(config, name)
    rows += bench_residual_write(config, name)
    rows += bench_small_ops(config, name)
    rows += bench_small_eigh(config, name)
    return rows


def main(quick: bool, out_dir: str = "bench/results") -> None:
    """The suite as ``sorsa-kernels bench`` runs it: measure, print, store the JSON."""
    results = run(quick)
    print(format_table(results, COLUMNS))
    print(f"wrote {write_results('init', results, out_dir, quick=quick)}")


if __name__ == "__main__":
    import sys

    main(quick="--quick" in sys.argv or not torch.cuda.is_available())
