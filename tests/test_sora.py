"""sora_prox_: the textbook soft-threshold, in place."""

import pytest
import torch

from sorsa_kernels import sora_prox_
from support import DEVICE, backend_params

BACKENDS = backend_params("sora_prox")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_soft_threshold_in_place(backend, dtype):
    gates = [torch.randn(n, device=DEVICE).to(dtype) for n in (1, 7, 130)] + [torch.randn(1, 19, device=DEVICE).to(dtype)]
    originals = [g.clone() for g in gates]
    storages = [g.data_ptr() for g in gates]
    sora_prox_(gates, 0.3, backend=backend)
    for g, g0, ptr in zip(gates, originals, storages):
        assert g.data_ptr() == ptr
        exact = g0.double()
        expected = torch.where(exact.abs() <= 0.3, torch.zeros_like(exact), exact - 0.3 * exact.sign()).to(dtype)
        # |g| − λ cancels: float32 arithmetic (float64 for float64) is exact to a unit in the last
        # place of |g| + λ, and the rounding to the gate's dtype adds one of the result.
        bound = torch.finfo(dtype).eps * (exact.abs() + 0.3)
        assert ((g.double() - expected.double()).abs() <= bound).all()
        assert torch.equal(g == 0, expected == 0)


def test_zero_threshold_is_identity_and_single_tensor_accepted():
    g = torch.randn(9, device=DEVICE)
    before = g.clone()
    sora_prox_(g, 0.0)
    assert torch.equal(g, before)


@pytest.mark.parametrize(
    "gates,threshold,error,text",
    [
        ([torch.ones(3)], -0.1, ValueError, "threshold must be >= 0"),
        ([torch.ones(3, dtype=torch.int64)], 0.1, TypeError, r"gates\[0\]"),
        ([torch.ones(3), torch.ones(2, device="meta")], 0.1, ValueError, r"gates\[1\] is on meta"),
        ([torch.ones(3)], "0.1", TypeError, "threshold"),
    ],
)
def test_bad_input(gates, threshold, error, text):
    with pytest.raises(error, match=text):
        sora_prox_(gates, threshold)
