"""Backend selection: one table of which backend implements which op, and one resolver.

Every public op takes ``backend="auto"|"torch"|"triton"|"cuda"``. ``"auto"`` defers to the
``SORSA_KERNELS_BACKEND`` environment variable when it is set, and otherwise takes the first
backend in :data:`AUTO_PREFERENCE` that implements the op and runs on the inputs' device.
Asking for a backend that cannot run raises :class:`BackendUnavailableError` saying why.

A backend module implements an op through plain functions of the op's backend interface,
documented in the op's module under ``sorsa_kernels/reference/`` (the torch backend, which is
also the test oracle).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from types import ModuleType

import torch

BACKEND_ENV = "SORSA_KERNELS_BACKEND"
BACKENDS = ("torch", "triton", "cuda")

# op -> backend -> module holding that backend's implementation (imported on first use).
IMPLEMENTATIONS: dict[str, dict[str, str]] = {
    "sorsa_linear": {
        "triton": "sorsa_kernels.triton.linear",
        "torch": "sorsa_kernels.reference.linear",
    },
    "ortho_reg": {
        "triton": "sorsa_kernels.triton.ortho",
        "torch": "sorsa_kernels.reference.ortho",
    },
    "rsvd": {
        "torch": "sorsa_kernels.reference.rsvd",
        "triton": "sorsa_kernels.triton.rsvd",
    },
    "subtract_lowrank": {
        "torch": "sorsa_kernels.reference.lowrank",
        "triton": "sorsa_kernels.triton.lowrank",
    },
    "sora_prox": {
        "torch": "sorsa_kernels.reference.sora",
    },
}

# "auto" takes the first of these that implements the op and can run on the device.
AUTO_PREFERENCE = ("cuda", "triton", "torch")


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that cannot run the op on the given device."""


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def why_unavailable(backend: str, device: torch.device, *, explicit: bool = True) -> str | None:
    """Return why ``backend`` cannot run on ``device``, or ``None`` when it can.

    With ``explicit=False`` (the "auto" choice) the Triton interpreter does not count: it is a
    debugging aid, far slower than the torch backend on a CPU.
    """
    if backend == "torch":
        return None
    if backend == "triton":
        if not _triton_installed():
            return "the triton package is not installed (pip install 'sorsa-kernels[triton]')"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and explicit and _triton_interpreted():
            return None
        return f"Triton kernels need CUDA tensors (got {device.type}; TRITON_INTERPRET=1 runs them on the CPU)"
    if backend == "cuda":
        if device.type != "cuda":
            return f"the CUDA extension needs CUDA tensors (got {device.type})"
        from sorsa_kernels.cuda import load_error

        return load_error()
    raise ValueError(f"unknown backend {backend!r}; expected one of 'auto', {', '.join(map(repr, BACKENDS))}")


def _requested(backend: str) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    name = backend.lower()
    if name == "auto":
        name = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if name != "auto" and name not in BACKENDS:
        source = f"{BACKEND_ENV}={name!r}" if backend.lower() == "auto" else repr(backend)
        raise ValueError(f"unknown backend {source}; expected one of 'auto', {', '.join(map(repr, BACKENDS))}")
    return name


@torch.compiler.assume_constant_result
def resolve(op: str, backend: str, device: torch.device) -> str:
    """Name of the backend that runs ``op`` for inputs on ``device``.

    Raises :class:`BackendUnavailableError` when an explicitly requested backend cannot run.
    ``torch.compile`` treats the answer as a constant of the traced graph.
    """
    return _resolve(op, _requested(backend), device, device.type == "cpu" and _triton_interpreted())


# Every call of an op resolves its backend: the answers are kept, per everything they depend on
# (the environment's backend is read by _requested each call; the interpreter's switch, which
# matters for CPU tensors alone, is part of the key).
@functools.cache
def _resolve(op: str, name: str, device: torch.device, interpreted: bool) -> str:
    implemented = IMPLEMENTATIONS[op]
    if name == "auto":
        for candidate in AUTO_PREFERENCE:
            if candidate in implemented and why_unavailable(candidate, device, explicit=False) is None:
                return candidate
        raise BackendUnavailableError(f"no backend implements {op} on {device.type}")  # torch covers every op
    if name not in implemented:
        raise BackendUnavailableError(
            f"the {name} backend does not implement {op}; available: {', '.join(sorted(implemented))}"
        )
    reason = why_unavailable(name, device)
    if reason is not None:
        raise BackendUnavailableError(f"the {name} backend cannot run {op}: {reason}")
    return name


@functools.cache
def implementation(op: str, backend: str) -> ModuleType:
    """The module implementing ``op`` for an already resolved ``backend`` name."""
    return importlib.import_module(IMPLEMENTATIONS[op][backend])


def available_backends(device: torch.device | str = "cpu") -> dict[str, str | None]:
    """For each backend, ``None`` if it can run on ``device``, else the reason it cannot."""
    device = torch.device(device)
    return {name: why_unavailable(name, device) for name in BACKENDS}
