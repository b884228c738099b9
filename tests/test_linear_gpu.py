"""sorsa_linear's Triton backend on a GPU: bench and odd shapes against the float64 oracle,
forward and every gradient, and under torch.compile with inductor.

The kernels run untuned here (tests/conftest.py); bench/tune_linear.py checks the autotuned
choices against the torch backend at the benchmark's shapes."""

import pytest
import torch

from sorsa_kernels import sorsa_linear
from support import DEVICE, TOLERANCE, assert_close, gpu, rel_error
from test_linear import check_against_oracle, make_inputs

pytestmark = gpu


@pytest.fixture(autouse=True)
def _full_precision_float32():
    allowed = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = allowed


def check(inputs, scale, tol):
    check_against_oracle("triton", inputs, scale, tol)


BENCH_CASES = [
    # (in, out, rank, x dtype, adapter dtype): the benchmark's shapes, bf16 under fp32 adapters
    (4096, 4096, 128, torch.bfloat16, torch.float32),
    (4096, 11008, 64, torch.bfloat16, torch.float32),
    (11008, 4096, 16, torch.bfloat16, torch.float32),
    (4096, 1024, 128, torch.bfloat16, torch.float32),
    (4096, 4096, 128, torch.bfloat16, torch.bfloat16),
]


@pytest.mark.parametrize("in_features,out_features,rank,dtype,adapter_dtype", BENCH_CASES, ids=str)
def test_bench_shapes(in_features, out_features, rank, dtype, adapter_dtype):
    check(make_inputs((4096, in_features), out_features, rank, dtype, adapter_dtype), 0.5, TOLERANCE[dtype])


ODD_CASES = [
    # (x shape, out, rank, dtype, adapter dtype, with S, with bias)
    ((1, 96), 80, 7, torch.bfloat16, torch.float32, True, True),
    ((3, 96), 80, 1, torch.bfloat16, torch.bfloat16, False, True),
    ((1000, 131), 150, 128, torch.bfloat16, torch.float32, True, False),
    ((65537, 72), 40, 7, torch.bfloat16, torch.float32, True, True),
    ((65537, 72), 40, 16, torch.float32, torch.float32, False, False),
    ((1000, 4095), 1027, 256, torch.bfloat16, torch.float32, True, True),
    ((1000, 4095), 1027, 7, torch.float32, torch.float32, True, True),
    ((8, 300), 4095, 128, torch.bfloat16, torch.float32, False, True),
    ((64, 4096), 4096, 16, torch.float16, torch.float16, True, False),
    ((96, 64), 40, 8, torch.bfloat16, torch.float32, True, True),  # TMA boxes larger than the tensors
    ((3, 11, 257), 300, 256, torch.float32, torch.float32, True, True),
]


