"""Warm up, synchronise, time: the one timing helper that autotune, the measured baseline and `adarun bench` share.

On CUDA, work is queued asynchronously, so a wall-clock reading is only meaningful between two device
synchronisations; the first call of an engine configuration also captures graphs and grows the
allocator, so it is run once untimed. `measure(fn, device)` does both and returns the median run.
`EnergyMeter` reads the GPU's cumulative energy counter through NVML where it exists.

Knows nothing of engines, methods or Ray: it times callables.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


def synchronize(device: torch.device | str) -> None:
    """Wait for queued device work (a no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@dataclass
class Measurement:
    seconds: float  # the median run's wall time
    result: Any  # what fn returned in the median run
    all_seconds: list[float] = field(default_factory=list)
    peak_mem_mib: float | None = None  # peak device memory over the timed runs (CUDA only)


def time_call(fn: Callable[[], Any], device: torch.device | str) -> tuple[Any, float]:
    """(fn(), seconds) with the device synchronised before and after."""
    synchronize(device)
    t = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - t


def measure(fn: Callable[[], Any], device: torch.device | str, warmup: int = 1, repeats: int = 1) -> Measurement:
    """Run fn `warmup` times untimed (graph capture, allocator, kernel selection), then `repeats` timed runs."""
    assert repeats >= 1, f"repeats must be >= 1, got {repeats}"
    for _ in range(warmup):
        fn()
    cuda = torch.device(device).type == "cuda"
    gc.collect()  # garbage that only the cycle collector frees would count in this peak: an earlier method's engine
    # (its compiled methods and captured graphs refer back to it) with its caches, still allocated
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    runs = [time_call(fn, device) for _ in range(repeats)]
    times = [s for _, s in runs]
    i = times.index(statistics.median_low(times))
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    return Measurement(seconds=times[i], result=runs[i][0], all_seconds=times, peak_mem_mib=peak)


class EnergyMeter:
    """The GPU's total-energy counter (millijoules) through NVML; `read()` is None where it cannot be read."""

    def __init__(self, device: str):
        self.handle = None
        if not str(device).startswith("cuda"):
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            vis = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(int(vis) if vis.isdigit() else 0)
            self._read = pynvml.nvmlDeviceGetTotalEnergyConsumption
            self.read()
        except Exception:  # no NVML, or a GPU that does not report energy
            self.handle = None

    def read(self) -> float | None:
        if self.handle is None:
            return None
        try:
            return float(self._read(self.handle))
        except Exception:
            return None

    @staticmethod
    def kwh(start_mj: float | None, end_mj: float | None) -> float | None:
        return (end_mj - start_mj) / 3.6e9 if start_mj is not None and end_mj is not None else None
