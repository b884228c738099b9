"""subtract_lowrank_ on every backend: every element of W against the float64 result rounded to
W's dtype (the op accumulates in float32, so a value may land one unit in the last place away
when the exact result sits next to a rounding boundary)."""

import pytest
import torch

from sorsa_kernels import subtract_lowrank_
from sorsa_kernels.ops.lowrank import subtract_lowrank_grouped_
from support import DEVICE, backend_params, interpretable_dtypes, poisoned_allocations

BACKENDS = backend_params("subtract_lowrank")

# (W shape, rank): single element, odd sizes, a rank-128 update, batch dimensions.
SHAPES = [((1, 1), 1), ((3, 37), 7), ((130, 45), 16), ((97, 200), 128), ((2, 33, 21), 5), ((2, 3, 19, 40), 3)]
MANTISSA_BITS = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23, torch.float64: 52}


def unit_in_last_place(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` numbers around each value of the float64 tensor ``x``."""
    info = torch.finfo(dtype)
    exponent = torch.floor(torch.log2(x.abs().clamp_min(info.tiny)))
    return torch.exp2(exponent - MANTISSA_BITS[dtype])


def check_elementwise(result, W, U, S, Vt):
    W64, U64, Vt64 = W.double(), U.double(), Vt.double()
    US64 = U64 if S is None else U64 * S.double().unsqueeze(-2)
    exact = W64 - US64 @ Vt64
    acc_eps = torch.finfo(torch.float64 if W.dtype == torch.float64 else torch.float32).eps
    # Rounding to W's dtype (one unit) plus the float32 accumulation error of the product.
    magnitude = W64.abs() + US64.abs() @ Vt64.abs()
    bound = unit_in_last_place(exact, W.dtype) + 4 * (U.shape[-1] + 2) * acc_eps * magnitude
    error = (result.double() - exact).abs()
    assert torch.isfinite(result).all()
    worst = (error / bound).max().item()
    assert worst <= 1.0, f"an element is {worst:.2f}× its error bound"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,rank", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("with_S", [True, False])
def test_every_element_matches_float64(backend, shape, rank, dtype, with_S):
    if dtype not in interpretable_dtypes(backend, [dtype]):
        pytest.skip("bfloat16 tl.dot is wrong under the Triton interpreter; covered on GPU")
    *batch, m, n = shape
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    W = torch.randn(shape, device=DEVICE).to(dtype)
    U = torch.randn(*batch, m, rank, device=DEVICE, dtype=acc) / rank**0.5
    S = torch.rand(*batch, rank, device=DEVICE, dtype=acc) + 0.5 if with_S else None
    Vt = torch.randn(*batch, rank, n, device=DEVICE, dtype=acc)
    original = W.clone()
    out = subtract_lowrank_(W, U, S, Vt, backend=backend)
    assert out is W and W.dtype == dtype and W.shape == shape
    check_elementwise(W, original, U, S, Vt)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_weight_and_low_precision_factors(backend):
    base = torch.randn(50, 70, device=DEVICE)
    W = base.T  # [70, 50], column-major
    original = W.clone()
    U = torch.randn(70, 6, device=DEVICE).bfloat16()
    S = torch.rand(6, device=DEVICE, dtype=torch.float64)
    Vt = torch.randn(6, 50, device=DEVICE).half()
    subtract_lowrank_(W, U, S, Vt, backend=backend)
    check_elementwise(W, original, U.float(), S.float(), Vt.float())
    assert torch.equal(base, W.T)


@pytest.mark.gpu
def test_large_bfloat16_weight_on_gpu():
    W = torch.randn(11008, 4096, device="cuda", dtype=torch.bfloat16)
    U = torch.randn(11008, 128, device="cuda") / 11008**0.5
    S = torch.rand(128, device="cuda") * 10
    Vt = torch.linalg.qr(torch.randn(4096, 128, device="cuda")).Q.T.contiguous()
    original = W.clone()
    subtract_lowrank_(W, U, S, Vt, backend="triton")
    check_elementwise(W, original, U, S, Vt)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("with_S", [True, False])
def test_grouped_weights_and_their_residual_norms(backend, dtype, with_S):
    """Separate weights (one launch on the GPU): each one as subtract_lowrank_ would leave it,
    and the squared norm of each unrounded residual."""
    if dtype not in interpretable_dtypes(backend, [dtype]):
        pytest.skip("bfloat16 tl.dot is wrong under the Triton interpreter; covered on GPU")
    m, n, rank, count = 70, 45, 6, 3
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    # Interleaved with other allocations: the weights are not one batch tensor.
    weights = [torch.randn(m + i % 2, n, device=DEVICE).to(dtype)[: m] for i in range(count)]
    U = torch.randn(count, m, rank, device=DEVICE, dtype=acc) / rank**0.5
    S = torch.rand(count, rank, device=DEVICE, dtype=acc) + 0.5 if with_S else None
    Vt = torch.randn(count, rank, n, device=DEVICE, dtype=acc)
    originals = [w.clone() for w in weights]
    with poisoned_allocations():
        norms = subtract_lowrank_grouped_(weights, U, S, Vt, backend=backend)
    assert norms.shape == (count,) and norms.dtype == acc
    for i, (W, original) in enumerate(zip(weights, originals)):
        Si = None if S is None else S[i]
        check_elementwise(W, original, U[i], Si, Vt[i])
        exact = original.double() - (U[i].double() * (1 if Si is None else Si.double())) @ Vt[i].double()
        assert abs(norms[i].item() / exact.square().sum().item() - 1) <= (1e-12 if dtype == torch.float64 else 1e-5)


def test_grouped_bad_input_names_the_argument():
    weights = [torch.randn(8, 9) for _ in range(2)]
    U, S, Vt = torch.randn(2, 8, 3), torch.rand(2, 3), torch.randn(2, 3, 9)
    with pytest.raises(TypeError, match="sequence of tensors"):
        subtract_lowrank_grouped_(torch.randn(2, 8, 9), U, S, Vt)
    with pytest.raises(ValueError, match="at least one"):
        subtract_lowrank_grouped_([], U, S, Vt)
    with pytest.raises(ValueError, match=r"weights\[1\]"):
        subtract_lowrank_grouped_([weights[0], torch.randn(8, 8)], U, S, Vt)
    with pytest.raises(ValueError, match=r"U.shape\[0\]"):
        subtract_lowrank_grouped_(weights, U[:1], S, Vt)
    with pytest.raises(ValueError, match=r"Vt.shape\[2\]"):
        subtract_lowrank_grouped_(weights, U, S, Vt[..., :-1])
    with pytest.raises(ValueError, match="S must have shape"):
        subtract_lowrank_grouped_(weights, U, S[:, :-1], Vt)


BAD_INPUTS = [
    (lambda a: a.update(U=a["U"][:-1]), ValueError, r"U.shape\[-2\]"),
    (lambda a: a.update(Vt=a["Vt"][:, :-1]), ValueError, r"Vt.shape\[-1\]"),
    (lambda a: a.update(Vt=a["Vt"][:-1]), ValueError, r"Vt.shape\[-2\]"),
    (lambda a: a.update(S=a["S"][:-1]), ValueError, "S must have shape"),
    (lambda a: a.update(W=a["W"].int()), TypeError, "W"),
    (lambda a: a.update(U=a["U"].long()), TypeError, "U"),
    (lambda a: a.update(U=a["U"][None]), ValueError, "batch dimensions"),
    (lambda a: a.update(W=torch.randn(5)), ValueError, "W must be a matrix"),
    (lambda a: a.update(Vt=a["Vt"].to("meta")), ValueError, "Vt is on meta"),
]


@pytest.mark.parametrize("mutate,error,text", BAD_INPUTS)
def test_bad_input_names_the_argument(mutate, error, text):
    args = dict(W=torch.randn(8, 9), U=torch.randn(8, 3), S=torch.rand(3), Vt=torch.randn(3, 9))
    mutate(args)
    with pytest.raises(error, match=text):
        subtract_lowrank_(**args)
