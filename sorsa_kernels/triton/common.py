"""Helpers shared by the Triton backend modules."""

from __future__ import annotations

import contextlib
import ctypes
import functools
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
        capture = _capture_id()
    # The zeroed workspaces the capture took live as long as the graph, which writes to them.
    graph.zeroed_workspaces = _capture_workspaces.pop(capture, [])
    return graph.replay


# ----------------------------------------------------------------------------------------------
# Workspaces kept zeroed
#
# A reduction split across programs adds its parts into zeros. Zeroing a buffer before each call
# is an allocation and a launch of their own on the host, and on an H100 1.0–1.4 µs of a 15–28 µs
# decode forward from CUDA graphs (bench/results/decode-clean-probe-*.txt); instead, the launches
# that use one of these buffers set what they changed back to zero before the last of them ends,
# so a buffer is zeroed once, when made. Calls on one stream run one after another and share a
# buffer; a CUDA graph's launches replay on whatever stream, beside anything else, so each capture
# has buffers of its own: a spare zeroed on the eager calls before it, else one whose zero fill
# the graph records.

_stream_workspaces: dict[tuple[torch.device, int], torch.Tensor] = {}  # (device, stream) -> buffer
_capture_workspaces: dict[int, list[torch.Tensor]] = {}  # capture id -> its buffers, the last in use
_spares: dict[torch.device, torch.Tensor] = {}


def zeroed_workspace(device: torch.device, numel: int) -> torch.Tensor:
    """A float32 buffer of at least ``numel`` zeros on ``device`` for the launches of one call
    on the current stream, which must leave every element they change zero again."""
    if device.type != "cuda":  # the interpreter (one program at a time), or meta tensors
        return _grown(_stream_workspaces, (device, 0), numel, device)
    if torch.cuda.is_current_stream_capturing():
        return _capture_workspace(device, numel)
    buffer = _grown(_stream_workspaces, (device, torch._C._cuda_getCurrentRawStream(device.index)), numel, device)
    _grown(_spares, device, buffer.numel(), device)
    return buffer


def _grown(buffers: dict, key, numel: int, device: torch.device) -> torch.Tensor:
    """``buffers[key]``, replaced by a new zeroed buffer where missing or under ``numel``."""
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = buffers[key] = torch.zeros(numel, dtype=torch.float32, device=device)
    return buffer


def _capture_workspace(device: torch.device, numel: int) -> torch.Tensor:
    capture = _capture_id()
    if capture is None:  # captures not told apart: a buffer for this call alone, zeroed in the graph
        return torch.zeros(numel, dtype=torch.float32, device=device)
    taken = _capture_workspaces.setdefault(capture, [])
    if taken and taken[-1].numel() >= numel:
        return taken[-1]
    spare = _spares.get(device)
    if spare is not None and spare.numel() >= numel:
        taken.append(_spares.pop(device))
    else:
        taken.append(torch.zeros(numel, dtype=torch.float32, device=device))
    return taken[-1]


def _capture_id() -> int | None:
    """The driver's id of the capture under way on the current stream, or None where the driver
    does not tell (no ``cuStreamGetCaptureInfo`` found)."""
    query = _capture_info_query()
    if query is None:
        return None
    function, optional_outputs = query
    status, capture = ctypes.c_int(), ctypes.c_uint64()
    stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
    if function(stream, ctypes.byref(status), ctypes.byref(capture), *[None] * optional_outputs) != 0:
        return None
    return capture.value


@functools.cache
def _capture_info_query():
    """``(cuStreamGetCaptureInfo, how many optional outputs follow the status and the id)``."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    # CUDA 13 names v3 (graph, dependencies, edge data, their count); CUDA 12 v2 (no edge data).
    for name, optional_outputs in (("cuStreamGetCaptureInfo_v3", 4), ("cuStreamGetCaptureInfo_v2", 3)):
        function = getattr(driver, name, None)
        if function is not None:
            function.restype = ctypes.c_int
            return function, optional_outputs
    return None


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
