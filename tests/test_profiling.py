"""Opt-in stage timing (sorsa_kernels.profiling) and the stages the rsvd GPU backend marks."""

import pytest
import torch

from sorsa_kernels.ops.rsvd import rsvd_grouped
from sorsa_kernels import profiling
from sorsa_kernels.profiling import record_stages, recording, stage
from support import DEVICE, backend_params


def test_stages_are_exclusive_and_add_up(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(profiling.time, "perf_counter", lambda: clock[0])

    def spend(seconds):
        clock[0] += seconds

    with record_stages() as times:
        assert recording()
        with stage("outer", None):
            spend(2)
            with stage("inner", None):
                spend(3)
            spend(1)
        with stage("inner", None):
            spend(1)
        spend(2)
    assert not recording()
    assert dict(times.calls) == {"outer": 1, "inner": 2}
    assert dict(times.seconds) == {"outer": 3, "inner": 4}
    assert times.outside() == 2 and times.total == 9


def test_stages_do_nothing_unless_recording():
    with stage("ignored", DEVICE):
        pass
    with record_stages() as times:
        pass
    assert dict(times.seconds) == {} and times.total >= 0
    with record_stages(), pytest.raises(RuntimeError, match="nested"):
        with record_stages():
            pass


@pytest.mark.parametrize("backend", [p for p in backend_params("rsvd") if p.values[0] == "triton"])
def test_gpu_backend_marks_its_stages(backend):
    weights = [torch.randn(48, 40, device=DEVICE) for _ in range(2)]
    with record_stages(DEVICE) as times:
        rsvd_grouped(weights, 3, niter=2, backend=backend)
    expected = {
        "sketch", "products with the weights", "orthonormalization", "shift estimate",
        "projection and its Gram matrix", "small eigh (host, incl. transfers)", "eigenvector refinement", "Ritz vectors",
    }
    assert set(times.seconds) == expected
    assert times.calls["products with the weights"] == 3 and times.calls["shift estimate"] == 1
