"""sorsa_linear on every backend against a float64 autograd oracle, forward and every gradient."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sorsa_kernels import BackendUnavailableError, sorsa_linear
from sorsa_kernels.backends import why_unavailable
from support import (
    DEVICE,
    TOLERANCE,
    as_float64,
    assert_close,
    assert_faithfully_rounded,
    backend_params,
    gpu,
    interpretable_dtypes,
    poisoned_allocations,
)

BACKENDS = backend_params("sorsa_linear")

# (x shape, out_features, rank): M of 1, 3 and 130 rows, a 3-D batch; in/out not multiples of 16;
# and 16-byte aligned rows, which 16-bit operands multiply in the Triton backend's TMA kernel.
SHAPES = [((1, 19), 23, 1), ((3, 37), 29, 7), ((130, 45), 53, 16), ((2, 33, 21), 40, 5), ((96, 64), 40, 8)]


def oracle(x, weight, U, S, Vt, bias, scale):
    """The op's definition, differentiated by autograd in float64."""
    t = x @ Vt.T
    if S is not None:
        t = t * S
    y = scale * (t @ U.T)
    if weight is not None:
        y = y + x @ weight.T
    if bias is not None:
        y = y + bias
    return y


def make_inputs(x_shape, out_features, rank, dtype, adapter_dtype, *, with_S=True, with_bias=True, with_weight=True):
    in_features = x_shape[-1]
    x = torch.randn(x_shape, device=DEVICE).to(dtype).requires_grad_()
    weight = (torch.randn(out_features, in_features, device=DEVICE) / in_features**0.5).to(dtype) if with_weight else None
    U = (torch.randn(out_features, rank, device=DEVICE) / out_features**0.5).to(adapter_dtype).requires_grad_()
    S = (torch.rand(rank, device=DEVICE) + 0.5).to(adapter_dtype).requires_grad_() if with_S else None
    Vt = (torch.randn(rank, in_features, device=DEVICE) / in_features**0.5).to(adapter_dtype).requires_grad_()
    bias = torch.randn(out_features, device=DEVICE).to(dtype) if with_bias else None
    return x, weight, U, S, Vt, bias


