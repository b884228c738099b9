"""Direct launches of compiled Triton kernels (sorsa_kernels/triton/common.py): the key a launch
is kept under distinguishes whatever Triton compiles separately, and a repeated launch computes
what the first did; workspaces kept zeroed stay zeroed, eagerly and from CUDA graphs."""

from unittest import mock

import pytest
import torch

from sorsa_kernels.triton import common
from support import DEVICE, TOLERANCE, as_float64, assert_close, gpu
from test_linear import TRITON_REASON, check_against_oracle, make_inputs, oracle

try:
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
except ImportError:  # triton < 3.4 specializes in Python, under other names
    native_specialize_impl = None


def _tensors():
    storage = torch.zeros(512, dtype=torch.float16)
    views = [storage, storage[1:], storage[4:], storage[8:], storage[8:].view(torch.bfloat16), storage.float()]
    views += [storage.view(16, 32), storage.view(32, 16), storage.view(16, 32)[:, :16], storage[8:264].view(16, 16)]
    return views + [None]


def _key(tensor):
    """The launch key of ``tensor`` as a launch's second operand (the first is always a tensor)."""
    return common.layout_key(torch.zeros(1), tensor)


@pytest.mark.skipif(native_specialize_impl is None, reason="this triton has no native_specialize_impl to compare with")
def test_layout_key_distinguishes_what_triton_compiles_apart():
    tensors = _tensors()
    ours = [_key(t) for t in tensors]
    triton_keys = [native_specialize_impl(BaseBackend, t, False, True, True) for t in tensors]
    for i in range(len(tensors)):
        for j in range(len(tensors)):
            if triton_keys[i] != triton_keys[j]:
                assert ours[i] != ours[j], f"tensors {i} and {j} compile apart but share a key"


def test_layout_key_distinguishes_layouts():
    """A plan keeps its tensors' shapes and strides: tensors that differ in either differ in key."""
    tensors = _tensors()
    keys = [_key(t) for t in tensors]
    layouts = [None if t is None else (t.shape, t.stride(), t.dtype, t.data_ptr() % 16 == 0) for t in tensors]
    for i in range(len(tensors)):
        for j in range(len(tensors)):
            if layouts[i] != layouts[j]:
                assert keys[i] != keys[j], f"tensors {i} and {j} share a key"


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_repeated_launches_compute_the_same(dtype):
    """Calls of one shape after the first launch the compiled kernels directly: new data at other
    addresses, inputs that are no longer 16-byte aligned and row counts that Triton specializes
    on (1, multiples of 16) must each come out right."""
    direct = mock.Mock(wraps=common.CompiledLaunch.__call__)
    with mock.patch.object(common.CompiledLaunch, "__call__", lambda self, *args: direct(self, *args)):
        for rows, offset in [(33, 0), (33, 0), (33, 1), (33, 1), (48, 0), (48, 0), (1, 0), (1, 0), (1, 1)]:
            x, weight, U, S, Vt, bias = make_inputs((rows, 97), 80, 7, dtype, torch.float32)
            x = torch.randn(rows, 97 + offset, device=x.device).to(dtype)[:, offset:].requires_grad_()
            check_against_oracle("triton", (x, weight, U, S, Vt, bias), 0.5, TOLERANCE[dtype])
    assert direct.call_count > 0, "no launch went the direct way"


@gpu
@pytest.mark.skipif(not hasattr(common.triton, "knobs"), reason="launch hooks live on CompiledKernel before triton 3.4")
def test_direct_launches_call_launch_hooks():
    launched = []

    def hook(metadata):
        launched.append(metadata.get()["name"])

    inputs = make_inputs((40, 64), 48, 4, torch.float32, torch.float32)
    check_against_oracle("triton", inputs, 1.0, TOLERANCE[torch.float32])  # compiles
    direct = mock.Mock(wraps=common.CompiledLaunch.__call__)
    common.triton.knobs.runtime.launch_enter_hook.add(hook)
    try:
        with mock.patch.object(common.CompiledLaunch, "__call__", lambda self, *args: direct(self, *args)):
            check_against_oracle("triton", inputs, 1.0, TOLERANCE[torch.float32])
    finally:
        common.triton.knobs.runtime.launch_enter_hook.remove(hook)
    assert direct.call_count > 0, "no launch went the direct way"
    assert len(launched) == direct.call_count, "a direct launch skipped the hook (or a launch was not direct)"
    assert any("rank_down" in name for name in launched), launched


