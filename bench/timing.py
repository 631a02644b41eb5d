"""Shared timing for the benchmarks: the median of repeated calls after warm-up, in milliseconds."""
from __future__ import annotations

import statistics
import time


def call_times_ms(fn, warmup: int, repeats: int) -> list[float]:
    """The time of each of `repeats` calls of fn, in milliseconds, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return times


def median_ms(fn, warmup: int, repeats: int) -> float:
    return statistics.median(call_times_ms(fn, warmup, repeats))