def check_against_oracle(backend, inputs, scale, tol, trainable_base=False):
    x, weight, U, S, Vt, bias = inputs
    if trainable_base:
        weight.requires_grad_()
        bias.requires_grad_()
    with poisoned_allocations():
        y = sorsa_linear(x, weight, U, S, Vt, bias, scale, backend=backend)
        dy = torch.randn_like(y)
        leaves = [t for t in (x, weight, U, S, Vt, bias) if t is not None and t.requires_grad]
        grads = torch.autograd.grad(y, leaves, dy)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], U.shape[0])
    ref_inputs = as_float64(x, weight, U, S, Vt, bias)
    y_ref = oracle(*ref_inputs, scale)
    ref_leaves = [t for t in ref_inputs if t is not None and t.requires_grad]
    ref_grads = torch.autograd.grad(y_ref, ref_leaves, dy.to(torch.float64))
    assert_close(y, y_ref, tol, "y")
    with torch.no_grad(), poisoned_allocations():  # the inference path: y alone
        y_infer = sorsa_linear(x, weight, U, S, Vt, bias, scale, backend=backend)
    assert y_infer.dtype == x.dtype and y_infer.shape == y.shape
    assert_close(y_infer, y_ref, tol, "y without grad")
    names = [n for n, t in zip(("x", "weight", "U", "S", "Vt", "bias"), inputs) if t is not None and t.requires_grad]
    for name, leaf, grad, ref in zip(names, leaves, grads, ref_grads):
        assert grad.dtype == leaf.dtype, f"d{name} dtype"
        assert_close(grad, ref, tol, f"d{name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x_shape,out_features,rank", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_matches_float64_oracle(backend, x_shape, out_features, rank, dtype):
    if dtype not in interpretable_dtypes(backend, [dtype]):
        pytest.skip("bfloat16 tl.dot is wrong under the Triton interpreter; covered on GPU")
    inputs = make_inputs(x_shape, out_features, rank, dtype, torch.float32 if dtype != torch.float64 else dtype)
    check_against_oracle(backend, inputs, 0.37, TOLERANCE[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "with_S,with_bias,with_weight",
    [(False, True, True), (True, False, True), (True, True, False), (False, False, True), (False, True, False), (False, False, False)],
)
def test_optional_parts(backend, with_S, with_bias, with_weight):
    inputs = make_inputs((37, 45), 29, 7, torch.float32, torch.float32, with_S=with_S, with_bias=with_bias, with_weight=with_weight)
    check_against_oracle(backend, inputs, 1.5, TOLERANCE[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_adapters_in_activation_dtype(backend, dtype):
    if dtype not in interpretable_dtypes(backend, [dtype]):
        pytest.skip("bfloat16 tl.dot is wrong under the Triton interpreter; covered on GPU")
    inputs = make_inputs((65, 37), 29, 7, dtype, dtype)
    check_against_oracle(backend, inputs, 0.5, TOLERANCE[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_trainable_weight_and_bias(backend):
    inputs = make_inputs((21, 19), 23, 3, torch.float32, torch.float32)
    check_against_oracle(backend, inputs, 0.5, TOLERANCE[torch.float32], trainable_base=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input(backend):
    x, weight, U, S, Vt, bias = make_inputs((50, 90), 31, 6, torch.float32, torch.float32)
    strided = x.detach()[::2, ::2].requires_grad_()  # [25, 45], row stride 180, column stride 2
    transposed = torch.randn(45, 25, device=DEVICE).T.requires_grad_()
    for view in (strided, transposed):
        check_against_oracle(backend, (view, weight[:, :45], U, S, Vt[:, :45].detach().requires_grad_(), bias), 0.8, 1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "x_shape,out_features,rank,scale",
    [((1000, 131), 150, 128, 0.25), ((5, 257), 259, 256, -1.75), ((7, 300), 18, 1, 3.0)],
    ids=["M1000-r128", "r256", "r1-wide"],
)
def test_ranks_and_rows_beyond_one_tile(backend, x_shape, out_features, rank, scale):
    inputs = make_inputs(x_shape, out_features, rank, torch.float32, torch.float32)
    check_against_oracle(backend, inputs, scale, TOLERANCE[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x_shape", [(0, 24), (2, 0, 24)])
def test_no_rows(backend, x_shape):
    inputs = make_inputs(x_shape, 20, 4, torch.float32, torch.float32)
    check_against_oracle(backend, inputs, 0.5, TOLERANCE[torch.float32])
    x, weight, U, S, Vt, bias = inputs
    y = sorsa_linear(x, weight, U, S, Vt, bias, 0.5, backend=backend)
    grads = torch.autograd.grad(y.sum(), (U, S, Vt))
    assert all(g.abs().sum() == 0 for g in grads), "gradients over no rows must be zero"


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_row_stride_and_other_bias_dtype(backend):
    rows, in_features, row_stride = 3, 45, 1_000_003
    _, weight, U, S, Vt, _ = make_inputs((rows, in_features), 31, 6, torch.float32, torch.float32)
    storage = torch.randn((rows - 1) * row_stride + in_features, device=DEVICE)
    x = storage.as_strided((rows, in_features), (row_stride, 1)).requires_grad_()
    bias = torch.randn(31, device=DEVICE, dtype=torch.float64)
    check_against_oracle(backend, (x, weight, U, S, Vt, bias), 0.8, TOLERANCE[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_some_gradients(backend):
    x, weight, U, S, Vt, bias = make_inputs((17, 24), 20, 4, torch.float32, torch.float32)
    x.requires_grad_(False)
    S.requires_grad_(False)
    y = sorsa_linear(x, weight, U, S, Vt, bias, 0.5, backend=backend)
    dU, dVt = torch.autograd.grad(y.sum(), (U, Vt))
    ref = as_float64(x, weight, U, S, Vt, bias)
    ref_dU, ref_dVt = torch.autograd.grad(oracle(*ref, 0.5).sum(), (ref[2], ref[4]))
    assert_close(dU, ref_dU, 1e-4, "dU")
    assert_close(dVt, ref_dVt, 1e-4, "dVt")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    x, weight, U, S, Vt, bias = make_inputs((5, 11), 9, 3, torch.float64, torch.float64)
    bias.requires_grad_()
    fn = lambda x, U, S, Vt, bias: sorsa_linear(x, weight, U, S, Vt, bias, 0.7, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, U, S, Vt, bias))


def test_autocast_casts_activations_like_f_linear():
    x, weight, U, S, Vt, bias = make_inputs((9, 24), 20, 4, torch.float32, torch.float32)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        y = sorsa_linear(x, weight, U, S, Vt, bias, 0.5)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert U.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    assert_close(y, oracle(*as_float64(x, weight, U, S, Vt, bias), 0.5), TOLERANCE[torch.bfloat16], "y")


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    x, weight, U, S, Vt, bias = make_inputs((2, 7, 24), 20, 4, torch.float32, torch.float32)

    def model(x):
        return torch.relu(sorsa_linear(x, weight, U, S, Vt, bias, 0.5, backend=backend)).sum()

    compiled = torch.compile(model, fullgraph=True, backend="aot_eager" if DEVICE.type == "cpu" else "inductor")
    value = compiled(x)
    (grad,) = torch.autograd.grad(value, x)
    ref_value = model(x)
    (ref_grad,) = torch.autograd.grad(ref_value, x)
    assert_close(value, ref_value, 1e-5, "value")
    assert_close(grad, ref_grad, 1e-5, "dx")
    with torch.no_grad():  # the inference op, traced apart (grad mode is part of the guard)
        assert_close(compiled(x[:, :1]), model(x[:, :1]), 1e-5, "value without grad")


BAD_INPUTS = [
    # (mutation of the good inputs, exception, text the message must contain)
    (lambda a: a.update(Vt=a["Vt"][:, :-1]), ValueError, "Vt.shape[1]"),
    (lambda a: a.update(U=a["U"][:-1]), ValueError, "weight.shape[0]"),
    (lambda a: a.update(S=a["S"][:-1]), ValueError, "S.shape[0]"),
    (lambda a: a.update(bias=a["bias"][:-1]), ValueError, "bias.shape[0]"),
    (lambda a: a.update(x=a["x"].long()), TypeError, "x"),
    (lambda a: a.update(U=a["U"].int()), TypeError, "U"),
    (lambda a: a.update(weight=a["weight"].double()), TypeError, "weight"),
    (lambda a: a.update(S=a["S"].double()), TypeError, "S"),
    (lambda a: a.update(Vt=a["Vt"].to("meta")), ValueError, "Vt is on meta"),
    (lambda a: a.update(U=torch.randn(20, 25), S=torch.randn(25), Vt=torch.randn(25, 24)), ValueError, "rank 25"),
    (lambda a: a.update(weight=[[1.0]]), TypeError, "weight"),
    (lambda a: a.update(scale="1"), TypeError, "scale"),
    (lambda a: a.update(S=a["S"][None]), ValueError, "S must be 1-D"),
]


@pytest.mark.parametrize("mutate,error,text", BAD_INPUTS)
def test_bad_input_names_the_argument(mutate, error, text):
    x, weight, U, S, Vt, bias = make_inputs((5, 24), 20, 4, torch.float32, torch.float32)
    args = dict(x=x.detach().cpu(), weight=weight.cpu(), U=U.detach().cpu(), S=S.detach().cpu(), Vt=Vt.detach().cpu(), bias=bias.cpu(), scale=1.0)
    mutate(args)
    with pytest.raises(error, match=text.replace("[", r"\[").replace("]", r"\]")):
        sorsa_linear(**args)


def test_unavailable_backend_says_why():
    x, weight, U, S, Vt, bias = make_inputs((5, 24), 20, 4, torch.float32, torch.float32)
    with pytest.raises(BackendUnavailableError, match="cuda backend"):
        sorsa_linear(x.cpu(), weight.cpu(), U.cpu(), S.cpu(), Vt.cpu(), backend="cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        sorsa_linear(x, weight, U, S, Vt, backend="cudnn")


def test_torch_compile_sees_the_custom_ops():
    # Eager calls reach the backend directly; a traced graph must hold the opaque custom ops.
    from torch._dynamo.backends.common import aot_autograd
    from functorch.compile import make_boxed_func

    graphs = []

    def record(gm, example_inputs):
        graphs.append(str(gm.graph))
        return make_boxed_func(gm.forward)

    x, weight, U, S, Vt, bias = make_inputs((6, 24), 20, 4, torch.float32, torch.float32)
    model = torch.compile(lambda x: sorsa_linear(x, weight, U, S, Vt, bias, 0.5, backend="torch").sum(),
                          fullgraph=True, backend=aot_autograd(fw_compiler=record, bw_compiler=record))  # fmt: skip
    model(x).backward()
    forward_graph, backward_graph = graphs
    assert "sorsa_kernels.linear_forward" in forward_graph and "sorsa_kernels.linear_backward" in backward_graph
    with torch.no_grad():
        model(x)
    assert "sorsa_kernels.linear_infer" in graphs[-1]


TRITON_REASON = why_unavailable("triton", DEVICE)


def kernel_inputs(rows, in_features, out_features, rank, dtype, adapter_dtype):
    x, weight, U, S, Vt, _ = make_inputs((rows, in_features), out_features, rank, dtype, adapter_dtype)
    dy = torch.randn(rows, out_features, device=DEVICE).to(dtype)
    return x.detach(), weight, U.detach(), S.detach(), Vt.detach(), dy


@pytest.mark.skipif(TRITON_REASON is not None, reason=f"triton backend: {TRITON_REASON}")
@pytest.mark.parametrize(
    "rows,in_features,out_features,rank,dtype",
    [
        # GPU: bench-like bf16 under float32 adapters; rows and out one 16-row step past whole
        # tiles (edge tiles, partial K blocks, the same compiled kernels as the 4096 shapes).
        pytest.param(4112, 4096, 4112, 128, torch.bfloat16, marks=gpu, id="gpu-bf16"),
        # The one-pass gradient (r <= 32).
        pytest.param(8208, 256, 8208, 7, torch.bfloat16, marks=gpu, id="gpu-bf16-one-pass"),
        # The TMA GEMMs' rank tail prefetched (r <= 32), with edge tiles in rows and columns.
        pytest.param(1000, 4104, 1032, 7, torch.bfloat16, marks=gpu, id="gpu-bf16-prefetched-tail"),
        # The flattened TMA GEMM's tail unrolled at its largest (r = 64: the most shared memory).
        pytest.param(1000, 4104, 1032, 64, torch.bfloat16, marks=gpu, id="gpu-bf16-unrolled-tail"),
        pytest.param(1000, 4095, 1027, 128, torch.float32, marks=gpu, id="gpu-fp32"),
        # Interpreter: 16-bit operands with 16-byte aligned rows take the TMA kernel, others not.
        pytest.param(96, 48, 40, 7, torch.float16, id="fp16-tma"),
        # The flattened TMA GEMM's rank tail in unrolled steps (r <= 64), and as a loop.
        pytest.param(96, 48, 40, 40, torch.float16, id="fp16-tma-unrolled-tail"),
        pytest.param(96, 80, 72, 72, torch.float16, id="fp16-tma-tail-loop"),
        pytest.param(70, 45, 37, 5, torch.float32, id="fp32-pointer"),
        # Few rows: also the one-launch forward of inference.
        pytest.param(3, 48, 40, 7, torch.float16, id="fp16-few"),
        pytest.param(17, 45, 37, 5, torch.float32, id="fp32-few"),
        pytest.param(7, 4096, 4112, 128, torch.bfloat16, marks=gpu, id="gpu-bf16-few"),
        pytest.param(64, 4096, 4112, 128, torch.bfloat16, marks=gpu, id="gpu-bf16-few64"),
    ],
)
def test_every_candidate_config(rows, in_features, out_features, rank, dtype):
    """Each configuration the tuner may choose computes each product right (against PyTorch in
    float32 on the same inputs; z and g, which come out rounded to x's dtype, to float32 accuracy
    before that rounding)."""
    from sorsa_kernels.benchmark.linear_products import FEW_ROWS_PRODUCT, GRADIENT_PASS_PRODUCT, step_products
    from sorsa_kernels.triton import linear

    if DEVICE.type == "cpu" and rows > 100:
        pytest.skip("GPU sizes")
    inputs = kernel_inputs(rows, in_features, out_features, rank, dtype, torch.float32)
    x, _, U, _, Vt, dy = inputs
    scale = 0.75
    products = step_products(*inputs, scale)
    # rank_down's products (and gradient_pass's g), rounded to x's dtype: checked element by element
    # against float64.
    rounded_sums = {"z": (x, Vt.T), "g": (dy, U), GRADIENT_PASS_PRODUCT: (dy, U)}
    if dtype == torch.float16:  # the TMA GEMM of many rows, or the TMA tiles of the few-row forward
        forward = FEW_ROWS_PRODUCT if rows <= linear.FEW_ROWS else "y"
        tiles = [c for p in products if p.name == forward for c in p.candidates]
        assert any(c.tma for c in tiles), f"{forward}: TMA tiles must be among the candidates"
    for product in products:
        references = product.reference()
        tolerance = 1e-4 if product.name in ("z", "g") or dtype == torch.float32 else TOLERANCE[dtype]
        for config in product.candidates:
            with poisoned_allocations():
                for output in product.outputs:
                    output.fill_(float("nan"))
                product.launch(config)
            for output, reference in zip(product.outputs, references):
                if product.name in rounded_sums and output.element_size() == 2:
                    a, b = (t.to(torch.float64) for t in rounded_sums[product.name])
                    exact, magnitude = scale * (a @ b), scale * (a.abs() @ b.abs())
                    assert_faithfully_rounded(output, exact, magnitude, f"{product.name} [{config}]")
                else:
                    assert_close(output, reference, tolerance, f"{product.name} [{config}]")
        product.launch(product.candidates[0])  # the input of later products: computed as the step would


MERGED_CASES = [
    # (x shape, out, rank, dtype, adapter dtype, with S, with bias): odd sizes; on a GPU bfloat16
    # at a bench shape and at odd ones.
    ((130, 45), 53, 7, torch.float16, torch.float32, True, True),
    ((2, 33, 45), 40, 33, torch.float16, torch.float16, False, False),
    ((70, 37), 29, 1, torch.float16, torch.float32, True, True),
    pytest.param((4096, 4096), 11008, 128, torch.bfloat16, torch.float32, True, False, marks=gpu, id="gpu-bench"),
    pytest.param((1000, 4095), 1027, 256, torch.bfloat16, torch.float32, True, True, marks=gpu, id="gpu-odd"),
    pytest.param((65537, 72), 40, 7, torch.bfloat16, torch.bfloat16, False, True, marks=gpu, id="gpu-rows"),
]


@pytest.mark.skipif(TRITON_REASON is not None, reason=f"triton backend: {TRITON_REASON}")
@pytest.mark.parametrize("x_shape,out_features,rank,dtype,adapter_dtype,with_S,with_bias", MERGED_CASES)
def test_inference_by_merged_weight(monkeypatch, x_shape, out_features, rank, dtype, adapter_dtype, with_S, with_bias):
    """The no-grad forward of many 16-bit rows through the merged weight (the way the tuner may
    choose, here taken first) against the float64 oracle."""
    from sorsa_kernels.triton import linear

    monkeypatch.setattr(linear, "_INFER_WAYS", ("merged", "fused"))
    monkeypatch.setattr(linear, "_chosen", {})
    x, weight, U, S, Vt, bias = make_inputs(x_shape, out_features, rank, dtype, adapter_dtype, with_S=with_S,
                                            with_bias=with_bias)  # fmt: skip
    with torch.no_grad(), poisoned_allocations():
        y = sorsa_linear(x, weight, U, S, Vt, bias, -0.6, backend="triton")
    assert y.dtype == dtype and y.shape == (*x_shape[:-1], out_features)
    assert_close(y, oracle(*as_float64(x, weight, U, S, Vt, bias), -0.6), TOLERANCE[dtype], "y")
    # Chosen: the way, and the merge's configuration; no launch of the fused forward.
    assert sorted(key[0] for key in linear._chosen) == ["infer", "merge"]
    assert "merged" in linear._chosen.values()


BESIDE_CASES = [
    # (x shape, out, rank, dtype, with S): odd ranks and row counts, 16-byte aligned rows (the y
    # and dx GEMMs by TMA), in ≤ 2·M (else the backward's way does not apply); on a GPU bfloat16
    # at a bench shape (the passes beside the GEMM start at once there).
    ((130, 48), 56, 7, torch.float16, True),
    ((2, 45, 40), 24, 16, torch.float16, False),
    pytest.param((4112, 4096), 4112, 16, torch.bfloat16, True, marks=gpu, id="gpu-bench"),
    pytest.param((2100, 4104), 1032, 7, torch.bfloat16, True, marks=gpu, id="gpu-odd"),
]


@pytest.mark.skipif(TRITON_REASON is not None, reason=f"triton backend: {TRITON_REASON}")
@pytest.mark.parametrize("x_shape,out_features,rank,dtype,with_S", BESIDE_CASES)
def test_forward_beside(monkeypatch, x_shape, out_features, rank, dtype, with_S):
    """Every way of the forward with z's pass beside the y GEMM (each taken first in turn) through
    the public op, with and without grad, against the float64 oracle (a bias where there is S)."""
    from sorsa_kernels.triton import linear

    inputs = make_inputs(x_shape, out_features, rank, dtype, torch.float32, with_S=with_S, with_bias=with_S)
    x, weight, U, _, Vt, _ = (t.detach() if t is not None else None for t in inputs)
    x = x.reshape(-1, x_shape[-1])
    y = x.new_empty(x.shape[0], out_features)
    z = linear._rank_buffer(x, x.shape[0], rank)
    ways = linear._forward_ways(x, weight.T, Vt.T, linear.scaled_columns(U, None, dtype).T, z, y)
    check_each_way_beside(monkeypatch, "_forward_ways", ways, inputs, TOLERANCE[dtype])


@pytest.mark.skipif(TRITON_REASON is not None, reason=f"triton backend: {TRITON_REASON}")
@pytest.mark.parametrize("x_shape,out_features,rank,dtype,with_S", BESIDE_CASES)
def test_backward_beside(monkeypatch, x_shape, out_features, rank, dtype, with_S):
    """Every way of the backward with dU+dS and dVt beside the dx GEMM (each taken first in turn)
    through the public op, against the float64 oracle."""
    from sorsa_kernels.triton import linear

    inputs = make_inputs(x_shape, out_features, rank, dtype, torch.float32, with_S=with_S)
    x = inputs[0].detach().reshape(-1, x_shape[-1])
    dy = x.new_empty(x.shape[0], out_features)
    z = linear._rank_buffer(dy, x.shape[0], rank)
    ways = linear._backward_ways(dy, x, z, inputs[1], inputs[2].detach(), with_S, z)
    check_each_way_beside(monkeypatch, "_backward_ways", ways, inputs, TOLERANCE[dtype])


def check_each_way_beside(monkeypatch, ways_function: str, ways, inputs, tol):
    """Each of ``ways`` with passes beside a GEMM (at least two), made the first of what the
    Triton backend's ``ways_function`` returns, in turn: the op through it against float64."""
    from sorsa_kernels.triton import linear

    beside = [way for way in ways if way != linear._APART]
    assert len(beside) >= 2, ways
    all_ways = getattr(linear, ways_function)
    for way in beside:
        monkeypatch.setattr(linear, "_chosen", {})
        monkeypatch.setattr(linear, ways_function, lambda *args, way=way: [way, *all_ways(*args)])
        check_against_oracle("triton", inputs, 0.37, tol)
        assert way in linear._chosen.values()


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_graphed_choice_takes_the_least_median_over_rounds(monkeypatch):
    """Timed from graphs, every candidate is timed in each round, the order rotating, and the
    least median wins: one slow timing does not decide (as it does timed once each)."""
    from sorsa_kernels.triton import linear

    timings = {"a": iter([1.0, 9.0, 1.0, 1.0, 1.0]), "b": iter([2.0] * 5)}
    calls = []

    def scripted_ms(run, graphed):
        calls.append(run)
        return next(timings[run])

    monkeypatch.setattr(linear, "_time_ms", scripted_ms)
    monkeypatch.setattr(linear, "_GRAPHED_ROUNDS", 5)
    assert linear._fastest(["a", "b"], lambda c: c, graphed=True) == "a"
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a", "a", "b"]
    timings = {"a": iter([9.0]), "b": iter([2.0])}
    assert linear._fastest(["a", "b"], lambda c: c, graphed=False) == "b"


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_gpu_candidates_cover_every_shape(monkeypatch):
    """Every dtype, row count, rank and alignment has a launch configuration on a GPU (the lists
    there are pruned by shape; the interpreter has its own)."""
    from sorsa_kernels.triton import linear

    monkeypatch.setattr(linear, "_triton_interpreted", lambda: False)
    for size in (2, 4, 8):
        for rows in (1, 3, 16, 64, 65, 1000, 65537):
            for aligned in (True, False):
                assert linear._matmul_candidates(rows, size, tma=False, aligned=aligned), (size, rows, aligned)
                for rank in (1, 7, 128, 256):
                    for kernel in ("rank_down", "row_reduction"):
                        assert linear._skinny_candidates(
                            kernel, rows, 4099, linear._rank_pad(rank), size, 4, torch.device("cpu"), aligned,
                            epilogue_operand=kernel == "row_reduction",
                        ), (kernel, size, rows, rank, aligned)  # fmt: skip


@pytest.mark.slow  # a few minutes on two cores with a cold Triton cache: hundreds of kernels
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_kernels_compile_for_hopper_without_spills():
    pytest.importorskip("triton.knobs", reason="the offline compile follows triton >= 3.4's JIT")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("linear_hopper_compile.py"))],
        env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