@pytest.mark.parametrize("x_shape,out_features,rank,dtype,adapter_dtype,with_S,with_bias", ODD_CASES, ids=str)
def test_odd_shapes(x_shape, out_features, rank, dtype, adapter_dtype, with_S, with_bias):
    inputs = make_inputs(x_shape, out_features, rank, dtype, adapter_dtype, with_S=with_S, with_bias=with_bias)
    check(inputs, -0.75, TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_non_contiguous_3d_input(dtype):
    x, weight, U, S, Vt, bias = make_inputs((4, 130, 2 * 520), 384, 32, dtype, torch.float32)
    strided = x.detach()[:, ::2, ::2].requires_grad_()  # [4, 65, 520], every stride > 1
    check((strided, weight[:, :520], U, S, Vt[:, :520].detach().requires_grad_(), bias), 1.25, TOLERANCE[dtype])
    # Rows contiguous, columns 28 apart: a view all the way into the kernel.
    transposed = torch.randn(520, 28, device=DEVICE, dtype=dtype).T.reshape(4, 7, 520).requires_grad_()
    check((transposed, weight[:, :520], U, S, Vt[:, :520].detach().requires_grad_(), bias), 1.25, TOLERANCE[dtype])


def test_row_offsets_beyond_32_bits():
    # Rows 2^30 + 16 elements apart: the last row starts past 2^31, so 32-bit offsets would wrap.
    rows, in_features, row_stride = 3, 64, 2**30 + 16
    storage = torch.randn((rows - 1) * row_stride + in_features, device=DEVICE, dtype=torch.bfloat16)
    x = storage.as_strided((rows, in_features), (row_stride, 1)).requires_grad_()
    _, weight, U, S, Vt, bias = make_inputs((rows, in_features), 48, 8, torch.bfloat16, torch.float32)
    check((x, weight, U, S, Vt, bias), 0.5, TOLERANCE[torch.bfloat16])
    del storage


def test_weight_none_and_s_none():
    x, _, U, _, Vt, bias = make_inputs((777, 500), 300, 24, torch.bfloat16, torch.float32, with_S=False)
    check((x, None, U, None, Vt, bias), 2.0, TOLERANCE[torch.bfloat16])


def test_no_rows_gives_zero_adapter_gradients():
    x, weight, U, S, Vt, bias = make_inputs((0, 256), 128, 16, torch.bfloat16, torch.float32)
    y = sorsa_linear(x, weight, U, S, Vt, bias, 0.5, backend="triton")
    assert y.shape == (0, 128)
    dx, dU, dS, dVt = torch.autograd.grad(y.sum(), (x, U, S, Vt))
    assert dx.shape == x.shape and all(g.abs().sum().item() == 0 for g in (dU, dS, dVt))


def test_tf32_when_allowed_stays_close():
    inputs = make_inputs((512, 1024), 768, 64, torch.float32, torch.float32)
    torch.backends.cuda.matmul.allow_tf32 = True
    check(inputs, 0.5, 5e-3)


class _AdapterBlock(torch.nn.Module):
    def __init__(self, in_features, out_features, rank, dtype):
        super().__init__()
        inputs = make_inputs((1, in_features), out_features, rank, dtype, torch.float32)
        _, weight, U, S, Vt, bias = inputs
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.U, self.S, self.Vt = (torch.nn.Parameter(t.detach()) for t in (U, S, Vt))
        self.norm = torch.nn.LayerNorm(in_features, dtype=dtype, device=DEVICE)

    def forward(self, x):
        h = sorsa_linear(self.norm(x), self.weight, self.U, self.S, self.Vt, self.bias, 0.5, backend="triton")
        return torch.nn.functional.gelu(h).float().square().mean()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_torch_compile_inductor_matches_eager(dtype):
    model = _AdapterBlock(256, 192, 16, dtype)
    x = torch.randn(4, 33, 256, device=DEVICE, dtype=dtype, requires_grad=True)
    params = [x, model.U, model.S, model.Vt]
    eager = model(x)
    eager_grads = torch.autograd.grad(eager, params)
    compiled = torch.compile(model, fullgraph=True, backend="inductor")(x)
    compiled_grads = torch.autograd.grad(compiled, params)
    tol = 1e-5 if dtype == torch.float32 else TOLERANCE[dtype]
    assert rel_error(compiled, eager) <= tol
    for name, got, want in zip(("x", "U", "S", "Vt"), compiled_grads, eager_grads):
        assert_close(got, want, tol, f"d{name} compiled vs eager")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_tensors_on_a_gpu_other_than_the_current():
    inputs = make_inputs((300, 96), 80, 8, torch.bfloat16, torch.float32)
    moved = [None if t is None else t.detach().to("cuda:1").requires_grad_(t.requires_grad) for t in inputs]
    with torch.cuda.device(0):
        check(moved, 0.5, TOLERANCE[torch.bfloat16])


def test_tuned_choice_computes_right(monkeypatch):
    # With tuning on, the first launch of each shape times every candidate on the real outputs
    # (dS accumulates over the timing runs and is reset); what follows must still be right.
    from sorsa_kernels.triton import linear

    monkeypatch.setenv(linear.AUTOTUNE_ENV, "1")
    monkeypatch.setattr(linear, "_chosen", {})
    monkeypatch.setattr(linear, "_plans", {})
    check(make_inputs((1000, 1024), 768, 64, torch.bfloat16, torch.float32), 0.5, TOLERANCE[torch.bfloat16])
    # The step's six launches, the forward's and the backward's ways (apart or beside), and the
    # no-grad forward's way (fused or merged) and merge.
    assert len(linear._chosen) == 10, "one tuned choice per launch of the step, per way, and of inference"
