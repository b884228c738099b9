"""Opt-in stage timing: where a long computation on the device spends its time.

Code marks its stages with ``with stage("products", device): ...``. Outside
:func:`record_stages` a stage costs one global lookup and changes nothing (no synchronization,
no overlap lost). Inside it, each stage synchronizes the device on entry and exit and adds its
wall time to the record, *exclusive* of the stages nested in it; the time outside every stage is
the host's own work (Python, launches that no stage covers). Synchronizing serializes what
normally overlaps (device work with host work, one chunk's host work with the next chunk's
device work), so a recorded run is slower than a plain one: its record says what each stage
costs alone, the plain run what they cost together.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import torch


class StageTimes:
    """Seconds and entries per stage name, in the order stages were first entered."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.total = 0.0
        self._open: list[list] = []  # [name, start of its current exclusive interval]

    def outside(self) -> float:
        """Wall time of the recording not spent inside any stage."""
        return self.total - sum(self.seconds.values())


_recording: StageTimes | None = None


def recording() -> bool:
    """Whether a :func:`record_stages` block is active (stages then synchronize)."""
    return _recording is not None


def _synchronize(device) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def record_stages(device=None):
    """Record the stages run inside the block; yields the :class:`StageTimes` (filled on exit)."""
    global _recording
    if _recording is not None:
        raise RuntimeError("record_stages blocks cannot be nested")
    times = StageTimes()
    _synchronize(device)
    start = time.perf_counter()
    _recording = times
    try:
        yield times
    finally:
        _synchronize(device)
        times.total = time.perf_counter() - start
        _recording = None


@contextlib.contextmanager
def stage(name: str, device):
    """Attribute the block's time on ``device`` to ``name`` while recording; a no-op otherwise."""
    times = _recording
    if times is None:
        yield
        return
    _synchronize(device)
    now = time.perf_counter()
    if times._open:  # the enclosing stage pauses
        parent = times._open[-1]
        times.seconds[parent[0]] += now - parent[1]
    times._open.append([name, now])
    times.calls[name] += 1
    try:
        yield
    finally:
        _synchronize(device)
        now = time.perf_counter()
        times.seconds[name] += now - times._open.pop()[1]
        if times._open:
            times._open[-1][1] = now
