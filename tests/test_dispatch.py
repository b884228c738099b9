"""The backend table and its resolver."""

import importlib

import pytest
import torch

from sorsa_kernels import BackendUnavailableError, available_backends
from sorsa_kernels.backends import AUTO_PREFERENCE, BACKEND_ENV, IMPLEMENTATIONS, resolve


def test_every_op_has_the_torch_backend():
    assert all("torch" in backends for backends in IMPLEMENTATIONS.values())
    assert set(AUTO_PREFERENCE) == {"torch", "triton", "cuda"}


def test_auto_on_cpu_is_torch(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter never counts for "auto"
    for op in IMPLEMENTATIONS:
        assert resolve(op, "auto", torch.device("cpu")) == "torch"


def test_environment_variable_steers_auto(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "cuda")
    with pytest.raises(BackendUnavailableError, match="cuda"):
        resolve("sorsa_linear", "auto", torch.device("cpu"))
    assert resolve("sorsa_linear", "torch", torch.device("cpu")) == "torch"  # explicit wins
    monkeypatch.setenv(BACKEND_ENV, "tpu")
    with pytest.raises(ValueError, match="SORSA_KERNELS_BACKEND='tpu'"):
        resolve("sorsa_linear", "auto", torch.device("cpu"))


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = available_backends("cpu")["triton"]
    assert reason is not None and "TRITON_INTERPRET=1" in reason
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert available_backends("cpu")["triton"] is None


def test_bad_backend_values():
    with pytest.raises(TypeError, match="backend must be a string"):
        resolve("rsvd", 3, torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        resolve("rsvd", "gpu", torch.device("cpu"))


INTERFACES = {
    "rsvd": ("rsvd", "rsvd_grouped", "rsvd_grouped_start", "working_bytes"),
    "subtract_lowrank": ("subtract_lowrank_", "subtract_lowrank_grouped_"),
}


@pytest.mark.parametrize("op", sorted(INTERFACES))
def test_backends_implement_the_whole_interface(op):
    for backend, module_name in IMPLEMENTATIONS[op].items():
        if backend == "triton":
            pytest.importorskip("triton")
        module = importlib.import_module(module_name)
        missing = [name for name in INTERFACES[op] if not callable(getattr(module, name, None))]
        assert not missing, f"{module_name} lacks {missing}"
