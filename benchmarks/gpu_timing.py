"""Timing helpers shared by the GPU benchmarks: CUDA-event medians and the device copy bandwidth."""

from __future__ import annotations

import statistics
import time

import torch

GIB = 1024**3


def cuda_timed(fn, repeats: int) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` runs after one warm-up, timed by CUDA events."""
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return round(statistics.median(times), 3)


def copy_bandwidth() -> float:
    """Bytes per second (read + written) of a 2 GiB device-to-device copy, best of 10."""
    src = torch.empty(2 * GIB, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(10):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    del src, dst
    return 2 * 2 * GIB / best