def _decode_inputs(rows, in_features, out_features, rank, dtype):
    x, weight, U, S, Vt, bias = make_inputs((rows, in_features), out_features, rank, dtype, torch.float32)
    return x.detach(), weight, U.detach(), S.detach(), Vt.detach(), bias


def _decode_reference(inputs, scale):
    return oracle(*as_float64(*inputs), scale)


def _assert_zeroed(workspaces):
    for workspace in workspaces:
        assert torch.count_nonzero(workspace) == 0, "a launch left its workspace dirty"


@pytest.mark.skipif(TRITON_REASON is not None, reason=f"triton backend: {TRITON_REASON}")
@pytest.mark.parametrize(
    "rows,in_features,out_features,rank,dtype",
    [
        pytest.param(3, 48, 40, 7, torch.float16, id="fp16"),
        pytest.param(17, 45, 37, 5, torch.float32, id="fp32"),
        # A rank over two tail steps: the split product's parts each add a share of the tail.
        pytest.param(5, 48, 40, 33, torch.float16, id="fp16-shared-tail"),
        pytest.param(64, 4096, 1030, 128, torch.bfloat16, marks=gpu, id="gpu-bf16"),
    ],
)
def test_decode_forward_leaves_its_workspace_zeroed(rows, in_features, out_features, rank, dtype):
    """Every configuration of the decode forward (t's K loop split, and the product's where the
    configuration says so) sets its workspace back to zeros, so the next call, of any
    configuration, adds into zeros: each one twice in a row comes out right."""
    from sorsa_kernels.triton import linear

    inputs = _decode_inputs(rows, in_features, out_features, rank, dtype)
    x, weight, U, S, Vt, bias = inputs
    y = torch.empty(rows, out_features, device=DEVICE, dtype=dtype)
    reference = _decode_reference(inputs, 0.75)
    configs = linear.few_rows_candidates(x, weight, y)
    assert any(c.split > 1 for c in configs), "no configuration splits the product"
    for config in configs:
        for call in range(2):
            y.fill_(float("nan"))
            linear.few_rows_forward(x, weight, U, S, Vt, bias, 0.75, y, config)
            assert_close(y, reference, TOLERANCE[dtype], f"call {call} [{config}]")
        _assert_zeroed(common._stream_workspaces.values())


@gpu
def test_decode_forward_from_cuda_graphs():
    """Graphs captured one after another on one stream, each with its own zeroed workspace (the
    first a spare zeroed before it, the second one its own fill zeroes), replayed in any order
    and between eager calls, with new inputs each time, come out right and leave their
    workspaces zeroed."""
    from sorsa_kernels.triton import linear

    shapes = [(1, 4096, 1030, 128), (64, 4096, 4112, 16)]
    layers = [_decode_inputs(*shape, torch.bfloat16) for shape in shapes]
    outputs = [torch.empty(shape[0], shape[2], device=DEVICE, dtype=torch.bfloat16) for shape in shapes]

    def forward(layer):
        linear.few_rows_forward(*layers[layer], 0.5, outputs[layer])

    for layer in range(len(layers)):
        forward(layer)  # tunes, and makes the stream's workspace and a spare
    graphs, captured = [], []
    for layer in range(len(layers)):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            forward(layer)
            forward(layer)
            captured.append(common._capture_id())
        graphs.append(graph)
    assert None not in captured and len(set(captured)) == len(captured), captured
    assert all(len(common._capture_workspaces[capture]) == 1 for capture in captured)

    for step, layer in enumerate([1, 0, 0, 1, 1, 0]):
        for tensor in layers[layer][:1] + layers[layer][4:5]:  # new x and Vt in place
            tensor.copy_(torch.randn_like(tensor, dtype=torch.float32) / tensor.shape[-1] ** 0.5)
        outputs[layer].fill_(float("nan"))
        if step % 3 == 2:
            forward(layer)
        else:
            graphs[layer].replay()
        assert_close(outputs[layer], _decode_reference(layers[layer], 0.5), TOLERANCE[torch.bfloat16], f"step {step}")
    torch.cuda.synchronize()
    _assert_zeroed([w for capture in captured for w in common._capture_workspaces[capture]])
    _assert_zeroed(common._stream_workspaces.values())
