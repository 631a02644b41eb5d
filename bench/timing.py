"""Shared timing for the benchmarks: the median of repeated calls after warm-up, in milliseconds."""
from __future__ import annotations

import statistics
import time


def median_ms(fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)
