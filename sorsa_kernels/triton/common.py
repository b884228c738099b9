"""Helpers shared by the Triton backend modules."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import triton
import triton.language as tl
from triton.compiler import CompiledKernel

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # triton < 3.4: no host tensor descriptors
    TensorDescriptor = None

if TensorDescriptor is not None:

    class PlannedDescriptor(TensorDescriptor):
        """A host tensor descriptor for a launch whose plan checked the layout once (16-byte
        aligned base and strides, unit last stride, power-of-two box): Triton's checks, a few
        microseconds per descriptor, are not repeated on every launch."""

        def __post_init__(self):
            pass

else:
    PlannedDescriptor = None


def on_device(device: torch.device):
    """Make ``device`` current while kernels are launched for its tensors (Triton launches on
    the current GPU; layers of one model may sit on several); nothing to do for CPU tensors (the
    interpreter) or a device already current."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def element_offsets(matrices: list[torch.Tensor]) -> tuple[torch.Tensor, bool]:
    """``(offsets, aligned)``: an int64 tensor on the matrices' device with each matrix's start
    in elements from ``matrices[0]`` (a kernel adds it to the first one's pointer), and whether
    every offset is a multiple of 16 elements.

    Addressing by offsets from one pointer argument (rather than by a table of raw pointers)
    keeps the compiler's knowledge of that pointer's 16-byte alignment; with ``aligned`` the
    kernel can assert it for every matrix, and tiles load as wide vectors."""
    first = matrices[0]
    size = first.element_size()
    if any((a.data_ptr() - first.data_ptr()) % size for a in matrices):
        raise ValueError("the matrices must be aligned to their element size")
    offsets = [(a.data_ptr() - first.data_ptr()) // size for a in matrices]
    table = torch.tensor(offsets, dtype=torch.int64).to(first.device, non_blocking=True)
    return table, all(offset % 16 == 0 for offset in offsets)


@triton.jit
def matrix_start(b, offsets, stride, INDIRECT: tl.constexpr, ALIGNED: tl.constexpr):
    """Where batch matrix ``b`` starts, in elements: ``offsets[b]`` from :func:`element_offsets`
    (INDIRECT; a multiple of 16 with ALIGNED), else ``b·stride``."""
    if INDIRECT:
        start = tl.load(offsets + b)
        if ALIGNED:
            start = tl.multiple_of(start, 16)
    else:
        start = b * stride
    return start


def graphed(fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` captured in a CUDA graph (after warm-up runs, which also compile its kernels and pick
    their launch configurations): each replay launches it whole, so its time is the device's
    alone, as in a serving engine's decode (or a training step captured whole)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


# ----------------------------------------------------------------------------------------------
# Direct launches of compiled kernels
#
# ``kernel[grid](...)`` binds and specializes every argument on each call: 19–26 µs of host time
# for rank_down's 16 arguments on the H100 machines measured (bench/host_linear.py), against
# 6–8 µs to launch the compiled kernel, and more than a small layer's kernel takes on the GPU.
# How a compiled kernel takes its arguments changed across Triton releases; the two switches
# below follow it.

# Triton >= 3.3 passes every argument to the launcher, constexprs included; 3.2 only the others.
_LAUNCH_TAKES_CONSTEXPRS = tuple(int(part) for part in triton.__version__.split(".")[:2]) >= (3, 3)

if hasattr(CompiledKernel, "launch_enter_hook"):  # triton < 3.4

    def _launch_hooks():
        return CompiledKernel.launch_enter_hook, CompiledKernel.launch_exit_hook

else:

    def _launch_hooks():
        return triton.knobs.runtime.launch_enter_hook, triton.knobs.runtime.launch_exit_hook


class CompiledLaunch:
    """Launches of one compiled kernel with every argument given in the kernel's order (the
    constexprs too), as Triton's own launch makes them, launch hooks (profilers) included."""

    def __init__(self, compiled: CompiledKernel, kernel: triton.runtime.JITFunction):
        self.compiled = compiled
        # Which arguments the launcher takes (all of them from triton 3.3 on).
        self.passed = None if _LAUNCH_TAKES_CONSTEXPRS else [not param.is_constexpr for param in kernel.params]
        driver = triton.runtime.driver.active
        self._current_device, self._current_stream = driver.get_current_device, driver.get_current_stream

    def __call__(self, grid: tuple[int, int, int], arguments):
        if self.passed is not None:
            arguments = [argument for argument, passed in zip(arguments, self.passed) if passed]
        compiled = self.compiled
        stream = self._current_stream(self._current_device())
        enter, leave = _launch_hooks()
        metadata = None
        if enter is None or not getattr(enter, "calls", True):  # no hook (triton >= 3.4: an empty chain)
            enter = leave = None
        else:
            metadata = compiled.launch_metadata(grid, stream, *arguments)
        compiled.run(*grid, stream, compiled.function, compiled.packed_metadata, metadata, enter, leave, *arguments)


def layout_key(*tensors) -> tuple:
    """What a launch depends on of its tensors (the first one a tensor, the others tensors or
    None, all on one device) besides their data: the device, and each one's shape, strides, dtype
    and whether it starts on 16 bytes (Triton compiles a kernel per pointer alignment). A launch
    whose other arguments are fixed too can repeat as a :class:`KernelLaunch`."""
    return (
        tensors[0].get_device(),
        *[None if t is None else (t.shape, t.stride(), t.dtype, t.data_ptr() % 16 == 0) for t in tensors],
    )


class KernelLaunch:
    """``kernel[grid](*arguments, **constants)`` with the grid, constexprs and compile options
    fixed, to repeat with new tensors: the first call goes through the JIT (which compiles the
    kernel or finds it compiled), the next ones launch the compiled kernel directly. The caller
    keeps one per specialization (see :func:`layout_key`): the same non-tensor arguments on every
    call, tensors of the same dtype, device and alignment. Under the interpreter every call goes
    through the JIT."""

    def __init__(self, kernel: triton.runtime.JITFunction, grid: tuple[int, ...], **constants):
        self.kernel = kernel
        self.grid = grid
        self.constants = constants
        self._grid = (*grid, 1, 1)[:3]
        self._compiled: CompiledLaunch | None = None
        self._constexprs: tuple = ()

    def __call__(self, *arguments):
        if self._compiled is not None:
            self._compiled(self._grid, (*arguments, *self._constexprs))
            return
        compiled = self.kernel[self.grid](*arguments, **self.constants)
        if isinstance(compiled, CompiledKernel):
            # The kernels declare their constexprs after the runtime arguments.
            self._constexprs = tuple(self.constants[param.name] for param in self.kernel.params[len(arguments):])
            self._compiled = CompiledLaunch(compiled, self.kernel)
