"""Timing, memory and result-file helpers shared by the benchmark suites."""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def environment() -> dict:
    """Where and with what a result was measured."""
    versions = {}
    for package in ("torch", "triton", "transformers", "peft"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "cuda": torch.version.cuda if cuda else None,
        "versions": versions,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def activation_dtype(device: torch.device) -> torch.dtype:
    """The suites' activations and frozen weights: bfloat16 on a GPU, as in a
    ``Trainer(bf16=True)`` run; float32 in the small CPU configuration."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def activation_autocast(device: torch.device):
    """bfloat16 autocast on a GPU, as ``Trainer(bf16=True)`` runs a step; none on the CPU."""
    if device.type == "cuda":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def median_ms(fn: Callable[[], object], *, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median time of ``fn`` in milliseconds: CUDA events via ``triton.testing.do_bench`` on a
    GPU, the wall clock on a CPU."""
    if torch.cuda.is_available():
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-6)
    times = []
    for _ in range(max(3, min(50, int(rep_ms / 1000 / once)))):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def synchronize(device) -> None:
    """Wait for ``device``'s queued work (nothing to wait for on a CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def idle_host_ms(fn: Callable[[], object], device, calls: int = 5) -> float:
    """Time for one call of ``fn`` to return, started with nothing queued on ``device``, the
    median of ``calls``: the host's time, plus any wait for the device inside the call (a call
    of more launches than the launch queue holds waits for room): an upper bound on the former."""
    times = []
    for _ in range(calls):
        synchronize(device)
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    synchronize(device)
    return statistics.median(times) * 1000


def interleaved_ms(fns: dict[str, Callable[[], object]], *, rounds: int = 5, rep_ms: float = 20) -> dict[str, list[float]]:
    """Per-round median times (ms) of each of ``fns``, timed in turn for ``rounds`` rounds (the
    order rotating each round) after one warm-up of each. A GPU's speed drifts within a run: on
    an H100 the same product's 20 ms rounds a few seconds apart differed by up to 31 % (once
    70 %). Timed side by side in short turns, candidates see the same drift, and the ratio of two
    is best taken round by round (:func:`median_ratio`)."""
    names = list(fns)
    for name in names:
        median_ms(fns[name], rep_ms=rep_ms)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            times[name].append(median_ms(fns[name], warmup_ms=5, rep_ms=rep_ms))
    return times


def median_ratio(numerator: list[float], denominator: list[float]) -> float:
    """The median over rounds of the ratio of two candidates' times of :func:`interleaved_ms`."""
    return statistics.median(n / d for n, d in zip(numerator, denominator))


def peak_memory_mb(fn: Callable[[], object]) -> float | None:
    """Peak CUDA memory allocated while ``fn`` runs, above what was allocated before (None on CPU)."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def write_results(suite: str, rows: list[dict], directory: str | Path = "bench/results", **meta) -> Path:
    """Store one suite's rows with the environment as ``<directory>/<suite>-<device>-<date>.json``."""
    env = environment()
    slug = "".join(c if c.isalnum() else "-" for c in env["device"].lower()).strip("-")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{suite}-{slug}-{env['date'][:10]}.json"
    path.write_text(json.dumps({"suite": suite, "environment": env, **meta, "rows": rows}, indent=1) + "\n")
    return path


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A plain text table of ``columns`` (floats to 3 significant digits)."""
    cells = [[f"{row.get(c):.3g}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)
