"""Loader for the compiled ``csrc/`` extension (the "cuda" backend).

The extension is built by ``setup.py`` when a CUDA build of torch and ``nvcc`` are present
(``SORSA_KERNELS_BUILD_CUDA=0`` skips it). When no prebuilt module is importable, the sources
under ``csrc/`` are compiled just in time with ``torch.utils.cpp_extension.load`` on first use
(``SORSA_KERNELS_JIT=0`` disables that). Either way the extension registers its ops with
``torch.library`` under the ``sorsa_kernels_C`` namespace.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from types import ModuleType

import torch

CSRC = Path(__file__).resolve().parents[2] / "csrc"
# Hopper's own instructions (wgmma, TMA) need sm_90a; sm_80 machine code covers Ampere.
NVCC_FLAGS = ["-O3", "-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_80,code=sm_80"]


def cuda_sources() -> list[Path]:
    """The extension's sources, when the package runs from a checkout that has them."""
    if not CSRC.is_dir():
        return []
    return sorted(p for p in CSRC.rglob("*") if p.suffix in (".cu", ".cpp"))


@functools.cache
def _load() -> tuple[ModuleType | None, str | None]:
    try:
        from sorsa_kernels import _C  # built by setup.py

        return _C, None
    except ImportError:
        pass
    if not torch.cuda.is_available():
        return None, "no CUDA device is available"
    sources = cuda_sources()
    if not sources:
        return None, "the extension was not built and csrc/ holds no CUDA sources yet"
    if os.environ.get("SORSA_KERNELS_JIT", "1") == "0":
        return None, "the extension was not built and SORSA_KERNELS_JIT=0 disables the JIT build"
    from torch.utils.cpp_extension import load

    try:
        module = load(
            name="sorsa_kernels_C",
            sources=[str(p) for p in sources],
            extra_cuda_cflags=NVCC_FLAGS,
            verbose=False,
        )
    except (RuntimeError, OSError) as error:  # a compiler failure is a reason, not a crash
        return None, f"the JIT build of csrc/ failed: {error}"
    return module, None


def load_error() -> str | None:
    """``None`` when the extension is loaded, else why it is not."""
    return _load()[1]


def extension() -> ModuleType:
    """The loaded extension module; raises ``RuntimeError`` with the reason when unavailable."""
    module, error = _load()
    if module is None:
        raise RuntimeError(f"sorsa_kernels CUDA extension unavailable: {error}")
    return module
