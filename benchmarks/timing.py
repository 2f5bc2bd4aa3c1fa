"""Timing shared by the benchmark scripts (imported as `timing`: Python puts a script's folder on its path)."""

from __future__ import annotations

import statistics
import time

import torch


def cuda_ms(work, repeats: int = 5, warmup: int = 2) -> float:
    """Median GPU milliseconds of `work()` over `repeats` runs after `warmup` (CUDA events; wall clock without
    a GPU)."""
    times = []
    for i in range(warmup + repeats):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            work()
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end)
        else:
            begin = time.perf_counter()
            work()
            elapsed = (time.perf_counter() - begin) * 1e3
        if i >= warmup:
            times.append(elapsed)
    return statistics.median(times)
