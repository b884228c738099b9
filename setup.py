"""Packaging; builds the optional CUDA extension from csrc/ when it can.

The extension is built when csrc/ holds sources, torch is importable with CUDA support and
nvcc is found; otherwise the build is skipped cleanly and the package falls back to a JIT build
on first use (sorsa_kernels/cuda). pip's isolated build environment has no torch: build the
extension with ``pip install --no-build-isolation .``. ``SORSA_KERNELS_BUILD_CUDA=0`` skips it.
"""

import os
import sys

from setuptools import setup


def cuda_build() -> dict:
    if os.environ.get("SORSA_KERNELS_BUILD_CUDA", "1") == "0":
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        print("sorsa-kernels: torch is not importable here; skipping the CUDA extension", file=sys.stderr)
        return {}
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from sorsa_kernels.cuda import NVCC_FLAGS, cuda_sources

    sources = [os.path.relpath(p) for p in cuda_sources()]
    if not sources:
        return {}
    if torch.version.cuda is None or CUDA_HOME is None:
        print("sorsa-kernels: no CUDA torch or nvcc; skipping the CUDA extension", file=sys.stderr)
        return {}
    extension = CUDAExtension(
        "sorsa_kernels._C", sources, extra_compile_args={"cxx": ["-O3"], "nvcc": NVCC_FLAGS}
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension}}


setup(**cuda_build())
