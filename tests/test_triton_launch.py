"""Direct launches of compiled Triton kernels (sorsa_kernels/triton/common.py): the key a launch
is kept under distinguishes whatever Triton compiles separately, and a repeated launch computes
what the first did."""

from unittest import mock

import pytest
import torch

from sorsa_kernels.triton import common
from support import TOLERANCE, gpu
from test_linear import check_against_oracle, make_inputs

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
