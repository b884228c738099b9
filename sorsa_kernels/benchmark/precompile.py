"""Compile Triton kernels before their first launch, many at once, for any CUDA target.

A launch function of :mod:`sorsa_kernels.triton.linear` called on meta tensors inside
:func:`captured_launches` records its kernel launches instead of running them; each record then
compiles exactly as ``JITFunction.run`` would compile it (same specialization, options and cache
key), so a later real launch finds its binary in Triton's cache. :func:`compile_all` compiles
records in parallel processes: a benchmark precompiles its whole configuration space in a
fraction of the serial time, and a GPU-less machine compiles for sm_90 to check shared memory
and register spills (tests/linear_hopper_compile.py).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import re
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import triton
from triton import knobs
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature


@dataclass
class Launch:
    """One captured launch: the kernel and the arguments ``kernel[grid](*args, **kwargs)`` got."""

    kernel: triton.runtime.JITFunction
    args: tuple
    kwargs: dict

    def key(self) -> tuple:
        """What the compiled binary depends on (type and divisibility of each argument, constexprs)."""
        spec = tuple(native_specialize_impl(BaseBackend, a, False, True, True) for a in self.args)
        return self.kernel.fn.__qualname__, spec, tuple(sorted((k, repr(v)) for k, v in self.kwargs.items()))


@contextlib.contextmanager
def captured_launches(kernels):
    """Within the block, launches of ``kernels`` are appended to the yielded list, not run."""
    launches: list[Launch] = []
    for kernel in kernels:

        def run(*args, grid, warmup, _kernel=kernel, **kwargs):
            launches.append(Launch(_kernel, args, kwargs))

        kernel.run = run
    try:
        yield launches
    finally:
        for kernel in kernels:
            del kernel.run  # the class's JITFunction.run again


def compile_launch(launch: Launch, target: GPUTarget):
    """Compile ``launch`` for ``target`` as ``JITFunction.run`` does (so into the same cache entry)."""
    kernel = launch.kernel
    backend = make_backend(target)
    kwargs = dict(launch.kwargs)
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


def resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, stack frame bytes per thread) of a compiled kernel, as cuobjdump
    reports them; Triton kernels keep no local arrays, so a stack frame holds register spills."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as file:
        file.write(cubin)
    try:
        info = subprocess.run([cuobjdump, "-res-usage", file.name], capture_output=True, text=True, check=True)
    finally:
        os.unlink(file.name)
    registers = max(map(int, re.findall(r"REG:(\d+)", info.stdout)), default=-1)
    stack = max(map(int, re.findall(r"STACK:(\d+)", info.stdout)), default=0)
    return registers, stack


_JOBS: list = []  # (launch, target, summarize) for the forked workers of compile_all


def _compile_job(index: int):
    launch, target, summarize = _JOBS[index]
    try:
        compiled = compile_launch(launch, target)
    except Exception as error:  # reported with the launch that raised it
        return f"{type(error).__name__}: {str(error)[-1500:]}"
    return summarize(compiled) if summarize else None


def compile_all(launches: list[Launch], target: GPUTarget, workers: int | None = None, summarize=None) -> list:
    """Compile ``launches`` (duplicates once) in up to ``workers`` forked processes; per launch,
    ``summarize(compiled)`` (picklable result), or a string naming the error it raised. Fork
    before this process initializes CUDA: the workers only compile."""
    unique = {}
    for launch in launches:
        unique.setdefault(launch.key(), launch)
    _JOBS[:] = [(launch, target, summarize) for launch in unique.values()]
    workers = max(1, min(workers or os.cpu_count() or 1, len(_JOBS)))
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        results = dict(zip(unique, pool.map(_compile_job, range(len(_JOBS)))))
    _JOBS.clear()
    return [results[launch.key()] for launch in launches]
